"""Events out of the process (issue 11 §4): signed batches from the store's outbox to a
loopback HTTP endpoint, none lost while it fails, none resent after a restart unless it
was never acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Config, Email, HookConfig, Mailstrom, QueueFilter
from mailstrom.errors import ConfigError
from mailstrom.message.prepared import PreparedMessage
from mailstrom.runtime.hook_post import BODY_READ_LIMIT, HTTPFailure
from mailstrom.runtime.hooks import HookSender, post
from mailstrom.runtime.metrics import MetricsRecorder
from mailstrom.status import Attempt, AttemptOutcome, RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import RecipientResult
from mailstrom.webhooks import SIGNATURE_HEADER, verify_signature
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import Answer
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config

SECRET = "whsec_test_0123456789"


@dataclass
class Request:
    body: bytes
    signature: str
    answered: int
    path: str = ""
    host: str = ""
    at: float = 0.0
    """When it arrived (``time.monotonic()``)."""

    @property
    def ids(self) -> list[int]:
        return [e["id"] for e in json.loads(self.body)["events"]]

    @property
    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = json.loads(self.body)["events"]
        return events


@dataclass
class Endpoint:
    """A loopback receiver of hook requests. ``answer(n)`` decides the status of the n-th
    request (0-based) and may block first (to be killed mid-request)."""

    answer: Callable[[int], int] = lambda n: 200
    too_large: Callable[[bytes], bool] = lambda body: False
    """Whether a request's body is more than the endpoint takes: it answers 413 then."""
    unread_over: int | None = None
    """A Content-Length over which the endpoint answers ``early`` at once, before reading
    the body, and closes the connection, as servers with a size limit do."""
    early: int = 413
    refused_unread: int = 0
    headers: Callable[[int], dict[str, str]] = lambda n: {}
    """Header fields the answer to the n-th request carries."""
    requests: list[Request] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""

    def record(self, request: Request) -> None:
        with self.cond:
            self.requests.append(request)
            self.cond.notify_all()

    def wait_for(self, check: Callable[[list[Request]], bool], timeout: float = 30) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: check(self.requests), timeout):
                raise AssertionError(f"timed out; requests: {self.requests!r}")

    def acked_ids(self) -> list[int]:
        with self.cond:
            return [i for r in self.requests if 200 <= r.answered < 300 for i in r.ids]


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    seen = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            if ep.unread_over is not None and length > ep.unread_over:
                with ep.cond:
                    ep.refused_unread += 1
                self.send_response(ep.early)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return
            body = self.rfile.read(length)
            with lock:
                n, seen[0] = seen[0], seen[0] + 1
            status = 413 if ep.too_large(body) else ep.answer(n)
            signature = self.headers.get(SIGNATURE_HEADER, "")
            host = self.headers.get("Host", "")
            ep.record(Request(body, signature, status, self.path, host, time.monotonic()))
            self.send_response(status)
            for name, value in ep.headers(n).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ep.url = f"http://127.0.0.1:{server.server_address[1]}/mail-events"
    try:
        yield ep
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


def hello(to: str, n: int = 0) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject=f"n{n}", text=f"Hello {n}")


def hook_config(dns: LoopbackDNS, port: int, url: str, **hook: Any) -> Config:
    options = {"timeout": 5.0, "batch": 2, "retry_min": 0.05, "retry_max": 0.2} | hook
    return loopback_config(dns, port, hook=HookConfig(url=url, secret=SECRET, **options))


def test_endpoint_failing_at_first_gets_every_event_exactly_once(
    mx: Any, dns_server: LoopbackDNS, endpoint: Endpoint, tmp_path: Path
) -> None:
    endpoint.answer = lambda n: 503 if n < 3 else 200
    mx.rcpt_replies["later@example.org"] = "451 4.7.1 Greylisted"
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    config = hook_config(dns_server, mx.port, endpoint.url)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(4)]
        ids.append(ms.send_email(hello("later@example.org", 9)))
        results.wait_count(5)
        endpoint.wait_for(lambda _: len(endpoint.acked_ids()) >= 5)
    # Stopping lets the sender finish its request in flight and mark it sent.
    sent = ms.metrics().worker.metrics
    store.close()

    acked = endpoint.acked_ids()
    assert sorted(acked) == sorted(set(acked)) and len(acked) == 5  # each exactly once
    assert [r.answered for r in endpoint.requests[:3]] == [503, 503, 503]
    assert sent.hook_failures == 3 and sent.hook_events_sent == 5
    # Every request is signed over its exact body.
    for request in endpoint.requests:
        assert verify_signature(SECRET, request.signature, request.body)
        assert not verify_signature("another secret", request.signature, request.body)
    events = {e["recipient"]: e for r in endpoint.requests if r.answered == 200 for e in r.events}
    assert {e["message_id"] for e in events.values()} == set(ids)
    later = events["later@example.org"]
    assert later["type"] == "deferred" and later["attempt"] == 1
    assert later["reply"] == {"code": 451, "enhanced": "4.7.1", "text": "Greylisted"}
    assert later["next_attempt_at"] is not None
    delivered = events["u0@example.org"]
    assert delivered["type"] == "delivered" and delivered["reply"]["code"] == 250
    assert delivered["mx_host"] == "mx.test" and delivered["ip"] == "127.0.0.1"
    # Nothing is left to send.
    store = SQLiteStore(tmp_path / "q.db")
    assert store.lease_events(now=datetime.now(UTC), limit=100, lease_for=timedelta(1)) is None
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("worker", ["thread", None])
def test_a_cancelled_recipient_reaches_the_endpoint_once(
    mx: Any,
    dns_server: LoopbackDNS,
    endpoint: Endpoint,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    kind: str,
    worker: str | None,
) -> None:
    """Was: a cancel wrote no event, so the endpoint's last word on a deferred recipient
    said deferred for ever while ``query_status`` said failed (cancelled). Each recipient
    a cancel fails reaches it once, as ``failed`` with the error "cancelled", also from a
    facade whose worker runs elsewhere; a finished recipient, or a second cancel, sends
    nothing."""
    mx.rcpt_replies["later@example.org"] = "451 4.7.1 Greylisted"
    url = (
        f"sqlite:///{tmp_path / 'q.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    results = Results()
    config = hook_config(dns_server, mx.port, endpoint.url)
    with Mailstrom(config, store=url, worker="thread", on_result=results) as ms:
        sent = ms.send_email(
            Email(
                from_="App <app@sender.test>",
                to=["bob@example.org", "later@example.org"],
                text="Hi",
            )
        )
        results.wait_count(2)
        endpoint.wait_for(lambda _: len(endpoint.acked_ids()) >= 2)
    with Mailstrom(config, store=url, worker=worker) as ms:
        queued = ms.send_email(
            hello("never@example.org"), send_at=datetime.now(UTC) + timedelta(days=1)
        )
        assert ms.cancel(sent) == 1
        assert ms.cancel_many([sent, queued]) == 1
        assert ms.cancel(sent) == 0
        if worker is None:  # no sender here: a worker with the hook sends them
            with Mailstrom(config, store=url, worker="thread"):
                endpoint.wait_for(lambda _: len(endpoint.acked_ids()) >= 4)
        else:
            endpoint.wait_for(lambda _: len(endpoint.acked_ids()) >= 4)
        assert ms.query_status(sent).recipient("later@example.org").error == "cancelled"
    events = [e for r in endpoint.requests if r.answered == 200 for e in r.events]
    assert len({e["id"] for e in events}) == len(events) == 4
    last = {(e["message_id"], e["recipient"]): e for e in sorted(events, key=lambda e: e["id"])}
    assert {k: (e["type"], e["error"], e["attempt"]) for k, e in last.items()} == {
        (sent, "bob@example.org"): ("delivered", None, 1),
        (sent, "later@example.org"): ("failed", "cancelled", 1),
        (queued, "never@example.org"): ("failed", "cancelled", 0),
    }


def test_no_hook_no_events(mx: Any, dns_server: LoopbackDNS, tmp_path: Path) -> None:
    """Without a hook (or the events setting) recording writes no outbox rows."""
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    config = loopback_config(dns_server, mx.port)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("u@example.org"))
        results.wait_count(1)
    assert store.read_events() == []
    store.close()


# --- a worker process killed in the middle of a request ---------------------------------


