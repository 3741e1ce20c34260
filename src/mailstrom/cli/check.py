"""``mailstrom check DOMAIN``: what delivery to a domain would do, step by step.

It resolves the domain as the worker does, connects to every address of every MX host on the
configured SMTP port, reports EHLO capabilities, STARTTLS and the certificate (verified with
the configured trust), says whether the TLS policy would let mail through, and checks that
the HELO name has forward (A/AAAA) and reverse (PTR) DNS that agree, as receivers expect.

It also asks for DNSSEC (whatever ``dns.dnssec`` says, so that it can report it): whether
the resolver validated the MX and address records (the AD bit), each host's TLSA records
at ``_25._tcp.<host>``, and the TLS policy the worker would apply to each host (DANE only
with ``dns.dnssec``, as in delivery), checking the certificate against the TLSA records.
It fetches the domain's MTA-STS policy too (see :mod:`mailstrom.cli.check_mtasts`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.resolver
import dns.reversename

from mailstrom.cli.context import settings_from
from mailstrom.cli.exits import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE
from mailstrom.cli.output import echo, print_json
from mailstrom.cli.parsing import Subparsers
from mailstrom.config import Config, TLSPolicy
from mailstrom.domains import a_label, literal_address, shown
from mailstrom.errors import DeliveryError, PermanentFailure
from mailstrom.routing import Route, Router, make_resolver
from mailstrom.routing.lookup import unanswered
from mailstrom.runtime.connection import SMTPConnection, StartTLS, TLSVerifyError
from mailstrom.tls.decide import Destination, TLSDecider
from mailstrom.tls.requirement import PolicySource, TLSMode, TLSRequirement

if TYPE_CHECKING:
    from mailstrom.cli.check_mtasts import MTASTSReport

EPILOG = """\
examples:
  mailstrom check example.org
  mailstrom check --json example.org | jq '.hosts[].addresses[].verdict'
  mailstrom check --smtp-port 2525 --dns-server 127.0.0.1:5353 test.example

