"""Which policy type and failure a connection attempt counts under (the error path; the
opened-connection path runs against real servers in tests/integration/test_tls_sessions)."""

from __future__ import annotations

import errno
from datetime import UTC, datetime

import pytest

from mailstrom.errors import (
    DeliveryError,
    LocalResourceShortage,
    SMTPConnectError,
    TemporaryFailure,
    TLSRequiredError,
)
from mailstrom.runtime.connection import TLSVerifyError
from mailstrom.stores import MemoryStore
from mailstrom.tls.danematch import DaneMismatch
from mailstrom.tls.decide import Destination
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement
from mailstrom.tlsrpt import PolicyType
from mailstrom.tlsrpt.observer import SessionObserver
from mailstrom.tlsrpt.recorder import SessionRecorder
from mailstrom.tlsrpt.report import Reporter, build_report

NOW = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
TLSA = TLSARecord(usage=3, selector=1, matching=1, data=b"\xab\x12")
STRIPPED = TLSRequiredError("mx.example.org does not offer STARTTLS", host="mx.example.org")


async def counted(
    source: PolicySource,
    error: DeliveryError,
    *,
    mode: TLSMode = TLSMode.REQUIRED,
    domain: str = "Example.ORG",
) -> list[tuple[str, str, str, str, str]]:
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    observe = SessionObserver(recorder)
    tlsa = (TLSA,) if source is PolicySource.DANE else ()
    requirement = TLSRequirement(mode=mode, source=source, tlsa=tlsa)
    observe(domain, requirement, "mx.example.org", "192.0.2.7", error)
    await recorder.flush()
    return [
        (s.policy_domain, s.policy_type.value, s.policy_string, s.result_type, s.receiving_ip)
        for s in store.tls_sessions(NOW.date())
    ]


@pytest.mark.parametrize("source", [PolicySource.DEFAULT, PolicySource.TABLE])
async def test_without_a_published_policy_a_failure_counts_as_no_policy_found(
    source: PolicySource,
) -> None:
    assert await counted(source, STRIPPED) == [
        ("example.org", "no-policy-found", "", "starttls-not-supported", "192.0.2.7")
    ]


async def test_under_dane_a_failure_counts_with_the_tlsa_records() -> None:
    mismatch = DaneMismatch("certificate of mx.example.org matches none of its TLSA records")
    error = TLSVerifyError(f"DANE: {mismatch}", host="mx.example.org")
    error.__cause__ = mismatch  # as the connection raises it
    assert await counted(PolicySource.DANE, error, mode=TLSMode.DANE) == [
        ("example.org", PolicyType.TLSA.value, "3 1 1 ab12", "tlsa-invalid", "192.0.2.7")
    ]


@pytest.mark.parametrize(
    ("source", "error", "domain"),
    [
        (PolicySource.RELAY, STRIPPED, "example.org"),  # the smarthost, not the domain's MX
        (PolicySource.MTA_STS, STRIPPED, "example.org"),  # MTA-STS counts its own
        (PolicySource.DEFAULT, SMTPConnectError("refused", host="mx"), "example.org"),
        (PolicySource.DEFAULT, STRIPPED, "[192.0.2.1]"),  # an address literal: no domain
    ],
    ids=["relay", "mta-sts-without-source", "not-about-tls", "address-literal"],
)
async def test_not_counted(source: PolicySource, error: DeliveryError, domain: str) -> None:
    assert await counted(source, error, domain=domain) == []


async def test_a_tlsa_rrset_is_one_policy_in_whatever_order_dns_gives_it() -> None:
    # Resolvers rotate an RRset's order (BIND, Unbound's rrset-roundrobin): a host with
    # two TLSA records (a key rollover) was two policies in the day's report, its
    # sessions split between them by the order each lookup happened to give.
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    observe = SessionObserver(recorder)
    other = TLSARecord(usage=2, selector=0, matching=2, data=b"\xcd" * 64)
    error = TLSVerifyError("DANE: no TLSA record matches", host="mx.example.org")
    for records in ((TLSA, other), (other, TLSA), (TLSA, other)):
        requirement = TLSRequirement(mode=TLSMode.DANE, source=PolicySource.DANE, tlsa=records)
        observe("example.org", requirement, "mx.example.org", "192.0.2.7", error)
    await recorder.flush()
    reporter = Reporter(organization="Sender", contact="tls@sender.test", submitter="sender.test")
    report = build_report("example.org", NOW.date(), store.tls_sessions(NOW.date()), reporter)
    [entry] = report.document["policies"]
    assert entry["policy"]["policy-string"] == sorted([str(TLSA), str(other)])
    assert entry["summary"]["total-failure-session-count"] == 3
    [detail] = entry["failure-details"]
    assert detail["failed-session-count"] == 3


async def test_a_tlsa_lookup_this_host_had_no_socket_for_is_not_the_domains_dnssec() -> None:
    # A TLSA lookup that failed for want of a file descriptor here was counted as the
    # domain's dnssec-invalid in its next TLS report.
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    observe = SessionObserver(recorder)
    destination = Destination(domain="example.org", mx_host="mx.example.org", mx_secure=True)
    shortage = OSError(errno.EMFILE, "Too many open files")
    observe.dane_failed(
        destination, LocalResourceShortage("DANE: TLSA lookup", shortage, host="mx.example.org")
    )
    observe.dane_failed(destination, TemporaryFailure("SERVFAIL", host="mx.example.org"))
    await recorder.flush()
    counted = [(s.result_type, s.count) for s in store.tls_sessions(NOW.date())]
    assert counted == [("dnssec-invalid", 1)]  # the SERVFAIL alone
