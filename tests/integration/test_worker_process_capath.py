"""A ``tls_context`` trusting the CAs of a directory (``capath``): OpenSSL loads them only
as a handshake needs one, so the context holds none that could be read back for a worker
process. The child trusted nothing and deferred every verified delivery that a worker
thread made; now such a context keeps the worker in this process."""

from __future__ import annotations

import shutil
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
import trustme

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.errors import WorkerError
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.certs import hashed_ca_directory
from tests.support.delivery import Results, loopback_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def trusting_a_directory(ca: trustme.CA, directory: Path) -> ssl.SSLContext:
    """A context trusting ``ca`` through a capath directory, named as OpenSSL looks it up
    (its subject's hash, which the openssl command computes)."""
    context = ssl.create_default_context(capath=str(hashed_ca_directory(directory, ca)))
    if not ssl.create_default_context().get_ca_certs():
        pytest.skip("this system's CAs load from a directory too: none is held up front")
    return context


def test_a_context_trusting_a_directory_delivers_as_a_worker_thread_does(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    """With a durable store "auto" started a worker process, which trusted nothing of the
    directory: "unable to get local issuer certificate", the message deferred."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    context = trusting_a_directory(tls_ca, tmp_path / "cas")
    cfg = loopback_config(dns_server, mx.port, tls="verify", tls_context=context)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    try:
        with Mailstrom(cfg, store=store, on_result=results) as ms:
            message_id = ms.send_email(
                Email(from_="app@sender.test", to=["u@example.org"], subject="s", text="hi")
            )
            results.wait_count(1)
            assert ms.query_status(message_id).state is RecipientState.DELIVERED
            assert ms.worker_mode == "thread"
        # A context that has verified a certificate holds the CA it loaded for it: the
        # refusal is judged on one as the application makes it, before any handshake.
        fresh = trusting_a_directory(tls_ca, tmp_path / "more")
        with pytest.raises(WorkerError, match="capath"):
            Mailstrom(replace(cfg, tls_context=fresh), store=store, worker="process")
    finally:
        store.close()
    assert len(mx.messages) == 1 and mx.messages[0].tls
