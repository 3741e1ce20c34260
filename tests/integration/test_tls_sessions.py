"""Counting TLS sessions for reports (RFC 8460) with ``tlsrpt_record`` and no MTA-STS:
every connection to a recipient's MX counts under its policy type (``tlsa`` under DANE,
``no-policy-found`` otherwise), against aiosmtpd receivers and the loopback DNS server."""

from __future__ import annotations

import dataclasses
import hashlib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailstrom import Config, Email, RecipientState, TLSPolicy
from mailstrom.client import Mailstrom
from mailstrom.runtime.connection import TLSVerifyError
from mailstrom.stores import MemoryStore
from mailstrom.stores.postgres import PostgresStore
from mailstrom.testing.smtp import start_receiving_server
from mailstrom.tls.danematch import DaneMismatch
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement
from mailstrom.tlsrpt import PolicyType, TLSSessions
from mailstrom.tlsrpt.observer import REMEMBERED_CODE, SessionObserver
from mailstrom.tlsrpt.recorder import SessionRecorder
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.certs import chain_with_anchor, der, self_signed, server_context, spki_sha256
from tests.support.delivery import FAST, FakeClock, Results

CLOCK = FakeClock()
DAY = CLOCK().date()

Run = Callable[..., list[TLSSessions]]


@pytest.fixture
def run(
    dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext
) -> Iterator[Callable[..., list[TLSSessions]]]:
    """Deliver one message per address in ``to`` (one connection each) through a worker
    with ``overrides``, stop it, and return the day's counters in its store."""
    running: list[Mailstrom] = []

    def deliver(port: int, to: list[str], **overrides: Any) -> list[TLSSessions]:
        options: dict[str, Any] = {
            "helo_name": "client.test",
            "smtp_port": port,
            "dns": dns_server.dns_config,
            "allow_loopback": True,
            "timeouts": FAST,
            "poll_interval": 0.5,
            "tls_context": client_tls_context,
            "max_messages_per_connection": 1,
            "tlsrpt_record": True,
        }
        store = MemoryStore()
        results = Results()
        ms = Mailstrom(Config(**(options | overrides)), store=store, clock=CLOCK, on_result=results)
        ms.start()
        running.append(ms)
        for address in to:
            ms.send_email(Email(from_="a@sender.test", to=[address], subject="Hi", text="Hi"))
            results.wait_final({address})  # one after the other: broken TLS is remembered
        assert set(results.states().values()) == {RecipientState.DELIVERED}
        ms.stop(timeout=5)  # the worker writes its counters when it stops
        running.remove(ms)
        return store.tls_sessions(DAY)

    yield deliver
    for ms in running:
        ms.stop(timeout=5)


def route(dns: LoopbackDNS, ip: str, *domains: str) -> None:
    for domain in domains:
        dns.mx(domain, [(10, "mx.test")])
    dns.a("mx.test", ip)


def summary(counters: list[TLSSessions]) -> dict[tuple[str, str, str], int]:
    """(domain, policy type, result type or "ok") → sessions."""
    found: dict[tuple[str, str, str], int] = {}
    for c in counters:
        key = (c.policy_domain, c.policy_type.value, c.result_type or "ok")
        found[key] = found.get(key, 0) + c.count
    return found


def test_opportunistic_tls_sessions_count_as_no_policy_found(
    smtp_server: Any, dns_server: LoopbackDNS, run: Run
) -> None:
    mx = smtp_server()
    route(dns_server, mx.host, "example.org", "Other.Example")
    counters = run(mx.port, ["a@example.org", "b@example.org", "c@other.example"])
    assert summary(counters) == {
        ("example.org", "no-policy-found", "ok"): 2,
        ("other.example", "no-policy-found", "ok"): 1,
    }
    assert all(c.policy_type is PolicyType.NO_POLICY and not c.policy_string for c in counters)


def test_a_server_without_starttls_counts_as_starttls_not_supported(
    smtp_server: Any, dns_server: LoopbackDNS, run: Run
) -> None:
    mx = smtp_server(starttls=False)
    route(dns_server, mx.host, "example.org")
    [counter] = run(mx.port, ["a@example.org"])
    assert counter.policy_type is PolicyType.NO_POLICY
    assert counter.result_type == "starttls-not-supported"
    assert (counter.receiving_mx, counter.receiving_ip) == ("mx.test", mx.host)
    assert counter.count == 1


