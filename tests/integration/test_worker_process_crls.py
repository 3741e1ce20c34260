"""A ``tls_context`` that checks CRLs, and where the worker runs: the CRLs a context holds
cannot be read back from it, so a worker process could not check them. It accepted a
revoked certificate that the worker thread refused; now such a context keeps the worker
in this process, and asking for a worker process with it is refused."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mailstrom import AsyncMailstrom, Config, Email, Mailstrom, MTASTSConfig, RecipientState
from mailstrom.errors import WorkerError
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, start_receiving_server
from tests.support.delivery import Results, loopback_config


def revoking(ca: trustme.CA, *certificates: trustme.LeafCert) -> bytes:
    """A CRL of ``ca`` revoking ``certificates``, in PEM."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - timedelta(days=1))
        .next_update(now + timedelta(days=30))
    )
    for leaf in certificates:
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - timedelta(hours=1))
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def revoked_mx(dns_server: LoopbackDNS, tmp_path: Path) -> tuple[ReceivingServer, ssl.SSLContext]:
    """An MX whose certificate its CA revoked, and a client context checking CRLs."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server_context)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(revoking(ca, leaf))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.load_verify_locations(crl)
    client.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    server = start_receiving_server(server_context)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server, client


def hello() -> Email:
    return Email(from_="app@sender.test", to=["u@example.org"], subject="hi", text="Hello")


@pytest.mark.parametrize("worker", ["auto", "thread"])
def test_a_revoked_certificate_is_refused_wherever_the_worker_runs(
    revoked_mx: tuple[ReceivingServer, ssl.SSLContext],
    dns_server: LoopbackDNS,
    tmp_path: Path,
    worker: str,
) -> None:
    """With a durable store, "auto" started a worker process, which took the context's
    CA certificates but not its CRLs nor its CRL checks: it delivered over TLS to an MX
    whose certificate was revoked, where a worker thread refused it."""
    server, context = revoked_mx
    try:
        cfg = loopback_config(dns_server, server.port, tls="verify", tls_context=context)
        results = Results()
        store = SQLiteStore(tmp_path / "q.db")
        with Mailstrom(cfg, store=store, on_result=results, worker=worker) as ms:  # type: ignore[arg-type]
            assert ms.worker_mode == "thread"
            message_id = ms.send_email(hello())
            results.wait_count(1)
            state = ms.query_status(message_id).state
        store.close()
    finally:
        server.stop()
    assert state is RecipientState.DEFERRED
    assert server.messages == []


def test_a_worker_process_is_refused_a_context_whose_crls_it_cannot_check(
    revoked_mx: tuple[ReceivingServer, ssl.SSLContext], dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    server, context = revoked_mx
    store = SQLiteStore(tmp_path / "q.db")
    try:
        for cfg in (
            loopback_config(dns_server, server.port, tls="verify", tls_context=context),
            loopback_config(dns_server, server.port, mta_sts=MTASTSConfig(tls_context=context)),
        ):
            with pytest.raises(WorkerError, match="CRL"):
                Mailstrom(cfg, store=store, worker="process")
    finally:
        store.close()
        server.stop()
    assert server.messages == []


def test_a_context_without_crl_checks_still_gets_a_worker_process(
    client_tls_context: ssl.SSLContext, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    cfg = Config(tls_context=client_tls_context)
    try:
        assert Mailstrom(cfg, store=store, worker=None).worker_mode is None
        ms = Mailstrom(cfg, store=store)
        assert ms.worker_mode == "process"
    finally:
        store.close()


async def test_an_async_facade_keeps_a_context_checking_crls_in_a_task(tmp_path: Path) -> None:
    checking = ssl.create_default_context()
    checking.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    store = SQLiteStore(tmp_path / "q.db")
    try:
        ms = AsyncMailstrom(Config(tls_context=checking), store=store)
        assert ms.worker_mode == "task"
        with pytest.raises(WorkerError, match="worker='task'"):
            AsyncMailstrom(Config(tls_context=checking), store=store, worker="process")
    finally:
        store.close()
