"""Forward-confirmed reverse DNS (FCrDNS) of the outgoing address, and the HELO name.

Gmail asks both of senders: the address's PTR record names a host whose A/AAAA records
include the address, and the name given in EHLO resolves to the address. Receivers
widely expect the PTR name and the EHLO name to be the same host.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailstrom.doctor.lookup import (
    Outcome,
    Resolver,
    address_family,
    normal_name,
    reverse_name,
    same_address,
)
from mailstrom.doctor.report import Check, Status, capped, listed, piece
from mailstrom.domains import literal_address

MAX_PTR_NAMES = 10
"""PTR names of the address forward-confirmed at most. Each costs a lookup (a dropped one
the whole DNS timeout), and whoever holds the address block decides how many there are:
RFC 7208 §4.6.4 bounds SPF's ``ptr`` mechanism the same way. A sane zone has one."""

_PTR_OWNER = (
    "PTR records belong to whoever holds the address block (your hosting or cloud "
    "provider: its console or its support), not to your own zone"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Forward:
    confirmed: list[str]
    unconfirmed: list[str]
    error: str | None


def _forward(resolver: Resolver, ip: str, names: list[str]) -> _Forward:
    confirmed: list[str] = []
    unconfirmed: list[str] = []
    error: str | None = None
    for name in names:
        answer = resolver.lookup(name, address_family(ip))
        if answer.outcome is Outcome.ERROR:
            error = error or answer.error
        if any(same_address(ip, r) for r in answer.records):
            confirmed.append(name)
        elif answer.outcome is not Outcome.ERROR:
            unconfirmed.append(name)
    return _Forward(confirmed=confirmed, unconfirmed=unconfirmed, error=error)


def check_fcrdns(resolver: Resolver, *, ip: str, helo: str) -> list[Check]:
    """Two checks: ``ptr`` (the address's reverse DNS, forward-confirmed) and ``helo``
    (the HELO name resolves to the address and is the PTR name)."""
    helo = normal_name(helo)
    rtype = address_family(ip)
    rname = reverse_name(ip)
    # The name a PTR record should give: the HELO name, unless that is an address literal.
    ptr_target = helo if literal_address(helo) is None else f"a host name that resolves to {ip}"
    ptr = resolver.lookup(rname, "PTR")
    # A PTR record of the root (".") names no host: nothing to confirm, and no name to
    # publish an address record at.
    named = [normal_name(n) for n in ptr.records]
    names = [n for n in named if n][:MAX_PTR_NAMES]
    forward = _forward(resolver, ip, names)
    unchecked = len([n for n in named if n]) - len(names)
    details = tuple(f"PTR {rname}: {n}" for n in names) + (
        (f"PTR {rname}: {unchecked} more names, not looked at",) if unchecked else ()
    )
    # A summary is one line: a few names, each cut short (DNS names run to 253, and ten
    # of them made a line of 2,500 characters). The details list them whole.
    some = listed([piece(n) for n in names], 3)
    confirmed = listed([piece(n) for n in forward.confirmed], 3)

    if ptr.outcome is Outcome.ERROR:
        ptr_check = Check(
            name="ptr",
            subject=ip,
            status=Status.UNKNOWN,
            summary=f"temporary DNS error: {ptr.error}",
        )
    elif not names:
        what = "has no PTR record" if not named else "has a PTR record that names no host (.)"
        ptr_check = Check(
            name="ptr",
            subject=ip,
            status=Status.FAIL,
            summary=f"{ip} {what} (Gmail rejects mail from such addresses)",
            fix=f"{_PTR_OWNER}: ask for PTR {rname} → {ptr_target}",
        )
    elif forward.confirmed:
        ptr_check = Check(
            name="ptr",
            subject=ip,
            status=Status.PASS,
            summary=f"{ip} → {confirmed} → {ip}: forward-confirmed",
            details=details,
        )
    elif forward.error is not None:
        ptr_check = Check(
            name="ptr",
            subject=ip,
            status=Status.UNKNOWN,
            summary=f"temporary DNS error confirming {some}: {forward.error}",
            details=details,
        )
    else:
        ptr_check = Check(
            name="ptr",
            subject=ip,
            status=Status.FAIL,
            summary=f"the PTR name {some} does not resolve back to {ip}",
            details=details,
            fix=f"publish {rtype} record {names[0]} → {ip}",
        )
    return [ptr_check, _check_helo(resolver, ip=ip, helo=helo, ptr_names=forward.confirmed)]


def _check_helo(resolver: Resolver, *, ip: str, helo: str, ptr_names: list[str]) -> Check:
    rtype = address_family(ip)

    def check(status: Status, summary: str, fix: str | None = None, *details: str) -> Check:
        return Check(
            name="helo", subject=helo, status=status, summary=summary, details=details, fix=fix
        )

    literal = literal_address(helo)
    if literal is not None:
        # RFC 5321 §4.1.3 allows it, but it is no name: nothing can be published at it,
        # and spam filters (rspamd's HFILTER_HELO_BAREIP) score a bare address in EHLO.
        matches = same_address(ip, str(literal))
        return check(
            Status.WARN if matches else Status.FAIL,
            f"{helo} is an address literal"
            + ("" if matches else f" of another address than {ip}")
            + ": receivers expect a host name that resolves to the address and is its PTR name",
            f'set helo_name = "{ptr_names[0]}"'
            if ptr_names
            else f"set helo_name to a host name that resolves to {ip}, and {_PTR_OWNER}: "
            f"ask for PTR {reverse_name(ip)} → that name",
        )
    if "." not in helo:
        return check(
            Status.FAIL,
            f"{helo} is not a fully qualified domain name",
            f'set helo_name to a name in DNS that resolves to {ip}, e.g. helo_name = "mail.'
            f'{helo}.example.com" (MAILSTROM_HELO_NAME, --helo-name)',
        )
    answer = resolver.lookup(helo, rtype)
    shown = capped([f"{rtype} {helo}: {r}" for r in answer.records])
    if answer.outcome is Outcome.ERROR:
        return check(Status.UNKNOWN, f"temporary DNS error: {answer.error}")
    if not any(same_address(ip, r) for r in answer.records):
        found = listed(answer.records) or f"no {rtype} record"
        return check(
            Status.FAIL,
            f"{helo} does not resolve to {ip} ({found})",
            f"publish {rtype} record {helo} → {ip}"
            + (f', or set helo_name = "{ptr_names[0]}"' if ptr_names else ""),
            *shown,
        )
    if helo not in ptr_names:
        ptr = listed([piece(n) for n in ptr_names], 3) or "no confirmed PTR name"
        return check(
            Status.WARN,
            f"{helo} resolves to {ip}, but the address's PTR names {ptr}",
            (f'set helo_name = "{ptr_names[0]}", or ' if ptr_names else "")
            + f"{_PTR_OWNER}: ask for PTR {reverse_name(ip)} → {helo}",
            *shown,
        )
    return check(Status.PASS, f"{helo} resolves to {ip} and is its PTR name", None, *shown)