def test_broken_tls_counts_as_failures_also_when_remembered(
    smtp_server: Any, dns_server: LoopbackDNS, run: Run
) -> None:
    mx = smtp_server(tls_broken=True)
    route(dns_server, mx.host, "example.org")
    counters = run(mx.port, ["a@example.org", "b@example.org"])
    assert mx.connections == 3  # TLS, plaintext again; then plaintext at once
    by_code = {c.failure_code: c for c in counters}
    assert len(counters) == 2 and REMEMBERED_CODE in by_code
    remembered = by_code.pop(REMEMBERED_CODE)
    [(code, handshake)] = by_code.items()
    assert "handshake" in code
    for c in (handshake, remembered):
        assert c.result_type == "validation-failure" and c.count == 1
        assert c.policy_type is PolicyType.NO_POLICY and c.receiving_mx == "mx.test"


def test_dane_sessions_count_as_tlsa_without_mta_sts(
    dns_server: LoopbackDNS, run: Run, tmp_path: Path
) -> None:
    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    try:
        route(dns_server, mx.host, "example.org")
        dns_server.tlsa("_25._tcp.mx.test", (3, 1, 1, spki_sha256(cert)))
        dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
        dns = dataclasses.replace(dns_server.dns_config, dnssec=True)
        counters = run(mx.port, ["a@example.org"], dns=dns)
    finally:
        mx.stop()
    [counter] = counters
    assert counter.policy_type is PolicyType.TLSA and counter.successful
    assert counter.policy_string == f"3 1 1 {spki_sha256(cert).hex()}"
    assert counter.policy_domain == "example.org" and counter.receiving_mx == "mx.test"


def test_a_session_under_tlsa_records_none_usable_counts_as_tlsa_invalid(
    dns_server: LoopbackDNS, run: Run, tmp_path: Path
) -> None:
    # Validated TLSA records that are all unusable for SMTP (here PKIX-TA, usage 0, which
    # RFC 7672 §3.1.3 rules out) still make TLS mandatory (RFC 7672 §2.2), but nothing
    # authenticates the server: the domain's DANE policy failed, "tlsa-invalid" (RFC 8460
    # §4.3.2: none of the records was valid). It was counted as a successful session, so
    # the domain's report never told it that its TLSA records were of no use.
    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    try:
        route(dns_server, mx.host, "example.org")
        dns_server.tlsa("_25._tcp.mx.test", (0, 1, 1, spki_sha256(cert)))
        dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
        dns = dataclasses.replace(dns_server.dns_config, dnssec=True)
        counters = run(mx.port, ["a@example.org"], dns=dns)
    finally:
        mx.stop()
    [counter] = counters
    assert counter.policy_type is PolicyType.TLSA and not counter.successful
    assert counter.result_type == "tlsa-invalid"
    assert counter.policy_domain == "example.org" and counter.receiving_mx == "mx.test"
    assert counter.receiving_ip == mx.host and counter.count == 1


@pytest.mark.parametrize(
    "overrides",
    [{"tlsrpt_record": False}, {"tls": TLSPolicy.NONE}],
    ids=["recording-off", "tls-none"],
)
def test_nothing_is_counted_when_off_or_without_tls(
    smtp_server: Any, dns_server: LoopbackDNS, run: Run, overrides: dict[str, Any]
) -> None:
    mx = smtp_server()
    route(dns_server, mx.host, "example.org")
    assert run(mx.port, ["a@example.org"], **overrides) == []


@pytest.mark.postgres
async def test_a_peers_control_characters_keep_no_counter_from_postgresql(
    postgres_url: str,
) -> None:
    # A DANE failure reason quotes the names of the peer's certificate, NUL included:
    # PostgreSQL refused that counter, and with it the whole batch, again at every flush.
    # (The reason is no longer the counter's code; the test keeps it so.)
    reason = "DANE: the certificate is not valid for mx.test (names: evil\x00\x1b[2J.test)"
    error = TLSVerifyError(reason, host="mx")
    error.__cause__ = DaneMismatch(reason.removeprefix("DANE: "), host_mismatch=True)
    tlsa = (TLSARecord(usage=2, selector=1, matching=1, data=b"\x01" * 32),)
    need = TLSRequirement(mode=TLSMode.DANE, source=PolicySource.DANE, tlsa=tlsa)
    with PostgresStore(postgres_url) as store:
        recorder = SessionRecorder(store, clock=CLOCK)
        observe = SessionObserver(recorder)
        observe("example.org", need, "mx.test", "192.0.2.7", error)
        recorder.success("example.org", PolicyType.NO_POLICY, "")
        await recorder.flush()
        assert recorder.pending == 0
        counters = store.tls_sessions(DAY)
    assert len(counters) == 2
    [failed] = [c for c in counters if c.result_type]
    assert failed.failure_code == "dane-ta-certificate-host-mismatch"


