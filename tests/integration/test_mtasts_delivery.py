"""MTA-STS applied to delivery (issue 13, "Done when"): loopback DNS serving the _mta-sts
TXT record, a loopback HTTPS server (trustme) serving the policy, and loopback SMTP
servers with chosen certificates."""

from __future__ import annotations

import dataclasses
import errno
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailstrom import Email, RecipientState
from mailstrom.client import Mailstrom
from mailstrom.config import Config, MTASTSConfig
from mailstrom.errors import LocalResourceShortage
from mailstrom.mtasts import https as mtasts_https
from mailstrom.mtasts.policy import CachedPolicy, parse_policy
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from mailstrom.testing.smtp import ReceivingServer, start_receiving_server
from mailstrom.tls.levels import TLSPolicy
from mailstrom.tlsrpt import PolicyType
from mailstrom.tlsrpt.deliver import report_message
from mailstrom.tlsrpt.report import Reporter, build_report
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import Answer, HTTPSFactory, HTTPSServer
from tests.support.delivery import Results, loopback_config

BOB = "bob@example.org"


def policy(mode: str = "enforce", *mx: str) -> str:
    lines = "".join(f"mx: {m}\n" for m in (mx or ("mx1.test",)))
    return f"version: STSv1\nmode: {mode}\n{lines}max_age: 86400\n"


@pytest.fixture
def https(https_server: HTTPSFactory) -> HTTPSServer:
    server = https_server()
    server.policy(policy())
    return server


@pytest.fixture
def zone(dns_server: LoopbackDNS) -> LoopbackDNS:
    dns_server.mx("example.org", [(10, "mx1.test")])
    dns_server.a("mx1.test", "127.0.0.1")
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    return dns_server


@pytest.fixture
def servers() -> Iterator[list[ReceivingServer]]:
    started: list[ReceivingServer] = []
    yield started
    for server in started:
        server.stop()


def serve(
    servers: list[ReceivingServer], context: ssl.SSLContext, **options: Any
) -> ReceivingServer:
    server = start_receiving_server(context, **options)
    servers.append(server)
    return server


def sts_config(
    zone: LoopbackDNS, port: int, sts_port: int, context: ssl.SSLContext, **options: Any
) -> Config:
    """A loopback config delivering to ``port`` over ``context``, with MTA-STS policies
    fetched from ``sts_port`` with it and looked up again at each message."""
    return loopback_config(
        zone,
        port,
        tls_context=context,
        mta_sts=MTASTSConfig(port=sts_port, tls_context=context, recheck=0),
        **options,
    )


