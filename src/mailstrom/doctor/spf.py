"""SPF (RFC 7208): would the domain's record authorize the outgoing address?

The evaluation is pyspf's (the reference implementation behind many receivers' milters),
so macros, ``include``, ``redirect``, the 10-lookup and void-lookup limits behave as a
receiver sees them. pyspf does its DNS through a module-level function, ``DNSLookup``;
mailstrom replaces it once with one that sends each query to the :class:`Resolver` set
for the current context (a ``ContextVar``), and falls back to pyspf's own function
anywhere else. So the doctor's SPF lookups go to the configured nameservers and port
(the loopback server in tests), and no global resolver setting is touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from mailstrom.doctor.extras import MissingExtra
from mailstrom.doctor.lookup import Outcome, Resolver, lookup_within
from mailstrom.doctor.report import Check, Status, capped, piece
from mailstrom.doctor.spfexpand import check_domain_end, expanded
from mailstrom.domains import literal_address

# RFC 7208 §4.5 and §12: record = version terms *SP, version = "v=spf1" (a quoted ABNF
# string: any case), terms = *( 1*SP ( directive / modifier ) ). The version ends at an SP
# or the end of the record: not at a tab, a newline or other Unicode white space (``\s``),
# which pyspf, evaluating the record, does not take either. The case is ASCII's only
# (re.ASCII): Unicode case folding takes "\u017f" (long s) for "s", and "v=\u017fpf1" is no
# SPF record to pyspf, which matches octets, or to receivers.
_SPF = re.compile(r"^v=spf1(?: |\Z)", re.IGNORECASE | re.ASCII)
_EXPLAINED = 200
"""Characters of pyspf's explanation a summary shows: it quotes the term it stopped at,
which the record's publisher may have made as long as a TXT record holds."""
TIME_LIMIT = 20.0
"""Seconds of DNS one SPF evaluation may take in all (RFC 7208 §4.6.4: receivers may stop
after at least 20 s, and do). The record's publisher chooses how many lookups there
are (up to about 110: 10 terms, 10 MX or PTR names each) and its servers how long each
takes: without a bound, slow answers held the doctor for minutes."""
BUDGET = 2 * TIME_LIMIT
"""Seconds all the SPF evaluations of one doctor run may take together: the domain's
(which gets its full :data:`TIME_LIMIT` first, as a receiver would give it), the HELO
name's, and those that ask whether a record passes every address. Each had its own 20 s,
and slow DNS held one run for two minutes; checks left when it is spent say "not
checked: time budget spent"."""
NOT_CHECKED = "not checked: time budget spent"
TXT_STRING = 255
"""Octets one character-string of a TXT record holds (RFC 1035 §3.3): a longer record
is published as several, which receivers join without a separator (RFC 7208 §3.3)."""
ANSWER_OCTETS = 450
"""RFC 7208 §3.4: when the name and the text of all its records of the type come to less
than 450 octets, "DNS answers ought to fit in UDP packets"; a larger SPF answer may be
truncated, and a receiver that cannot fall back to TCP gets a temperror."""


