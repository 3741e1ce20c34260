"""``mailstrom tlsrpt``: the daily TLS reports (RFC 8460) of the sessions workers counted.

For every policy domain with counted sessions on the day, the domain's ``_smtp._tls`` TXT
record is looked up; a domain that publishes one with a ``rua`` gets its report written as
a JSON file and, with ``--send``, sent: ``mailto:`` addresses get a queued message (the
worker delivers it, DKIM-signed when signing is configured; not for an address whose
domain routes to this host or a private network, as for a POST), ``https:`` URLs a POST
(:func:`~mailstrom.tlsrpt.deliver.post_reports`: through the same resolver as the TXT
lookups, never to this host or a private network unless ``allow_loopback``; eight at a
time, each within ``--post-timeout``, after every report is written and mailed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_CANTCREAT, EX_NOINPUT, EX_OK, EX_TEMPFAIL, CLIError, UsageError
from mailstrom.cli.output import echo, print_json
from mailstrom.cli.parsing import Subparsers, path_arg, setting_arg
from mailstrom.config import Config
from mailstrom.errors import MailstromError
from mailstrom.mtasts.fetch import DNSTrouble, require_httpx, txt_records
from mailstrom.routing import Router, make_resolver
from mailstrom.settings import KEYS
from mailstrom.stores.base import Store

if TYPE_CHECKING:
    import dns.asyncresolver

    from mailstrom.tlsrpt.report import Report, Reporter
    from mailstrom.tlsrpt.sessions import TLSSessions

# The report builder, its delivery and the client's prepare step are loaded by this
# command when it runs, not by every command's start-up.

EPILOG = """\
examples:
  mailstrom tlsrpt                                   # yesterday's reports, into .
  mailstrom tlsrpt --date 2026-11-29 --out /var/lib/mailstrom/tlsrpt
  mailstrom tlsrpt --send --organization "Example Inc." --contact tls@example.com
  mailstrom tlsrpt --send --post-timeout 10s         # give each POST 10 s, not 30

