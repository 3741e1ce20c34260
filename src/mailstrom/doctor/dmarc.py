"""DMARC (RFC 7489): the domain's policy, and whether its mail would pass it.

Mail passes DMARC when SPF passes for an envelope sender whose domain *aligns* with the
From domain, or a DKIM signature verifies whose ``d=`` aligns with it: equal domains in
strict mode (``aspf=s``/``adkim=s``), the same organizational domain in relaxed mode (the
default). The organizational domain is the registrable domain under the Public Suffix
List (``publicsuffixlist``, which ships the list: nothing is downloaded at run time).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailstrom.doctor.extras import MissingExtra
from mailstrom.doctor.lookup import Outcome, Resolver, normal_name
from mailstrom.doctor.report import Check, Status, capped, piece

_WSP = " \t"
r"""The only white space RFC 7489's grammar allows (§6.4: ``*WSP`` around ``=``, ``;`` and
``,``; RFC 5234's WSP is SP or HTAB): not ``\s`` or ``str.strip()``'s, which take
newlines, NBSP and the rest of Unicode's."""
# RFC 7489 §6.4: dmarc-version = "v" *WSP "=" *WSP %x44 %x4d %x41 %x52 %x43 %x31. A quoted
# ABNF string is case-insensitive (RFC 5234 §2.3): "V=DMARC1" is a DMARC record. The
# value is given in hex: exactly "DMARC1" (§6.3: "MUST match precisely").
_DMARC = re.compile(r"^[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")
_POLICIES = ("none", "quarantine", "reject")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
"""RFC 3986 §3.1: a URI starts with its scheme and a colon. rua= and ruf= are lists of
URIs (RFC 7489 §6.4), ``mailto:`` the one every receiver supports (§6.2): a bare address
(``rua=d@example.com``) is none, and receivers send it no report."""
_PERCENT = re.compile(r"[0-9]{1,3}")
"""RFC 7489 §6.4: ``pct`` is 1*3DIGIT, ASCII digits (``str.isdigit`` takes ``٣`` and ``²``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DMARCRecord:
    """The tags of a DMARC record that decide what receivers do (RFC 7489 §6.3)."""

    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    testing: bool = False
    """``t=y`` (DMARCbis): the policy is being tested, for receivers the same as ``pct=0``
    of RFC 7489 (§6.6.4: the next policy down). Any other ``t=`` value is ``t=n``."""
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()

    def applied(self, policy: str) -> str:
        """What receivers do with failing mail under ``policy`` (this record's ``p=`` or
        ``sp=``): with ``pct=0`` or ``t=y`` none of it is sampled, and it gets the next
        policy down (RFC 7489 §6.6.4), so ``quarantine`` is ``none`` to them."""
        if policy == "none" or (self.pct > 0 and not self.testing):
            return policy
        return "quarantine" if policy == "reject" else "none"


def is_dmarc(text: str) -> bool:
    """Whether a TXT record is a DMARC record (its first tag is ``v=DMARC1``)."""
    return _DMARC.match(text) is not None


def parse_dmarc(text: str) -> DMARCRecord:
    """Parse a DMARC record; raises ValueError naming what is wrong.

    >>> parse_dmarc("v=DMARC1; p=reject; rua=mailto:d@example.com").p
    'reject'
    """
    tags = _tags(text)
    if "p" not in tags:
        raise ValueError("the required p= tag is missing")
    return _record(tags)


def _tags(text: str) -> dict[str, str]:
    """The tags of a DMARC record by lower-case name, the first of a name only."""
    if not is_dmarc(text):
        raise ValueError("the record does not start with v=DMARC1")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        if not part.strip(_WSP):
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"not a tag=value pair: {piece(part.strip(_WSP))!r}")
        tags.setdefault(name.strip(_WSP).lower(), value.strip(_WSP))
    return tags


def _record(tags: dict[str, str]) -> DMARCRecord:
    def choice(tag: str, allowed: Sequence[str], default: str | None) -> Any:
        value = tags.get(tag)
        if value is None:
            return default
        if value.lower() not in allowed:
            raise ValueError(f"{tag}={piece(value)} is not one of {', '.join(allowed)}")
        return value.lower()

    pct_text = tags.get("pct", "100")
    if not _PERCENT.fullmatch(pct_text) or int(pct_text) > 100:
        raise ValueError(f"pct={piece(pct_text, 20)} is not a whole number from 0 to 100")
    return DMARCRecord(
        p=choice("p", _POLICIES, None),
        sp=choice("sp", _POLICIES, None),
        adkim=choice("adkim", ("r", "s"), "r"),
        aspf=choice("aspf", ("r", "s"), "r"),
        pct=int(pct_text),
        testing=tags.get("t", "n").lower() == "y",
        rua=_uris(tags.get("rua")),
        ruf=_uris(tags.get("ruf")),
    )


def _valid_policy(tags: dict[str, str]) -> bool:
    """Whether ``tags`` have a valid p= and, if any, a valid sp=."""
    return tags.get("p", "").lower() in _POLICIES and tags.get("sp", "none").lower() in _POLICIES


def read_as_receivers(text: str) -> tuple[DMARCRecord, str | None]:
    """The record as receivers apply it, and None; or, for a record whose p= is missing
    or invalid (or its sp=) but whose rua= holds a report URI, the record receivers act
    on instead, ``p=none`` (RFC 7489 §6.6.3, step 6: they "SHOULD act as if a record
    containing a valid "v" tag and "p=none" was retrieved"), and what is wrong with it.
    Raises ValueError, as :func:`parse_dmarc`, for any other invalid record.

    >>> read_as_receivers("v=DMARC1; rua=mailto:d@example.com")[0].p
    'none'
    """
    try:
        return parse_dmarc(text), None
    except ValueError as exc:
        tags = _tags(text)
        if _valid_policy(tags):
            raise
        kept = {name: value for name, value in tags.items() if name not in ("p", "sp")}
        record = _record({**kept, "p": "none"})  # still ValueError for another bad tag
        if not any(_URI_SCHEME.match(uri) for uri in record.rua):
            raise  # "otherwise, the Mail Receiver applies no DMARC processing"
        return record, str(exc)


def with_valid_policy(text: str) -> str:
    """``text`` (a record :func:`read_as_receivers` reads as ``p=none``) made valid: its
    first p=, if invalid, set to ``none`` (or ``p=none`` put right after ``v=DMARC1``),
    its first sp=, if invalid, left out, and later ones of either left out. Its other
    tags stay as they were written."""
    version, *parts = text.split(";")
    kept: list[str] = []
    seen: set[str] = set()
    for part in parts:
        name = part.partition("=")[0].strip(_WSP).lower()
        first = name not in seen
        seen.add(name)
        valid = part.partition("=")[2].strip(_WSP).lower() in _POLICIES
        if name in ("p", "sp") and not first:
            continue  # read by nobody, but the first once that one is gone
        if name == "p" and not valid:
            part = part.partition("=")[0] + "=none"
        elif name == "sp" and not valid:
            continue
        kept.append(part)
    if "p" not in seen:
        kept.insert(0, " p=none")
    return ";".join([version, *kept])


def _uris(value: str | None) -> tuple[str, ...]:
    return tuple(u.strip(_WSP) for u in (value or "").split(",") if u.strip(_WSP))


@functools.lru_cache(maxsize=1)
def _psl() -> Any:
    try:
        from publicsuffixlist import PublicSuffixList
    except ImportError:
        raise MissingExtra(["publicsuffixlist"]) from None
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registrable domain: ``mail.example.co.uk`` → ``example.co.uk``."""
    domain = normal_name(domain)
    return str(_psl().privatesuffix(domain) or domain)


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 §3.1: strict needs the same domain, relaxed the same organizational one."""
    a, b = normal_name(identifier), normal_name(from_domain)
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """The policy discovery's result (RFC 7489 §6.6.3)."""

    name: str | None = None
    """Where the record was found (``_dmarc.<domain>`` or at the organizational domain)."""
    records: tuple[str, ...] = ()
    error: str | None = None


def discover(resolver: Resolver, domain: str) -> Found:
    """Look for ``_dmarc.<domain>``, then ``_dmarc.<organizational domain>``."""
    names = [f"_dmarc.{domain}"]
    org = organizational_domain(domain)
    if org != normal_name(domain):
        names.append(f"_dmarc.{org}")
    for name in names:
        answer = resolver.lookup(name, "TXT")
        if answer.outcome is Outcome.ERROR:
            return Found(name=name, error=answer.error)
        records = tuple(r for r in answer.records if is_dmarc(r))
        if records:
            return Found(name=name, records=records)
    return Found()


def check_dmarc(
    resolver: Resolver,
    *,
    domain: str,
    spf_result: str | None,
    dkim_domains: Sequence[str],
    bulk: bool = False,
    envelope_domain: str | None = None,
    testing_domains: Sequence[str] = (),
    unknown_domains: Sequence[str] = (),
) -> Check:
    """The policy, and whether mail From ``domain`` would pass it, given the SPF result
    for ``envelope_domain`` (default: ``domain``, mailstrom's default envelope sender;
    None when SPF was not judged, for want of an outgoing address) and the ``d=``
    domains of the configured keys whose DKIM check passed. ``testing_domains`` are
    those of keys that verify but whose records say ``t=y``: verifiers are to treat
    their mail as unsigned (RFC 6376 §3.6.1), so a pass that needs them is a warning.
    ``unknown_domains`` are those of keys whose check could not be decided now (a lookup
    failed): mail that could pass by them, or by an SPF result of ``temperror``, neither
    passes nor fails here, but is unknown."""
    envelope_domain = envelope_domain or domain
    found = discover(resolver, domain)
    first_record = f'"v=DMARC1; p=none; rua=mailto:dmarc@{domain}"'
    starter = f"publish TXT at _dmarc.{domain}: {first_record}"

    def check(status: Status, summary: str, fix: str | None, details: Sequence[str]) -> Check:
        return Check(
            name="dmarc",
            subject=found.name or f"_dmarc.{domain}",
            status=status,
            summary=summary,
            details=tuple(details),
            fix=fix,
        )

    if found.error is not None:
        return check(Status.UNKNOWN, f"temporary DNS error: {found.error}", None, [])
    shown = capped([f"TXT {found.name}: {r}" for r in found.records])
    if not found.records:
        status = Status.FAIL if bulk else Status.WARN
        why = " (Gmail and Yahoo require one of bulk senders)" if bulk else ""
        return check(
            status,
            f"no DMARC record for {domain}{why}",
            starter + ", then p=quarantine once the reports show your mail passes",
            [],
        )
    if len(found.records) > 1:
        return check(
            Status.FAIL,
            f"{len(found.records)} DMARC records at {found.name}: receivers then apply none",
            f"keep exactly one TXT record starting with v=DMARC1 at {found.name}",
            shown,
        )
    try:
        record, broken = read_as_receivers(found.records[0])
    except ValueError as exc:
        fix = starter
        if found.name == f"_dmarc.{normal_name(domain)}":
            # Published beside the invalid record, a valid one would make two, and
            # receivers apply neither (RFC 7489 §6.6.3): it takes the invalid one's place.
            fix = (
                f"replace the TXT record at {found.name} that starts with v=DMARC1 by a "
                f"valid one, e.g. {first_record}"
            )
        return check(Status.FAIL, f"invalid DMARC record: {exc}", fix, shown)

    at_org = found.name != f"_dmarc.{normal_name(domain)}"
    policy = (record.sp or record.p) if at_org else record.p
    spf_ok = spf_result == "pass" and aligned(envelope_domain, domain, record.aspf)
    dkim_ok = [d for d in dkim_domains if aligned(d, domain, record.adkim)]
    in_tests = [d for d in testing_domains if aligned(d, domain, record.adkim)]
    testing_note = (
        f"a DKIM key in testing mode (t=y) for d={', '.join(in_tests)}, which verifiers "
        "are to treat as unsigned (RFC 6376 §3.6.1)"
    )
    drop_testing = "drop t=y from the key's record (see the dkim check)"
    pending = [d for d in unknown_domains if aligned(d, domain, record.adkim)]
    not_known = [
        *(["SPF could not be evaluated (see the spf check)"] if spf_result == "temperror" else []),
        *([f"the DKIM record of d={', '.join(pending)} could not be looked up"] if pending else []),
    ]
    details = [
        *shown,
        f"policy for {domain}: p={policy}"
        + (f" (sp= of {found.name})" if at_org and record.sp else "")
        + f", adkim={record.adkim}, aspf={record.aspf}, pct={record.pct}"
        + (", t=y" if record.testing else ""),
        "SPF: not checked (no outgoing address to judge)"
        if spf_result is None
        else f"SPF: {spf_result}, " + ("aligned" if spf_ok else "does not count for DMARC"),
        "DKIM: "
        + (
            f"aligned signature by d={', '.join(dkim_ok)}"
            if dkim_ok
            else f"aligned signature only by {testing_note}"
            if in_tests
            else "no aligned signature that verifies"
        ),
    ]
    published = found.records[0]
    if broken is not None:
        published = with_valid_policy(published)
        details.append(
            f"{broken}: receivers act as if the record said p=none, as it has a rua= URI "
            "(RFC 7489 §6.6.3)"
        )
    if not record.rua:
        details.append("no rua=: you get no aggregate reports of who sends as you")
    elif not any(_URI_SCHEME.match(uri) for uri in record.rua):
        details.append(
            f"rua= holds no URI ({piece(', '.join(record.rua))}: mailto: is missing): you get "
            "no aggregate reports of who sends as you"
        )
    policy_domain = (found.name or f"_dmarc.{domain}").removeprefix("_dmarc.")
    details.extend(_unconsenting(resolver, policy_domain, record.rua))
    if record.pct == 0 and policy != "none":
        # RFC 7489 §6.6.4: mail not sampled gets the next policy down, and pct=0 samples
        # none: a record that says quarantine is, to receivers, p=none.
        details.append(
            f"pct=0: receivers apply p={policy} to none of the failing mail, but "
            f"p={record.applied(policy)} (RFC 7489 §6.6.4)"
        )
    elif record.pct < 100:
        details.append(f"pct={record.pct}: the policy applies to part of failing mail only")
    if record.testing and policy != "none":
        details.append(
            f"t=y: the policy is being tested (DMARCbis): receivers apply p={policy} to none "
            f"of the failing mail, but p={record.applied(policy)}, as for pct=0"
        )

    if not dkim_ok and spf_result is None:
        # DMARC then passes or fails by SPF alone, for an address not known here (a
        # relay's, or one that routing could not find for now): no verdict either way.
        return check(
            Status.WARN,
            f"mail From {domain} passes DMARC (p={policy}) only if SPF passes for the "
            "address receivers see, which was not checked: no aligned DKIM signature",
            "give the address receivers see with --ip to check SPF for it, and sign with "
            f"a DKIM key for d={domain} (see the dkim checks)",
            details,
        )
    if not spf_ok and not dkim_ok and not_known:
        # A lookup that failed for now decides nothing: the mail may pass once it works,
        # and "would fail DMARC" (exit 2, with a fix to publish) was no verdict to give.
        return check(
            Status.UNKNOWN,
            f"whether mail From {domain} passes DMARC (p={policy}) is not known now: "
            + "; ".join(not_known),
            None,
            details,
        )
    if not spf_ok and not dkim_ok and in_tests:
        return check(
            Status.WARN,
            f"mail From {domain} passes DMARC (p={policy}) only by {testing_note}: "
            "receivers that do so fail it",
            f"{drop_testing}, or make SPF pass for this address (see the spf check)",
            details,
        )
    if not spf_ok and not dkim_ok:
        return check(
            Status.FAIL,
            f"mail From {domain} from this setup would fail DMARC (p={policy})",
            "make SPF pass for this address or publish the DKIM key (see the spf and dkim "
            f"checks); an aligned DKIM key signs with d={domain}"
            + (
                f" (relaxed alignment: or another name under {organizational_domain(domain)})"
                if record.adkim == "r"
                else ""
            ),
            details,
        )
    problems: list[str] = []
    fixes: list[str] = []
    if broken is not None:
        problems.append(f"the record is invalid ({broken}): receivers read it as p=none")
        fixes.append(f'replace the TXT record at {found.name} by "{published}"')
    if not dkim_ok and in_tests:
        problems.append(
            f"passes by SPF alone where {testing_note} counts for nothing, and forwarding "
            "breaks SPF"
        )
        fixes.append(drop_testing)
    elif not dkim_ok:
        problems.append("passes by SPF alone, which forwarding breaks")
        fixes.append(f"sign with a DKIM key for d={domain} and publish it (see the dkim check)")
    tag = "sp" if at_org and record.sp else "p"
    if policy == "none" and bulk:
        problems.append(f"{tag}=none asks receivers to do nothing with mail that fails")
        fixes.append(
            f"once the reports show your mail passes, publish at {found.name}: "
            f'"{_with_policy(published, tag, "quarantine")}"'
        )
    elif record.applied(policy) == "none" and bulk:
        # p=quarantine with pct=0 or t=y samples no failing mail: receivers apply the
        # next policy down, none (RFC 7489 §6.6.4), so it enforces no more than p=none.
        testing = " and ".join(
            [*(["pct=0"] if record.pct == 0 else []), *(["t=y"] if record.testing else [])]
        )
        problems.append(
            f"{tag}={policy} with {testing} asks receivers to do nothing with mail that "
            "fails, as p=none does (RFC 7489 §6.6.4)"
        )
        fixes.append(
            f"once the reports show your mail passes, publish at {found.name}: "
            f'"{_without_testing(published)}"'
        )
    verdict = f"mail From {domain} would pass DMARC (p={policy})"
    if problems:
        return check(
            Status.WARN, f"{verdict}, but {'; '.join(problems)}", "; ".join(fixes), details
        )
    return check(Status.PASS, verdict, None, details)


MOST_REPORT_URIS = 5
"""rua= URIs whose consent is looked up at most: receivers need send to two only (RFC 7489
§6.2), and each is a lookup of a name the record's publisher chose."""


def _unconsenting(resolver: Resolver, policy_domain: str, uris: Sequence[str]) -> list[str]:
    """A note for each ``mailto:`` report URI of ``uris`` (the first few) outside the
    organization of ``policy_domain`` whose host has not agreed to take its reports:
    receivers check for a ``v=DMARC1`` TXT record at
    ``<policy domain>._report._dmarc.<host>`` and send none without it (RFC 7489 §7.1)."""
    notes: list[str] = []
    own = organizational_domain(policy_domain)
    asked: set[str] = set()
    for uri in uris[:MOST_REPORT_URIS]:
        if uri[:7].lower() != "mailto:":
            continue
        # mailto:addr!10m: a size limit may follow the address (§6.2), headers after a "?".
        address = uri[7:].partition("!")[0].partition("?")[0]
        local, at, host = address.rpartition("@")
        host = normal_name(host)
        if not at or not local or not host or host in asked or organizational_domain(host) == own:
            continue
        asked.add(host)
        name = f"{policy_domain}._report._dmarc.{host}"
        answer = resolver.lookup(name, "TXT")
        if answer.outcome is Outcome.ERROR:
            notes.append(
                f"rua={piece(uri)}: could not check that {piece(host)} takes reports for "
                f"{policy_domain} ({answer.error})"
            )
        elif not any(is_dmarc(r) for r in answer.records):
            notes.append(
                f"rua={piece(uri)}: {piece(host)} has not agreed to take reports for "
                f'{policy_domain} (no "v=DMARC1" TXT record at {piece(name, 120)}, RFC 7489 '
                "§7.1): receivers send no reports there"
            )
    return notes


def _with_policy(record: str, tag: str, policy: str) -> str:
    """``record`` with its ``tag`` (``p`` or ``sp``) of ``none`` set to ``policy``: the
    first such tag, the one :func:`parse_dmarc` reads, its name and value in any case."""
    return re.sub(
        rf"(;[ \t]*{tag}[ \t]*=[ \t]*)none(?=[ \t]*(?:;|\Z))",
        lambda m: m.group(1) + policy,
        record,
        count=1,
        flags=re.IGNORECASE,
    )


def _without_testing(record: str) -> str:
    """``record`` without its ``pct=`` and ``t=`` tags (every one of a name: the first
    is the one read, and a later one would take its place): what is left applies its
    policy to all failing mail (``pct=100``, ``t=n``, the defaults)."""
    version, *parts = record.split(";")
    kept = [p for p in parts if p.partition("=")[0].strip(_WSP).lower() not in ("pct", "t")]
    return ";".join([version, *kept])