class Budget:
    """The seconds left for the SPF evaluations of one run (a monotonic deadline)."""

    def __init__(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self._deadline - time.monotonic()


_resolver: ContextVar[Resolver | None] = ContextVar("mailstrom_spf_resolver", default=None)


@dataclass(slots=True)
class _ReverseDNS:
    """What an evaluation did with the address's PTR names (the ``ptr`` mechanism's and
    the ``%{p}`` macro's, the only terms that ask for them)."""

    blind: bool = False
    """Answer its PTR queries with no name: what a receiver that skips ``ptr``, or whose
    PTR lookup fails, finds (RFC 7208 §5.5: then the mechanism does not match)."""
    asked: bool = False
    """Whether it asked for them."""


_reverse: ContextVar[_ReverseDNS | None] = ContextVar("mailstrom_spf_reverse", default=None)


def _pyspf() -> Any:
    try:
        import spf  # type: ignore[import-untyped]
    except ImportError:
        raise MissingExtra(["pyspf"]) from None
    if not getattr(spf.DNSLookup, "mailstrom", False):
        spf.DNSLookup = _lookup_through(spf, spf.DNSLookup)
    return spf


_query_class: Any = None


def _query(spf: Any) -> Any:
    """pyspf's ``query``, counting a ``redirect=`` against the 10-lookup limit when it is
    followed, not when its record is read.

    RFC 7208 §4.6.4: the terms that cause DNS queries count "when they are evaluated", and
    ``redirect=`` is evaluated only when no mechanism matched (§6.1). pyspf counts it as
    it reads the modifiers, before the mechanisms: a record of ten lookup mechanisms
    and a redirect= failed (permerror, "Too many DNS lookups") at the tenth, which
    receivers that follow the RFC pass. pyspf is not changed: its count is undone for a
    record with a redirect= before it is read, and made again when the redirect is
    followed (pyspf evaluates the target at the level of the record that redirects;
    an include: at the level below).

    Its time limit (``querytime``) is kept on the monotonic clock, not pyspf's wall
    clock, which an operator or NTP may step during an evaluation."""
    global _query_class
    if _query_class is not None:
        return _query_class

    class Query(spf.query):  # type: ignore[misc]
        querytime: float  # pyspf's: the seconds of lookups left, 0 for no limit

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            limit = self.querytime
            self._mailstrom_deadline = time.monotonic() + limit if limit > 0 else None

        def dns(self, *args: Any, **kwargs: Any) -> Any:
            # pyspf takes what is left of its querytime from the wall clock (time.time()
            # before and after each lookup): a clock stepped back during a lookup gave
            # the evaluation as much more time (an hour's step, an hour of slow DNS), one
            # stepped forward cut it short. What is left is set from a monotonic deadline
            # before each of its lookups instead; pyspf's own arithmetic after one is
            # overwritten before the next. pyspf reads a querytime of 0 as "no limit",
            # and raises its TempError for one below 0: none is left then.
            if self._mailstrom_deadline is not None:
                left = self._mailstrom_deadline - time.monotonic()
                self.querytime = left if left > 0 else -1.0
            return super().dns(*args, **kwargs)

        def expand_domain(self, arg: str) -> str:
            # pyspf's own took CPU growing as the square of a label's length, and its
            # expand as the square of a text's labels (mailstrom.doctor.spfexpand).
            check_domain_end(spf, arg)
            return self.expand(arg)

        def expand(self, s: str, stripdot: bool = True) -> str:
            return expanded(spf, self, s, stripdot)

        def get_explanation(self, spec: str) -> None:
            # An exp= names the text a receiver gives the sender of mail that fails (RFC
            # 7208 §6.2), looked up then only; pyspf looks up every exp= it reads, at
            # every level and before the mechanisms. The doctor shows no such text, and
            # a slow exp= server spent the evaluation's time: a pass became a temperror.
            # The domain-spec's syntax is still checked (expand_domain) before this.
            return None

        def check1(self, record: Any, domain: str, recursion: int) -> Any:
            levels: list[int] = self.__dict__.setdefault("_mailstrom_levels", [])
            if recursion in levels:  # the redirect= of the record at this level, taken
                self.check_lookups()
            if _redirects(spf, record):
                self.lookups -= 1  # pyspf counts it as it reads the record
            levels.append(recursion)
            try:
                return super().check1(record, domain, recursion)
            finally:
                levels.pop()

    _query_class = Query
    return Query


def _redirects(spf: Any, record: Any) -> bool:
    """Whether pyspf, reading ``record``, counts a ``redirect=`` (as its ``check0`` finds
    modifiers: terms split at SP, names matched as written)."""
    if not isinstance(record, str):
        return False
    terms = record.split(" ")
    if terms[0].lower() != "v=spf1":
        return False
    for term in terms[1:]:
        named = spf.RE_MODIFIER.split(term)[1:]
        if len(named) == 2 and named[0] == "redirect":
            return True
    return False


def _lookup_through(spf: Any, original: Any) -> Any:
    def lookup(name: str, qtype: str, strict: Any = True, timeout: Any = 30) -> list[Any]:
        resolver = _resolver.get()
        if resolver is None:
            return list(original(name, qtype, strict, timeout))
        # pyspf's timeout is what is left of the evaluation's time: the resolver's own
        # (dns.timeout) let one unanswered query run past it by up to that long.
        reverse = _reverse.get() if qtype == "PTR" else None
        if reverse is not None:
            reverse.asked = True
            if reverse.blind:
                return []
        bound = float(timeout) if isinstance(timeout, int | float) else None
        answer = lookup_within(resolver, name, qtype, bound)
        if answer.failed:
            raise spf.TempError(f"DNS {answer.error}")
        rows: list[Any] = []
        for text in answer.records:
            value: Any = text
            if qtype in ("TXT", "SPF"):  # pyspf joins a record's strings as bytes
                value = (_as_pyspf_reads(text).encode("utf-8", "surrogateescape"),)
            elif qtype == "MX":
                preference, _, host = text.partition(" ")
                value = (int(preference), host)
            rows.append(((name, qtype), value))
        return rows

    lookup.mailstrom = True  # type: ignore[attr-defined]
    return lookup


_MODIFIER_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]*(?==)")
"""RFC 7208 §12: name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." ), then ``=``: what
makes a term a modifier (a mechanism's name is ended by ``:``, ``/`` or the term's end)."""
_MACRO = re.compile(r"%(?:[%_-]|\{([A-Za-z])([0-9]*)R)")
"""RFC 7208 §7.1: ``%%``, ``%_``, ``%-`` (escapes, skipped as units so that ``%%{`` stays
text), and the start of a macro whose transformers reverse with an upper-case ``R``."""