exit code: 0 when every report was written (and sent, with --send), 64 for a bad
option, 66 when the record of earlier runs' sending in --out cannot be read, 73 when a
report (or that record, or the day's lock file) could not be written to --out (disk
full, no access; the other domains' are written and sent), 75 when a report could not
be sent for now or a DNS lookup failed (run it again: what was sent is not sent twice),
or another --send run of the same day is sending (nothing sent). A
domain whose _smtp._tls record is unusable (two TLSRPTv1 records, no rua) gets no
report, as one without a record: no failure of the run (RFC 8460 section 3); nor is
a rua URI that fails for good (no valid address or URL, only refused addresses, a 4xx
answer), shown as "FAILED for good".
"""

MAX_LOOKUPS = 32
"""``_smtp._tls`` TXT lookups in flight at once."""

POST_TIMEOUT_KEY = "tlsrpt.post_timeout"


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tlsrpt",
        parents=parents,
        help="write (and send) the daily TLS reports of RFC 8460",
        description="Turn one UTC day's counted TLS sessions into a JSON report for each "
        "policy domain that publishes a _smtp._tls TXT record with rua, write it, and "
        "with --send deliver it (mailto: as queued mail, https: as a POST).",
        epilog=EPILOG,
    )
    p.add_argument(
        "--date", metavar="YYYY-MM-DD", help="the UTC day to report (default: yesterday)"
    )
    # An empty value ("$CONTACT" unset) is refused, as the settings refuse one: it fell
    # back to the setting or the default without a word (--out to the working directory).
    p.add_argument(
        "--out", metavar="DIR", default=".", type=_out_arg, help="where to write the reports (.)"
    )
    p.add_argument("--send", action="store_true", help="send each report to its rua")
    p.add_argument(
        "--organization",
        type=setting_arg("tlsrpt.organization", "--organization"),
        help="organization-name (tlsrpt.organization, else the domain of the From of "
        "mailed reports, else the HELO name)",
    )
    p.add_argument(
        "--contact",
        type=setting_arg("tlsrpt.contact", "--contact"),
        help="contact-info (tlsrpt.contact, else postmaster@HELO name)",
    )
    p.add_argument(
        "--from",
        dest="sender",
        type=setting_arg("tlsrpt.from", "--from"),
        metavar="ADDRESS",
        help="From of mailed reports (tlsrpt.from, else the contact)",
    )
    p.add_argument(
        "--post-timeout",
        metavar="SECONDS",
        type=setting_arg(POST_TIMEOUT_KEY, "--post-timeout"),
        help="time each https: POST may take in all, e.g. 10 or 10s or 500ms "
        f"({POST_TIMEOUT_KEY}, else 30 s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=tlsrpt_command)


def _out_arg(text: str) -> str:
    """An argparse ``type`` for ``--out``: a directory's path, not empty."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got ''")
    return path_arg(text)


@dataclass(slots=True, kw_only=True)
class Delivery:
    uri: str
    ok: bool
    detail: str
    permanent: bool = False
    """Failed for good: the URI (the policy domain's) refuses it however often it is
    tried, so it is no failure of the run, which running again would not mend."""


@dataclass(slots=True, kw_only=True)
class DomainReport:
    domain: str
    rua: list[str] = field(default_factory=list)
    file: str | None = None
    report_id: str | None = None
    problem: str | None = None
    sent: list[Delivery] = field(default_factory=list)


def _day(text: str | None) -> date:
    """The day of ``--date``: YYYY-MM-DD only, not the basic (``20300102``) or week
    (``2030-W01-3``) forms date.fromisoformat() also reads since Python 3.11."""
    if text is None:
        return utc_now().date() - timedelta(days=1)
    try:
        if not _ISO_DATE.fullmatch(text):
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--date: expected YYYY-MM-DD, got {text!r}") from None


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class _LookupFailed:
    """A ``_smtp._tls`` lookup that failed (SERVFAIL, a timeout): the run fails, since the
    next one may get an answer. An unusable record is no failure of the run: it is the
    policy domain's to change, and until then it wants no report (RFC 8460 §3)."""

    problem: str


async def _rua(
    resolver: dns.asyncresolver.Resolver, domains: list[str]
) -> dict[str, list[str] | str | _LookupFailed | None]:
    """Each domain's rua URIs, None without a record, why its record is unusable (text),
    or why the lookup failed."""
    from mailstrom.tlsrpt.report import ReportRecordError
    from mailstrom.tlsrpt.report import parse_tlsrpt_record as parse_record

    # Every recipient domain of the day may be here (no-policy-found sessions count too):
    # a bounded number of lookups at a time, not one burst of thousands.
    lookups = asyncio.Semaphore(MAX_LOOKUPS)

    async def one(domain: str) -> list[str] | str | _LookupFailed | None:
        try:
            async with lookups:
                records, _ = await txt_records(resolver, f"_smtp._tls.{domain}")
            return parse_record(records)
        except DNSTrouble as exc:
            return _LookupFailed(str(exc))
        except ReportRecordError as exc:
            return f"_smtp._tls record unusable: {exc.reason}"

    found = await asyncio.gather(*(one(d) for d in domains))
    return dict(zip(domains, found, strict=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Job:
    """What one run reports, where it writes, and how it sends."""

    config: Config
    store: Store
    day: date
    reporter: Reporter
    out: Path
    send: bool
    sender: str
    post_timeout: float


def _post_timeout(given: str | None, values: Mapping[str, Any]) -> float:
    """Seconds per POST: the option's (checked by argparse), else the setting's (checked
    when the settings were loaded), else the default."""
    from mailstrom.tlsrpt.deliver import POST_TIMEOUT

    raw = given if given is not None else values.get(POST_TIMEOUT_KEY)
    if raw is None:
        return POST_TIMEOUT
    duration: timedelta = KEYS[POST_TIMEOUT_KEY](POST_TIMEOUT_KEY, raw)
    return duration.total_seconds()


def tlsrpt_command(args: argparse.Namespace) -> int:
    from mailstrom.tlsrpt.report import Reporter

    settings = settings_from(args)
    config = settings.config
    values = settings.values
    day = _day(args.date)
    contact = args.contact or values.get("tlsrpt.contact") or f"postmaster@{config.helo_name}"
    sender = args.sender or values.get("tlsrpt.from") or contact
    submitter = _reporting_domain(sender) or config.helo_name
    reporter = Reporter(
        organization=args.organization or values.get("tlsrpt.organization") or submitter,
        contact=contact,
        submitter=submitter,
    )
    post_timeout = _post_timeout(args.post_timeout, values)
    out = Path(args.out)
    try:
        is_dir = out.is_dir()
    except OSError as exc:  # is_dir answers False only for "no such file": not a long name
        raise UsageError(f"--out: {exc.strerror or exc}: {args.out}") from None
    if not is_dir:
        raise UsageError(f"--out: {out} is not a directory")
    if args.send:
        require_httpx()
    # With --send it queues the mailto: reports: a store that outlasts the command.
    sending = _day_lock(out, day) if args.send else contextlib.nullcontext()
    with sending, store_from(settings, read_only=not args.send) as store:
        job = _Job(
            config=config,
            store=store,
            day=day,
            reporter=reporter,
            out=out,
            send=args.send,
            sender=sender,
            post_timeout=post_timeout,
        )
        # One event loop for the lookups and the POSTs, which share one resolver.
        outcome = asyncio.run(_report_day(job))
        if args.send:
            _prune_records(out, day)
    results = outcome.results
    if args.json:
        print_json({"date": day.isoformat(), "domains": results})
    else:
        _print(day, results)
    if outcome.unwritten:
        # Before "run it again": the directory or its disk wants an operator first.
        return EX_CANTCREAT
    failed = outcome.lookups_failed or any(
        not d.ok and not d.permanent for r in results for d in r.sent
    )
    return EX_TEMPFAIL if failed else EX_OK


def _reporting_domain(sender: str) -> str | None:
    """The reporting organization's domain: that of the report mail's From (``sender``),
    whose DKIM key signs it, or None when it is no mailbox or its domain an address
    literal. RFC 8460 §5.3 names the submitter by it in the file name, the subject and
    ``TLS-Report-Submitter``, and a receiver checks it against the signature's ``d=``:
    the HELO name is one host's, often under another domain than the From's."""
    from mailstrom.message.addresses import parse_mailbox

    try:
        domain = parse_mailbox("From", sender).address.envelope.rpartition("@")[2]
    except MailstromError:
        return None
    return None if domain.startswith("[") else domain


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outcome:
    results: list[DomainReport]
    """Each domain's, in the order of the domains."""
    lookups_failed: bool
    """Whether a ``_smtp._tls`` lookup failed."""
    unwritten: bool
    """Whether a report could not be written to ``--out``."""


async def _report_day(job: _Job) -> _Outcome:
    """Each domain's report, written and (with ``--send``) sent."""
    from mailstrom.tlsrpt.report import build_report

    submitter = job.reporter.submitter
    # Grouped once: each report is built from its own domain's counters, not from the
    # whole day's (which made the run domains times counters, minutes for a large sender).
    by_domain: dict[str, list[TLSSessions]] = {}
    for session in job.store.tls_sessions(job.day):
        by_domain.setdefault(session.policy_domain, []).append(session)
    domains = sorted(by_domain)
    resolver = make_resolver(job.config.dns)
    # The worker's routes, for the domains of mailto: addresses (see _queue).
    router = Router.for_config(job.config, resolver=resolver)
    rua = await _rua(resolver, domains) if domains else {}
    results: list[DomainReport] = []
    posts: list[_Post] = []
    unwritten = False
    ledger = _Ledger.read(job.out, job.day) if job.send else None
    for domain in domains:
        entry = DomainReport(domain=domain)
        results.append(entry)
        found = rua[domain]
        if found is None:
            entry.problem = "no _smtp._tls record: no report wanted"
            continue
        if isinstance(found, _LookupFailed):
            entry.problem = found.problem
            continue
        if isinstance(found, str):
            entry.problem = found
            continue
        entry.rua = found
        # A rerun sends the report the earlier runs sent part of: its id kept (and so its
        # file name), for a collector to take both copies as one.
        earlier = ledger.domains.get(domain) if ledger is not None else None
        report_id = earlier.report_id if earlier else None
        report = build_report(domain, job.day, by_domain[domain], job.reporter, report_id=report_id)
        path = job.out / _fitting(report.filename(submitter))
        try:
            _write(path, report.json())
        except OSError as exc:
            # A full disk, a directory gone or not ours: this report is not written nor
            # sent (the run's exit says so), the other domains' go on as they would.
            entry.problem = f"report not written: {exc.strerror or exc}: {path}"
            unwritten = True
            continue
        entry.report_id = report.report_id
        entry.file = str(path)
        if ledger is not None:
            done = ledger.start(domain, report.report_id)
            for uri in found:
                if uri in done.sent:
                    detail = "sent by an earlier run; not sent again"
                    entry.sent.append(Delivery(uri=uri, ok=True, detail=detail))
                elif uri.lower().startswith("mailto:"):
                    entry.sent.append(await _queue(job, report, uri, router))
                else:
                    # Its place is kept; the POST is made below, with the day's others.
                    posts.append(_Post(entry=entry, slot=len(entry.sent), report=report, uri=uri))
                    entry.sent.append(Delivery(uri=uri, ok=False, detail="not posted"))
                if entry.sent[-1].ok:
                    done.sent[uri] = None
    # Saved before the POSTs, which may take minutes, and after them: a run cut off in
    # between sends again only what it had not sent.
    if ledger is not None and not ledger.save():
        unwritten = True
    posts = _claimed(job, posts)
    if posts:
        await _post_all(job, resolver, posts)
        for post in posts:
            if post.entry.sent[post.slot].ok and ledger is not None:
                ledger.domains[post.entry.domain].sent[post.uri] = None
        _settle(job, posts)
        if ledger is not None and not ledger.save():
            unwritten = True
    lookups_failed = any(isinstance(found, _LookupFailed) for found in rua.values())
    return _Outcome(results=results, lookups_failed=lookups_failed, unwritten=unwritten)


MAX_FILE_NAME = 255 - len(".tmp")
"""Octets of a report's file name at most: what file systems allow (NAME_MAX), less the
suffix of the temporary name it is written under first."""


def _fitting(name: str) -> str:
    """``name`` (RFC 8460 §5.3: ``sender!policy-domain!begin!end!id.json``) cut to
    :data:`MAX_FILE_NAME` octets where it is longer: a domain may have 253 octets, and
    with the sender's name and the rest the name would be no file's. What is cut is the
    end of ``sender!policy-domain``: the times and the unique id stay whole."""
    if len(name.encode()) <= MAX_FILE_NAME:
        return name
    names, *times_and_id = name.rsplit("!", 3)
    tail = "!" + "!".join(times_and_id)
    room = max(MAX_FILE_NAME - len(tail.encode()), 0)
    return names.encode()[:room].decode("utf-8", "ignore") + tail


def _write(path: Path, data: bytes) -> None:
    # Written whole under a temporary name, then renamed: a reader never sees half a file.
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):  # nor is half of one left behind
            temporary.unlink(missing_ok=True)
        raise


async def _queue(job: _Job, report: Report, uri: str, router: Router) -> Delivery:
    """The report queued as mail to the address of the ``mailto:`` ``uri``, unless its
    domain routes to an address a POST is refused
    (:func:`~mailstrom.tlsrpt.deliver.mail_refusal`): the URI is the policy domain's
    choice, as an https one is. Through a relay, the relay's routes count, not ours."""
    from mailstrom.client.common import prepare_for
    from mailstrom.message.addrspec import validate_address
    from mailstrom.tlsrpt.deliver import mail_refusal, report_message
    from mailstrom.tlsrpt.report import mailto_address

    try:
        to = mailto_address(uri)
        address = validate_address(to)
    except MailstromError as exc:  # the policy domain's URI, which no rerun mends
        return Delivery(uri=uri, ok=False, detail=str(exc), permanent=True)
    if job.config.relay is None:
        refusal = await mail_refusal(
            address.envelope.rpartition("@")[2], router, allow_loopback=job.config.allow_loopback
        )
        if refusal is not None:
            return Delivery(uri=uri, ok=False, detail=str(refusal), permanent=refusal.permanent)
    try:
        msg = report_message(report, sender=job.sender, to=to, submitter=job.reporter.submitter)
        now = utc_now()
        prepared = prepare_for(
            job.config,
            msg,
            envelope_from=None,
            envelope_to=None,
            now=now,
            idempotency_key=_mail_key(job.day, report.policy_domain, to),
        )
        message_id = job.store.enqueue(prepared, now=now)
    except MailstromError as exc:
        return Delivery(uri=uri, ok=False, detail=str(exc))
    detail = f"queued as {message_id}"
    if not prepared.dkim:
        # RFC 8460 §3: a report by mail without a valid DKIM signature of the reporting
        # domain is ignored by its receiver. Queued all the same (the keys may be
        # added before it goes), but said, rather than an "ok" that means nothing.
        detail += " (NOT DKIM-signed: receivers ignore unsigned reports; see dkim.keys)"
    return Delivery(uri=uri, ok=True, detail=detail)


def _mail_key(day: date, domain: str, to: str) -> str:
    """The idempotency key of ``domain``'s report of ``day`` mailed to ``to``: the store
    queues it once (for ``Config.idempotency_window``), whichever run asks. The record
    of sent reports and the day's lock are in ``--out``, one host's: every host of a
    shared store that runs the daily timer queued the report again, a copy with its own
    report id, and the domain counted the day's sessions as many times."""
    digest = hashlib.sha256(f"{domain}\0{to}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"tlsrpt-{day.isoformat()}-{digest[:40]}"


def _post_key(day: date, domain: str, uri: str) -> str:
    """The key :func:`_claim` takes in the store for ``domain``'s report of ``day``
    POSTed to ``uri``, as :func:`_mail_key` for a mailed one."""
    digest = hashlib.sha256(f"{domain}\0{uri}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"tlsrpt-post-{day.isoformat()}-{digest[:40]}"


def _claimed(job: _Job, posts: list[_Post]) -> list[_Post]:
    """The POSTs this run is to make: those whose key (:func:`_post_key`) it took in the
    store (``Store.claim_tls_report``), held while the POSTs may last; the others' say
    why not: another run holds the key (the POST is done, or under way there), or the
    store failed (the next run tries again). The record of sent reports and the day's
    lock are in ``--out``, one host's: every host of a shared store that runs the daily
    timer POSTed the report again, a copy with its own report id, and the domain
    counted the day's sessions as many times."""
    if not posts:
        return []
    from mailstrom.tlsrpt.deliver import MAX_POSTS

    now = utc_now()
    # The POST phase's longest: every POST its whole deadline, MAX_POSTS at a time; and as
    # long again, for the settling after it. A run cut off holds its keys no longer.
    rounds = -(-len(posts) // MAX_POSTS)
    until = now + timedelta(seconds=2 * rounds * job.post_timeout + 60)
    mine: list[_Post] = []
    for post in posts:
        key = _post_key(job.day, post.entry.domain, post.uri)
        try:
            taken = job.store.claim_tls_report(key, now=now, until=until)
        except MailstromError as exc:
            post.entry.sent[post.slot] = Delivery(
                uri=post.uri, ok=False, detail=f"not posted: {exc}"
            )
            continue
        if taken:
            mine.append(post)
        else:
            detail = "posted by another run (of this or another host); not posted again"
            post.entry.sent[post.slot] = Delivery(uri=post.uri, ok=True, detail=detail)
    return mine


def _settle(job: _Job, posts: list[_Post]) -> None:
    """Hold the key of each POST made for ``Config.idempotency_window`` (as a mailed
    report's idempotency key is held), and let go of each that failed, for the next run
    of any host to make it. A store that fails is said on stderr: the key's hold then
    ends when :func:`_claimed` said."""
    now = utc_now()
    for post in posts:
        done = post.entry.sent[post.slot].ok
        until = now + job.config.idempotency_window if done else now
        try:
            job.store.hold_tls_report(_post_key(job.day, post.entry.domain, post.uri), until=until)
        except MailstromError as exc:
            sys.stderr.write(f"mailstrom: {post.uri}: the store kept no record of it: {exc}\n")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Post:
    """An ``https:`` rua URI to POST ``report`` to, and where its Delivery goes."""

    entry: DomainReport
    slot: int
    """Its index in ``entry.sent``: deliveries are shown in the record's rua order."""
    report: Report
    uri: str


async def _post_all(job: _Job, resolver: dns.asyncresolver.Resolver, posts: list[_Post]) -> None:
    """Every POST of the run, :data:`~mailstrom.tlsrpt.deliver.MAX_POSTS` at a time: the
    URLs come from the policy domains' DNS, and each one that never answers costs its
    whole deadline (one after another, 100 of them held a daily run 50 minutes)."""
    from mailstrom.tlsrpt.deliver import post_reports

    problems = await post_reports(
        [(post.report, post.uri) for post in posts],
        resolver=resolver,
        allow_loopback=job.config.allow_loopback,
        context=job.config.tls_context,
        timeout=job.post_timeout,
        source_address=job.config.source_address,
    )
    for post, problem in zip(posts, problems, strict=True):
        if problem is None:
            delivery = Delivery(uri=post.uri, ok=True, detail="posted")
        else:
            delivery = Delivery(
                uri=post.uri, ok=False, detail=str(problem), permanent=problem.permanent
            )
        post.entry.sent[post.slot] = delivery


def _print(day: date, results: list[DomainReport]) -> None:
    if not results:
        echo(f"{day.isoformat()}: no TLS sessions counted; no reports")
        return
    for r in results:
        if r.problem is not None:
            echo(f"{r.domain}: {r.problem}")
            continue
        echo(f"{r.domain}: report {r.report_id} written to {r.file}")
        for d in r.sent:
            outcome = "ok" if d.ok else "FAILED for good" if d.permanent else "FAILED"
            echo(f"  {d.uri}: {outcome}: {d.detail}")


@contextlib.contextmanager
def _day_lock(out: Path, day: date) -> Iterator[None]:
    """Hold ``tlsrpt-DAY.lock`` in ``out`` (an exclusive ``flock``) while the day's
    reports are sent: two runs at once (a cron run and one by hand) each read the record
    of sent reports before the other wrote it, and both sent every report. A second run
    is refused (CLIError, EX_TEMPFAIL: the first sends, and a later run sends only what
    it did not); a lock file that cannot be made, EX_CANTCREAT. The file stays: removing
    it while another run opens it would let a third take a lock of its own."""
    path = out / f"tlsrpt-{day.isoformat()}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CLIError(f"cannot create {path}: {exc.strerror or exc}", EX_CANTCREAT) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CLIError(
                f"another tlsrpt --send run is sending the reports of {day.isoformat()} "
                f"(it holds {path}); nothing sent",
                EX_TEMPFAIL,
            ) from None
        except OSError as exc:  # a file system without locks
            raise CLIError(f"cannot lock {path}: {exc.strerror or exc}", EX_CANTCREAT) from None
        yield
    finally:
        os.close(fd)  # and with it the lock


_RECORD_NAME = re.compile(r"tlsrpt-(\d{4}-\d{2}-\d{2})\.(?:sent|lock)", re.ASCII)
"""The record of a day's sent reports and its lock file (see :class:`_Ledger`)."""


def _prune_records(out: Path, day: date) -> None:
    """Remove from ``out`` the records and lock files of days older than the workers keep
    the day's counters (:data:`~mailstrom.tlsrpt.recorder.RETENTION`): a rerun of such a
    day has nothing to send, and each day's run left its files there for ever. ``day``'s
    own stay. What cannot be removed is left, said on stderr: no failure of the run."""
    from mailstrom.tlsrpt.recorder import RETENTION

    oldest = utc_now().date() - RETENTION
    try:
        names = [entry.name for entry in os.scandir(out) if entry.is_file(follow_symlinks=False)]
    except OSError:
        return  # the run's own writes said what is wrong with the directory
    for name in names:
        match = _RECORD_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            of = date.fromisoformat(match[1])
        except ValueError:
            continue
        if of >= oldest or of == day:
            continue
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            sys.stderr.write(f"mailstrom: cannot remove {out / name}: {exc.strerror or exc}\n")


MAX_LEDGER = 16 << 20
"""Octets of a record of sent reports read at most (a day's domains times their URIs)."""


@dataclass(slots=True)
class _Sent:
    report_id: str
    sent: dict[str, None]
    """The URIs the report was sent to, in the order they were."""


@dataclass(slots=True)
class _Ledger:
    """What the runs of one day sent, kept in ``--out`` (``tlsrpt-DAY.sent``, JSON): a
    rerun, after a failure, sends each domain the same report, and only where it was not
    sent yet."""

    path: Path
    domains: dict[str, _Sent]

    @classmethod
    def read(cls, out: Path, day: date) -> _Ledger:
        """The record in ``out`` (empty when there is none); CLIError (66) when it cannot
        be read: sending without it would send again what was sent."""
        path = out / f"tlsrpt-{day.isoformat()}.sent"
        try:
            with path.open("rb") as f:
                data = f.read(MAX_LEDGER + 1)
        except FileNotFoundError:
            return cls(path, {})
        except OSError as exc:
            raise CLIError(f"cannot read {path}: {exc.strerror or exc}", EX_NOINPUT) from None
        try:
            if len(data) > MAX_LEDGER:
                raise ValueError(f"larger than {MAX_LEDGER} octets")
            domains = {
                domain: _Sent(item["report_id"], dict.fromkeys(item["sent"]))
                for domain, item in json.loads(data)["domains"].items()
            }
            if not all(
                isinstance(d, str)
                and isinstance(s.report_id, str)
                and all(isinstance(u, str) for u in s.sent)
                for d, s in domains.items()
            ):
                raise ValueError("not a record of sent reports")
        # RecursionError: JSON nested deeper than the parser's stack (a damaged file).
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise CLIError(
                f"{path} is damaged ({type(exc).__name__}: {exc}); remove it to send the "
                "day's reports to every rua URI again",
                EX_NOINPUT,
            ) from None
        return cls(path, domains)

    def start(self, domain: str, report_id: str) -> _Sent:
        """The record of ``domain``'s report ``report_id``, made when new."""
        sent = self.domains.get(domain)
        if sent is None or sent.report_id != report_id:
            sent = self.domains[domain] = _Sent(report_id, {})
        return sent

    def save(self) -> bool:
        """Written (whole, then renamed in place); False, said on stderr, when not."""
        document = {
            "domains": {
                domain: {"report_id": s.report_id, "sent": list(s.sent)}
                for domain, s in self.domains.items()
                if s.sent
            }
        }
        try:
            _write(self.path, json.dumps(document, indent=1).encode())
        except OSError as exc:
            sys.stderr.write(
                f"mailstrom: cannot write {self.path}: {exc.strerror or exc}; a rerun would "
                "send again what this one sent\n"
            )
            return False
        return True
