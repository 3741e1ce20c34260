"""The doctor's sequence: outgoing address and port 25, then the DNS checks that judge
that address and the domain (FCrDNS, SPF, DKIM, DMARC, blocklists)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mailstrom.bounds import check_seconds
from mailstrom.config import Config
from mailstrom.dkim.config import DKIMConfig, signing_domain_for
from mailstrom.doctor import extras
from mailstrom.doctor import spf as spf_checks
from mailstrom.doctor.dkim import DKIMKey, judge_dkim
from mailstrom.doctor.dmarc import check_dmarc
from mailstrom.doctor.dnsbl import DEFAULT_DNSBLS, check_dnsbl
from mailstrom.doctor.fcrdns import check_fcrdns
from mailstrom.doctor.lookup import (
    NOT_FINISHED,
    Resolver,
    TimeLimited,
    address_family,
    public_form,
)
from mailstrom.doctor.mx import check_mx
from mailstrom.doctor.network import Network, SocketNetwork
from mailstrom.doctor.outgoing import (
    DEFAULT_PROBE,
    Target,
    check_outgoing,
    check_port25,
    find_targets,
)
from mailstrom.doctor.report import Check, DoctorReport, Status, listed
from mailstrom.doctor.tls import check_tls
from mailstrom.domains import a_label, ldh_domain_name
from mailstrom.tls.levels import TLSPolicy
from mailstrom.tls.table import PolicyTable

TIME_LIMIT = 60.0
"""Seconds a doctor run may take in all (``doctor.time_limit``, ``--time-limit``). Each
lookup is bounded (``dns.timeout``) and so are the SPF evaluations together (40 s), but a
run asks for dozens of names, and slow or silent servers held it for minutes; checks the
limit leaves unfinished say so, as a warning."""
TIME_FIX = (
    "run the doctor again (its DNS servers were slow), or give it more time with "
    "--time-limit SECONDS (doctor.time_limit)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderSetup:
    """What the doctor judges: the sending domain and how this machine sends for it."""

    domain: str
    """The From domain (and, as mailstrom sends by default, the envelope sender's), taken
    as a lower-case A-label; :class:`ValueError` when it is no domain name of
    letter-digit-hyphen labels (RFC 5321 §4.1.2), which no sending domain can be."""
    helo_name: str
    """The name sent in EHLO; a U-label is taken as its A-label, as EHLO sends it."""
    ip: str | None = None
    """The address receivers see, if known (``--ip``); else it is found by routing.
    :class:`ValueError` when it is no IP address, or has a zone index."""
    source_address: str | None = None
    probe: str = DEFAULT_PROBE
    """Where to test outbound SMTP: ``HOST[:PORT]``, an address, or a mail domain."""
    smtp_port: int = 25
    """The probe's port when ``probe`` names none."""
    timeout: float = 10.0
    """Seconds for the probe's connection, and again for its greeting."""
    dkim_keys: tuple[DKIMKey, ...] = ()
    dnsbls: tuple[str, ...] = DEFAULT_DNSBLS
    bulk: bool = False
    """A bulk sender (Gmail: 5,000 messages a day to its users): its mail must be signed
    with DKIM and have a DMARC record, which should enforce."""
    relay: str | None = None
    """``host:port`` of the configured relay: then the relay, not this machine, talks to
    receivers, and the IP checks judge an address only when one is given."""
    tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC
    """The global TLS level (``Config.tls``) of deliveries to MX hosts."""
    tls_domains: PolicyTable = field(default_factory=PolicyTable)
    """The per-domain TLS levels (``Config.tls_domains``), which override ``tls``."""
    mta_sts: bool = False
    """Whether receivers' MTA-STS policies are applied (``Config.mta_sts``)."""
    allow_loopback: bool = False
    """Whether mail may go to this host (``Config.allow_loopback``, tests and demos): an
    MX host ``localhost`` or on a loopback address is then a mail host, as the router
    takes it, for the ``mx`` check and the probe target."""
    time_limit: float = TIME_LIMIT
    """Seconds the whole run may take; checks not finished by then warn "not finished
    (time limit)". :class:`~mailstrom.errors.ConfigError` when it is no positive number."""

    def __post_init__(self) -> None:
        # The checks compare the domain with names from DNS and the keys' domains, which
        # are lower-case A-labels without the final dot: "Example.COM." judged as it was
        # written found no DKIM key for it, and took its own DMARC record for its
        # organizational domain's (with the sp= policy).
        object.__setattr__(self, "domain", ldh_domain_name(self.domain))
        check_seconds(self.time_limit, "time_limit")
        if self.ip is not None:
            object.__setattr__(self, "ip", public_form(self.ip))
        # Judged as EHLO sends it (smtp.session): a U-label as its A-label, the only form
        # a PTR record can name and receivers see.
        if not self.helo_name.isascii():
            object.__setattr__(self, "helo_name", a_label(self.helo_name))

    @classmethod
    def from_config(cls, config: Config, *, domain: str, **given: Any) -> SenderSetup:
        """The setup ``config`` describes, overridden by ``given`` (None values ignored).
        DKIM keys come from ``config.dkim``."""
        values: dict[str, Any] = {
            "helo_name": config.helo_name,
            "source_address": config.source_address,
            "smtp_port": config.smtp_port,
            "timeout": config.timeouts.connect,
            "dkim_keys": dkim_keys(config.dkim),
            "relay": f"{config.relay.host}:{config.relay.port}" if config.relay else None,
            "tls": config.tls,
            "tls_domains": config.tls_table,
            "mta_sts": config.mta_sts is not None,
            "allow_loopback": config.allow_loopback,
        }
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(domain=domain, **values)


def dkim_keys(setting: DKIMConfig | None) -> tuple[DKIMKey, ...]:
    """The keys ``Config.dkim`` signs with, as the doctor checks them."""
    if setting is None:
        return ()
    return tuple(
        DKIMKey(
            domain=key.domain,
            selector=key.selector,
            private_key=key.private_key
            if isinstance(key.private_key, bytes)
            else os.fspath(key.private_key),
            algorithm=key.algorithm.value,
        )
        for key in setting.keys
    )


def run_doctor(
    setup: SenderSetup, resolver: Resolver, network: Network | None = None
) -> DoctorReport:
    """Every check, in order; lookups go to ``resolver``, connections to ``network``,
    all within ``setup.time_limit`` seconds: a check the limit cuts short, or leaves
    unstarted, warns "not finished (time limit)"."""
    extras.require()
    network = SocketNetwork() if network is None else network
    report = DoctorReport(domain=setup.domain, helo_name=setup.helo_name, relay=setup.relay)
    # Every lookup of the run goes through one deadline: each waits no longer than what
    # is left, and one asked after it fails at once, so the checks after it cost nothing
    # and the run ends in time whatever the servers do.
    timed = TimeLimited(resolver, setup.time_limit)
    resolver = timed

    checks, ips, outgoing_cut = _outgoing(setup, timed, network)
    report.add(checks)
    report.ip = ips[0] if ips else None
    report.ips = tuple(ips)
    if setup.relay is None:  # else the relay talks to receivers, with its own TLS
        plaintext = check_tls(
            tls=setup.tls, tls_domains=setup.tls_domains, mta_sts=setup.mta_sts, bulk=setup.bulk
        )
        if plaintext is not None:
            report.add(plaintext)
    spf_results: list[str] = []  # none judged: no outgoing address
    inputs_cut = False  # whether DMARC's verdict rests on a check cut short
    if not ips:
        report.add(_finished(_skipped(setup, ("ptr", "helo", "spf", "spf-helo")), outgoing_cut))
    # One time budget for all SPF evaluations: each has its own limit too (the receivers'
    # 20 s), and five of them at their limits held a run for minutes.
    budget = spf_checks.Budget(spf_checks.BUDGET)
    for ip in ips:  # each address receivers may see: IPv4's and IPv6's on a dual-stack host
        fcrdns = _finished(check_fcrdns(resolver, ip=ip, helo=setup.helo_name), timed.ran_out())
        report.add([_or_only(c, ips) for c in fcrdns])
        spf, spf_result = spf_checks.check_spf(
            resolver, domain=setup.domain, ip=ip, helo=setup.helo_name, budget=budget
        )
        spf_results.append(spf_result)
        spf_cut = timed.ran_out()
        inputs_cut = inputs_cut or spf_cut
        report.add(_finished(spf, spf_cut))
        helo_spf = spf_checks.check_spf_helo(resolver, helo=setup.helo_name, ip=ip, budget=budget)
        report.add(_finished(helo_spf, timed.ran_out()))

    mx = check_mx(resolver, domain=setup.domain, allow_loopback=setup.allow_loopback)
    report.add(_finished(mx, timed.ran_out()))

    # Mail From the domain is signed by the keys of one key domain only, as the signer
    # picks them (DKIMConfig.keys_for): a verifying key of any other domain signs none of
    # it, and counting it would pass DMARC for mail that goes out unsigned.
    signer = signing_domain_for(setup.domain, {key.domain for key in setup.dkim_keys})
    verified: list[DKIMKey] = []
    testing: list[DKIMKey] = []
    unknown: list[str] = []  # a lookup failed: whether they verify is not known
    for key in setup.dkim_keys:
        verdict = judge_dkim(resolver, key)
        key_cut = timed.ran_out()
        report.add(_finished(verdict.check, key_cut))
        if verdict.check.status is Status.UNKNOWN and key.domain == signer and key.kind == "rsa":
            unknown.append(key.domain)
            inputs_cut = inputs_cut or key_cut
        if verdict.verifies and key.domain == signer:
            verified.append(key)
            if verdict.testing:
                testing.append(key)
    # Only RSA signatures count for DMARC here: Microsoft's and Yahoo's receivers, among
    # others, do not verify Ed25519 (RFC 8463), and to them mail signed by Ed25519 keys
    # alone is unsigned. Counting it passed DMARC for mail they refuse. Nor do keys in
    # testing mode (t=y), whose mail verifiers are to treat as unsigned (RFC 6376 §3.6.1):
    # DMARC is told of them apart, and warns when its pass rests on them.
    rsa = [key for key in verified if key.kind == "rsa"]
    signing = [key.domain for key in rsa if key not in testing]
    signing_in_tests = [key.domain for key in rsa if key in testing]
    # Gmail and Yahoo require bulk senders to sign with DKIM as well as pass SPF, and
    # Gmail blocks their unsigned mail ("5.7.26 ... Gmail requires all bulk senders to
    # authenticate with both SPF and DKIM") whatever SPF and DMARC say.
    unsigned = Status.FAIL if setup.bulk else Status.WARN
    if verified and not rsa:
        report.add(
            Check(
                name="dkim",
                subject=setup.domain,
                status=unsigned,
                summary=f"mail From {setup.domain} is signed with Ed25519 keys only, which "
                "many receivers (Microsoft's, Yahoo's) do not verify: to them it is unsigned",
                fix=f"sign with an RSA key for d={verified[0].domain} as well: mailstrom dkim "
                f"keygen --domain {verified[0].domain} --selector NEW --algorithm rsa, and "
                "publish its record: receivers that verify Ed25519 then check both",
            )
        )
    if setup.dkim_keys and signer is None:
        domains = sorted({key.domain for key in setup.dkim_keys})
        report.add(
            Check(
                name="dkim",
                subject=setup.domain,
                status=unsigned,
                summary=f"no configured DKIM key signs mail From {setup.domain}: the keys "
                f"are for {listed(domains)}",
                fix=f"configure a DKIM key for d={setup.domain} (or a parent domain) and "
                "publish its record",
            )
        )
    if not setup.dkim_keys:
        report.add(
            Check(
                name="dkim",
                subject=setup.domain,
                status=unsigned,
                summary="no DKIM key configured: mail is unsigned, and Gmail asks bulk "
                "senders for DKIM as well as SPF",
                fix=f"configure a DKIM key for d={setup.domain} (or check one with "
                "--dkim DOMAIN:SELECTOR:KEYFILE) and publish its record",
            )
        )
    dmarc = check_dmarc(
        resolver,
        domain=setup.domain,
        spf_result=_worst_spf(spf_results),
        dkim_domains=signing,
        testing_domains=signing_in_tests,
        unknown_domains=unknown,
        bulk=setup.bulk,
    )
    # Undecided for want of an SPF result or a key's record the time limit cut short,
    # DMARC is as unfinished as they are.
    cut = timed.ran_out() or (inputs_cut and dmarc.status is Status.UNKNOWN)
    report.add(_finished(dmarc, cut))
    for ip in ips:
        for zone in setup.dnsbls:
            report.add(_finished(check_dnsbl(resolver, ip=ip, zone=zone), timed.ran_out()))
    return report


def _or_only(check: Check, ips: Sequence[str]) -> Check:
    """``check`` of one address of several (a dual-stack host's), its fix offering the
    other way out when it fails: sending from the others only (``source_address``)."""
    if len(ips) < 2 or check.status is not Status.FAIL or check.fix is None:
        return check
    others = [ip for ip in ips if ip != check.subject]
    if len(others) != 1:  # the helo check's subject is the name, not the address
        return check
    fix = f'{check.fix}; or send from {others[0]} only: source_address = "{others[0]}"'
    return replace(check, fix=fix)


def _worst_spf(results: Sequence[str]) -> str | None:
    """The SPF result DMARC is judged by when mail leaves from several addresses: a
    result other than pass for any of them (its mail fails SPF), one that is certain
    (fail, softfail...) before a temporary error; None when none was judged."""
    if not results:
        return None
    failing = [r for r in results if r != "pass"]
    certain = [r for r in failing if r != "temperror"]
    return (certain or failing or ["pass"])[0]


def _finished(checks: Check | Sequence[Check], cut: bool) -> list[Check]:
    """``checks``, each made "not finished (time limit)" when ``cut``: the run's time
    limit cut short a lookup they made. A warning with the fix, not what the lookups that
    failed would have made of it (unknown, "run again later", or a verdict on half the
    answers)."""
    checks = [checks] if isinstance(checks, Check) else list(checks)
    if not cut:
        return checks
    return [
        replace(c, status=Status.WARN, summary=NOT_FINISHED, details=(), fix=TIME_FIX)
        for c in checks
    ]


def _outgoing(
    setup: SenderSetup, resolver: TimeLimited, network: Network
) -> tuple[list[Check], list[str], bool]:
    """The outgoing address and port 25 checks, the addresses receivers may see (none
    found: empty), and whether the time limit cut finding the probe target short."""
    if setup.relay is not None:
        checks = [
            Check(
                name="port-25",
                subject=setup.relay,
                status=Status.SKIP,
                summary=f"relay mode: mail leaves through {setup.relay}, not port 25",
            )
        ]
        if setup.ip is None:
            checks.append(
                Check(
                    name="outgoing-ip",
                    subject=setup.relay,
                    status=Status.SKIP,
                    summary="relay mode: receivers see the relay's address; give it with "
                    "--ip to check its reverse DNS, SPF and listings",
                )
            )
            return checks, [], False
        check, ip = check_outgoing(network, None, given=setup.ip, source=None)
        return [*checks, check], [ip] if ip else [], False
    found = find_targets(
        resolver,
        setup.probe,
        setup.smtp_port,
        source=setup.source_address,
        allow_loopback=setup.allow_loopback,
    )
    cut = resolver.ran_out()
    if isinstance(found, Check) or setup.ip is not None:
        # One address: the one given with --ip, or none (no target to route towards).
        target = found[0] if isinstance(found, list) else None
        check, ip = check_outgoing(network, target, given=setup.ip, source=setup.source_address)
        if ip is None and isinstance(found, Check) and found.status is Status.UNKNOWN:
            # The address is found by routing towards the target, whose lookup failed for
            # now: so did finding the address, which is no failure of the setup (exit 75).
            check = replace(
                check,
                status=Status.UNKNOWN,
                summary=f"{check.summary}: its lookup failed for now",
                fix=None,
            )
        # An address given with --ip is no less known for the probe target's lookup.
        checks = _finished(check, cut and ip is None)
        if isinstance(found, Check):
            checks.extend(_finished(found, cut))
        elif target is not None:
            checks.append(_port25(setup, resolver, network, target))
        return checks, [ip] if ip else [], cut
    # The address of each IP version the target has: delivery (without source_address)
    # reaches a receiver over either, IPv4 first and IPv6 when that fails or is all the
    # receiver has, and receivers judge each address by itself (Gmail refuses IPv6 mail
    # from an address without PTR). Only the IPv4 one was judged.
    routes: dict[str, Target] = {}
    outgoing: list[Check] = []
    unrouted: list[tuple[Target, Check]] = []
    for target in found:
        check, ip = check_outgoing(network, target, given=None, source=setup.source_address)
        if ip is None:
            unrouted.append((target, check))
        elif ip not in routes:
            routes[ip] = target
            outgoing.append(check)
    for target, check in unrouted:
        if routes:  # no route of that version: the mail goes out over the other
            version = _version(target.address)
            check = replace(
                check,
                status=Status.SKIP,
                summary=f"{check.summary}: no {version} mail leaves this machine",
                fix=None,
            )
        outgoing.append(check)
    probes = [_port25(setup, resolver, network, target) for target in routes.values()]
    if len(probes) > 1 and any(p.status is Status.PASS for p in probes):
        # Delivery falls back to the version that answers: mail flows, late where it
        # waits for the other to fail first.
        probes = [
            replace(
                p,
                status=Status.WARN,
                summary=f"{p.summary} (port 25 answers over the other IP version, which "
                "delivery falls back to)",
            )
            if p.status is Status.FAIL
            else p
            for p in probes
        ]
    return [*outgoing, *probes], list(routes), cut


def _version(ip: str) -> str:
    return "IPv4" if address_family(ip) == "A" else "IPv6"


def _port25(setup: SenderSetup, timed: TimeLimited, network: Network, target: Target) -> Check:
    """The port 25 probe, within what is left of the run's time: it waits its timeout for
    the connection and again for the greeting, so half of what is left at most. A probe
    that timed out only for being given less than its own timeout is not finished: the
    receiver may just be slow, no sign of a blocked port."""
    left = timed.left()
    timeout = min(setup.timeout, left / 2)
    if timeout <= 0:
        unmade = Check(name="port-25", subject=target.shown, status=Status.UNKNOWN, summary="")
        return _finished(unmade, True)[0]
    started = time.monotonic()
    check = check_port25(network, target, source=setup.source_address, timeout=timeout)
    shortened = timeout < setup.timeout and time.monotonic() - started >= timeout
    return _finished(check, shortened and check.status is not Status.PASS)[0]


def _skipped(setup: SenderSetup, names: Sequence[str]) -> list[Check]:
    why = "no outgoing address to judge" + (
        " (relay mode: give the relay's with --ip)" if setup.relay else " (give one with --ip)"
    )
    return [
        Check(
            name=n,
            subject=setup.helo_name if "helo" in n else setup.domain,
            status=Status.SKIP,
            summary=why,
        )
        for n in names
    ]