def _as_pyspf_reads(record: str) -> str:
    """An SPF record as pyspf is to read it: its modifiers' names in lower case, and
    its macros' reversing transformer (``%{IR}``) too.

    "As per the definition of the ABNF notation in [RFC5234], mechanism and modifier
    names are case-insensitive" (RFC 7208 §4.6.1), and so is the transformer
    ``[ "r" ]`` (§7.1). pyspf lowers mechanism names, but compares modifier names as
    written (``Redirect=`` was an unknown modifier, ignored: a record that receivers
    follow to its provider's senders failed them all) and reverses only for ``r``
    (``%{IR}`` looked up the address unreversed). Nothing else changes: a macro letter
    keeps its case (upper case asks for URL escaping), so does a modifier's value, and
    only SPF records are read so (an ``exp=`` explanation is shown as published)."""
    if not _SPF.match(record):
        return record
    record = " ".join(
        _MODIFIER_NAME.sub(lambda name: name[0].lower(), term, count=1)
        for term in record.split(" ")
    )
    return _MACRO.sub(lambda macro: f"%{{{macro[1]}{macro[2]}r" if macro[1] else macro[0], record)


@contextlib.contextmanager
def _using(resolver: Resolver, reverse: _ReverseDNS | None = None) -> Iterator[None]:
    token = _resolver.set(resolver)
    reverse_token = _reverse.set(reverse)
    try:
        yield
    finally:
        _reverse.reset(reverse_token)
        _resolver.reset(token)


def evaluate(
    resolver: Resolver,
    *,
    ip: str,
    sender: str,
    helo: str,
    time_limit: float = TIME_LIMIT,
    reverse: _ReverseDNS | None = None,
) -> tuple[str, str]:
    """pyspf's verdict for mail from ``sender`` (``postmaster@HELO`` checks the HELO
    identity) sent by ``ip``: (result, explanation); result is one of pass, fail,
    softfail, neutral, none, permerror, temperror (also when the lookups took longer
    than ``time_limit`` seconds in all); the explanation is pyspf's own, never an
    ``exp=`` text, which is not looked up. ``reverse``, when given, notes whether the
    address's PTR names were asked for, and may hide them."""
    spf = _pyspf()
    query = _query(spf)(i=ip, s=sender, h=helo, querytime=time_limit)
    with _using(resolver, reverse):
        result, _code, explanation = query.check()
    return str(result), str(explanation)