def test_a_tlsa_lookup_that_fails_counts_as_dnssec_invalid(
    dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext, tmp_path: Path
) -> None:
    # Validated MX and address records, and a TLSA lookup the validating resolver answers
    # with SERVFAIL (a bogus signature, say): the host is not used (RFC 7672 §2.2) and the
    # mail waits. Nothing was counted, so the domain's report never said why its mail
    # stopped coming; it is a "dnssec-invalid" failure of its DANE policy (RFC 8460
    # §4.3.2: no valid records were returned from the recursive resolver).
    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    try:
        route(dns_server, mx.host, "example.org")
        dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
        dns_server.servfail("_25._tcp.mx.test", "TLSA")
        config = Config(
            helo_name="client.test",
            smtp_port=mx.port,
            dns=dataclasses.replace(dns_server.dns_config, dnssec=True),
            allow_loopback=True,
            timeouts=FAST,
            poll_interval=0.5,
            tls_context=client_tls_context,
            tlsrpt_record=True,
        )
        store, results = MemoryStore(), Results()
        ms = Mailstrom(config, store=store, clock=CLOCK, on_result=results)
        ms.start()
        try:
            ms.send_email(
                Email(from_="a@sender.test", to=["a@example.org"], subject="Hi", text="Hi")
            )
            results.wait_final({"a@example.org"})
            assert results.states() == {"a@example.org": RecipientState.DEFERRED}
        finally:
            ms.stop(timeout=5)  # the worker writes its counters when it stops
    finally:
        mx.stop()
    assert mx.connections == 0
    [counter] = store.tls_sessions(DAY)
    assert counter.policy_type is PolicyType.TLSA and counter.result_type == "dnssec-invalid"
    assert counter.policy_domain == "example.org" and counter.receiving_mx == "mx.test"
    assert counter.failure_code == "tlsa-lookup-failed" and counter.count == 1


def deferred_under_dane(
    dns_server: LoopbackDNS,
    client_tls_context: ssl.SSLContext,
    server: ssl.SSLContext,
    tlsa: tuple[int, int, int, bytes],
) -> list[TLSSessions]:
    """Deliver one message to a DANE host with validated ``tlsa`` that its ``server``
    certificate fails; return the day's counters once the message is deferred."""
    mx = start_receiving_server(server)
    try:
        route(dns_server, mx.host, "example.org")
        dns_server.tlsa("_25._tcp.mx.test", tlsa)
        dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
        config = Config(
            helo_name="client.test",
            smtp_port=mx.port,
            dns=dataclasses.replace(dns_server.dns_config, dnssec=True),
            allow_loopback=True,
            timeouts=FAST,
            poll_interval=0.5,
            tls_context=client_tls_context,
            tlsrpt_record=True,
        )
        store, results = MemoryStore(), Results()
        ms = Mailstrom(config, store=store, clock=CLOCK, on_result=results)
        ms.start()
        try:
            ms.send_email(
                Email(from_="a@sender.test", to=["a@example.org"], subject="Hi", text="Hi")
            )
            results.wait_final({"a@example.org"})
            assert results.states() == {"a@example.org": RecipientState.DEFERRED}
        finally:
            ms.stop(timeout=5)  # the worker writes its counters when it stops
    finally:
        mx.stop()
    assert mx.messages == []
    return store.tls_sessions(DAY)


def test_a_certificate_matching_no_tlsa_record_counts_as_tlsa_invalid(
    dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext, tmp_path: Path
) -> None:
    # The server's certificate matches none of the host's (usable) TLSA records: RFC 8460
    # §4.3.2.1's "tlsa-invalid", none of the records in the RRset was found valid for it.
    # It was counted as "validation-failure", the type for a failure "not matching a
    # category above", which hid from the domain that its TLSA records were the trouble.
    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    counters = deferred_under_dane(
        dns_server,
        client_tls_context,
        server_context(tmp_path, cert, key),
        (3, 1, 1, spki_sha256(other)),
    )
    [counter] = counters
    assert counter.policy_type is PolicyType.TLSA
    assert counter.policy_string == f"3 1 1 {spki_sha256(other).hex()}"
    assert counter.result_type == "tlsa-invalid"
    assert counter.failure_code == "no-tlsa-record-matches"  # not the text: one per kind
    assert counter.receiving_mx == "mx.test" and counter.count == 1


def test_a_dane_ta_leaf_for_another_name_counts_as_certificate_host_mismatch(
    dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext, tmp_path: Path
) -> None:
    # The chain leads to the trust anchor the TLSA record names, but the leaf is issued
    # for another name: RFC 8460 §4.3.1's "certificate-host-mismatch", a certificate that
    # does not adhere to the DANE policy's constraints because of its names.
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, "elsewhere.example")
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    counters = deferred_under_dane(
        dns_server, client_tls_context, server_context(tmp_path, chain, key), (2, 0, 1, anchor)
    )
    [counter] = counters
    assert counter.policy_type is PolicyType.TLSA
    assert counter.result_type == "certificate-host-mismatch"
    assert counter.failure_code == "dane-ta-certificate-host-mismatch"