exit code: 0 when at least one address would accept a connection under the TLS
policy, 69 when none would (or the domain takes no mail), 75 on a temporary DNS failure,
64 for a DOMAIN that is no domain name. An address checks its domain.
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        parents=parents,
        help="show how mail to a domain would be delivered",
        description="Resolve DOMAIN's MX hosts, connect to each address, and report EHLO "
        "capabilities, STARTTLS, TLS version and certificate, whether DNSSEC validated the "
        "records, each host's TLSA records and whether the certificate matches them, what "
        "the TLS policy would do, and whether the HELO name's forward and reverse DNS "
        "match. Sends no mail.",
        epilog=EPILOG,
    )
    p.add_argument(
        "domain",
        type=_domain_arg,
        help="recipient domain, or an address (its part after the last @)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=check_command)


def _domain_arg(text: str) -> str:
    """The domain of DOMAIN (or of an address, as ``mailstrom doctor`` takes it), when
    DNS can name it (the router's own test, before any lookup) and it holds no white
    space or control character. Any other was checked all the same: DNS takes "@" and
    " " escaped, so a pasted address got a report of a domain that does not exist, and
    exit 69 as for a domain that takes no mail, where it is the command line that is
    wrong."""
    from mailstrom.routing.lookup import to_qname

    domain = text.rpartition("@")[2].strip()
    try:
        to_qname(domain)
    except PermanentFailure as exc:
        why = exc.__cause__ or exc
        raise argparse.ArgumentTypeError(f"not a domain name: {shown(text)} ({why})") from None
    if not all(char.isprintable() and not char.isspace() for char in domain):
        raise argparse.ArgumentTypeError(
            f"not a domain name: {shown(text)} (white space or a control character)"
        )
    return domain


# --- the report --------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class AddressReport:
    ip: str
    port: int
    connected: bool = False
    error: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    starttls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    certificate_verified: bool | None = None
    certificate: dict[str, Any] | None = None
    certificate_error: str | None = None
    verdict: str = ""
    usable: bool = False
    dane: str | None = None
    """With TLSA records: which one the certificate matched, or why none did."""


@dataclass(slots=True, kw_only=True)
class HostReport:
    name: str
    preference: int
    addresses: list[AddressReport]
    dnssec: bool = False
    """The host's address records were DNSSEC-validated (the resolver's AD bit)."""
    tlsa: list[str] = field(default_factory=list)
    """Its TLSA records at _25._tcp.<host>, as "usage selector matching data"."""
    tlsa_malformed: int = 0
    """TLSA records left out of :attr:`tlsa` for a digest of the wrong size: unusable,
    but published (RFC 7672 §2.2: TLS is required all the same)."""
    tlsa_dnssec: bool = False
    tlsa_error: str | None = None
    tls_policy: str | None = None
    """The policy delivery would apply (none, opportunistic, required, verify, dane...)."""
    tls_policy_reason: str | None = None
    canonical: str | None = None
    """The CNAME-expanded name when the host is an alias (its TLSA records may be there)."""
    tlsa_at: str | None = None
    """Where the reported TLSA records were looked up, when the host is an alias."""


@dataclass(slots=True, kw_only=True)
class HeloReport:
    name: str
    addresses: list[str] = field(default_factory=list)
    error: str | None = None
    ptr: dict[str, list[str]] = field(default_factory=dict)
    """Each address's PTR names; an address whose PTR lookup failed is left out."""
    forward_confirmed: bool = False
    lookup_failed: bool = False
    """A lookup failed (SERVFAIL, timeout): unless confirmed, whether forward and reverse
    DNS match is not known."""


@dataclass(slots=True, kw_only=True)
class CheckReport:
    domain: str
    smtp_port: int
    tls_policy: str
    relay: str | None = None
    implicit_mx: bool = False
    alias_of: str | None = None
    """The domain's CNAME expansion, when its MX records were found through an alias."""
    dns_error: str | None = None
    dns_permanent: bool = False
    hosts: list[HostReport] = field(default_factory=list)
    helo: HeloReport | None = None
    dnssec: bool = False
    """The MX records (or the implicit MX's addresses) were DNSSEC-validated."""
    dnssec_trusted: bool = False
    """``dns.dnssec``: delivery believes the AD bit (and so uses DANE)."""
    mta_sts: MTASTSReport | None = None

    @property
    def deliverable(self) -> bool:
        return any(a.usable for h in self.hosts for a in h.addresses)


# --- probing -----------------------------------------------------------------------------


def _certificate(conn: SMTPConnection) -> dict[str, Any] | None:
    cert = conn.peer_certificate
    if not cert:
        return None

    def name(rdns: Any) -> str:
        return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn)

    not_after = cert.get("notAfter")
    expires = datetime.fromtimestamp(_cert_time(not_after), UTC).isoformat() if not_after else None
    return {
        "subject": name(cert.get("subject", ())),
        "issuer": name(cert.get("issuer", ())),
        "names": [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"],
        "expires": expires,
    }


def _cert_time(text: str) -> float:
    import ssl

    return float(ssl.cert_time_to_seconds(text))


async def _open(config: Config, host: str, ip: str, mode: StartTLS) -> SMTPConnection:
    return await SMTPConnection.open(
        host=host,
        ip=ip,
        port=config.smtp_port,
        helo_name=config.helo_name,
        timeouts=config.timeouts,
        starttls=mode,
        tls_context=config.tls_context,
        source_address=config.source_address,
    )


async def probe(
    config: Config, host: str, ip: str, need: TLSRequirement | None = None
) -> AddressReport:
    """Connect in plaintext for the capabilities, then with STARTTLS to judge TLS; ``need``
    is the TLS requirement delivery would apply (default: the global policy's)."""
    report = AddressReport(ip=ip, port=config.smtp_port)
    try:
        plain = await _open(config, host, ip, StartTLS.NEVER)
    except DeliveryError as exc:
        report.error = str(exc)
        report.verdict = f"would defer: {exc}"
        return report
    report.connected = True
    report.extensions = dict(plain.extensions)
    report.starttls = "STARTTLS" in plain.extensions
    await plain.close()
    if report.starttls:
        await _probe_tls(config, host, ip, report)
        if need is not None and need.tlsa:
            await _probe_dane(config, host, ip, need, report)
    if need is None or (need.source is PolicySource.DEFAULT and need.mode is not TLSMode.NONE):
        report.verdict, report.usable = _verdict(config.tls, report)
    else:
        report.verdict, report.usable = _verdict_for(need, report)
    return report


async def _probe_dane(
    config: Config, host: str, ip: str, need: TLSRequirement, report: AddressReport
) -> None:
    try:
        conn = await SMTPConnection.open(
            host=host,
            ip=ip,
            port=config.smtp_port,
            helo_name=config.helo_name,
            timeouts=config.timeouts,
            starttls=StartTLS.DANE,
            tlsa=need.tlsa,
            dane_names=need.dane_names,
            dane_next_hops=need.dane_next_hops,
            source_address=config.source_address,
        )
    except DeliveryError as exc:
        report.dane = f"no match: {exc.text}"
        return
    report.dane = f"matched {conn.dane_match}"
    await conn.close()


def _verdict_for(need: TLSRequirement, r: AddressReport) -> tuple[str, bool]:
    """What delivery under the decided requirement would do with this address."""
    label = need.label
    tls_works = r.tls_version is not None
    if need.mode is TLSMode.NONE:
        return f"would deliver in plaintext (policy none: {need.reason})", True
    if need.mode is TLSMode.DANE:
        if r.dane is not None and r.dane.startswith("matched"):
            return f"would deliver over TLS (DANE: {r.dane})", True
        why = r.dane or r.error or "STARTTLS not offered"
        return f"would defer ({label}): {why}", False
    if need.mode is TLSMode.VERIFY and not r.certificate_verified:
        why = r.certificate_error or r.error or "STARTTLS not offered"
        return f"would defer ({label}): {why}", False
    if need.mode is TLSMode.REQUIRED and not tls_works:
        return f"would defer ({label}): {r.error or 'STARTTLS not offered'}", False
    if tls_works:
        return f"would deliver over TLS ({label})", True
    if r.starttls:
        return "would deliver in plaintext (TLS handshake failed)", True
    return "would deliver in plaintext (no STARTTLS)", True


async def _probe_tls(config: Config, host: str, ip: str, report: AddressReport) -> None:
    try:
        conn = await _open(config, host, ip, StartTLS.VERIFY)
        report.certificate_verified = True
        report.certificate = _certificate(conn)
    except TLSVerifyError as exc:
        report.certificate_verified = False
        report.certificate_error = str(exc)
        try:  # the handshake itself may work: report what it negotiates
            conn = await _open(config, host, ip, StartTLS.REQUIRED)
        except DeliveryError as again:
            report.error = str(again)
            return
    except DeliveryError as exc:
        report.error = str(exc)
        return
    report.tls_version, report.tls_cipher = conn.tls_version, conn.tls_cipher
    report.extensions = dict(conn.extensions)  # what the server offers over TLS
    await conn.close()


def _verdict(policy: TLSPolicy, r: AddressReport) -> tuple[str, bool]:
    """What delivery under ``policy`` would do with this address."""
    tls_works = r.tls_version is not None
    if policy is TLSPolicy.VERIFY and not r.certificate_verified:
        why = r.certificate_error or r.error or "STARTTLS not offered"
        return f"would defer (tls=verify): {why}", False
    if policy is TLSPolicy.REQUIRED and not tls_works:
        return f"would defer (tls=required): {r.error or 'STARTTLS not offered'}", False
    if tls_works:
        return "would deliver over TLS", True
    if r.starttls:
        return "would deliver in plaintext (TLS handshake failed)", True
    return "would deliver in plaintext (no STARTTLS)", True


MAX_HELO_PTR_LOOKUPS = 10
"""Addresses of the HELO name whose PTR names are looked up at most: its RRsets hold as
many as DNS carries, and each lookup may cost the whole DNS timeout. The doctor's PTR
names and SPF's ``ptr`` mechanism (RFC 7208 §4.6.4) are bounded the same way."""


async def check_helo(config: Config) -> HeloReport:
    """Forward-confirmed reverse DNS of the HELO name (FCrDNS)."""
    report = HeloReport(name=config.helo_name)
    resolver = make_resolver(config.dns)
    problems: list[str] = []
    # An address literal (RFC 5321 §4.1.3) names its address: no DNS name to look up,
    # and none a PTR record can give back (the doctor's helo check says the same).
    literal = literal_address(config.helo_name)
    if literal is not None:
        report.addresses.append(str(literal))
        problems.append(
            f"{config.helo_name} is an address literal, not a host name: receivers expect "
            "a name that resolves to the address and is its PTR name"
        )
    # The A-label, which EHLO sends for a U-label HELO name and all a PTR record can name:
    # looked up as such (read with domains.IDNA), not as text, which dnspython read with
    # its default codec, IDNA 2003 before 2.9 (mail.Straße.de: mail.strasse.de).
    wanted = a_label(config.helo_name).rstrip(".")
    for rdtype in ("A", "AAAA") if literal is None else ():
        try:
            answer = await resolver.resolve(wanted, rdtype)
            report.addresses.extend(r.to_text() for r in answer)
        except dns.resolver.NoAnswer as exc:
            if (why := unanswered(exc)) is not None:  # says nothing of the records
                problems.append(f"{rdtype} lookup failed: {why}")
                report.lookup_failed = True
            continue
        except dns.resolver.NXDOMAIN:
            continue
        except dns.exception.DNSException as exc:
            problems.append(f"{rdtype} lookup failed: {exc}")
            report.lookup_failed = True
    if not report.addresses and not problems:
        problems.append(f"{config.helo_name} has no A or AAAA record")
    for ip in report.addresses[:MAX_HELO_PTR_LOOKUPS]:
        try:
            answer = await resolver.resolve(dns.reversename.from_address(ip), "PTR")
            names = [r.to_text().rstrip(".").lower() for r in answer]
        except dns.resolver.NoAnswer as exc:
            if (why := unanswered(exc)) is not None:
                problems.append(f"PTR lookup for {ip} failed: {why}")
                report.lookup_failed = True
                continue
            names = []
        except dns.resolver.NXDOMAIN:
            names = []
        except dns.exception.DNSException as exc:
            # Not "no PTR record": whether there is one is not known.
            problems.append(f"PTR lookup for {ip} failed: {exc}")
            report.lookup_failed = True
            continue
        report.ptr[ip] = names
        if wanted in names:
            report.forward_confirmed = True
    report.error = "; ".join(problems) or None
    return report


async def run_check(config: Config, domain: str) -> CheckReport:
    # MTA-STS and DANE lookups are loaded by this command only, not by every command.
    from mailstrom.cli.check_mtasts import apply_to_verdicts, asks_mta_sts, check_mta_sts
    from mailstrom.tls.dane import lookup_tlsa, tlsa_base_domains, tlsa_name

    report = CheckReport(
        domain=domain,
        smtp_port=config.smtp_port,
        tls_policy=config.tls.value,
        relay=config.relay.host if config.relay else None,
    )
    report.dnssec_trusted = config.dns.dnssec
    # Ask for DNSSEC whatever the setting, to report it; delivery believes it only with
    # dns.dnssec (the decider below is the worker's own).
    asking = dataclasses.replace(config.dns, dnssec=True)
    route: Route | None = None
    sts_asked: set[str] = set()  # the hosts whose decision would go on to MTA-STS
    try:
        # As the worker builds its router: source_address's IP version included.
        route = await Router.for_config(dataclasses.replace(config, dns=asking)).route(domain)
    except DeliveryError as exc:
        report.dns_error = str(exc)
        report.dns_permanent = isinstance(exc, PermanentFailure)
    helo = asyncio.create_task(check_helo(config))
    mta_sts = asyncio.create_task(check_mta_sts(config, domain))
    if route is not None:
        report.implicit_mx = route.implicit
        report.alias_of = route.canonical
        report.dnssec = route.secure
        resolver = make_resolver(asking)
        decider = TLSDecider.for_config(config)
        for host in route.hosts:
            host_report = HostReport(
                name=host.name, preference=host.preference, addresses=[], dnssec=host.secure
            )
            host_report.canonical = host.canonical
            try:
                # In the order delivery looks (RFC 7672 §2.2.3: a validated alias's
                # expansion first); unvalidated records are shown too, marked as such.
                bases = tlsa_base_domains(
                    host.name, host.canonical, chain_secure=host.secure, alias_secure=True
                ) or (host.name,)
                for base in bases:
                    found = await lookup_tlsa(resolver, base)
                    if found.exists:
                        break
                if host.canonical is not None:
                    host_report.tlsa_at = tlsa_name(found.host)
                host_report.tlsa = [str(r) for r in found.records]
                host_report.tlsa_malformed = found.malformed
                host_report.tlsa_dnssec = found.secure
            except DeliveryError as exc:
                host_report.tlsa_error = exc.text
            need: TLSRequirement | None = None
            try:
                need = await decider.requirement(
                    Destination(
                        domain=route.domain,
                        mx_host=host.name,
                        mx_secure=route.secure,
                        host_secure=host.secure,
                        mx_canonical=host.canonical,
                        next_hops=route.next_hops,
                    )
                )
                host_report.tls_policy = need.label
                host_report.tls_policy_reason = need.reason
                if asks_mta_sts(need):
                    sts_asked.add(host.name)
            except DeliveryError as exc:
                host_report.tls_policy_reason = f"would defer: {exc.text}"
            addresses = await asyncio.gather(
                *(probe(config, host.name, ip, need) for ip in host.addresses)
            )
            if need is None:  # the policy itself refuses this host
                for address in addresses:
                    address.verdict = host_report.tls_policy_reason or "would defer"
                    address.usable = False
            host_report.addresses = list(addresses)
            report.hosts.append(host_report)
    report.helo = await helo
    report.mta_sts = await mta_sts
    apply_to_verdicts(report, report.mta_sts, asked=sts_asked)
    return report


# --- the command -------------------------------------------------------------------------


def check_command(args: argparse.Namespace) -> int:
    config = settings_from(args).config
    report = asyncio.run(run_check(config, args.domain))
    if args.json:
        print_json(report)
    else:
        print_report(report)
    if report.deliverable:
        return EX_OK
    if report.dns_error is not None and not report.dns_permanent:
        return EX_TEMPFAIL
    return EX_UNAVAILABLE


def print_report(r: CheckReport) -> None:
    echo(f"Domain {r.domain} (SMTP port {r.smtp_port}, TLS policy {r.tls_policy})")
    if r.relay:
        echo(f"  note: a relay is configured; the worker sends everything to {r.relay}")
    if r.dns_error is not None:
        kind = "permanent" if r.dns_permanent else "temporary"
        echo(f"  DNS: {kind} failure: {r.dns_error}")
    elif r.implicit_mx:
        echo("  no MX records: the domain's own addresses stand in (implicit MX)")
    if r.alias_of is not None:
        echo(f"  alias of:    {r.alias_of} (its MX records are those of the expansion)")
    if r.dns_error is None:
        trust = "" if r.dnssec_trusted else " (not used: dns.dnssec is off)"
        validated = "validated (AD)" if r.dnssec else "not validated"
        echo(f"  DNSSEC:      MX records {validated}{trust}")
    for h in r.hosts:
        print()
        echo(f"MX {h.preference} {h.name}")
        if h.canonical is not None:
            echo(f"  alias of:    {h.canonical}")
        echo(f"  DNSSEC:      addresses {'validated (AD)' if h.dnssec else 'not validated'}")
        at = f" at {h.tlsa_at}" if h.tlsa_at else ""
        if h.tlsa_error:
            echo(f"  TLSA:        lookup failed: {h.tlsa_error}")
        elif h.tlsa or h.tlsa_malformed:
            state = "validated (AD)" if h.tlsa_dnssec else "NOT validated"
            malformed = (
                f"; {h.tlsa_malformed} malformed record(s) ignored" if h.tlsa_malformed else ""
            )
            echo(f"  TLSA:        {state}{at}{malformed}")
            for record in h.tlsa:
                echo(f"               {record}")
        else:
            echo("  TLSA:        none")
        if h.tls_policy is not None:
            echo(f"  TLS policy:  {h.tls_policy} ({h.tls_policy_reason})")
        elif h.tls_policy_reason:
            echo(f"  TLS policy:  {h.tls_policy_reason}")
        for a in h.addresses:
            where = f"[{a.ip}]:{a.port}" if _is_v6(a.ip) else f"{a.ip}:{a.port}"
            echo(f"  {where}")
            if not a.connected:
                echo(f"    connect:     failed: {a.error}")
            else:
                caps = " ".join(k if not v else f"{k}={v}" for k, v in sorted(a.extensions.items()))
                echo(f"    EHLO:        {caps or '(none)'}")
                echo(f"    STARTTLS:    {'offered' if a.starttls else 'not offered'}")
                if a.tls_version:
                    echo(f"    TLS:         {a.tls_version} {a.tls_cipher or ''}".rstrip())
                elif a.starttls and a.error:
                    echo(f"    TLS:         failed: {a.error}")
                if a.certificate_verified and a.certificate:
                    c = a.certificate
                    echo(f"    certificate: verified; subject {c['subject']}")
                    echo(f"                 issuer {c['issuer']}; expires {c['expires']}")
                    if c["names"]:
                        echo(f"                 names {', '.join(c['names'])}")
                elif a.certificate_verified:
                    echo("    certificate: verified")
                elif a.certificate_error:
                    echo(f"    certificate: NOT verified: {a.certificate_error}")
                if a.dane:
                    echo(f"    DANE:        {a.dane}")
            echo(f"    verdict:     {a.verdict}")
    if r.mta_sts is not None:
        from mailstrom.cli.check_mtasts import print_mta_sts

        print_mta_sts(r.mta_sts)
    if r.helo is not None:
        h2 = r.helo
        print()
        echo(f"HELO name {h2.name}")
        echo(f"  A/AAAA:      {', '.join(h2.addresses) or '-'}")
        for ip, names in h2.ptr.items():
            echo(f"  PTR {ip}: {', '.join(names) or '(none)'}")
        if len(h2.addresses) > MAX_HELO_PTR_LOOKUPS:
            more = len(h2.addresses) - MAX_HELO_PTR_LOOKUPS
            echo(f"  PTR:         not looked up for the {more} other addresses")
        if h2.error:
            echo(f"  problem:     {h2.error}")
        if h2.forward_confirmed:
            verdict = "forward and reverse DNS match"
        elif h2.lookup_failed:
            verdict = "could not be checked: a lookup failed; run again later"
        else:
            verdict = (
                "forward and reverse DNS do not match; some receivers will refuse or score mail"
            )
        echo(f"  verdict:     {verdict}")


def _is_v6(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 6
    except ValueError:
        return False