def _evaluate_within(
    budget: Budget,
    resolver: Resolver,
    *,
    ip: str,
    sender: str,
    helo: str,
    reverse: _ReverseDNS | None = None,
) -> tuple[str, str] | None:
    """:func:`evaluate` in what is left of ``budget`` (at most :data:`TIME_LIMIT`); None,
    without a lookup, when nothing is left."""
    left = budget.left()
    if left <= 0:  # pyspf takes a querytime of 0 for "no limit"
        return None
    limit = min(TIME_LIMIT, left)
    return evaluate(resolver, ip=ip, sender=sender, helo=helo, time_limit=limit, reverse=reverse)


_BY_REVERSE_DNS = (
    "only by the address's reverse DNS (the ptr mechanism or the %{p} macro), which RFC "
    "7208 §5.5 says not to publish: it is slow, and does not match when the PTR lookup "
    "fails, so receivers that skip it, or whose lookup fails, do not pass the mail"
)


def _rests_on_reverse_dns(
    budget: Budget, resolver: Resolver, *, ip: str, sender: str, helo: str, asked: bool
) -> bool:
    """Whether a pass (whose evaluation ``asked`` for the address's PTR names) is lost
    when they are not found; False when that is not known (``budget`` spent, or a
    temporary error). Evaluated again only when the names were asked for: rarely."""
    if not asked:
        return False
    blind = _ReverseDNS(blind=True)
    evaluated = _evaluate_within(budget, resolver, ip=ip, sender=sender, helo=helo, reverse=blind)
    return evaluated is not None and evaluated[0] not in ("pass", "temperror")


def _naming_fix(name: str, records: list[str], mechanism: str) -> str:
    """The fix for a pass that rests on reverse DNS: the address named first."""
    if len(records) != 1:
        return f"name the address ({mechanism}) in the SPF record at {name} instead of its PTR name"
    return (
        f'replace TXT at {name} "{records[0]}" by '
        f"{publishable(name, with_mechanism(records[0], mechanism))}"
        ", then remove its ptr terms once the hosts they stand for are named so"
    )


def spf_records(
    resolver: Resolver, name: str, *, budget: Budget | None = None
) -> tuple[list[str], str | None]:
    """The ``v=spf1`` TXT records at ``name``, and the lookup error if it failed; the
    lookup waits no longer than what is left of ``budget``, when one is given (none is
    made when nothing is left)."""
    left = None if budget is None else budget.left()
    if left is not None and left <= 0:  # DNSResolver takes a timeout of 0 for its own
        return [], NOT_CHECKED
    answer = lookup_within(resolver, name, "TXT", left)
    if answer.outcome is Outcome.ERROR:
        return [], answer.error
    return [r for r in answer.records if _SPF.match(r)], None


def mechanism_for(ip: str) -> str:
    """``ip4:192.0.2.1`` or ``ip6:2001:db8::1``: the one mechanism that authorizes ``ip``."""
    return f"ip{ipaddress.ip_address(ip).version}:{ip}"


def with_mechanism(record: str, mechanism: str) -> str:
    """``record`` with ``mechanism`` put first, before anything that could end the
    evaluation (``-all``, ``redirect=``): ``v=spf1 ip4:192.0.2.1 include:… -all``."""
    terms = _terms(record)
    return " ".join([terms[0], mechanism, *terms[1:]])


def publishable(name: str, record: str) -> str:
    """``record``, to be published at ``name``, as a fix shows it: one quoted
    character-string of at most :data:`TXT_STRING` octets each, cut after a space where one
    is in the string (between terms; receivers join the strings without a separator), and
    a warning when ``name`` and ``record`` pass :data:`ANSWER_OCTETS`.

    A merged record, or one with a mechanism added, is as long as its publisher's terms
    make it: shown as one string, it could not be published as it was shown (a zone file
    refuses it, and a DNS console either refuses it or cuts it where it likes).

    >>> publishable("example.com", "v=spf1 a -all")
    '"v=spf1 a -all"'
    """
    data = record.encode("utf-8", "surrogateescape")
    strings: list[bytes] = []
    start = 0  # an index, not a slice taken off: linear in a 64 KiB record's octets
    while len(data) - start > TXT_STRING:
        cut = data.rfind(b" ", start, start + TXT_STRING) + 1
        if cut <= start:  # a term longer than a string: cut in it, not in a character
            cut = start + TXT_STRING
            while cut > start + 1 and 0x80 <= data[cut] < 0xC0:  # a UTF-8 continuation
                cut -= 1
        strings.append(data[start:cut])
        start = cut
    strings.append(data[start:])
    quoted = " ".join(f'"{s.decode("utf-8", "surrogateescape")}"' for s in strings)
    size = len(name.encode("utf-8", "surrogateescape")) + sum(map(len, strings))
    if size <= ANSWER_OCTETS:
        return quoted
    return (
        f"{quoted} (with its name {size} octets, over the {ANSWER_OCTETS} within which RFC "
        "7208 §3.4 says an answer fits a UDP packet: some receivers may not get it; "
        f"shorten it, e.g. by moving senders into a record at a name of yours such as "
        f"_spf.{name}, included with include:_spf.{name})"
    )