def cli_env(tmp_path: Path, mx: Any, dns: LoopbackDNS, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    root = Path(__file__).parents[2]
    env.update(
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / ".config"),
        PYTHONPATH=os.pathsep.join(p for p in (str(root / "src"), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        MAILSTROM_STORE=f"sqlite:///{tmp_path / 'q.db'}",
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_SMTP_PORT=str(mx.port),
        MAILSTROM_DNS_NAMESERVERS=dns.dns_config.nameservers[0],
        MAILSTROM_DNS_PORT=str(dns.dns_config.port),
        MAILSTROM_ALLOW_LOOPBACK="1",
        MAILSTROM_POLL_INTERVAL="0.2",
    )
    env.update({f"MAILSTROM_{k.upper()}": v for k, v in settings.items()})
    return env


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailstrom", "worker", "--no-live", "--log-format", "json", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_started(proc: subprocess.Popen[str]) -> None:
    """Read the worker's log until it says it started (signals are handled from then on)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"worker started"' in line:
            return
    raise AssertionError("the worker exited before it started")


def finish(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return err


def test_worker_killed_mid_batch_resends_only_unacknowledged_events(
    mx: Any, dns_server: LoopbackDNS, endpoint: Endpoint, tmp_path: Path
) -> None:
    # Six delivered recipients whose events wait in the outbox: a worker with the events
    # setting records them, and no hook sends them yet.
    store = SQLiteStore(tmp_path / "q.db")
    store.enqueue_many(
        [
            PreparedMessage(
                data=f"Subject: n{i}\r\n\r\nHello {i}\r\n".encode(),
                envelope_from="app@sender.test",
                recipients=(f"u{i}@example.org",),
            )
            for i in range(6)
        ],
        now=datetime.now(UTC),
    )
    env = cli_env(tmp_path, mx, dns_server, events="1")
    once = subprocess.run(
        [sys.executable, "-m", "mailstrom", "worker", "--once", "--no-live"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert once.returncode == 0, once.stderr
    assert len(store.read_events()) == 6
    all_ids = [e.id for e in store.read_events()]

    # The endpoint takes the first batch; the second request hangs until the worker that
    # sent it has been killed (its answer then reaches nobody).
    holding, killed = threading.Event(), threading.Event()

    def answer(n: int) -> int:
        if n == 1:
            holding.set()
            killed.wait(30)
            return 599  # reaches nobody; not counted as acknowledged below
        return 200

    endpoint.answer = answer
    # One request at a time: the endpoint's answers then say which batches were
    # acknowledged when the worker was killed (with several in flight, one answered 200
    # may not be marked sent yet, and goes again: at least once).
    hook_env = cli_env(
        tmp_path,
        mx,
        dns_server,
        hook_secret=SECRET,
        hook_batch="2",
        hook_timeout="2",
        hook_concurrency="1",
    )
    first = start_worker(hook_env, "--hook", endpoint.url)
    try:
        assert holding.wait(30), finish(first)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        killed.set()
        finish(first)
    endpoint.wait_for(lambda rs: len(rs) == 2)
    acked_before, unacked = endpoint.requests[0].ids, endpoint.requests[1].ids
    assert len(acked_before) == len(unacked) == 2

    # A new worker sends the rest, the killed batch included once its lease has expired,
    # and nothing that was acknowledged before.
    second = start_worker(hook_env, "--hook", endpoint.url)
    try:
        endpoint.wait_for(lambda rs: set(endpoint.acked_ids()) == set(all_ids))
    finally:
        err = finish(second)
    assert '"event": "worker stopped"' in err
    resent = [i for r in endpoint.requests[2:] for i in r.ids]
    assert sorted(resent) == sorted(set(all_ids) - set(acked_before))
    assert set(unacked) <= set(resent)
    for request in endpoint.requests:
        assert verify_signature(SECRET, request.signature, request.body)

    # A third start sends nothing: everything was acknowledged.
    count = len(endpoint.requests)
    third = start_worker(hook_env, "--hook", endpoint.url)
    wait_started(third)
    finish(third)
    assert len(endpoint.requests) == count
    assert store.lease_events(now=datetime.now(UTC), limit=100, lease_for=timedelta(1)) is None
    store.close()


def test_hook_payloads_carry_the_messages_tags_and_metadata(
    mx: Any, dns_server: LoopbackDNS, endpoint: Endpoint, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    config = hook_config(dns_server, mx.port, endpoint.url)
    email = Email(
        from_="App <app@sender.test>",
        to=["u1@example.org"],
        text="Your receipt",
        tags=["receipt"],
        metadata={"order": "42"},
    )
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        tagged = ms.send_email(email)
        raw = ms.send_email(
            b"From: app@sender.test\r\nTo: u2@example.org\r\nSubject: raw\r\n\r\nraw\r\n",
            tags=["raw", "shop:eu"],
            metadata={"user": "u-7"},
        )
        results.wait_count(2)
        endpoint.wait_for(lambda _: len(endpoint.acked_ids()) >= 2)
        assert ms.query_status(raw).tags == ("raw", "shop:eu")
        assert [m.id for m in ms.query(QueueFilter(tag="receipt"))] == [tagged]
    store.close()
    events = {e["message_id"]: e for r in endpoint.requests for e in r.events}
    assert events[tagged]["tags"] == ["receipt"]
    assert events[tagged]["metadata"] == {"order": "42"}
    assert events[raw]["tags"] == ["raw", "shop:eu"]
    assert events[raw]["metadata"] == {"user": "u-7"}


# --- endpoints that answer slowly, or too much -------------------------------------------

DRIP_CAP = 5.0
"""Seconds a slow endpoint keeps dripping before it completes its 200 (so that without a
deadline on the whole request, a test fails after this long rather than hanging)."""


@dataclass
class RawEndpoint:
    """A loopback endpoint that writes its answer itself, byte by byte if it likes:
    ``answer(wfile, stop)`` after reading each request."""

    answer: Callable[[Any, threading.Event], None]
    stop: threading.Event = field(default_factory=threading.Event)
    requested: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    url: str = ""


@pytest.fixture
def raw_endpoint() -> Iterator[RawEndpoint]:
    ep = RawEndpoint(answer=lambda wfile, stop: None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            ep.requested.set()
            with contextlib.suppress(OSError):  # the client gave up and closed
                ep.answer(self.wfile, ep.stop)
            ep.answered.set()
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    ep.url = f"http://127.0.0.1:{server.server_address[1]}/mail-events"
    try:
        yield ep
    finally:
        ep.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def drip(wfile: Any, stop: threading.Event) -> None:
    """A byte every 0.2 s, each well within any per-read timeout, for DRIP_CAP seconds."""
    end = time.monotonic() + DRIP_CAP
    while time.monotonic() < end and not stop.wait(0.2):
        wfile.write(b"X")


def drip_header(wfile: Any, stop: threading.Event) -> None:
    wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    drip(wfile, stop)
    wfile.write(b"\r\nContent-Length: 0\r\n\r\n")


def drip_body(wfile: Any, stop: threading.Event) -> None:
    wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    drip(wfile, stop)


def test_post_gives_up_on_an_endpoint_that_drips_its_answer_after_the_timeout(
    raw_endpoint: RawEndpoint,
) -> None:
    raw_endpoint.answer = drip_header
    start = time.monotonic()
    failure = post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, timeout=0.5)
    took = time.monotonic() - start
    assert failure == "no complete answer within 0.5 s (hook.timeout)"
    # Ended by the deadline, not by the endpoint: each byte within a per-read timeout,
    # the wait was the whole drip (DRIP_CAP). The room above 0.5 s is a loaded host's.
    assert took < DRIP_CAP / 2


def drip_body_413(wfile: Any, stop: threading.Event) -> None:
    wfile.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 100\r\n\r\n")
    drip(wfile, stop)


@pytest.mark.parametrize(("answer", "status"), [(drip_body, None), (drip_body_413, 413)])
def test_an_answer_whose_body_drips_past_the_timeout_is_the_endpoints_word(
    raw_endpoint: RawEndpoint, answer: Callable[[Any, threading.Event], None], status: int | None
) -> None:
    """A status line and header that arrived in time are the endpoint's answer, whatever
    its body does after (the deadline still cuts the wait for it): a 200 whose body
    dripped past ``hook.timeout`` failed the request, and the batch the endpoint had
    taken was POSTed again. An error status so is that status, as it was."""
    raw_endpoint.answer = answer
    # The status line and header are written at once; the deadline (within DRIP_CAP, for
    # the body still to be dripping then) leaves a loaded host room to deliver them.
    failure = post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, timeout=2.0)
    if status is None:
        assert failure is None
    else:
        assert isinstance(failure, HTTPFailure) and failure.status == status, failure


def test_post_reads_a_huge_answer_only_up_to_the_bound(raw_endpoint: RawEndpoint) -> None:
    size = 1 << 30

    def huge(wfile: Any, stop: threading.Event) -> None:
        wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        while raw_endpoint.sent < size and not stop.is_set():
            wfile.write(chunk)  # raises once the client has closed the connection
            raw_endpoint.sent += len(chunk)

    raw_endpoint.answer = huge
    start = time.monotonic()
    assert post(raw_endpoint.url, b"{}", {}, timeout=5.0) is None  # the status is the answer
    assert time.monotonic() - start < 2.5  # not the 5 s deadline (the bytes: see below)
    assert raw_endpoint.answered.wait(5)
    # What the socket buffers took in before the client closed, not the gigabyte.
    assert BODY_READ_LIMIT <= raw_endpoint.sent < 64 << 20


def test_a_worker_stops_promptly_while_its_endpoint_drips_and_loses_no_event(
    mx: Any, dns_server: LoopbackDNS, raw_endpoint: RawEndpoint, endpoint: Endpoint, tmp_path: Path
) -> None:
    raw_endpoint.answer = drip_header
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    config = hook_config(dns_server, mx.port, raw_endpoint.url, timeout=0.5)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("u@example.org"))
        results.wait_count(1)
        assert raw_endpoint.requested.wait(10)
        stopping = time.monotonic()
    # The request in flight fails within hook.timeout; nothing waits for the endpoint.
    assert time.monotonic() - stopping < 3.0
    events = store.read_events()
    assert len(events) == 1
    assert ms.metrics().worker.metrics.hook_events_sent == 0

    # The event is still in the outbox: a worker whose endpoint answers sends it.
    config = hook_config(dns_server, mx.port, endpoint.url)
    with Mailstrom(config, store=store, worker="thread"):
        endpoint.wait_for(lambda _: endpoint.acked_ids() == [events[0].id])
    store.close()


class _AckFailsOnce(SQLiteStore):
    """A store whose first acknowledgement of sent events fails with a bug, not a
    StoreError."""

    failed = False

    def ack_events(self, *args: Any, **kwargs: Any) -> int:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug below the hook sender")
        return super().ack_events(*args, **kwargs)


def test_an_unexpected_error_while_sending_does_not_end_the_sender(
    mx: Any,
    dns_server: LoopbackDNS,
    endpoint: Endpoint,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The sender task ended on it, unwatched, and said nothing: events piled up unsent
    # while delivery went on.
    store = _AckFailsOnce(tmp_path / "q.db")
    results = Results()
    config = hook_config(dns_server, mx.port, endpoint.url, timeout=1.0)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("u0@example.org"))
        results.wait_count(1)
        endpoint.wait_for(lambda requests: len(requests) >= 1)
        ms.send_email(hello("u1@example.org", 1))
        results.wait_count(2)
        # The first batch again once its lease ran out (it was never marked sent).
        endpoint.wait_for(lambda _: len(set(endpoint.acked_ids())) >= 2)
        failures = ms.metrics().worker.metrics.hook_failures
    store.close()
    assert store.failed and failures == 1
    assert any(r.getMessage() == "hook: sending a batch failed" for r in caplog.records)


class _LeaseFailsOnce(SQLiteStore):
    """A store whose first lease of outbox events fails with what is no StoreError: a
    thread that could not be started for a store call, a bug."""

    failed = False

    def lease_events(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise RuntimeError("can't start new thread")
        return super().lease_events(*args, **kwargs)


def test_an_unexpected_error_while_leasing_does_not_end_the_sender(
    mx: Any,
    dns_server: LoopbackDNS,
    endpoint: Endpoint,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The sender task ended on it, unwatched, and said nothing: every event after it
    # stayed in the outbox while delivery went on, until the worker was restarted.
    store = _LeaseFailsOnce(tmp_path / "q.db")
    results = Results()
    config = hook_config(dns_server, mx.port, endpoint.url, timeout=1.0)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        ms.send_email(hello("u0@example.org"))
        results.wait_count(1)
        endpoint.wait_for(lambda _: len(endpoint.acked_ids()) == 1, timeout=15)
        failures = ms.metrics().worker.metrics.hook_failures
    store.close()
    assert store.failed and failures == 1
    assert any(r.getMessage().startswith("hook: the sender failed") for r in caplog.records)


@pytest.mark.parametrize(
    "url", ["http://[::1/hook", "http://h.test:99999/x", "http://h.test:port/x", "http://a b/x"]
)
def test_hook_urls_urllib_cannot_read_are_refused_at_configuration(url: str) -> None:
    with pytest.raises(ConfigError, match=r"hook\.url"):
        HookConfig(url=url, secret=SECRET)
    assert post(url, b"{}", {}, 1.0) is not None  # and a request fails, it does not raise


def test_a_hook_url_whose_path_is_not_ascii_reaches_the_endpoint(endpoint: Endpoint) -> None:
    # An IRI, accepted by HookConfig: http.client writes the request line in ASCII and
    # raised UnicodeEncodeError for every request, so no event ever went.
    url = endpoint.url + "/\u00e9v\u00e9nements?f\u00fcr=zo\u00eb"
    HookConfig(url=url, secret=SECRET)
    assert post(url, b"{}", {}, 5.0) is None
    assert [r.path for r in endpoint.requests] == [
        "/mail-events/%C3%A9v%C3%A9nements?f%C3%BCr=zo%C3%AB"
    ]


@pytest.mark.parametrize("host", ["b\u00fccher.test", "\u4f8b\u3048.test"])
def test_a_hook_url_whose_host_is_not_ascii_is_requested_by_its_a_labels(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    # Through an HTTP proxy (the endpoint here), which post() honours from the
    # environment: the request line and Host header held the U-label name, which
    # http.client cannot write (UnicodeEncodeError for every request, so no event went;
    # directly, a name outside Latin-1 failed so, and "b\u00fccher" went as a Latin-1
    # Host, which names no host). HookConfig accepts such a URL.
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", endpoint.url.removesuffix("/mail-events"))
    url = f"http://{host}:8080/mail-events"
    HookConfig(url=url, secret=SECRET)
    assert post(url, b"{}", {}, 5.0) is None
    a_labels = host.encode("idna").decode()
    assert [(r.path, r.host) for r in endpoint.requests] == [
        (f"http://{a_labels}:8080/mail-events", f"{a_labels}:8080")
    ]


@pytest.mark.parametrize(
    ("host", "a_labels"),
    [("stra\u00dfe.test", "xn--strae-oqa.test"), ("\u03c2.test", "xn--3xa.test")],
)
def test_a_hook_url_whose_host_is_not_ascii_goes_to_that_host_not_another(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, host: str, a_labels: str
) -> None:
    """The A-labels of IDNA 2008 (UTS #46), as browsers and the rest of mailstrom
    (``domains.a_label``) write the name. The standard library's "idna" codec is IDNA
    2003, which maps "\u00df" to "ss" and "\u03c2" to "\u03c3": the signed events (recipient
    addresses, metadata) went to strasse.test, a host someone else may own."""
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", endpoint.url.removesuffix("/mail-events"))
    url = f"http://{host}/mail-events"
    HookConfig(url=url, secret=SECRET)
    assert post(url, b"{}", {}, 5.0) is None
    assert [(r.path, r.host) for r in endpoint.requests] == [
        (f"http://{a_labels}/mail-events", a_labels)
    ]


@pytest.mark.parametrize(
    ("quoted", "a_labels"),
    [("stra%C3%9Fe.test", "xn--strae-oqa.test"), ("%CF%82.test", "xn--3xa.test")],
)
def test_a_hook_url_whose_host_is_percent_encoded_goes_to_that_host_not_another(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, quoted: str, a_labels: str
) -> None:
    """A host written percent-encoded, as JavaScript's ``encodeURI()`` writes an IRI's:
    urllib decodes it, and the socket module and http.client then wrote it in IDNA 2003,
    so the signed events went to strasse.test (or xn--4xa.test), a host someone else may own."""
    port = int(endpoint.url.split(":")[2].split("/")[0])
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # The name the system's resolver is asked for: the socket module's "idna" form.
        looked_up.append(host.encode("idna").decode() if isinstance(host, str) else host)
        return real_getaddrinfo("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = f"http://{quoted}:{port}/mail-events"
    HookConfig(url=url, secret=SECRET)
    assert post(url, b"{}", {}, 5.0) is None
    assert looked_up == [a_labels]
    assert [r.host for r in endpoint.requests] == [f"{a_labels}:{port}"]


@pytest.mark.parametrize("host", ["app%00x.test", "app%20x.test", "%FF.test", "a%2Fb.test"])
def test_a_hook_url_whose_percent_encoded_host_no_lookup_finds_is_refused(host: str) -> None:
    # urllib decodes the host: a control character, a space or an octet that is not UTF-8
    # made every request fail (InvalidURL, or a name nobody has), retried for ever, while
    # HookConfig took the URL.
    with pytest.raises(ConfigError, match=r"hook\.url"):
        HookConfig(url=f"https://{host}/x", secret=SECRET)


@pytest.mark.parametrize("host", ["\u2603.test", "\u0661\u0662\u0663.test"])
def test_a_hook_url_whose_host_has_no_idna_2008_form_is_refused_at_configuration(
    host: str,
) -> None:
    # IDNA 2003 has a form for each (the request went to it), IDNA 2008 none (a symbol;
    # a label of digits only, right to left): every request would fail, for ever.
    with pytest.raises(ConfigError, match=r"hook\.url"):
        HookConfig(url=f"https://{host}/x", secret=SECRET)
    assert post(f"https://{host}/x", b"{}", {}, 1.0) is not None  # a failure, not a raise


@pytest.mark.parametrize(
    "host",
    ["a" * 64 + ".test", "app..test", ".app.test", "\u00fc" * 60 + ".test", "a.b" * 85],
    ids=["long-label", "empty-label", "leading-dot", "long-u-label", "long-name"],
)
def test_a_hook_url_whose_host_dns_cannot_hold_is_refused_at_configuration(host: str) -> None:
    # A label of more than 63 octets (an A-label counted), an empty one, a name of more
    # than 253 characters: no lookup can succeed, yet HookConfig took the URL and the
    # sender failed every request, retrying for ever.
    with pytest.raises(ConfigError, match=r"hook\.url"):
        HookConfig(url=f"https://{host}/x", secret=SECRET)


@pytest.mark.parametrize(
    "url",
    [
        "https://app.test./x",
        "https://localhost:8080/x",
        "http://[::1]:1/x",
        "http://b\u00fccher.test/",
    ],
)
def test_hook_urls_with_hosts_dns_can_hold_are_accepted(url: str) -> None:
    HookConfig(url=url, secret=SECRET)


@pytest.mark.parametrize(
    "url", ["https://user:s3cret@h.test/x", "https://s3cret@h.test/x", "ftp://u:s3cret@h.test/"]
)
def test_a_hook_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    # urllib sends no credentials from a URL: it looked up "user:s3cret@h.test" as the host,
    # so every request failed, and the warning about it logged the password.
    with pytest.raises(ConfigError, match=r"hook\.url") as refused:
        HookConfig(url=url, secret=SECRET)
    assert "s3cret" not in str(refused.value)


def test_sent_events_are_pruned_while_the_outbox_never_empties(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """Pruning ran only on a turn that found the outbox empty: with an endpoint failing
    (or events coming faster than they go) every turn found a batch, so events sent long
    ago were never deleted however long that lasted."""
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    long_ago = datetime.now(UTC) - timedelta(days=3)
    _deferred_events(store, ["u0@example.org", "u1@example.org"], now=long_ago)
    # The first event went out long ago; the second never does: the endpoint fails.
    first = store.lease_events(now=long_ago, limit=1, lease_for=timedelta(minutes=1))
    assert first is not None
    assert store.ack_events(first, now=long_ago) == 1
    endpoint.answer = lambda n: 500
    hook = HookConfig(url=endpoint.url, secret=SECRET, retry_min=0.05, retry_max=0.1)

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    async def run() -> None:
        sender = HookSender(
            hook,
            store,
            store_call=call,
            clock=lambda: datetime.now(UTC),
            metrics=MetricsRecorder(),
            poll_interval=0.05,
        )
        task = asyncio.create_task(sender.run())
        await asyncio.to_thread(endpoint.wait_for, lambda requests: len(requests) >= 3)
        sender.stop(0)
        await asyncio.wait_for(task, 10)

    try:
        asyncio.run(run())
        assert [e.address for e in store.read_events()] == ["u1@example.org"]
    finally:
        store.close()


def _deferred_events(
    store: SQLiteStore, addresses: list[str], now: datetime | None = None, *, together: bool = False
) -> None:
    """One deferred-delivery event in the outbox of ``store`` per address, in order, at
    ``now`` (the present by default); ``together``: all in one transaction, for a sender
    to find at once."""
    now = now or datetime.now(UTC)
    for group in [addresses] if together else [[address] for address in addresses]:
        store.enqueue(
            PreparedMessage(
                data=b"From: a@sender.test\r\nSubject: hi\r\n\r\nhi\r\n",
                envelope_from="a@sender.test",
                recipients=tuple(group),
            ),
            now=now,
        )
        lease = store.lease(now=now, limit=len(group), lease_for=timedelta(minutes=5))
        assert lease is not None
        attempt = Attempt(at=now, outcome=AttemptOutcome.TEMPORARY, error="try later")
        store.record(
            [
                RecipientResult(
                    message_id=item.message_id,
                    address=r.address,
                    state=RecipientState.DEFERRED,
                    attempt=attempt,
                    lease_token=item.lease_token,
                    ref=r.ref,
                    next_attempt_at=now + timedelta(minutes=10),
                )
                for item in lease.items
                for r in item.recipients
            ]
        )


def test_a_413_shrinks_the_batch_and_an_event_too_large_alone_is_given_up(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 413 (Content Too Large) was a failure like any other: the same batch went again
    and again, for ever, and no event after it was ever sent. The batch is halved now, down
    to one event; an event too large on its own is given up with a log line."""
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    addresses = [f"u{n}@example.org" for n in range(3)] + ["big@example.org"]
    addresses += [f"v{n}@example.org" for n in range(4)]
    _deferred_events(store, addresses)
    # The endpoint takes at most two events a request, and never the big one.
    endpoint.too_large = lambda body: body.count(b'"id":') > 2 or b"big@" in body
    hook = HookConfig(url=endpoint.url, secret=SECRET, batch=8, retry_min=0.05, retry_max=0.1)

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    metrics = MetricsRecorder()

    async def run() -> None:
        sender = HookSender(
            hook,
            store,
            store_call=call,
            clock=lambda: datetime.now(UTC),
            metrics=metrics,
            poll_interval=0.05,
        )
        task = asyncio.create_task(sender.run())
        try:
            await asyncio.to_thread(endpoint.wait_for, lambda _: len(endpoint.acked_ids()) >= 7, 10)
        finally:
            sender.stop(0)
            await asyncio.wait_for(task, 10)

    try:
        with caplog.at_level("WARNING", logger="mailstrom.hooks"):
            asyncio.run(run())
        ids = {e.address: e.id for e in store.read_events()}
        assert (
            store.lease_events(now=datetime.now(UTC), limit=10, lease_for=timedelta(minutes=1))
            is None
        )  # nothing left to send, the big event included
    finally:
        store.close()
    acked = endpoint.acked_ids()
    assert sorted(acked) == sorted(i for a, i in ids.items() if a != "big@example.org")
    assert len(acked) == len(set(acked))
    assert all(len(r.ids) <= 2 for r in endpoint.requests if r.answered == 200)
    assert metrics.hook_events_sent == 7
    given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 1 and f"event {ids['big@example.org']}" in given_up[0]


def test_a_413_limit_between_a_batch_and_its_half_is_not_hit_again_and_again(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """After a 413 the sender halved its batch, and doubled it again with the next batch
    the endpoint took: an endpoint taking five events at most was sent eight, then four,
    then eight..., a 413 every other request for as long as events came. The size refused
    is remembered now (for an hour, by the sender's clock): the batch grows back only
    below it, so a few 413s find the endpoint's limit, and none follow. Past the hour,
    full batches are tried again (the endpoint may take them now)."""
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    shift = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + shift[0]

    _deferred_events(store, [f"u{n}@example.org" for n in range(60)])
    limit = [5]
    endpoint.too_large = lambda body: body.count(b'"id":') > limit[0]
    # The 413s of one request at a time are counted: requests in flight together were
    # leased with the same limit, and are refused together.
    hook = HookConfig(
        url=endpoint.url,
        secret=SECRET,
        batch=8,
        retry_min=0.05,
        retry_max=0.1,
        concurrency=1,
    )

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    async def run() -> None:
        sender = HookSender(
            hook,
            store,
            store_call=call,
            clock=clock,
            metrics=MetricsRecorder(),
            poll_interval=0.05,
        )
        task = asyncio.create_task(sender.run())
        try:
            await asyncio.to_thread(endpoint.wait_for, lambda _: len(endpoint.acked_ids()) >= 60)
            # An hour on, the endpoint takes any batch: the sender finds out.
            limit[0] = 1000
            shift[0] = timedelta(hours=1, minutes=1)
            later = [f"v{n}@example.org" for n in range(16)]
            # Recorded at the present: by the sender's clock, the queue's mail is all due.
            await asyncio.to_thread(_deferred_events, store, later, together=True)
            sender.wake()
            await asyncio.to_thread(endpoint.wait_for, lambda _: len(endpoint.acked_ids()) >= 76)
        finally:
            sender.stop(0)
            await asyncio.wait_for(task, 10)

    try:
        asyncio.run(run())
        ids = [e.id for e in store.read_events()]
    finally:
        store.close()
    acked = endpoint.acked_ids()
    assert sorted(acked) == ids and len(acked) == len(set(acked))
    first = [r for r in endpoint.requests if r.ids[0] in ids[:60]]
    refused = [len(r.ids) for r in first if r.answered == 413]
    # 8 refused, then 6 (halfway between the 4 taken and the 8 refused): 5 from then on.
    assert len(refused) <= 3, [(len(r.ids), r.answered) for r in first]
    assert all(r.answered == 200 for r in first[-5:])
    later = [len(r.ids) for r in endpoint.requests if r.ids[0] in ids[60:]]
    assert 8 in later, later


UNREAD = 16 << 20
"""A body far larger than the sockets' buffers: the endpoint closes while it is sent."""


def test_a_413_the_endpoint_sends_before_reading_the_body_is_a_413(endpoint: Endpoint) -> None:
    """A server with a size limit answers 413 as soon as it reads the Content-Length, and
    closes the connection without reading the body; writing the rest of it then fails
    (broken pipe, reset). post() gave that error, not the 413, so the sender never sent
    fewer events at once: the same batch went again and again, and none after it."""
    endpoint.unread_over = 1 << 20
    failure = post(endpoint.url, b"x" * UNREAD, {}, timeout=10.0)
    assert isinstance(failure, HTTPFailure) and failure.status == 413, failure
    assert endpoint.refused_unread == 1


def test_a_413_before_the_whole_body_was_read_is_a_413_over_tls_too(
    https_server: Any, tls_ca: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The TLS socket fails the write as SSLEOFError; the answer is still there to read.
    pem = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    server = https_server(names=("localhost",))
    server.routes["/h"] = Answer(status=413)  # it reads 10 MB of a body at most
    failure = post(f"https://localhost:{server.port}/h", b"x" * 2 * UNREAD, {}, timeout=10.0)
    assert isinstance(failure, HTTPFailure) and failure.status == 413, failure
    server.routes["/h"] = Answer(status=200)
    failure = post(f"https://localhost:{server.port}/h", b"x" * 2 * UNREAD, {}, timeout=10.0)
    assert failure is not None and not isinstance(failure, HTTPFailure)


def test_a_2xx_before_the_body_was_read_is_no_sent_batch(endpoint: Endpoint) -> None:
    # An answer to a body the endpoint never read whole cannot say it took the batch.
    endpoint.unread_over = 1 << 20
    endpoint.early = 200
    failure = post(endpoint.url, b"x" * UNREAD, {}, timeout=10.0)
    assert failure is not None and not isinstance(failure, HTTPFailure)
    assert endpoint.refused_unread == 1


def _run_sender(
    store: SQLiteStore, hook: HookConfig, metrics: MetricsRecorder, until: Callable[[], bool]
) -> None:
    """Run a hook sender on ``store`` until ``until()`` holds (looked at every 50 ms, for
    20 s at most), then stop it."""

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    async def run() -> None:
        sender = HookSender(
            hook,
            store,
            store_call=call,
            clock=lambda: datetime.now(UTC),
            metrics=metrics,
            poll_interval=0.05,
        )
        task = asyncio.create_task(sender.run())
        try:
            for _ in range(400):
                if until():
                    break
                await asyncio.sleep(0.05)
        finally:
            sender.stop(0)
            await asyncio.wait_for(task, 10)

    asyncio.run(run())


def _lock_store_while_answering(path: Path, hold: float) -> Callable[[int], int]:
    """An ``Endpoint.answer`` that takes the SQLite write lock of ``path`` (as another
    process writing would) before its first 200, and lets it go ``hold`` seconds later."""

    def answer(n: int) -> int:
        if n == 0:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN IMMEDIATE")
            threading.Timer(hold, conn.close).start()
        return 200

    return answer


def test_a_batch_the_store_was_locked_to_acknowledge_is_not_posted_again(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """The endpoint took a batch, and the store was locked when the sender marked it sent:
    the sender went on to the next events, and the batch was POSTed again once its lease
    ran out, after events recorded later. Now the acknowledgement is tried again first."""
    store = SQLiteStore(tmp_path / "q.db", busy_timeout=0.2)
    store.enable_events()
    _deferred_events(store, [f"u{n}@example.org" for n in range(4)])
    endpoint.answer = _lock_store_while_answering(tmp_path / "q.db", hold=1.0)
    hook = HookConfig(
        url=endpoint.url, secret=SECRET, batch=2, timeout=0.5, retry_min=0.05, retry_max=0.1
    )
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 4)
        ids = [e.id for e in store.read_events()]
    finally:
        store.close()
    # Both batches may be in flight at once, and answered in either order: each once.
    assert sorted(r.ids for r in endpoint.requests) == [ids[:2], ids[2:]]
    assert all(r.answered == 200 for r in endpoint.requests)


def test_a_batch_the_store_was_locked_to_give_back_goes_before_later_events(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """The endpoint failed a batch, and the store was locked when the sender gave it back:
    the batch stayed leased, the sender leased and POSTed the events after it, and sent
    the batch only once its lease ran out, a recipient's earlier state after its later
    one. Now the give-back is tried again first, and the events go in order."""
    store = SQLiteStore(tmp_path / "q.db", busy_timeout=0.2)
    store.enable_events()
    _deferred_events(store, [f"u{n}@example.org" for n in range(4)])
    locking = _lock_store_while_answering(tmp_path / "q.db", hold=1.0)

    def answer(n: int) -> int:
        locking(n)  # the first request only, which fails
        return 500 if n == 0 else 200

    endpoint.answer = answer
    # The order of one request at a time (requests in flight together end in any order).
    hook = HookConfig(
        url=endpoint.url,
        secret=SECRET,
        batch=2,
        timeout=0.5,
        retry_min=0.05,
        retry_max=0.1,
        concurrency=1,
    )
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 4)
        ids = [e.id for e in store.read_events()]
    finally:
        store.close()
    assert [r.ids for r in endpoint.requests] == [ids[:2], ids[:2], ids[2:]]
    assert [r.answered for r in endpoint.requests] == [500, 200, 200]


def test_a_2xx_whose_body_is_cut_short_is_a_sent_batch(raw_endpoint: RawEndpoint) -> None:
    """Only the status counts: an endpoint that answered 200 has the batch, whatever
    happens to the body of its answer. A chunked body cut short (the connection closed
    within a chunk) failed the request, and the batch went again, for ever if the endpoint
    always answers so."""

    def short(wfile: Any, stop: threading.Event) -> None:
        wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort")

    raw_endpoint.answer = short
    assert post(raw_endpoint.url, b"{}", {}, timeout=5.0) is None


def test_an_event_given_up_that_the_store_was_locked_to_mark_is_not_posted_again(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """The endpoint refused an event alone as too large (413), and the store was locked
    when the sender marked it given up: the sender went on, and the event stayed leased,
    to be POSTed (and refused) once more when its lease ran out. The endpoint's answer
    was final: the mark is tried again first, as a sent batch's is."""
    store = SQLiteStore(tmp_path / "q.db", busy_timeout=0.2)
    store.enable_events()
    _deferred_events(store, ["big@example.org", "small@example.org"])
    locking = _lock_store_while_answering(tmp_path / "q.db", hold=1.0)

    def too_large(body: bytes) -> bool:
        if b"big@" not in body:
            return False
        locking(0)  # as the endpoint answers 413, the store is locked for a while
        return True

    endpoint.too_large = too_large
    hook = HookConfig(
        url=endpoint.url, secret=SECRET, batch=1, timeout=0.5, retry_min=0.05, retry_max=0.1
    )
    metrics = MetricsRecorder()
    try:
        # Until both are marked (the given-up one is not counted as sent).
        _run_sender(store, hook, metrics, lambda: store.unsent_events() == 0)
        ids = {e.address: e.id for e in store.read_events()}
        # Past any lease: nothing is left to send, the given-up event included.
        later = datetime.now(UTC) + timedelta(hours=1)
        assert store.lease_events(now=later, limit=10, lease_for=timedelta(minutes=1)) is None
    finally:
        store.close()
    # Both events may be in flight at once, and answered in either order: each once.
    assert sorted((r.ids, r.answered) for r in endpoint.requests) == [
        ([ids["big@example.org"]], 413),
        ([ids["small@example.org"]], 200),
    ]
    assert metrics.hook_events_sent == 1


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
)
def test_interim_1xx_answers_before_the_final_one_are_skipped(
    raw_endpoint: RawEndpoint, interim: bytes
) -> None:
    """RFC 9110 §15.2: a client parses 1xx answers before the final one, expected or not.
    http.client skipped only a 100 and took a 102 (Processing, from a server working on a
    long request) or a 103 (Early Hints, from a proxy or CDN) for the answer: a failure,
    so a batch the endpoint then took with 200 was POSTed again, for ever."""

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    raw_endpoint.answer = answer
    assert post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, 5.0) is None


@pytest.mark.parametrize(
    ("status", "header"),
    [
        (200, b"".join(b"X-Trace-%d: a\r\n" % i for i in range(150))),
        (204, b"X-Long: " + b"a" * 70_000 + b"\r\n"),
        (503, b"".join(b"X-Trace-%d: a\r\n" % i for i in range(150))),
    ],
    ids=["200-many-lines", "204-long-line", "503-many-lines"],
)
def test_an_answer_whose_header_http_client_cannot_read_is_its_status(
    raw_endpoint: RawEndpoint, tmp_path: Path, status: int, header: bytes
) -> None:
    """http.client reads at most 100 header lines of 64 KiB: past that it raised, the
    request failed although the endpoint had answered 200, and the batch it took went
    again, for ever. The status line is the endpoint's answer; the header is dropped
    (http.client's own limits, which are the whole process's, left as they are)."""
    import http.client

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(b"HTTP/1.1 %d Answer\r\n" % status + header + b"Content-Length: 0\r\n\r\n")

    raw_endpoint.answer = answer
    failure = post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, 5.0)
    if status < 300:
        assert failure is None, failure
    else:
        assert isinstance(failure, HTTPFailure) and failure.status == status, failure
    assert http.client._MAXHEADERS == 100  # type: ignore[attr-defined]
    if status >= 300:
        return
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org", "u1@example.org"])
    hook = HookConfig(url=raw_endpoint.url, secret=SECRET, retry_min=0.05, retry_max=0.1)
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 2)
    finally:
        store.close()
    assert (metrics.hook_events_sent, metrics.hook_failures) == (2, 0)


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\n"
        + b"".join(b"Link: </asset-%d.js>; rel=preload\r\n" % i for i in range(150))
        + b"\r\n",
        b"HTTP/1.1 102 Processing\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=["103-many-lines", "102-long-line"],
)
def test_an_interim_answer_whose_header_http_client_cannot_read_is_skipped(
    raw_endpoint: RawEndpoint, tmp_path: Path, interim: bytes
) -> None:
    """An interim answer's header is dropped anyway; one past http.client's limits (a
    CDN's 103 with more than 100 Link lines) raised, and the request failed although the
    endpoint then answered 200: the batch it took was POSTed again, for ever."""

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    raw_endpoint.answer = answer
    assert post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, 5.0) is None
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org", "u1@example.org"])
    hook = HookConfig(url=raw_endpoint.url, secret=SECRET, retry_min=0.05, retry_max=0.1)
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 2)
    finally:
        store.close()
    assert (metrics.hook_events_sent, metrics.hook_failures) == (2, 0)