@pytest.mark.parametrize("servfail", [True, False], ids=["lookup-failed", "no-tlsa"])
def test_a_report_mails_failed_tlsa_lookup_is_not_counted(
    dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext, tmp_path: Path, servfail: bool
) -> None:
    # A mailed TLS report travels with TLS-Required: No, which "dane-only" (the operator's
    # own demand) does not lift: its host's TLSA lookup is made, and when it fails the
    # host is not used. RFC 8460 §3: the report's own session SHOULD NOT be in the next
    # report, which its connections keep to; its failed lookup was counted all the same,
    # a "dnssec-invalid" failure of example.org made by mail about example.org. Nor is
    # "dane-only"'s refusal of its host for want of TLSA records ("dane-required").
    from mailstrom.tlsrpt.deliver import report_message
    from mailstrom.tlsrpt.report import Reporter, build_report

    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    try:
        route(dns_server, mx.host, "example.org")
        dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
        if servfail:
            dns_server.servfail("_25._tcp.mx.test", "TLSA")
        config = Config(
            helo_name="client.test",
            smtp_port=mx.port,
            dns=dataclasses.replace(dns_server.dns_config, dnssec=True),
            allow_loopback=True,
            timeouts=FAST,
            poll_interval=0.5,
            tls_context=client_tls_context,
            tls_domains={"example.org": "dane-only"},
            tlsrpt_record=True,
        )
        reporter = Reporter(
            organization="Client", contact="tls@client.test", submitter="client.test"
        )
        report = build_report("example.org", DAY, [], reporter)
        mail = report_message(
            report, sender="tls@client.test", to="tls@example.org", submitter="client.test"
        )
        store, results = MemoryStore(), Results()
        ms = Mailstrom(config, store=store, clock=CLOCK, on_result=results)
        ms.start()
        try:
            ms.send_email(mail)
            results.wait_final({"tls@example.org"})
            assert results.states() == {"tls@example.org": RecipientState.DEFERRED}
        finally:
            ms.stop(timeout=5)  # the worker writes its counters when it stops
    finally:
        mx.stop()
    assert mx.connections == 0
    assert store.tls_sessions(DAY) == []


@pytest.mark.parametrize("unusable", [False, True], ids=["no-tlsa", "none-usable"])
def test_a_host_dane_only_refuses_counts_as_dane_required(
    smtp_server: Any, dns_server: LoopbackDNS, client_tls_context: ssl.SSLContext, unusable: bool
) -> None:
    # "dane-only" refuses an MX host without usable DNSSEC-validated TLSA records (none
    # at all, or only PKIX-TA ones, which RFC 7672 §3.1.3 rules out): the mail waits and
    # no connection is made. Nothing was counted, so the domain's report never said why
    # its mail stopped coming; RFC 8460 §4.3.2.1 names this "dane-required" (the sender
    # requires DANE TLSA records for the domain's MX hosts, and none were present).
    mx = smtp_server()
    route(dns_server, mx.host, "example.org")
    if unusable:
        dns_server.tlsa("_25._tcp.mx.test", (0, 1, 1, b"\x01" * 32))
    dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
    config = Config(
        helo_name="client.test",
        smtp_port=mx.port,
        dns=dataclasses.replace(dns_server.dns_config, dnssec=True),
        allow_loopback=True,
        timeouts=FAST,
        poll_interval=0.5,
        tls_context=client_tls_context,
        tls_domains={"example.org": "dane-only"},
        tlsrpt_record=True,
    )
    store, results = MemoryStore(), Results()
    ms = Mailstrom(config, store=store, clock=CLOCK, on_result=results)
    ms.start()
    try:
        ms.send_email(Email(from_="a@sender.test", to=["a@example.org"], subject="Hi", text="Hi"))
        results.wait_final({"a@example.org"})
        assert results.states() == {"a@example.org": RecipientState.DEFERRED}
    finally:
        ms.stop(timeout=5)  # the worker writes its counters when it stops
    assert mx.connections == 0
    [counter] = store.tls_sessions(DAY)
    assert counter.policy_type is PolicyType.TLSA and counter.result_type == "dane-required"
    assert counter.policy_domain == "example.org" and counter.receiving_mx == "mx.test"
    assert counter.receiving_ip == "" and counter.count == 1
    code = "no-usable-tlsa-records" if unusable else "no-validated-tlsa-records"
    assert counter.failure_code == code
