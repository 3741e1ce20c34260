"""Does the sending domain take mail? Receivers ask it of the envelope sender's domain.

Mail whose envelope sender is in a domain that takes no mail can get no bounce, and
receivers refuse it: a null MX (``MX 0 .``) says the domain accepts none, and "Senders of
email SHOULD NOT use envelope sender addresses in domains that publish a null MX" (RFC
7505 §4.2; receivers reply 550 5.7.27, §4.3); a domain with neither MX nor address
records has no way to take mail either (Postfix's ``reject_unknown_sender_domain``
refuses both: "Sender address rejected: Domain not found"). mailstrom's envelope sender
is the From address by default, so the From domain is the one asked about.
"""

from __future__ import annotations

from collections.abc import Callable

from mailstrom.doctor.lookup import MOST_MX_HOSTS, Outcome, Resolver, host_addresses, normal_name
from mailstrom.doctor.report import Check, Status, capped, listed, piece
from mailstrom.routing.policy import RoutePolicy


def check_mx(resolver: Resolver, *, domain: str, allow_loopback: bool = False) -> Check:
    """The ``mx`` check: ``domain`` has MX records (or, without any, an address that
    stands in for them, RFC 5321 §5.1), and no null MX (a warning beside other MX
    records, which take its mail as the router sees it). Its mail hosts' addresses are
    judged as the router judges them (:func:`~mailstrom.doctor.lookup.host_addresses`):
    a domain whose hosts are only ``localhost`` or loopback addresses takes no mail
    (unless ``allow_loopback``, for tests and demos)."""
    policy = RoutePolicy(allow_loopback=allow_loopback)

    def check(status: Status, summary: str, fix: str | None = None, *details: str) -> Check:
        return Check(
            name="mx", subject=domain, status=status, summary=summary, details=details, fix=fix
        )

    answer = resolver.lookup(domain, "MX")
    if answer.outcome is Outcome.ERROR:
        return check(Status.UNKNOWN, f"temporary DNS error: {answer.error}")
    records = _by_preference(answer.records)
    shown = capped([f"MX {domain}: {preference} {host}" for preference, host in records])
    hosts = [host for _, host in records]
    null = any(host in ("", ".") for host in hosts)
    # An exchange written as an address literal ("[192.0.2.25]") names no host (RFC 5321
    # §5.1): the router skips it, as Postfix does, and bounces a domain left without one.
    literals = [host for host in hosts if host.startswith("[") and host.endswith("]")]
    real = [host for host in hosts if host not in ("", ".") and host not in literals]
    if null and not real:
        return check(
            Status.FAIL,
            f"{domain} publishes a null MX (RFC 7505): it takes no mail, so its mail gets no "
            "bounces, and receivers refuse mail from it (550 5.7.27)",
            f"remove the null MX of {domain} and publish the MX records of the servers that "
            "take its mail (bounces and replies come back there)",
            *shown,
        )
    if literals and not real:
        at = listed([piece(host) for host in literals], 3)
        return check(
            Status.FAIL,
            f"{domain}'s MX records name only address literals ({at}), which are no host "
            "names (RFC 5321 §5.1): senders skip them, so it takes no mail and its mail "
            "gets no bounces",
            f"publish MX records at {domain} naming the servers that take its mail by their "
            "host names",
            *shown,
        )
    if real:
        # A summary is one line: a few names, each cut short (DNS names run to 253).
        at = listed([piece(host) for host in real], 3)
        unusable = _unusable(resolver, real, policy)
        if unusable is None and null:
            # RFC 7505 §3: a domain with a null MX MUST NOT publish other MX records.
            # Senders seeing both deliver to the real hosts (mailstrom's router drops the
            # null MX), but a receiver checking the sender's domain may take it as "no
            # mail here".
            return check(
                Status.WARN,
                f"{domain} publishes a null MX (RFC 7505) beside other MX records, which "
                f"RFC 7505 §3 forbids: senders deliver its mail to {at}, but receivers may "
                "read the null MX as taking no mail and refuse mail from it",
                f"remove the null MX of {domain}: its other MX records take its mail",
                *shown,
            )
        if null:
            # The hosts beside it decide where mail goes, as the router drops the null MX;
            # the verdict on them stands, and the forbidden mix is named with it.
            check = _also_null(check, domain)
        if unusable is not None and unusable[2] is not None:
            return check(
                Status.UNKNOWN,
                f"temporary DNS error looking up the addresses of {domain}'s MX hosts "
                f"({at}): {unusable[2]}",
                None,
                *shown,
            )
        if unusable is not None:
            refused, addressless, _ = unusable
            why = listed(
                [
                    *refused,
                    *(f"{piece(host)}: no A or AAAA record" for host in addressless),
                ],
                3,
            )
            fix = f"publish MX records at {domain} naming the servers that take its mail"
            if addressless:
                fix += f", or publish the address of {piece(addressless[0])}"
            unasked = len(set(map(normal_name, real))) - MOST_MX_HOSTS
            if unasked > 0:  # the others may have one: no verdict on the domain
                return check(
                    Status.WARN,
                    f"{domain}'s first {MOST_MX_HOSTS} MX hosts have no address senders "
                    f"deliver to ({why}); its {unasked} others were not looked up",
                    fix,
                    *shown,
                )
            return check(
                Status.FAIL,
                f"{domain}'s MX hosts ({at}) have no address senders deliver to "
                f"({why}), so it takes no mail and its mail gets no bounces",
                fix,
                *shown,
            )
        return check(Status.PASS, f"{domain} takes mail at {at}", None, *shown)
    addresses = host_addresses(resolver, domain, ("A", "AAAA"), policy)
    if addresses.kept:
        return check(
            Status.PASS,
            f"{domain} has no MX record: its address {next(iter(addresses.kept))} takes its "
            "mail (implicit MX, RFC 5321 §5.1)",
        )
    if addresses.error is not None:
        return check(Status.UNKNOWN, f"temporary DNS error: {addresses.error}")
    if addresses.refused:
        return check(
            Status.FAIL,
            f"{domain} has no MX record, and its own address stands in for one (RFC 5321 "
            f"§5.1): {listed(list(addresses.refused), 3)}, where senders do not deliver, so "
            "it takes no mail and its mail gets no bounces",
            f"publish MX records at {domain} naming the servers that take its mail",
        )
    return check(
        Status.FAIL,
        f"{domain} has no MX or address record: it takes no mail, so its mail gets no "
        "bounces, and receivers that check the sender's domain refuse it (Domain not found)",
        f"publish MX records at {domain} naming the servers that take its mail",
    )


