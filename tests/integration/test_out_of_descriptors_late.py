"""A worker process short of file descriptors at a step it takes for the first time: a
module it loads only then (a bounce's mark, ...) must not make a server's answer, or the
delivery it ended, be lost or told as something else.

The limit is lowered on the worker's child process only, as in
:mod:`tests.integration.test_out_of_descriptors`.
"""

from __future__ import annotations

import errno
import logging
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailstrom import Mailstrom, RecipientState
from mailstrom.message import prepare
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import HTTPSServer
from tests.integration.test_dkim_delivery import rotated
from tests.integration.test_mtasts_delivery import (
    BOB,
    failures,
    https,
    serve,
    servers,
    sts_config,
    zone,
)
from tests.integration.test_out_of_descriptors import (
    _child,
    _descriptors_back,
    _no_descriptor_left,
)
from tests.integration.test_worker_modes import config, hello, mx
from tests.support.delivery import Results
from tests.support.dkim import dual, publish, signature_tags

__all__ = ["https", "mx", "servers", "zone"]  # the fixtures, found by pytest by these names


def _told(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the worker logged of bounces it could not make."""
    return [r for r in caplog.records if r.getMessage().startswith("bounce messages")]


def test_a_worker_out_of_descriptors_records_a_refusal_that_owes_a_bounce(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection kept and the route known, no descriptor left, and the server refuses
    a recipient whose sender gets a bounce: the refusal is recorded (failed, one attempt)
    and the bounce is sent once descriptors return. The worker loaded the module that
    writes a bounce's mark at the first result owing one; the import failed (EMFILE), the
    session was told as crashed, and the server's answer was never recorded: the recipient
    stayed leased, to be sent again when the lease ran out."""
    dns_server.mx("a.example", [(10, "mx.test")])
    dns_server.mx("sender.test", [(10, "mx.test")])
    mx.rcpt_replies["nobody@a.example"] = "550 5.1.1 No such user"
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, connection_idle=60, bounce_notices=True)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        ms.send_email(hello("u@a.example"))
        results.wait_count(1)  # a connection to reuse, and the route known
        pid = _child(ms)
        _no_descriptor_left(pid)
        refused = ms.send_email(hello("nobody@a.example", 1))
        results.wait_count(2)
        r = ms.query_status(refused).recipients[0]
        assert (r.state, r.attempts) == (RecipientState.FAILED, 1)
        # The worker tries to make the bounce once the result is recorded: descriptors
        # return only after it told why it could not (below).
        deadline = time.monotonic() + 30
        while not _told(caplog) and time.monotonic() < deadline:
            time.sleep(0.02)
        _descriptors_back(pid)
    finally:
        ms.stop()
    assert ms.worker_status.error is None
    # The bounce, made by the next worker if this one could not load its renderer.
    again = Mailstrom(cfg, store=store, on_result=results, worker="process")
    with again:
        results.wait_count(3)
    assert [m.rcpt_tos for m in mx.messages] == [("u@a.example",), ("app@sender.test",)]
    store.close()
    # Its renderer not loaded (EMFILE) was this host's shortage, told as one: no bug's
    # traceback at ERROR, which sent operators looking for one.
    told = _told(caplog)
    assert told and all(r.levelname == "WARNING" and not r.exc_text for r in told), told
    assert all("Too many open files" in r.getMessage() for r in told), told


