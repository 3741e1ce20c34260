"""The outgoing address and outbound port 25.

The doctor connects towards a *probe target*: by default the first MX host of
``gmail.com`` on the configured SMTP port. Gmail is the receiver most senders must
satisfy and its MX hosts answer on port 25 everywhere, and looking the host up in DNS
(through the configured resolver) keeps the target current without a hard-coded address.
``--probe`` (or ``doctor.probe``) names another: an address, a host, or a mail domain
whose first MX host is used, with an optional port — tests point it at a loopback
receiver.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailstrom.doctor.lookup import (
    MOST_MX_HOSTS,
    Outcome,
    Resolver,
    address_family,
    host_addresses,
    normal_name,
    public_form,
)
from mailstrom.doctor.network import Network
from mailstrom.doctor.report import Check, Status, listed, piece
from mailstrom.routing.policy import RoutePolicy, not_global_kind

DEFAULT_PROBE = "gmail.com"

RELAY_FIX = (
    "ask the provider to open outbound port 25 (AWS, Google Cloud, Azure and many other "
    "clouds block it by default), or send through a relay (smarthost) on port 587: set "
    'relay.host = "smtp.example.net", relay.username and relay.password (MAILSTROM_RELAY_*)'
)
_NAME_A_PROBE = "name a reachable SMTP server with --probe HOST[:PORT]"
"""The fix when the probe target cannot be found or takes no mail."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    """What was asked for, as shown (``gmail-smtp-in.l.google.com``, ``127.0.0.1``)."""
    address: str
    port: int

    @property
    def shown(self) -> str:
        """``name (address):port``, or ``address:port`` when the name is the address: the
        subject of the port 25 check."""
        if self.name == self.address:
            return f"{self.name}:{self.port}"
        return f"{self.name} ({self.address}):{self.port}"


def split_probe(text: str, default_port: int) -> tuple[str, int]:
    """``HOST[:PORT]`` (IPv6 with a port as ``[::1]:25``) → (host, port); ValueError if
    the port is no port."""
    host, port = text.strip(), None
    if host.startswith("["):
        host, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [HOST] or [HOST]:PORT, got {text!r}")
        port = rest.removeprefix(":") if rest else None
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    if not host:
        raise ValueError(f"expected HOST[:PORT], got {text!r}")
    if port is None:
        return host, default_port
    # isascii: isdigit() also takes "\u0669" (int() reads it as 9) and "²" (int() refuses).
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"not a port number: {port!r}")
    return host, int(port)


def find_target(
    resolver: Resolver,
    spec: str,
    default_port: int,
    *,
    source: str | None = None,
    allow_loopback: bool = False,
) -> Target | Check:
    """The probe target ``spec`` names (the first of :func:`find_targets`), or a check
    saying why there is none."""
    found = find_targets(resolver, spec, default_port, source=source, allow_loopback=allow_loopback)
    return found[0] if isinstance(found, list) else found


def find_targets(
    resolver: Resolver,
    spec: str,
    default_port: int,
    *,
    source: str | None = None,
    allow_loopback: bool = False,
) -> list[Target] | Check:
    """The probe targets ``spec`` names, one for each IP version it has an address of
    (the first MX host with one), in the order found; or a check saying why there is
    none. A host that sends over IPv4 and IPv6 alike (no ``source_address``) reaches a
    receiver over either, and is judged by each address it sends from. With a ``source``
    address (the ``source_address`` setting), an MX host's addresses of its IP version
    only: delivery bound to it skips the others, which it cannot reach."""
    host, port = split_probe(spec, default_port)
    try:
        return [Target(name=host, address=str(ipaddress.ip_address(host)), port=port)]
    except ValueError:
        pass
    name = normal_name(host)
    mx = resolver.lookup(name, "MX")
    if mx.failed:
        # Its MX host is unknown for now: the domain's own address stands in only when it
        # has no MX records (RFC 5321 §5.1), and is no SMTP server otherwise (gmail.com's
        # is a web server), where a refused probe would blame this machine's port 25.
        return Check(
            name="port-25",
            subject=spec,
            status=Status.UNKNOWN,
            summary=f"cannot find the probe target {spec}: {mx.error}",
            fix=_NAME_A_PROBE,
        )
    ranked: list[tuple[int, str]] = []
    if mx.outcome is Outcome.ANSWER:
        ranked = sorted((int(p), h) for p, _, h in (r.partition(" ") for r in mx.records))
        # An exchange written as an address literal ("[192.0.2.25]") names no host (RFC
        # 5321 §5.1): the router skips it, as Postfix does; looked up as a name, it was
        # "no MX or address record" for a domain that has MX records.
        literals = [h for _, h in ranked if h.startswith("[") and h.endswith("]")]
        real = [(p, h) for p, h in ranked if h not in (".", "") and h not in literals]
        if real:
            # A null MX beside other MX records (RFC 7505 §3 forbids the mix) is dropped,
            # as the router drops it: the mail goes to the others, so they are probed.
            ranked = real
        elif literals and len(literals) == len(ranked):
            at = listed([piece(host) for host in literals], 3)
            return Check(
                name="port-25",
                subject=spec,
                status=Status.FAIL,
                summary=f"cannot probe {spec}: {name} accepts no mail (its MX records name "
                f"only address literals, {at}, which are no host names: RFC 5321 §5.1)",
                fix=_NAME_A_PROBE,
            )
        elif ranked:
            # RFC 7505: the domain takes no mail, and its own address is no SMTP server
            # (implicit MX is for a domain without MX records): a probe there would be
            # refused, and blamed on this machine's port 25.
            return Check(
                name="port-25",
                subject=spec,
                status=Status.FAIL,
                summary=f"cannot probe {spec}: {name} accepts no mail (null MX, RFC 7505)",
                fix=_NAME_A_PROBE,
            )
    # The MX hosts, best first, tried in turn as the router tries them (a host without
    # an address is passed over); without MX records, the domain's own name (implicit MX,
    # RFC 5321 §5.1). Bounded: an RRset holds as many records as its publisher likes.
    hosts = list(dict.fromkeys(normal_name(h) for _, h in ranked))[:MOST_MX_HOSTS] or [name]
    rtypes = ("A", "AAAA") if source is None else (address_family(source),)
    # Judged as the router judges them: "localhost" is this host, and so is an MX host
    # at 127.0.0.1; the router delivers to neither (unless allow_loopback), and a probe
    # there tests this host's own port 25, not the way out.
    policy = RoutePolicy(allow_loopback=allow_loopback)
    found: dict[str, Target] = {}  # by record type, in the order found
    failed: str | None = None
    refused: list[str] = []
    for host in hosts:
        if len(found) == len(rtypes):
            break
        # An exchange that spells an address ("MX 10 192.0.2.25"; RFC 5321 §5.1 wants a
        # name) is where the router delivers, as Postfix does: probed there, not looked
        # up as a name that has no address records.
        wanted = tuple(rtype for rtype in rtypes if rtype not in found)
        addresses = host_addresses(resolver, host, wanted, policy)
        for address, rtype in addresses.kept.items():
            name = address if _spells(host, address) else host
            found.setdefault(rtype, Target(name=name, address=address, port=port))
        refused.extend(addresses.refused)
        failed = failed or addresses.error
    if found:
        return list(found.values())
    if refused and failed is None:
        at = listed([piece(host) for host in hosts], 3)
        return Check(
            name="port-25",
            subject=spec,
            status=Status.FAIL,
            summary=f"cannot probe {spec}: its mail hosts ({at}) have only addresses "
            f"mail is not sent to ({listed(refused, 3)}): this host's own, not the way out",
            fix=_NAME_A_PROBE,
        )
    record = "address record" if source is None else f"{rtypes[0]} record"
    missing = (
        f"no MX or {record}"
        if not ranked
        else f"no {record} for its MX hosts ({listed([piece(h) for h in hosts], 3)})"
    ) + ("" if source is None else f", which source_address {source} needs")
    return Check(
        name="port-25",
        subject=spec,
        status=Status.FAIL if failed is None else Status.UNKNOWN,
        summary=f"cannot find the probe target {spec}: {failed or missing}",
        fix=_NAME_A_PROBE,
    )


def _spells(host: str, address: str) -> bool:
    """Whether MX host ``host`` is written as ``address`` (not a name looked up)."""
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(address)
    except ValueError:
        return False


def check_outgoing(
    network: Network, target: Target | None, *, given: str | None, source: str | None
) -> tuple[Check, str | None]:
    """Which address receivers will see: ``given`` (``--ip``), else the one the kernel
    picks towards the target (bound to ``source``, the ``source_address`` setting)."""
    if given is not None:
        return Check(
            name="outgoing-ip",
            subject=given,
            status=Status.PASS,
            summary=f"{given} (given with --ip)",
        ), given
    if target is None:
        return Check(
            name="outgoing-ip",
            subject="-",
            status=Status.FAIL,
            summary="no probe target to find the outgoing address with",
            fix="give the address receivers see with --ip ADDRESS, or a target with --probe",
        ), None
    try:
        ip = network.local_address(target.address, target.port, source)
    except OSError as exc:
        return Check(
            name="outgoing-ip",
            subject=source or "-",
            status=Status.FAIL,
            summary=f"no route towards {target.name} ({target.address}): {exc.strerror or exc}",
            fix="check this machine's network, or give the address with --ip ADDRESS",
        ), None
    # A link-local address comes with its zone index (fe80::1%eth0), which names an
    # interface of this host, and an IPv4 one of a dual-stack socket IPv4-mapped: the
    # address is judged as others see it.
    ip = public_form(ip.partition("%")[0])
    how = (
        f"the source_address setting, towards {target.name}"
        if source
        else (f"the route towards {target.name} ({target.address})")
    )
    address = ipaddress.ip_address(ip)
    kind = (
        "loopback"
        if address.is_loopback
        else "link-local"
        if address.is_link_local
        else not_global_kind(address)
    )
    if not source and kind in _BEHIND_A_TRANSLATOR:
        return Check(
            name="outgoing-ip",
            subject=ip,
            status=Status.WARN,
            summary=f"{ip} ({how}) is a {kind} address: behind NAT receivers see another one",
            fix="give the public address receivers see with --ip ADDRESS (your provider's "
            "console shows it) so the checks below judge the right one",
        ), ip
    return Check(name="outgoing-ip", subject=ip, status=Status.PASS, summary=f"{ip} ({how})"), ip


_BEHIND_A_TRANSLATOR = frozenset(
    {"loopback", "link-local", "private", "site-local", "benchmarking"}
)
"""Kinds of address (:func:`~mailstrom.routing.policy.not_global_kind`, the route
policy's networks) a network numbers its own hosts from, which reach the Internet only
through a translator: private use (RFC 1918, RFC 6598, RFC 4193, the NAT64 local-use
prefix), the deprecated site-local prefix, and the benchmarking one that labs and some
networks use. Not the documentation prefixes, which number no host."""


def check_port25(network: Network, target: Target, *, source: str | None, timeout: float) -> Check:
    """Whether an SMTP server on the target answers: outbound port 25 is open."""
    where = target.shown
    probe = network.probe(target.address, target.port, source, timeout)

    def check(status: Status, summary: str, fix: str | None = None) -> Check:
        return Check(name="port-25", subject=where, status=status, summary=summary, fix=fix)

    if not probe.connected:
        blocked = "looks blocked" if probe.timed_out else "is refused or unreachable"
        return check(
            Status.FAIL,
            f"outbound SMTP {blocked}: {probe.error}",
            RELAY_FIX,
        )
    if not probe.greeting:
        return check(
            Status.FAIL,
            f"the connection opened but no SMTP greeting came ({probe.error}): something "
            "on the way intercepts port 25",
            RELAY_FIX,
        )
    if not probe.greeting.startswith("220"):
        return check(
            Status.WARN,
            f"answered, but refuses this address: {probe.greeting}",
            "see the blocklist checks, or ask the receiver's postmaster why",
        )
    return check(Status.PASS, f"answered: {probe.greeting}")