def _also_null(check: Callable[..., Check], domain: str) -> Callable[..., Check]:
    """``check`` for a verdict on the MX hosts published beside a null MX: its summary
    and fix also name the null MX, which RFC 7505 §3 forbids beside them."""

    def with_null(status: Status, summary: str, fix: str | None = None, *details: str) -> Check:
        summary += "; it also publishes a null MX (RFC 7505) beside them, which RFC 7505 §3 forbids"
        remove = f"remove the null MX of {domain}"
        return check(status, summary, f"{fix}; {remove}" if fix else remove, *details)

    return with_null


def _by_preference(records: tuple[str, ...]) -> list[tuple[int, str]]:
    """MX records (``preference exchange``) in the order senders try them: lowest
    preference first (RFC 5321 §5.1), whatever order the answer lists them in. Equal
    preferences, which senders try in random order, come by name, so that two runs over
    the same answer look up the same hosts and report them alike."""
    parsed = [(int(p), h.strip()) for p, _, h in (r.strip().partition(" ") for r in records)]
    return sorted(parsed, key=lambda record: (record[0], normal_name(record[1])))


def _unusable(
    resolver: Resolver, hosts: list[str], policy: RoutePolicy
) -> tuple[list[str], list[str], str | None] | None:
    """When none of the first :data:`MOST_MX_HOSTS` of ``hosts`` (in the order senders
    try them) has an address the router delivers to: their refused addresses (``address
    (kind)``), the hosts with no address record at all, and the first lookup error, if
    one failed; else None. The first host with a usable address ends the lookups.

    A host without addresses counts as much as one with refused ones: the router finds
    no route through either (mail to the domain waits, then bounces), and a domain with
    only such hosts passed as one that "takes mail". A failed lookup leaves it unknown:
    it passed too."""
    refused: list[str] = []
    addressless: list[str] = []
    error: str | None = None
    for host in list(dict.fromkeys(normal_name(h) for h in hosts))[:MOST_MX_HOSTS]:
        addresses = host_addresses(resolver, host, ("A", "AAAA"), policy)
        if addresses.kept:
            return None
        refused.extend(addresses.refused)
        if addresses.error is not None:
            error = error or addresses.error
        elif not addresses.refused:
            addressless.append(host)
    return refused, addressless, error