def test_interim_answers_that_never_end_fail_the_request_at_its_deadline(
    raw_endpoint: RawEndpoint,
) -> None:
    """1xx answers, or one interim header, sent until the client gives up: the request
    fails at its deadline, as one whose final answer never comes."""

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(b"HTTP/1.1 102 Processing\r\n")
        while not stop.wait(0.01):
            wfile.write(b"X-Still: working\r\n\r\nHTTP/1.1 102 Processing\r\n")

    raw_endpoint.answer = answer
    failure = post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, 0.5)
    assert failure == "no complete answer within 0.5 s (hook.timeout)", failure


def test_a_101_answer_to_a_hook_request_is_a_failure(raw_endpoint: RawEndpoint) -> None:
    """101 (Switching Protocols) ends HTTP on the connection: no interim answer to skip."""

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
        wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    raw_endpoint.answer = answer
    failure = post(raw_endpoint.url, b"{}", {"Content-Type": "application/json"}, 5.0)
    assert isinstance(failure, HTTPFailure) and failure.status == 101, failure


@pytest.mark.parametrize(
    ("status_line", "status"),
    [
        (b"HTTP/1.1 503 \x1b[2J\x1b[31mAll clear\x00\rfake: " + b"A" * 60_000, 503),
        (b"HTTP/1.1 2OO \x1b[2J\x1b[31mAll clear\x00 " + b"A" * 60_000, None),
    ],
    ids=["reason", "bad-status-line"],
)
def test_the_endpoints_words_in_a_failure_are_made_safe_and_cut_short(
    raw_endpoint: RawEndpoint,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status_line: bytes,
    status: int | None,
) -> None:
    """A failure quotes the endpoint's reason phrase (or the status line it could not
    read), and the sender's warning the failure: it went there as sent, 60,000
    characters of it, with the ESC sequences that clear and recolour the terminal of
    whoever reads the log, a NUL and a CR to forge a line. It is quoted as the other
    peers' words are (safetext), and cut short."""

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(status_line + b"\r\nContent-Length: 0\r\n\r\n")

    raw_endpoint.answer = answer
    failure = post(raw_endpoint.url, b"{}", {}, 5.0)
    assert failure is not None
    if status is not None:
        assert isinstance(failure, HTTPFailure) and failure.status == status, failure
    assert failure.isprintable(), failure[:300]
    assert "All clear" in failure
    assert len(failure) < 300
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org"])
    hook = HookConfig(url=raw_endpoint.url, secret=SECRET, retry_min=0.05, retry_max=0.1)
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_failures >= 1)
    finally:
        store.close()
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert warnings, caplog.text
    assert all(w.isprintable() and len(w) < 500 for w in warnings), warnings[0][:300]