def _terms(record: str) -> list[str]:
    """The version and terms of an SPF record: separated by SP only (RFC 7208 §12)."""
    return [term for term in record.split(" ") if term]


def check_spf(
    resolver: Resolver, *, domain: str, ip: str, helo: str, budget: Budget | None = None
) -> tuple[Check, str]:
    """SPF for mail whose envelope sender is in ``domain`` (mailstrom's default envelope
    sender is the From address), sent by ``ip``. Returns the check and pyspf's result
    (``temperror`` when ``budget``, default :data:`BUDGET`, was spent before it)."""
    budget = Budget(BUDGET) if budget is None else budget
    if budget.left() <= 0:
        spent = Check(name="spf", subject=domain, status=Status.UNKNOWN, summary=NOT_CHECKED)
        return spent, "temperror"
    records, error = spf_records(resolver, domain, budget=budget)
    reverse = _ReverseDNS()
    sender = f"postmaster@{domain}"
    evaluated = _evaluate_within(budget, resolver, ip=ip, sender=sender, helo=helo, reverse=reverse)
    result, explanation = evaluated or ("temperror", NOT_CHECKED)
    explanation = piece(explanation, _EXPLAINED)
    mechanism = mechanism_for(ip)
    shown = capped([f"TXT {domain}: {r}" for r in records])

    def check(status: Status, summary: str, fix: str | None = None) -> tuple[Check, str]:
        return (
            Check(
                name="spf",
                subject=domain,
                status=status,
                summary=summary,
                details=shown,
                fix=fix,
            ),
            result,
        )

    if result == "pass":
        opened = _passes_anyone(resolver, sender=f"postmaster@{domain}", helo=helo, budget=budget)
        if opened is None:
            shown = (*shown, _NOT_ASKED)
        if opened:
            return check(
                Status.WARN,
                f"pass, but {domain}'s SPF record authorizes every address: anyone can send "
                f"mail as {domain} and pass SPF",
                _narrowing_fix(domain, records, mechanism),
            )
        if _rests_on_reverse_dns(
            budget, resolver, ip=ip, sender=sender, helo=helo, asked=reverse.asked
        ):
            return check(
                Status.WARN,
                f"pass, but {_BY_REVERSE_DNS}",
                _naming_fix(domain, records, mechanism),
            )
        return check(Status.PASS, f"pass: {domain}'s SPF record authorizes {ip}")
    if result == "temperror" or error is not None:
        return check(Status.UNKNOWN, f"temporary error: {error or explanation}")
    if result == "none" or not records:
        return check(
            Status.FAIL,
            f"none: {domain} publishes no SPF record",
            f'publish TXT at {domain}: "v=spf1 {mechanism} ~all" (add the other services '
            "that send mail as this domain, e.g. include:<provider>, before ~all)",
        )
    if result == "permerror":
        if len(records) > 1:
            return check(
                Status.FAIL,
                f"permerror: {domain} has {len(records)} SPF records; receivers then ignore all",
                f"publish exactly one TXT at {domain} starting with v=spf1: merge their "
                f"mechanisms, e.g. {publishable(domain, _merged(records, mechanism))}",
            )
        return check(
            Status.FAIL,
            f"permerror: {explanation}",
            f"correct the TXT record at {domain} ({explanation}), for instance by "
            f'replacing it with "v=spf1 {mechanism} ~all" plus the other services that '
            "send for you",
        )
    return check(
        Status.FAIL,
        f"{result}: {domain}'s SPF record does not authorize {ip}",
        f'replace TXT at {domain} "{records[0]}" by '
        f"{publishable(domain, with_mechanism(records[0], mechanism))}",
    )