def test_a_worker_out_of_descriptors_defers_its_first_7bit_downgrade_as_a_shortage(
    smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A connection kept to a server without 8BITMIME, no descriptor left, and the first
    8-bit message for it: the encoders it is re-encoded with load only then, and the
    import failed (EMFILE). Told as a crash ("internal error: OSError"), an attempt
    spent; it is this host's shortage (no attempt), and once descriptors return the
    message goes, re-encoded."""
    old = smtp_server(eightbitmime=False)
    dns_server.a("mx.test", old.host)
    dns_server.mx("a.example", [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, old.port, connection_idle=60)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        ms.send_email(hello("u@a.example"))
        results.wait_count(1)  # a connection to reuse, and the route known
        pid = _child(ms)
        _no_descriptor_left(pid)
        sent = ms.send_email(
            "From: app@sender.test\r\nTo: v@a.example\r\nSubject: 8bit\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n".encode()
        )
        results.wait_count(2)
        r = ms.query_status(sent).recipients[0]
        assert (r.state, r.attempts) == (RecipientState.DEFERRED, 0)
        assert r.error is not None and r.error.startswith("local resource shortage: ")
        assert "Too many open files" in r.error
        _descriptors_back(pid)
        ms.retry(sent)
        results.wait_count(3)
    finally:
        ms.stop()
    assert ms.query_status(sent).state is RecipientState.DELIVERED
    assert [m.rcpt_tos for m in old.messages] == [("u@a.example",), ("v@a.example",)]
    assert max(old.messages[1].content) < 128
    store.close()


def test_a_worker_out_of_descriptors_defers_its_first_dkim_resign_as_a_shortage(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Keys rotated while a message waited, a connection kept, no descriptor left: the
    worker signs the message anew, with a module it loads at the first message to sign
    again; the import failed (EMFILE) outside any handler, the session was logged as
    crashed, and the message it had in hand was left leased, no result recorded. It is
    this host's shortage (no attempt), and the message goes, signed by the new keys, once
    descriptors return."""
    dns_server.mx("a.example", [(10, "mx.test")])
    old, new = dual("sender.test"), rotated()
    publish(dns_server, old)
    publish(dns_server, new)
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, connection_idle=60, dkim=new, poll_interval=0.2)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        store.enqueue(prepare(hello("u@a.example"), now=datetime.now(UTC)), now=datetime.now(UTC))
        results.wait_count(1)  # a connection to reuse, and the route known; nothing signed
        pid = _child(ms)
        _no_descriptor_left(pid)
        signed = prepare(hello("v@a.example", 1), now=datetime.now(UTC), dkim=old)
        stale = store.enqueue(signed, now=datetime.now(UTC))
        results.wait_count(2)
        r = ms.query_status(stale).recipients[0]
        assert (r.state, r.attempts) == (RecipientState.DEFERRED, 0)
        assert r.error is not None and r.error.startswith("local resource shortage: ")
        _descriptors_back(pid)
        ms.retry(stale)
        results.wait_count(3)
    finally:
        ms.stop()
    assert ms.query_status(stale).state is RecipientState.DELIVERED
    received = mx.messages[-1]
    assert received.rcpt_tos == ("v@a.example",)
    assert [t["s"] for t in signature_tags(received.content)] == ["rsa2027", "ed2027"]
    store.close()