def _blackhole(host: str, port: int = 0) -> tuple[socket.socket, list[socket.socket]]:
    """A listener on ``host`` whose backlog is full, and the connections filling it: the
    kernel drops further SYNs, so connecting to it hangs as connecting to an address a
    firewall filters does. Close them all after."""
    listener = socket.socket()
    listener.bind((host, port))
    listener.listen(0)
    filling = []
    for _ in range(3):
        client = socket.socket()
        client.settimeout(0.2)
        with contextlib.suppress(OSError):
            client.connect(listener.getsockname())
        filling.append(client)
    return listener, filling


def test_a_connection_the_deadline_cuts_short_is_a_failed_request() -> None:
    """An endpoint whose address drops connection attempts (a firewall): when the
    deadline shut the connecting socket down before its own timeout ran out, the error
    was taken for the endpoint closing mid-request, and post() raised AttributeError
    reading an answer on no connection. The sender logged it as a bug, with a traceback,
    and left the batch leased, so the events after it went first."""
    listener, filling = _blackhole("127.0.0.2")
    url = f"http://127.0.0.2:{listener.getsockname()[1]}/mail-events"
    try:
        failures = [post(url, b"{}", {}, timeout=0.3) for _ in range(3)]
    finally:
        for sock in [listener, *filling]:
            sock.close()
    assert all(isinstance(f, str) and not isinstance(f, HTTPFailure) for f in failures)