_NOBODY = ("240.0.0.1", "100::1")
"""Addresses no record names on purpose (IPv4's reserved 240.0.0.0/4, IPv6's discard
prefix 100::/64, RFC 6666): a record that authorizes one authorizes every address of its
family."""


_NOT_ASKED = (
    "whether the record authorizes every address was not checked: a lookup failed or the "
    "time budget was spent"
)


def _passes_anyone(resolver: Resolver, *, sender: str, helo: str, budget: Budget) -> bool | None:
    """Whether the record checked for ``sender`` (the HELO's, for ``""``) passes any sender
    at all: ``+all`` (also in an ``include:``d record), ``ip4:0.0.0.0/0`` or ``ip6:::/0``;
    None when that is not known (a temporary error, or ``budget`` spent). Such a record
    lets anyone with an envelope sender in the domain (or, for the HELO's, anyone sending
    a bounce) pass SPF, and with it DMARC (its alignment is on that domain).
    Both families are asked whatever the outgoing address's: a receiver takes mail over
    either, so an IPv6 sender's ``ip4:0.0.0.0/0`` opens the domain just the same."""
    known = True
    for nobody in _NOBODY:
        evaluated = _evaluate_within(budget, resolver, ip=nobody, sender=sender, helo=helo)
        if evaluated is not None and evaluated[0] == "pass":
            return True
        known = known and evaluated is not None and evaluated[0] != "temperror"
    return False if known else None


def _narrowing_fix(domain: str, records: list[str], mechanism: str) -> str:
    terms = _terms(records[0]) if records else []
    if any(term.lower() in ("all", "+all") for term in terms):
        narrowed = ["~all" if term.lower() in ("all", "+all") else term for term in terms]
        if mechanism not in narrowed:
            narrowed.insert(1, mechanism)
        shown = publishable(domain, " ".join(narrowed))
        return f'replace TXT at {domain} "{records[0]}" by {shown}'
    return (
        f"remove from TXT at {domain} the term that matches every address (an ip4: or ip6: "
        "range such as 0.0.0.0/0, or an include: of a record ending in +all), and name "
        f"your senders instead ({mechanism})"
    )


def _merged(records: list[str], mechanism: str) -> str:
    """One record with the terms of ``records``: each mechanism once, the first ``all``
    last (``~all`` when none has one), and the first ``exp=`` only (RFC 7208 §6: a record
    with two ``redirect=`` or two ``exp=`` is itself a permerror).

    A record's ``redirect=`` (taken only when it has no ``all``, §6.1) becomes an
    ``include:`` of the same domain: the senders it names pass the merged record too,
    whatever the other records' ``all`` (a redirect= kept last lost to their -all)."""
    # A dict keeps the terms in their first order and finds a repeat in constant time: a
    # list searched for each term made the advice quadratic in the records' terms (a 64
    # KiB answer holds some 30,000), seconds of CPU for one check.
    terms: dict[str, None] = {}
    tail: list[str] = []
    explanation: list[str] = []
    for record in records:
        own = _terms(record)[1:]
        has_all = any(term.lower().lstrip("+-~?") == "all" for term in own)
        for term in own:
            lowered = term.lower()
            if lowered.lstrip("+-~?") == "all":
                if not tail:
                    tail.append(term)
            elif lowered.startswith("redirect="):
                if not has_all:
                    terms.setdefault("include:" + term[len("redirect=") :])
            elif lowered.startswith("exp="):
                if not explanation:
                    explanation.append(term)
            else:
                terms.setdefault(term)
    first = [] if mechanism in terms else [mechanism]
    return " ".join(["v=spf1", *first, *terms, *(tail or ["~all"]), *explanation])