def test_a_dkim_resign_short_of_descriptors_inside_the_signer_is_a_shortage_too(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signer loaded, a module it loads later failing for want of a descriptor
    (EMFILE; made to fail here, in a worker thread): told as this host's shortage, no
    attempt, and signed anew once it passes. Was: taken for a bug in the signer, logged
    with a traceback, and the message went with the signature of a key rotated away."""
    from mailstrom.dkim.resigned import ResignedMessages

    dns_server.mx("a.example", [(10, "mx.test")])
    old, new = dual("sender.test"), rotated()
    publish(dns_server, old)
    publish(dns_server, new)
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, dkim=new, poll_interval=0.2)
    sign = ResignedMessages.sign
    short = [True]

    def sign_or_short(self: ResignedMessages, *args: Any, **kwargs: Any) -> Any:
        if short[0]:
            raise OSError(errno.EMFILE, "Too many open files")
        return sign(self, *args, **kwargs)

    monkeypatch.setattr(ResignedMessages, "sign", sign_or_short)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="thread")
    with ms:
        signed = prepare(hello("v@a.example", 1), now=datetime.now(UTC), dkim=old)
        stale = store.enqueue(signed, now=datetime.now(UTC))
        ms.wake()
        results.wait_count(1)
        r = ms.query_status(stale).recipients[0]
        assert (r.state, r.attempts) == (RecipientState.DEFERRED, 0)
        assert r.error is not None and r.error.startswith("local resource shortage: ")
        short[0] = False
        ms.retry(stale)
        results.wait_count(2)
    assert ms.query_status(stale).state is RecipientState.DELIVERED
    [received] = mx.messages
    assert [t["s"] for t in signature_tags(received.content)] == ["rsa2027", "ed2027"]
    store.close()


@pytest.mark.parametrize("cached", [True, False], ids=["policy cached", "none cached"])
def test_a_worker_out_of_descriptors_reports_no_mta_sts_failure_of_its_own(
    cached: bool,
    zone: LoopbackDNS,
    https: HTTPSServer,
    servers: list[Any],
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    """An MTA-STS domain's record looked up again at each message (``recheck = 0``), a
    connection kept, no descriptor left: the record's lookup has no socket. That was
    told as the domain's failure: an "sts-policy-fetch-error" in the day's TLS report to
    the domain, and, no policy cached, the message went over the kept connection as if
    the domain had none. It is this host's shortage: nothing reported, a cached policy
    applied, and without one the message deferred (no attempt) until descriptors return."""
    mx = serve(servers, server_tls_context)
    record = "v=STSv1; id=one;"
    if not cached:
        zone.delete("_mta-sts.example.org")
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = sts_config(
        zone, mx.port, https.port, client_tls_context, poll_interval=30, connection_idle=60
    )
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        ms.send_email(hello(BOB))
        results.wait_count(1)  # the route known, a connection kept (and the policy cached)
        zone.txt("_mta-sts.example.org", record)
        pid = _child(ms)
        _no_descriptor_left(pid)
        short = ms.send_email(hello(BOB, 1))
        results.wait_count(2)
        r = ms.query_status(short).recipients[0]
        if cached:
            assert (r.state, r.attempts) == (RecipientState.DELIVERED, 1)
        else:
            assert (r.state, r.attempts) == (RecipientState.DEFERRED, 0)
            assert r.error is not None
            assert r.error.startswith("local resource shortage: MTA-STS: TXT lookup of _mta-sts.")
            _descriptors_back(pid)
            ms.retry(short)
            results.wait_count(3)
    finally:
        ms.stop()
    assert ms.query_status(short).state is RecipientState.DELIVERED
    assert results.all[-1].attempt.tls_policy == "mta-sts enforce"
    assert failures(store) == {}
    store.close()


def test_a_worker_short_of_a_descriptor_for_the_system_cas_keeps_no_context_trusting_none(
    mx: Any,
    dns_server: LoopbackDNS,
    tls_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first connection that checks a certificate against the system's CAs (no
    ``tls_context``: here a ``verify`` domain) makes the context then, and its socket took
    the last descriptor: ssl.create_default_context() could not open the CA file, said
    nothing, and the context trusting no CA was kept for the process's life. Every
    verified handshake failed from then on ("certificate of mx.test not accepted"), as
    the server's fault, also once descriptors returned. It is this host's shortage (no
    attempt), and the next connection reads the CAs."""
    system_file = tmp_path / "system.pem"
    tls_ca.cert_pem.write_to_path(str(system_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(system_file))  # the child's "system" CAs
    dns_server.mx("a.example", [(10, "mx.test")])
    dns_server.mx("b.example", [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, connection_idle=0, tls_domains={"b.example": "verify"})
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        ms.send_email(hello("u@a.example"))  # opportunistic: no CA read
        results.wait_count(1)
        pid = _child(ms)
        # One left, set again once the connection above is closed: the lookups take it
        # one at a time, then the new connection's socket keeps it.
        _no_descriptor_left(pid, spare=1)
        verified = ms.send_email(hello("u@b.example", 1))
        results.wait_count(2)
        r = ms.query_status(verified).recipients[0]
        assert (r.state, r.attempts) == (RecipientState.DEFERRED, 0), r.error
        # The CA file's, not the socket's: that one the spare descriptor was kept for.
        assert r.error is not None
        assert r.error.startswith("local resource shortage: reading the CA certificates")
        _descriptors_back(pid)
        ms.retry(verified)
        results.wait_count(3)
    finally:
        ms.stop()
    assert ms.query_status(verified).state is RecipientState.DELIVERED
    assert mx.messages[-1].rcpt_tos == ("u@b.example",) and mx.messages[-1].tls
    store.close()