def send(
    zone: LoopbackDNS,
    https: HTTPSServer,
    port: int,
    client_tls_context: ssl.SSLContext,
    store: Store | None = None,
    worker: str = "thread",
    dnssec: bool = False,
    **options: Any,
) -> tuple[Any, Store]:
    """Send one message to BOB and wait for its first result; (recipient status, store)."""
    store = store if store is not None else MemoryStore()
    config = sts_config(zone, port, https.port, client_tls_context, **options)
    if dnssec:
        config = dataclasses.replace(config, dns=dataclasses.replace(config.dns, dnssec=True))
    results = Results()
    with Mailstrom(config, store=store, on_result=results, worker=worker) as ms:  # type: ignore[arg-type]
        mid = ms.send_email(Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hello"))
        results.wait_final({BOB})
        status = ms.query_status(mid).recipient(BOB)
    return status, store


def failures(store: Store) -> dict[str, int]:
    today = datetime.now(UTC).date()
    return {s.result_type: s.count for s in store.tls_sessions(today) if s.result_type}


def successes(store: Store) -> int:
    today = datetime.now(UTC).date()
    return sum(s.count for s in store.tls_sessions(today) if not s.result_type)


def test_enforce_matching_mx_with_valid_certificate_delivers(
    zone: LoopbackDNS,
    https: HTTPSServer,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
) -> None:
    mx = smtp_server(name="mx1.test")
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DELIVERED
    assert status.history[-1].tls_policy == "mta-sts enforce"
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1
    assert successes(store) == 1 and failures(store) == {}
    [counter] = store.tls_sessions(datetime.now(UTC).date())
    assert counter.policy_type is PolicyType.STS
    assert "mode: enforce" in counter.policy_string


def test_enforce_certificate_for_another_name_defers(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    zone.mx("example.org", [(10, "mail.example.net")])
    zone.a("mail.example.net", "127.0.0.1")
    https.policy(policy("enforce", "mail.example.net"))
    mx = smtp_server()  # its certificate does not name mail.example.net
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DEFERRED
    assert "mail.example.net" in status.reason
    assert mx.received == []
    assert failures(store) == {"certificate-host-mismatch": 1}


def test_enforce_self_signed_certificate_defers(
    zone: LoopbackDNS,
    https: HTTPSServer,
    servers: list[ReceivingServer],
    client_tls_context: ssl.SSLContext,
) -> None:
    other = trustme.CA()  # its own certificate, self-signed, presented as the server's
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*_pem_files(other))
    mx = serve(servers, context, name="mx1.test")
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DEFERRED
    assert "certificate" in status.reason
    assert mx.received == []
    assert failures(store) == {"certificate-not-trusted": 1}


def _pem_files(ca: trustme.CA) -> tuple[str, str]:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(ca.cert_pem.bytes())
    key.write_bytes(ca.private_key_pem.bytes())
    return str(cert), str(key)


def test_enforce_mx_not_in_policy_defers_without_connecting(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    https.policy(policy("enforce", "mx.other.example"))
    mx = smtp_server(name="mx1.test")
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DEFERRED
    assert "does not list MX host mx1.test" in status.reason
    assert mx.connections == 0
    assert failures(store) == {"validation-failure": 1}


def test_enforce_starttls_stripped_defers(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    mx = smtp_server(name="mx1.test", starttls=False)
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DEFERRED
    assert "STARTTLS" in status.reason
    assert "(TLS policy mta-sts enforce: MTA-STS policy of example.org (enforce" in status.reason
    assert mx.received == []
    assert failures(store) == {"starttls-not-supported": 1}


def test_testing_mode_delivers_and_records_the_failure(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    https.policy(policy("testing"))
    mx = smtp_server(name="mx1.test", starttls=False)
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DELIVERED
    assert status.history[-1].tls_policy == "mta-sts testing"
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1
    assert failures(store) == {"starttls-not-supported": 1}


def test_testing_mode_never_falls_back_for_a_requiretls_message(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    zone.mx("example.org", [(10, "mail.example.net")])
    zone.a("mail.example.net", "127.0.0.1")
    https.policy(policy("testing", "mail.example.net"))
    # REQUIRETLS offered, but the certificate does not name mail.example.net: without
    # the fallback of testing mode, the message has nowhere to go.
    mx = smtp_server(requiretls=True)
    config = sts_config(zone, mx.port, https.port, client_tls_context)
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:
        mid = ms.send_email(
            Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hello", require_tls=True)
        )
        results.wait_final({BOB})
        status = ms.query_status(mid).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert "mail.example.net" in status.reason
    assert mx.received == []


def test_testing_mode_with_valid_certificate_counts_a_success(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    https.policy(policy("testing"))
    mx = smtp_server(name="mx1.test")
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DELIVERED
    assert status.tls
    assert successes(store) == 1 and failures(store) == {}


def test_cached_policy_applies_when_the_https_server_is_down(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    https = https_server()
    https.policy(policy("enforce", "mx.other.example"))
    mx = smtp_server(name="mx1.test")
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        first, _ = send(zone, https, mx.port, client_tls_context, store=store)
        assert first.state is RecipientState.DEFERRED
        https.stop()
        zone.txt("_mta-sts.example.org", "v=STSv1; id=two;")  # a refresh, which fails
        # This time a worker process (its configuration crosses the process boundary).
        again, _ = send(zone, https, mx.port, client_tls_context, store=store, worker="process")
        # The cached enforce policy still refuses mx1.test: nothing was sent.
        assert again.state is RecipientState.DEFERRED
        assert "does not list MX host mx1.test" in again.reason
        assert mx.connections == 0
        cached = store.mta_sts_policy("example.org")
        assert cached is not None and cached.policy_id == "one"
        assert failures(store)["sts-policy-fetch-error"] == 1
    finally:
        store.close()


def test_new_id_is_refetched_and_applied(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    https.policy(policy("enforce", "mx.other.example"))
    mx = smtp_server(name="mx1.test")
    first, store = send(zone, https, mx.port, client_tls_context)
    assert first.state is RecipientState.DEFERRED
    zone.txt("_mta-sts.example.org", "v=STSv1; id=two;")
    https.policy(policy("enforce", "mx1.test"))
    again, _ = send(zone, https, mx.port, client_tls_context, store=store)
    assert again.state is RecipientState.DELIVERED
    assert https.count() == 2


def test_a_policy_cached_by_a_clock_since_set_back_is_refreshed(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    """A policy fetched while the clock was a year ahead (corrected by NTP since) was
    due for its refresh only a year and half its max_age on: the domain's new MX host,
    listed in the policy it now serves under the same id, was refused all that time."""
    https.policy(policy("enforce", "mx1.test"))
    mx = smtp_server(name="mx1.test")
    store = MemoryStore()
    ahead = datetime.now(UTC) + timedelta(days=365)
    old = parse_policy(policy("enforce", "mx.other.example").encode())
    store.save_mta_sts_policy(CachedPolicy.of("example.org", "one", old, ahead))
    status, _ = send(zone, https, mx.port, client_tls_context, store=store)
    assert status.state is RecipientState.DELIVERED
    assert https.count() == 1


@pytest.mark.parametrize(
    "answer",
    [
        Answer(body=policy().replace("STSv1", "STSv9").encode()),
        Answer(body=policy().replace("enforce", "always").encode()),
        Answer(body=policy().encode() + b"#" * 70_000),
        Answer(status=302, headers={"Location": "https://mta-sts.example.org/elsewhere"}),
    ],
    ids=["wrong-version", "bad-mode", "oversized", "redirect"],
)
def test_bad_policy_files_are_ignored(
    zone: LoopbackDNS,
    https: HTTPSServer,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    answer: Answer,
) -> None:
    https.routes["/.well-known/mta-sts.txt"] = answer
    mx = smtp_server(name="mx1.test", starttls=False)  # delivered only without a policy
    status, store = send(zone, https, mx.port, client_tls_context)
    assert status.state is RecipientState.DELIVERED
    assert status.history[-1].tls_policy == "opportunistic"
    assert "MTA-STS policy of example.org ignored" in caplog.text
    assert store.mta_sts_policy("example.org") is None


@pytest.mark.parametrize("match", [True, False], ids=["dane-match", "dane-mismatch"])
def test_dane_sessions_are_counted_for_tls_reports(
    dns_server: LoopbackDNS,
    https: HTTPSServer,
    servers: list[ReceivingServer],
    client_tls_context: ssl.SSLContext,
    tmp_path: Path,
    match: bool,
) -> None:
    """With reporting on, a connection under DANE counts as a tlsa session (RFC 8460)."""
    from tests.support.certs import self_signed, server_context, spki_sha256

    cert, key = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    mx = serve(servers, server_context(tmp_path, cert, key), name="mx.test")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", "127.0.0.1")
    dns_server.tlsa("_25._tcp.mx.test", (3, 1, 1, spki_sha256(cert if match else other)))
    dns_server.authenticated("example.org", "mx.test", "_25._tcp.mx.test")
    status, store = send(dns_server, https, mx.port, client_tls_context, dnssec=True)
    assert status.state is (RecipientState.DELIVERED if match else RecipientState.DEFERRED)
    [counter] = store.tls_sessions(datetime.now(UTC).date())
    assert counter.policy_type is PolicyType.TLSA
    assert counter.policy_string.startswith("3 1 1 ")
    assert counter.receiving_mx == "mx.test"
    assert counter.result_type == ("" if match else "tlsa-invalid")


@pytest.mark.parametrize(
    ("tls", "starttls", "state"),
    [
        (TLSPolicy.VERIFY, True, RecipientState.DELIVERED),
        (TLSPolicy.REQUIRED, False, RecipientState.DEFERRED),
    ],
)
def test_testing_mode_counts_an_unlisted_mx_once(
    zone: LoopbackDNS,
    https: HTTPSServer,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
    tls: TLSPolicy,
    starttls: bool,
    state: RecipientState,
) -> None:
    # The connection to an MX host the testing policy does not list is one session: its
    # failure (mx not listed) is counted, not also a success for the TLS it then had, nor
    # a second failure for what the global policy then met.
    https.policy(policy("testing", "mx.other.example"))
    mx = smtp_server(name="mx1.test", starttls=starttls)
    status, store = send(zone, https, mx.port, client_tls_context, tls=tls)
    assert status.state is state
    assert failures(store) == {"validation-failure": 1}
    assert successes(store) == 0


def test_a_tls_report_goes_despite_the_rua_domains_failing_policy(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    # RFC 8460 §3: reports sent by mail MUST be delivered despite any TLS-related failure
    # (they are how the domain learns of it). Its enforce policy fails here, as in
    # test_enforce_certificate_for_another_name_defers; the report still goes.
    zone.mx("example.org", [(10, "mail.example.net")])
    zone.a("mail.example.net", "127.0.0.1")
    https.policy(policy("enforce", "mail.example.net"))
    mx = smtp_server()  # its certificate does not name mail.example.net
    reporter = Reporter(organization="Sender", contact="tls@sender.test", submitter="sender.test")
    report = build_report("example.org", datetime.now(UTC).date(), [], reporter)
    message = report_message(report, sender="tls@sender.test", to=BOB, submitter="sender.test")
    config = sts_config(zone, mx.port, https.port, client_tls_context)
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:
        mid = ms.send_email(message)
        results.wait_final({BOB})
        status = ms.query_status(mid).recipient(BOB)
    assert status.state is RecipientState.DELIVERED
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1


def test_testing_mode_counts_an_unlisted_mx_per_connection_not_per_message(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    # Two messages, one after the other, over one connection kept idle in between: one
    # session, so one failure (mx not listed), as a listed host's would be one success.
    https.policy(policy("testing", "mx.other.example"))
    mx = smtp_server(name="mx1.test")
    store = MemoryStore()
    config = sts_config(zone, mx.port, https.port, client_tls_context, connection_idle=30.0)
    results = Results()
    with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
        for n in range(2):
            ms.send_email(Email(from_="app@sender.test", to=[BOB], subject=f"{n}", text="Hi"))
            results.wait_count(n + 1)
    assert mx.connections == 1
    assert failures(store) == {"validation-failure": 1}


def test_testing_mode_counts_an_unlisted_mx_remembered_broken_as_the_policys_failure(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    # Two sessions: the handshake fails (plaintext again), then plaintext at once, the
    # host's TLS remembered broken. Each is the policy's failure, never no-policy-found.
    https.policy(policy("testing", "mx.other.example"))
    mx = smtp_server(name="mx1.test", tls_broken=True)
    store = MemoryStore()
    config = sts_config(
        zone, mx.port, https.port, client_tls_context, max_messages_per_connection=1
    )
    results = Results()
    with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
        for n in range(2):
            ms.send_email(Email(from_="app@sender.test", to=[BOB], subject=f"{n}", text="Hi"))
            mx.wait_for_messages(n + 1)
    assert mx.connections == 3
    counters = store.tls_sessions(datetime.now(UTC).date())
    assert {(c.policy_type, c.result_type, c.failure_code) for c in counters} == {
        (PolicyType.STS, "validation-failure", "mx-not-listed-in-policy")
    }
    assert failures(store) == {"validation-failure": 2}


def test_testing_mode_falls_back_to_plaintext_at_once_for_a_host_remembered_broken(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    """A testing policy lists the host, whose TLS handshake fails. The first session tries
    what enforce would ask (verified TLS), then TLS as before, then plaintext: the host's
    TLS is remembered broken. The next one still tries verified TLS, for the report, and
    then goes in plaintext at once, as without a policy: its fallback tried the broken
    handshake again, a connection (or a whole handshake timeout) per session."""
    https.policy(policy("testing"))
    mx = smtp_server(name="mx1.test", tls_broken=True)
    store = MemoryStore()
    config = sts_config(
        zone, mx.port, https.port, client_tls_context, max_messages_per_connection=1
    )
    results = Results()
    with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
        for n in range(2):
            ms.send_email(Email(from_="app@sender.test", to=[BOB], subject=f"{n}", text="Hi"))
            mx.wait_for_messages(n + 1)
    assert mx.connections == 3 + 2
    assert failures(store) == {"validation-failure": 2}


def test_a_testing_policys_plaintext_for_a_host_remembered_broken_defers_a_530(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    """Under a testing policy, a server whose TLS handshake fails and that takes mail over
    TLS only answers the plaintext fallback "530 Must issue a STARTTLS command first" (RFC
    3207 §4). The first session's plaintext came from the opener's fallback and deferred;
    the host is then remembered broken and the next session's fallback is plaintext from
    the start, which the 530 rule did not count as TLS skipped: that message bounced."""
    https.policy(policy("testing"))
    mx = smtp_server(name="mx1.test", tls_broken=True, require_starttls=True)
    config = sts_config(
        zone, mx.port, https.port, client_tls_context, max_messages_per_connection=1
    )
    results = Results()
    sent = []
    with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:
        for address in ("a@example.org", "b@example.org"):
            mid = ms.send_email(Email(from_="app@sender.test", to=[address], text="Hi"))
            results.wait_final({address})
            sent.append((ms.query_status(mid).recipient(address), address))
    for status, address in sent:
        assert status.state is RecipientState.DEFERRED, (address, status.reason)
        assert status.reply is not None and status.reply.code == 530
        assert status.history[-1].tls_policy == "mta-sts testing"
    assert mx.messages == []


def test_enforce_still_applies_when_the_tlsa_records_are_all_unusable(
    dns_server: LoopbackDNS,
    https: HTTPSServer,
    servers: list[ReceivingServer],
    client_tls_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    """Validated TLSA records of PKIX usages only (unusable for SMTP) make TLS mandatory
    but authenticate nothing: the domain's enforce policy still wants a certificate valid
    for the MX host, and a self-signed one is not (RFC 8461 §2, RFC 7672 §2.2)."""
    from tests.support.certs import self_signed, server_context, spki_sha256

    cert, key = self_signed("mx1.test")
    mx = serve(servers, server_context(tmp_path, cert, key), name="mx1.test")
    dns_server.mx("example.org", [(10, "mx1.test")])
    dns_server.a("mx1.test", "127.0.0.1")
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    dns_server.tlsa("_25._tcp.mx1.test", (1, 1, 1, spki_sha256(cert)))  # PKIX-EE
    dns_server.authenticated("example.org", "mx1.test", "_25._tcp.mx1.test")
    status, _ = send(dns_server, https, mx.port, client_tls_context, dnssec=True)
    assert status.state is RecipientState.DEFERRED, status
    assert status.history[-1].tls_policy == "mta-sts enforce"
    assert mx.received == []


def test_a_tls_required_no_session_counts_as_no_policy_found_beside_the_policys(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    # The domain's enforce policy applies to the first message; the second carries
    # TLS-Required: No (RFC 8689 §5), so the policy is not applied to its session, which
    # counts as no-policy-found (docs/guide.md, "TLS reports"). It was not counted at all
    # once the policy had applied to an earlier message of the domain.
    mx = smtp_server(name="mx1.test")
    store = MemoryStore()
    config = sts_config(
        zone, mx.port, https.port, client_tls_context, max_messages_per_connection=1
    )
    results = Results()
    with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
        for address, headers in (("a@example.org", {}), ("b@example.org", {"TLS-Required": "No"})):
            ms.send_email(
                Email(
                    from_="app@sender.test",
                    to=[address],
                    subject="Hi",
                    text="Hello",
                    headers=headers,
                )
            )
            results.wait_final({address})  # one after the other: a new connection each
    assert set(results.states().values()) == {RecipientState.DELIVERED}
    counted = {
        (s.policy_type.value, s.result_type or "ok"): s.count
        for s in store.tls_sessions(datetime.now(UTC).date())
    }
    assert counted == {("sts", "ok"): 1, ("no-policy-found", "ok"): 1}


def test_a_requiretls_message_waits_for_a_policy_that_could_not_be_fetched(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
) -> None:
    """The MX records are not DNSSEC-validated, so only the MTA-STS policy can vouch for
    mx1.test (RFC 8689 §4.2.1). Its HTTPS server being down failed the message for good
    (5.7.30), as if the domain had no policy; it is deferred now, and goes once the
    policy is fetched."""
    mx = smtp_server(name="mx1.test", requiretls=True)

    def send_requiretls(https: HTTPSServer) -> Any:
        config = sts_config(zone, mx.port, https.port, client_tls_context)
        results = Results()
        with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:
            mid = ms.send_email(
                Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hi", require_tls=True)
            )
            results.wait_final({BOB})
            return ms.query_status(mid).recipient(BOB)

    down = https_server()
    down.policy(policy("enforce", "mx1.test"))
    down.stop()
    status = send_requiretls(down)
    assert status.state is RecipientState.DEFERRED
    assert "was not fetched" in status.reason
    assert mx.received == []

    zone.servfail("_mta-sts.example.org", "TXT")  # nor is its record to be had
    status = send_requiretls(down)
    assert status.state is RecipientState.DEFERRED
    assert "_mta-sts record was not looked up" in status.reason
    zone.delete("_mta-sts.example.org")
    zone.txt("_mta-sts.example.org", "v=STSv1; id=one;")

    up = https_server()
    up.policy(policy("enforce", "mx1.test"))
    status = send_requiretls(up)
    assert status.state is RecipientState.DELIVERED
    mx.wait_for_messages(1)
    assert len(mx.messages) == 1


def test_a_table_entry_keeps_the_mta_sts_policy_vouching_for_a_requiretls_mx(
    zone: LoopbackDNS, https: HTTPSServer, smtp_server: Any, client_tls_context: ssl.SSLContext
) -> None:
    """The MX records are not DNSSEC-validated, and the domain's enforce policy lists
    mx1.test: that vouches for it (RFC 8689 §4.2.1), and the message went. With a
    ``tls.domains`` entry for the domain (``verify``, stricter than the default), the
    policy was never asked, and the message failed for good (5.7.30)."""
    mx = smtp_server(name="mx1.test", requiretls=True)
    config = sts_config(
        zone, mx.port, https.port, client_tls_context, tls_domains={"example.org": "verify"}
    )
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:
        mid = ms.send_email(
            Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hi", require_tls=True)
        )
        results.wait_final({BOB})
        status = ms.query_status(mid).recipient(BOB)
    assert status.state is RecipientState.DELIVERED, status.reason
    assert status.history[-1].tls_policy == "verify"  # the table's level, as it was
    [received] = mx.wait_for_messages(1)
    assert received.tls and "REQUIRETLS" in received.mail_options


def test_a_table_entry_keeps_a_requiretls_message_waiting_for_an_unfetched_policy(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
) -> None:
    """As without the entry: the policy that could vouch for mx1.test is not to be had
    now, so the message waits for it rather than failing for good."""
    mx = smtp_server(name="mx1.test", requiretls=True)
    down = https_server()
    down.policy(policy("enforce", "mx1.test"))
    down.stop()
    config = sts_config(
        zone, mx.port, down.port, client_tls_context, tls_domains={"example.org": "verify"}
    )
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:
        mid = ms.send_email(
            Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hi", require_tls=True)
        )
        results.wait_final({BOB})
        status = ms.query_status(mid).recipient(BOB)
    assert status.state is RecipientState.DEFERRED
    assert "was not fetched" in status.reason
    assert mx.received == []


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
def test_a_tls_required_no_session_to_a_host_remembered_broken_counts_as_no_policy_found(
    zone: LoopbackDNS,
    https: HTTPSServer,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
    listed: bool,
) -> None:
    # The testing policy applies to the first message, whose failed handshake makes the
    # host's TLS remembered broken; the second carries TLS-Required: No, so the policy is
    # not applied to its session (plaintext at once, for the remembered failure). That
    # session was taken for the policy's, as the first message's decision was: not
    # counted at all for a listed host, counted as "mx-not-listed" for another.
    https.policy(policy("testing") if listed else policy("testing", "mx.other.example"))
    mx = smtp_server(name="mx1.test", tls_broken=True)
    store = MemoryStore()
    config = sts_config(
        zone, mx.port, https.port, client_tls_context, max_messages_per_connection=1
    )
    results = Results()
    with Mailstrom(config, store=store, on_result=results, worker="thread") as ms:
        for n, headers in enumerate(({}, {"TLS-Required": "No"})):
            ms.send_email(
                Email(from_="app@sender.test", to=[BOB], subject=f"{n}", text="Hi", headers=headers)
            )
            mx.wait_for_messages(n + 1)
    counters = store.tls_sessions(datetime.now(UTC).date())
    by_type: dict[PolicyType, int] = {}
    for c in counters:
        by_type[c.policy_type] = by_type.get(c.policy_type, 0) + c.count
    assert by_type == {PolicyType.STS: 1, PolicyType.NO_POLICY: 1}
    assert [
        (c.result_type, c.failure_code) for c in counters if c.policy_type is PolicyType.NO_POLICY
    ] == [("validation-failure", "tls-handshake-failed-recently")]


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_a_worker_process_fetches_policies_with_the_tls_versions_it_was_given(
    zone: LoopbackDNS,
    tls_ca: trustme.CA,
    smtp_server: Any,
    client_tls_context: ssl.SSLContext,
    tmp_path: Path,
    worker: str,
) -> None:
    """``mta_sts.tls_context`` crossed to a worker process as its CAs alone: a context
    asking for TLS 1.3 at least fetched, in the child, a policy a server offering TLS 1.2
    only served, which the same context refuses in a worker thread. Here the policy would
    name another MX: applied, it defers the message; refused, the message is delivered."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("mta-sts.example.org").configure_cert(server_context)
    server_context.maximum_version = ssl.TLSVersion.TLSv1_2
    https = HTTPSServer(server_context)
    try:
        https.policy(policy("enforce", "mail.example.net"))
        modern = ssl.create_default_context()
        tls_ca.configure_trust(modern)
        modern.minimum_version = ssl.TLSVersion.TLSv1_3
        mx = smtp_server(name="mx1.test")
        config = loopback_config(
            zone,
            mx.port,
            tls_context=client_tls_context,
            mta_sts=MTASTSConfig(port=https.port, tls_context=modern, recheck=0),
        )
        store = SQLiteStore(tmp_path / "q.db")
        results = Results()
        with Mailstrom(config, store=store, on_result=results, worker=worker) as ms:  # type: ignore[arg-type]
            mid = ms.send_email(Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hi"))
            results.wait_final({BOB})
            status = ms.query_status(mid).recipient(BOB)
        store.close()
    finally:
        https.stop()
    assert status.state is RecipientState.DELIVERED, status.reason
    assert status.history[-1].tls_policy != "mta-sts enforce"


def test_a_policy_not_fetched_for_want_of_descriptors_is_asked_for_once_per_round(
    zone: LoopbackDNS,
    https: HTTPSServer,
    servers: list[ReceivingServer],
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy fetch short of a descriptor (the system's CAs not read: EMFILE) at the
    first MX host: the delivery went on to the next MX host, which looked the record up
    and fetched again, and so on for each. The shortage is this host's and the next MX
    host would meet it too: the round ends there, deferred with no attempt."""
    mx = serve(servers, server_tls_context)
    zone.mx("example.org", [(10, "mx1.test"), (20, "mx2.test"), (30, "mx3.test")])
    zone.a("mx2.test", "127.0.0.1")
    zone.a("mx3.test", "127.0.0.1")

    def short(ca_file: str | None = None) -> ssl.SSLContext:
        raise LocalResourceShortage(
            "reading the CA certificates", OSError(errno.EMFILE, "Too many open files")
        )

    monkeypatch.setattr(mtasts_https, "default_context", short)
    config = sts_config(zone, mx.port, https.port, client_tls_context)
    assert config.mta_sts is not None
    config = dataclasses.replace(
        config, mta_sts=dataclasses.replace(config.mta_sts, tls_context=None)
    )
    results = Results()
    with Mailstrom(config, store=MemoryStore(), on_result=results, worker="thread") as ms:  # type: ignore[arg-type]
        mid = ms.send_email(Email(from_="app@sender.test", to=[BOB], subject="Hi", text="Hello"))
        results.wait_count(1)
        status = ms.query_status(mid).recipient(BOB)
    assert (status.state, status.attempts) == (RecipientState.DEFERRED, 0)
    assert status.error is not None and status.error.startswith("local resource shortage: ")
    assert zone.queries("_mta-sts.example.org", "TXT") == 1
    assert https.count() == 0 and mx.messages == []