def check_spf_helo(
    resolver: Resolver, *, helo: str, ip: str, budget: Budget | None = None
) -> Check:
    """SPF of the HELO identity (RFC 7208 §2.3): what receivers check for bounces, whose
    envelope sender is empty. Worth a warning, not a failure: most mail has a sender.
    Unknown, unchecked, when ``budget`` (default :data:`BUDGET`) was spent before it."""
    budget = Budget(BUDGET) if budget is None else budget
    if literal_address(helo) is not None:
        # "This SPF check can only be performed when the HELO identity is a valid domain
        # name" (RFC 7208 §2.3): a literal has no record, and none can be published at it.
        return Check(
            name="spf-helo",
            subject=helo,
            status=Status.WARN,
            summary=f"none: {helo} is an address literal, which has no SPF record (RFC 7208 §2.3)",
            fix="set helo_name to a host name that resolves to the address, and publish TXT "
            'at it: "v=spf1 a -all" (the host may send as itself)',
        )
    if budget.left() <= 0:
        return Check(name="spf-helo", subject=helo, status=Status.UNKNOWN, summary=NOT_CHECKED)
    records, error = spf_records(resolver, helo, budget=budget)
    reverse = _ReverseDNS()
    evaluated = _evaluate_within(budget, resolver, ip=ip, sender="", helo=helo, reverse=reverse)
    result, explanation = evaluated or ("temperror", NOT_CHECKED)
    explanation = piece(explanation, _EXPLAINED)
    shown = capped([f"TXT {helo}: {r}" for r in records])
    own = '"v=spf1 a -all" (the host may send as itself)'
    fix = f"publish TXT at {helo}: {own}"
    opened = (
        _passes_anyone(resolver, sender="", helo=helo, budget=budget) if result == "pass" else False
    )
    if opened is None:
        shown = (*shown, _NOT_ASKED)
    if opened:
        # Receivers check the HELO identity for mail with an empty envelope sender, and
        # DMARC takes it then: its relaxed alignment makes mail.example.com count for
        # From: ...@example.com.
        status, summary, fix_or_none = (
            Status.WARN,
            f"pass, but {helo}'s SPF record authorizes every address: anyone can send "
            f"mail with an empty envelope sender (a bounce) as {helo} and pass SPF",
            _narrowing_fix(helo, records, mechanism_for(ip)),
        )
    elif result == "pass" and _rests_on_reverse_dns(
        budget, resolver, ip=ip, sender="", helo=helo, asked=reverse.asked
    ):
        status, summary, fix_or_none = (
            Status.WARN,
            f"pass, but {_BY_REVERSE_DNS}",
            _naming_fix(helo, records, mechanism_for(ip)),
        )
    elif result == "pass":
        status, summary, fix_or_none = Status.PASS, f"pass: {helo} authorizes {ip}", None
    elif result == "temperror" or error is not None:
        # The HELO's own record may have been read fine and an include failed: then
        # pyspf's explanation, not the (absent) lookup error, says what went wrong.
        status, summary, fix_or_none = (
            Status.UNKNOWN,
            f"temporary error: {error or explanation}",
            None,
        )
    elif result == "none":
        status, summary, fix_or_none = Status.WARN, f"none: {helo} has no SPF record", fix
    else:
        why = explanation if result == "permerror" else f"{helo} does not authorize {ip}"
        status, summary = Status.WARN, f"{result}: {why}"
        if not records:
            fix_or_none = fix
        elif result == "permerror":
            # One more record beside those there would be one more reason for a
            # permerror (several v=spf1 records are one): they are to be replaced.
            there = (
                f'TXT at {helo} "{records[0]}"'
                if len(records) == 1
                else f"the {len(records)} SPF records at {helo}"
            )
            fix_or_none = f"replace {there} by {own}"
        else:
            fix_or_none = (
                f'replace TXT at {helo} "{records[0]}" by '
                f"{publishable(helo, with_mechanism(records[0], mechanism_for(ip)))}"
            )
    return Check(
        name="spf-helo",
        subject=helo,
        status=status,
        summary=summary,
        details=shown,
        fix=fix_or_none,
    )
