"""The MTA-STS part of ``mailstrom check DOMAIN``: the domain's ``_mta-sts`` record, its
policy fetched now (with the worker's settings, never from the cache), and what the policy
would do to each MX address when ``mta_sts`` is on."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailstrom.cli.output import echo
from mailstrom.config import Config, MTASTSConfig
from mailstrom.errors import ConfigError
from mailstrom.mtasts.fetch import (
    DNSTrouble,
    a_label,
    fetch_policy,
    require_httpx,
    txt_records,
)
from mailstrom.mtasts.https import route_policy_for
from mailstrom.mtasts.policy import Mode, PolicyError, parse_sts_record
from mailstrom.routing import make_resolver
from mailstrom.tls.requirement import PolicySource, TLSMode, TLSRequirement

if TYPE_CHECKING:
    from mailstrom.cli.check import CheckReport


@dataclass(slots=True, kw_only=True)
class MTASTSReport:
    """What ``check`` found about the domain's MTA-STS policy."""

    applied: bool
    """Whether the worker applies MTA-STS (``mta_sts`` is configured)."""
    records: list[str] = field(default_factory=list)
    """The ``_mta-sts`` TXT records as published."""
    policy_id: str | None = None
    mode: str | None = None
    mx: list[str] = field(default_factory=list)
    ignored_mx: list[str] = field(default_factory=list)
    """``mx`` values of the policy that are no pattern: they allow no host."""
    max_age: int | None = None
    policy: list[str] = field(default_factory=list)
    """The policy file's lines."""
    error: str | None = None
    result_type: str | None = None
    """The RFC 8460 failure type of ``error``, when it is a policy failure."""


async def check_mta_sts(config: Config, domain: str) -> MTASTSReport:
    """Look up and fetch ``domain``'s MTA-STS policy as the worker would."""
    report = MTASTSReport(applied=config.mta_sts is not None)
    settings = config.mta_sts or MTASTSConfig()
    resolver = make_resolver(config.dns)
    name = a_label(domain)
    if name is None:
        report.error = f"{domain!r} is no domain name"
        return report
    try:
        report.records, _ = await txt_records(resolver, f"_mta-sts.{name}")
        report.policy_id = parse_sts_record(report.records)
    except DNSTrouble as exc:
        report.error = str(exc)
        return report
    except PolicyError as exc:
        report.error, report.result_type = exc.reason, exc.result_type
        return report
    if report.policy_id is None:
        return report
    try:
        require_httpx()
        policy = await fetch_policy(
            name,
            resolver=resolver,
            config=settings,
            # As the worker fetches it (mtasts/source.py): never from a private network.
            route_policy=route_policy_for(
                allow_loopback=config.allow_loopback, source_address=config.source_address
            ),
            source_address=config.source_address,
        )
    except ConfigError as exc:
        report.error = str(exc)
        return report
    except PolicyError as exc:
        report.error, report.result_type = exc.reason, exc.result_type
        return report
    report.mode = policy.mode.value
    report.mx = list(policy.mx)
    report.ignored_mx = list(policy.ignored)
    report.max_age = policy.max_age
    report.policy = policy.lines
    return report


def asks_mta_sts(need: TLSRequirement) -> bool:
    """Whether the worker, having come to ``need`` without MTA-STS, would still ask the
    policy (:class:`~mailstrom.tls.decide.TLSDecider`): ``need`` is the global default, or
    DANE's answer for TLSA records that are all unusable (TLS required, unauthenticated),
    which leaves MTA-STS in force (RFC 8461 §2). Not after a ``tls.domains`` entry, usable
    TLSA records or a relay."""
    if need.source is PolicySource.DEFAULT:
        return True
    return need.source is PolicySource.DANE and need.mode is not TLSMode.DANE


def apply_to_verdicts(
    report: CheckReport, sts: MTASTSReport, *, asked: Collection[str] = ()
) -> None:
    """When the worker would apply ``sts`` to a host (MTA-STS on, mode enforce or testing,
    and the host is one of ``asked``: nothing before MTA-STS decided, see
    :func:`asks_mta_sts`), say so in the host's TLS policy; under ``enforce`` an address of
    an unlisted host, or one without a verified certificate, would be deferred, and its
    verdict says that."""
    if not sts.applied or sts.mode not in (Mode.ENFORCE.value, Mode.TESTING.value):
        return
    from mailstrom.mtasts.policy import mx_matches

    about = f"MTA-STS policy of {report.domain} ({sts.mode}, id {sts.policy_id})"
    for host in report.hosts:
        if host.name not in asked:
            continue  # a table entry or DANE decided: MTA-STS is not asked
        pattern = next((p for p in sts.mx if mx_matches(p, host.name)), None)
        host.tls_policy = f"mta-sts {sts.mode}"
        host.tls_policy_reason = (
            f"{about}: {host.name} matches mx {pattern}"
            if pattern is not None
            else f"{about} does not list {host.name}"
        )
        if sts.mode != Mode.ENFORCE.value:
            continue
        for address in host.addresses:
            if pattern is None:
                address.verdict = f"would defer (MTA-STS enforce): {host.name} is not listed"
                address.usable = False
            elif not address.certificate_verified:
                why = address.certificate_error or address.error or "STARTTLS not offered"
                address.verdict = f"would defer (MTA-STS enforce): {why}"
                address.usable = False


def print_mta_sts(sts: MTASTSReport) -> None:
    state = "applied by the worker" if sts.applied else "not applied (mta_sts is off)"
    print()
    echo(f"MTA-STS ({state})")
    if not sts.records and sts.error is None:
        echo("  no _mta-sts TXT record: the domain publishes no policy")
        return
    for record in sts.records:
        echo(f"  TXT:         {record}")
    if sts.error is not None:
        kind = f" ({sts.result_type})" if sts.result_type else ""
        echo(f"  problem{kind}: {sts.error}")
        return
    if sts.policy_id is None:
        # TXT records at the name, but none begins "v=STSv1;" (RFC 8461 §3.1 discards
        # them): the worker applies no policy, and there is none to describe.
        echo("  none is a v=STSv1 record: the domain publishes no policy")
        return
    echo(f"  policy:      id {sts.policy_id}, mode {sts.mode}, max_age {sts.max_age}")
    for pattern in sts.mx:
        echo(f"  mx:          {pattern}")
    for value in sts.ignored_mx:
        echo(f"  mx ignored:  {value!r} (not a host name or *.name: it allows no host)")