def test_an_address_that_never_answers_leaves_time_for_the_hosts_next_one(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook host with two addresses, the first of which drops connection attempts (an
    AAAA record where IPv6 is filtered): the first took the request's whole deadline and
    every request failed, for ever, though the second answers at once (urllib alone
    gets there, giving each address the whole timeout). Each address now gets its share
    of what is left, as Go's dialer gives it."""
    port = int(endpoint.url.split(":")[2].split("/")[0])
    listener, filling = _blackhole("127.0.0.2", port)
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "dual.test":
            return real_getaddrinfo(host, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        failure = post(f"http://dual.test:{port}/mail-events", b"{}", {}, timeout=4.0)
    finally:
        for sock in [listener, *filling]:
            sock.close()
    assert failure is None
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_the_sender_waits_as_long_as_retry_after_asks(
    endpoint: Endpoint, tmp_path: Path, status: int
) -> None:
    """RFC 9110 §10.2.3, RFC 6585 §4: a 429 (Too Many Requests) or 503 with Retry-After
    says when to come back. The sender took no notice and came back after its own backoff
    (from ``hook.retry_min``, 1 s), again and again, into the window the endpoint asked
    it to keep out of. It now waits at least that long (at most ``hook.retry_max``)."""
    endpoint.answer = lambda n: status if n == 0 else 200
    endpoint.headers = lambda n: {"Retry-After": "1"} if n == 0 else {}
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org"])
    hook = HookConfig(url=endpoint.url, secret=SECRET, retry_min=0.05, retry_max=5.0)
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 1)
    finally:
        store.close()
    assert [r.answered for r in endpoint.requests] == [status, 200]
    assert endpoint.requests[1].at - endpoint.requests[0].at >= 1.0


def test_post_reads_retry_after_in_seconds_or_as_a_date(endpoint: Endpoint) -> None:
    later = datetime.now(UTC) + timedelta(seconds=90)
    given = ["120", format_datetime(later, usegmt=True), "soon", "1" * 40, "-5"]
    endpoint.answer = lambda n: 503
    endpoint.headers = lambda n: {"Retry-After": given[n]}
    failures = [post(endpoint.url, b"{}", {}, 5.0) for _ in given]
    assert all(isinstance(f, HTTPFailure) and f.status == 503 for f in failures), failures
    waits = [f.retry_after if isinstance(f, HTTPFailure) else "?" for f in failures]
    assert waits[0] == 120.0
    assert isinstance(waits[1], float) and 80 <= waits[1] <= 90
    assert waits[2:] == [None, None, None]


def test_a_413_with_retry_after_is_waited_out_not_given_up(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9110 §15.5.14: a 413 with Retry-After says the condition is temporary. The
    sender gave up an event refused so on its own, marking it sent: lost, though the
    endpoint asked for it again a second later."""
    endpoint.answer = lambda n: 413 if n == 0 else 200
    endpoint.headers = lambda n: {"Retry-After": "1"} if n == 0 else {}
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org"])
    hook = HookConfig(url=endpoint.url, secret=SECRET, retry_min=0.05, retry_max=5.0)
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 1)
    finally:
        store.close()
    assert [r.answered for r in endpoint.requests] == [413, 200]
    assert endpoint.requests[1].ids == endpoint.requests[0].ids
    assert not any("given up" in r.getMessage() for r in caplog.records)


def test_retry_after_is_waited_out_when_a_request_beside_it_fails_without_one(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """Requests in flight together end in any order. One answered 429 with Retry-After,
    and one beside it that failed later without (a 503, a reset) made the sender forget
    the wait the endpoint asked for: it came back after its own backoff (0.3 s here, not
    the 2 s asked). The longest wait any of them asked for is kept."""

    def answer(n: int) -> int:
        if n == 0:
            return 429
        if n == 1:
            time.sleep(0.3)  # ends after the 429
            return 503
        return 200

    endpoint.answer = answer
    endpoint.headers = lambda n: {"Retry-After": "2"} if n == 0 else {}
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org", "u1@example.org"], together=True)
    hook = HookConfig(
        url=endpoint.url, secret=SECRET, batch=1, concurrency=2, retry_min=0.05, retry_max=5.0
    )
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 2)
    finally:
        store.close()
    answered = [r.answered for r in endpoint.requests]
    assert answered[:2] == [429, 503], answered
    assert endpoint.requests[2].at - endpoint.requests[0].at >= 2.0


def test_a_receiver_de_duplicating_on_id_gets_a_restarted_memory_stores_events(
    mx: Any, dns_server: LoopbackDNS, endpoint: Endpoint
) -> None:
    """Was: a memory store numbered its events from 1, so the same process started again
    (a deploy, a crash) sent ids its endpoint already had, for other recipients; a receiver
    that de-duplicates on ``id``, as the guide says to, dropped every one of them."""
    config = hook_config(dns_server, mx.port, endpoint.url)
    for run in range(2):
        results = Results()
        with Mailstrom(config, store="memory:", worker="thread", on_result=results) as ms:
            ms.send_email(hello(f"run{run}@example.org", run))
            results.wait_count(1)
            endpoint.wait_for(lambda _, n=run + 1: len(endpoint.acked_ids()) >= n)
    events = [e for r in endpoint.requests if r.answered == 200 for e in r.events]
    kept = {e["id"]: e["recipient"] for e in events}  # what a de-duplicating receiver keeps
    assert sorted(kept.values()) == ["run0@example.org", "run1@example.org"]
    assert [e["id"] for e in events] == sorted(kept)  # increasing across the restart too


def test_a_hook_request_checks_the_endpoints_certificate_and_name(
    https_server: Any, tls_ca: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signed events go to the endpoint named, over TLS, or nowhere: a certificate no
    trusted CA issued, or one for another name, fails the request before any body goes."""
    server = https_server(names=("localhost",))
    server.routes["/h"] = Answer(status=200)
    url = f"https://localhost:{server.port}/h"
    untrusted = post(url, b"{}", {}, timeout=5.0)  # the session's CA is not trusted yet
    assert untrusted is not None and "CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted
    pem = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    other_name = post(f"https://127.0.0.1:{server.port}/h", b"{}", {}, timeout=5.0)
    assert other_name is not None and "CERTIFICATE_VERIFY_FAILED" in other_name, other_name
    assert [r for r in server.requests if r.path == "/h"] == []
    assert post(url, b"{}", {}, timeout=5.0) is None
    assert [r.body for r in server.requests if r.path == "/h"] == [b"{}"]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_failed_request_and_the_body_goes_nowhere_else(
    endpoint: Endpoint, status: int
) -> None:
    """Not followed: a hook URL that moved is a configuration error to see in the log, and
    following it would send the signed events wherever the answer points."""
    endpoint.answer = lambda n: status if n == 0 else 200
    endpoint.headers = lambda n: {"Location": f"{endpoint.url}/moved"}
    failure = post(endpoint.url, b'{"events":[]}', {}, timeout=5.0)
    assert isinstance(failure, HTTPFailure) and failure.status == status, failure
    assert [r.path for r in endpoint.requests] == ["/mail-events"]


def test_log_lines_and_errors_show_the_hook_url_without_its_credentials(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Endpoints often take a token in the query: the warnings about a failing endpoint
    # showed it to everyone who reads the logs, who are more than those who read the
    # configuration.
    endpoint.answer = lambda n: 503 if n == 0 else 200
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org"])
    hook = HookConfig(url=f"{endpoint.url}?token=s3cret&v=2", secret=SECRET, retry_min=0.05)
    metrics = MetricsRecorder()
    try:
        with caplog.at_level("INFO", logger="mailstrom.hooks"):
            _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 1)
    finally:
        store.close()
    assert [r.answered for r in endpoint.requests] == [503, 200]
    assert endpoint.requests[1].path == "/mail-events?token=s3cret&v=2"  # sent as it is
    shown = [r.getMessage() for r in caplog.records if r.name == "mailstrom.hooks"]
    assert any(f"{endpoint.url.removesuffix('/mail-events')}/\u2026" in line for line in shown)
    assert not any("s3cret" in line for line in shown), shown
    assert "s3cret" not in repr(hook)
    with pytest.raises(ConfigError, match=r"hook\.url") as refused:
        HookConfig(url="http://h.test:port/x?token=s3cret", secret=SECRET)
    assert "s3cret" not in str(refused.value) and "h.test:port/\u2026" in str(refused.value)


def test_log_lines_and_errors_show_the_hook_url_without_its_path(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Slack-style hook URLs carry their token in the path (``/T000/B000/XXXX``): the
    warnings about a failing endpoint, ``repr(HookConfig)`` and the configuration's errors
    showed it to everyone who reads the logs. They show the endpoint's origin only."""
    url = f"{endpoint.url}/T0001/B0002/XXXXs3cret?token=q5ecret"
    origin = endpoint.url.removesuffix("/mail-events")
    endpoint.answer = lambda n: 503 if n == 0 else 200
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, ["u0@example.org"])
    hook = HookConfig(url=url, secret=SECRET, retry_min=0.05)
    metrics = MetricsRecorder()
    try:
        with caplog.at_level("INFO", logger="mailstrom.hooks"):
            _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 1)
    finally:
        store.close()
    assert [r.answered for r in endpoint.requests] == [503, 200]
    assert endpoint.requests[1].path == url.removeprefix(origin)  # sent as it is
    shown = [r.getMessage() for r in caplog.records if r.name == "mailstrom.hooks"]
    assert any(f"{origin}/\u2026" in line for line in shown), shown
    assert not any("s3cret" in line or "q5ecret" in line for line in shown), shown
    assert "s3cret" not in repr(hook) and f"{origin}/\u2026" in repr(hook)
    for bad in ("http://h.test:port/T0001/XXXXs3cret", "h.test/T0001/XXXXs3cret"):
        with pytest.raises(ConfigError, match=r"hook\.url") as refused:
            HookConfig(url=bad, secret=SECRET)
        assert "s3cret" not in str(refused.value), refused.value


def test_a_failure_quoting_the_hook_urls_path_does_not_show_it(
    raw_endpoint: RawEndpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint's words may quote the request's path ("no route for POST /T0001/...");
    the failure the sender logs is the operator's to read, the token in it is not."""

    def answer(wfile: Any, stop: threading.Event) -> None:
        wfile.write(
            b"HTTP/1.1 404 No route for POST /mail-events/T0001/B0002/XXXXs3cret\r\n"
            b"Content-Length: 0\r\n\r\n"
        )

    raw_endpoint.answer = answer
    url = f"{raw_endpoint.url}/T0001/B0002/XXXXs3cret"
    failure = post(url, b"{}", {}, 5.0)
    assert isinstance(failure, HTTPFailure) and failure.status == 404, failure
    assert "s3cret" not in failure and "No route for POST /\u2026" in failure, failure


def _exported(ms: Mailstrom) -> dict[str, float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mailstrom.ops.exporter import MailstromCollector

    registry = CollectorRegistry()
    registry.register(MailstromCollector(ms.metrics))
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_hook_backlog_is_exported_while_the_endpoint_fails(
    mx: Any, dns_server: LoopbackDNS, endpoint: Endpoint, tmp_path: Path
) -> None:
    """While an endpoint is down the outbox grows, and only hook_failures_total said so,
    which grows as fast with one event waiting as with a million."""
    endpoint.answer = lambda n: 503
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    config = hook_config(dns_server, mx.port, endpoint.url)
    with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
        for i in range(3):
            ms.send_email(hello(f"u{i}@example.org", i))
        results.wait_count(3)
        endpoint.wait_for(lambda requests: len(requests) >= 1)
        exported = _exported(ms)
    store.close()
    assert exported["mailstrom_hook_backlog_events"] == 3


def test_no_hook_no_backlog_family(mx: Any, dns_server: LoopbackDNS, tmp_path: Path) -> None:
    # With events on alone no hook sends them: unsent events are no backlog.
    config = dataclasses.replace(loopback_config(dns_server, mx.port), events=True)
    results = Results()
    with Mailstrom(config, store=SQLiteStore(tmp_path / "q.db"), on_result=results) as ms:
        ms.send_email(hello("u0@example.org"))
        results.wait_count(1)
        exported = _exported(ms)
        assert ms.store.unsent_events() == 1
    assert "mailstrom_hook_backlog_events" not in exported
    assert exported["mailstrom_queue_messages"] == 1


def test_a_slow_endpoint_gets_up_to_hook_concurrency_requests_at_once(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """Hook requests went one at a time: an endpoint taking 50 ms a request took 20 of them
    a second, however fast the worker recorded, and the outbox's backlog never drained.
    Up to ``hook.concurrency`` requests are in flight now, each with a batch of its own
    (oldest first within it), never more, and every event is acknowledged once."""
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, [f"u{n}@example.org" for n in range(12)])
    # Each answer waits for two more requests to be in flight (5 s at most: then it
    # answers anyway, and the answers after it no longer wait).
    together = threading.Barrier(3, timeout=5)
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most at once

    def answer(n: int) -> int:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        try:
            together.wait()
        except threading.BrokenBarrierError:
            pass
        finally:
            with lock:
                in_flight[0] -= 1
        return 200

    endpoint.answer = answer
    hook = HookConfig(
        url=endpoint.url, secret=SECRET, batch=2, concurrency=3, retry_min=0.05, retry_max=0.1
    )
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 12)
        ids = [e.id for e in store.read_events()]
        assert store.unsent_events() == 0
    finally:
        store.close()
    assert not together.broken, "the requests never were three in flight at once"
    assert in_flight[1] == 3
    acked = endpoint.acked_ids()
    assert sorted(acked) == ids and len(acked) == len(set(acked)) == 12
    assert all(len(r.ids) == 2 and r.ids == sorted(r.ids) for r in endpoint.requests)
    assert metrics.hook_events_sent == 12 and metrics.hook_failures == 0


def test_an_endpoint_that_fails_gets_one_request_at_a_time(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """With several requests in flight, an endpoint that is down must not get several
    requests after each wait: once the requests in flight have failed, one at a time goes
    (after the backoff) until the endpoint takes one, and no event is lost."""
    store = SQLiteStore(tmp_path / "q.db")
    store.enable_events()
    _deferred_events(store, [f"u{n}@example.org" for n in range(12)])
    cond = threading.Condition()
    in_flight = [0]
    alone: list[bool] = []

    def answer(n: int) -> int:
        if n < 3:  # the first requests, sent together
            return 503
        if n >= 6:
            return 200
        # A retry: it stays in flight a while, long enough for another to arrive.
        with cond:
            in_flight[0] += 1
            cond.notify_all()
            alone.append(not cond.wait_for(lambda: in_flight[0] > 1, timeout=0.3))
            in_flight[0] -= 1
        return 503

    endpoint.answer = answer
    hook = HookConfig(
        url=endpoint.url, secret=SECRET, batch=2, concurrency=3, retry_min=0.05, retry_max=0.1
    )
    metrics = MetricsRecorder()
    try:
        _run_sender(store, hook, metrics, lambda: metrics.hook_events_sent >= 12)
        ids = [e.id for e in store.read_events()]
    finally:
        store.close()
    assert alone == [True, True, True]
    acked = endpoint.acked_ids()
    assert sorted(acked) == ids and len(acked) == len(set(acked)) == 12
    assert metrics.hook_failures == 6


@pytest.mark.postgres
def test_senders_of_two_workers_sharing_a_postgres_outbox_send_each_event_once(
    endpoint: Endpoint, postgres_url: str
) -> None:
    """Two workers' senders on one PostgreSQL outbox, each with several requests in flight:
    every request's batch is a lease of its own, so no event goes in two requests (the
    endpoint takes every one), and every event goes."""
    from mailstrom.stores.postgres import PostgresStore
    from tests.contract.support import NOW, lease_all, message, results_for

    lock = threading.Lock()
    in_flight = [0, 0]  # now, most at once

    def answer(n: int) -> int:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        time.sleep(0.02)  # an endpoint that takes a while: the requests overlap
        with lock:
            in_flight[0] -= 1
        return 200

    endpoint.answer = answer
    hook = HookConfig(
        url=endpoint.url, secret=SECRET, batch=2, concurrency=3, retry_min=0.05, retry_max=0.1
    )
    metrics = [MetricsRecorder(), MetricsRecorder()]

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(method, *args, **kwargs)  # as a worker calls PostgreSQL

    async def run(stores: list[PostgresStore]) -> None:
        senders = [
            HookSender(
                hook,
                store,
                store_call=call,
                clock=lambda: datetime.now(UTC),
                metrics=counted,
                poll_interval=0.05,
            )
            for store, counted in zip(stores, metrics, strict=True)
        ]
        tasks = [asyncio.create_task(sender.run()) for sender in senders]
        try:
            for _ in range(400):
                if await asyncio.to_thread(stores[0].unsent_events) == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            for sender in senders:
                sender.stop(0)
            await asyncio.wait_for(asyncio.gather(*tasks), 10)

    with PostgresStore(postgres_url) as first, PostgresStore(postgres_url) as second:
        first.enable_events()
        recipients = [f"u{n}@example.org" for n in range(40)]
        first.enqueue(message(*recipients), now=NOW)
        first.record(results_for(lease_all(first), RecipientState.DELIVERED))
        asyncio.run(run([first, second]))
        ids = [e.id for e in first.read_events(limit=100)]
        assert first.unsent_events() == 0
    acked = endpoint.acked_ids()
    assert len(ids) == 40 and sorted(acked) == ids, (len(acked), len(set(acked)))
    assert all(r.ids == sorted(r.ids) for r in endpoint.requests)
    assert sum(m.hook_events_sent for m in metrics) == 40
    assert in_flight[1] > 1
