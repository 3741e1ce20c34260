"""Where the worker runs (engine v2 #6): a child process, a thread, a task, or nowhere.

The process mode is what a durable store gets by default; on_result, worker_status and
stop() work in every mode, and a worker process dies with its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailstrom import (
    AsyncMailstrom,
    Config,
    DestinationRule,
    Email,
    Mailstrom,
    ReasonClass,
    RecipientState,
    ShapingConfig,
    Timeouts,
)
from mailstrom.errors import InvalidArgument, StoreError, WorkerError
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory, start_receiving_server
from tests.support.delivery import FakeClock, Results, loopback_config
from tests.support.threads import refuse_thread

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)
ROOT = Path(__file__).parents[2]


def hello(to: str, n: int = 0) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject=f"n{n}", text=f"Hello {n}")


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


def config(dns: LoopbackDNS, port: int, **overrides: Any) -> Config:
    # Only wake-ups explain prompt deliveries.
    return loopback_config(dns, port, **({"poll_interval": 30} | overrides))


def test_a_durable_store_gets_a_worker_process_by_default(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, client_tls_context: Any
) -> None:
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, tls="verify", tls_context=client_tls_context)
    with Mailstrom(cfg, store=store, on_result=results) as ms:
        assert ms.worker_mode == "process"
        pid = ms.worker.pid  # type: ignore[union-attr]
        assert pid is not None and pid != os.getpid()
        ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(20)]
        results.wait_count(20)
        assert all(ms.query_status(i).state is RecipientState.DELIVERED for i in ids)
        assert ms.worker_status.running
        assert ms.worker_status.delivered == 20
    assert not ms.worker_status.running
    assert _gone(pid)
    # The child rebuilt the verifying TLS context from the CA certificates it was given.
    assert all(m.tls for m in mx.messages)
    store.close()


def test_a_worker_process_trusts_no_more_cas_than_the_context_it_was_given(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    tls_ca: trustme.CA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The child rebuilt the context as the system's CAs plus the given ones: a context
    trusting a private CA alone let the worker process accept any certificate a system
    CA signed. The "system" store here is the test CA's file (SSL_CERT_FILE, which the
    child inherits); the context given trusts another CA only, so TLS must not verify."""
    system_file = tmp_path / "system.pem"
    tls_ca.cert_pem.write_to_path(str(system_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(system_file))
    private = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, tls="verify", tls_context=private)
    with Mailstrom(cfg, store=store, on_result=results, worker="process") as ms:
        message_id = ms.send_email(hello("u@example.org"))
        results.wait_count(1)
        state = ms.query_status(message_id).state
    assert state is RecipientState.DEFERRED
    assert mx.messages == []
    store.close()


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_a_worker_process_keeps_the_tls_versions_of_the_context_it_was_given(
    dns_server: LoopbackDNS, tmp_path: Path, tls_ca: trustme.CA, worker: str
) -> None:
    """The child rebuilt the context from its CAs and checks alone: a context that asked
    for TLS 1.3 at least (or refused some protocol by its options, or checked strictly)
    got Python's defaults in the worker process, which took TLS 1.2 from a server that
    offers no more. Both modes must refuse it, the message stays queued."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("mx.test").configure_cert(server_context)
    server_context.maximum_version = ssl.TLSVersion.TLSv1_2
    server = start_receiving_server(server_context)
    try:
        dns_server.mx("example.org", [(10, "mx.test")])
        dns_server.a("mx.test", server.host)
        modern = ssl.create_default_context()
        tls_ca.configure_trust(modern)
        modern.minimum_version = ssl.TLSVersion.TLSv1_3
        results = Results()
        store = SQLiteStore(tmp_path / "q.db")
        cfg = config(dns_server, server.port, tls="verify", tls_context=modern)
        with Mailstrom(cfg, store=store, on_result=results, worker=worker) as ms:
            message_id = ms.send_email(hello("u@example.org"))
            results.wait_count(1)
            status = ms.query_status(message_id)
        store.close()
    finally:
        server.stop()
    assert status.state is RecipientState.DEFERRED
    assert server.messages == []


def test_a_worker_process_delivers_from_the_store_a_relative_url_named(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child opens the facade's store by its absolute path: a relative URL names the
    same file there, and the facade closes the store it opened when it stops."""
    monkeypatch.chdir(tmp_path)
    results = Results()
    with Mailstrom(config(dns_server, mx.port), store="sqlite:///q.db", on_result=results) as ms:
        assert ms.worker_mode == "process"
        mid = ms.send_email(hello("bob@example.org"))
        results.wait_count(1)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    with pytest.raises(StoreError, match="closed"):
        ms.store.recent()


def test_thread_mode_and_custom_clocks_stay_in_this_process(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    assert Mailstrom(config(dns_server, mx.port), store=store, worker="thread").worker_mode == (
        "thread"
    )
    assert Mailstrom(config(dns_server, mx.port), store=store, clock=FakeClock()).worker_mode == (
        "thread"
    )
    assert Mailstrom(config(dns_server, mx.port), store=MemoryStore()).worker_mode == "thread"
    with pytest.raises(WorkerError, match="memory"):
        Mailstrom(config(dns_server, mx.port), store=MemoryStore(), worker="process")
    with pytest.raises(WorkerError, match="clock"):
        Mailstrom(config(dns_server, mx.port), store=store, clock=FakeClock(), worker="process")
    store.close()


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_the_status_once_started_says_since_when(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, worker: str
) -> None:
    """A worker process answered "ready" before its first status snapshot: start()
    returned with a status running since nobody knew when (``started_at`` None, as
    every other field of the snapshot at its default) for up to half a second."""
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, worker=worker) as ms:  # type: ignore[arg-type]
        status = ms.worker_status
        assert status.running and status.started_at is not None, status
    store.close()


class RecordsSeen(SQLiteStore):
    """A store of the application's, whose own code runs where the worker records."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.recorded: list[str] = []

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        self.recorded.extend(result.address for result in results)
        return super().record_and_lease(results, **kwargs)


def test_a_store_of_the_applications_own_class_delivers_with_its_own_code(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A subclass of a store, with methods of its own, pickles as the store it derives
    from: by default the worker ran in a process on that base class, and not one of its
    methods was ever called there. It stays in this process, as a custom router or
    clock does; asked for, a worker process still runs the base class."""
    results = Results()
    store = RecordsSeen(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        ms.send_email(hello("bob@example.org"))
        results.wait_count(1)
    assert store.recorded == ["bob@example.org"]
    assert ms.worker_mode == "thread"
    asked = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    assert asked.worker_mode == "process"
    store.close()


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_an_on_result_that_raises_stops_no_delivery(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    worker: str,
) -> None:
    """A bug in the application's callback is logged, in every mode, and delivery goes
    on. In a thread (or task) the exception ended the worker: of five messages sent one
    apart, one was delivered; a worker process already went on."""
    calls: list[str] = []

    def buggy(result: Any) -> None:
        calls.append(result.address)
        raise KeyError("a bug in the application")

    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=buggy, worker=worker) as ms:
        for i in range(5):
            ms.send_email(hello(f"u{i}@example.org", i))
            assert _wait_until(lambda: len(calls) == i + 1, 10)  # noqa: B023
        assert ms.worker_status.running
    store.close()
    assert len(mx.messages) == 5
    failed = [r for r in caplog.records if r.getMessage() == "on_result callback failed"]
    assert len(failed) == 5 and all(r.exc_info for r in failed)


async def test_an_on_result_that_raises_stops_no_delivery_in_a_task(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    calls: list[str] = []

    def buggy(result: Any) -> None:
        calls.append(result.address)
        raise KeyError("a bug in the application")

    async with AsyncMailstrom(
        config(dns_server, mx.port), store=MemoryStore(), on_result=buggy
    ) as ms:
        assert ms.worker_mode == "task"
        for i in range(3):
            mid = await ms.send_email(hello(f"u{i}@example.org", i))
            assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
        assert ms.worker_status.running
    assert len(calls) == 3


def test_a_worker_thread_started_again_after_stop_delivers(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    # The facade started the stopped Worker again, which kept the last stop()'s request:
    # start() returned as if it ran, the thread ended at once, and mail stayed queued.
    store = MemoryStore()
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="thread")
    try:
        for n in range(3):
            ms.start()
            mid = ms.send_email(hello("bob@example.org", n))
            assert ms.wait(mid, timeout=10).state is RecipientState.DELIVERED
            assert ms.worker_status.running
            ms.stop()
            assert not ms.worker_status.running
    finally:
        ms.stop()
        store.close()


def test_a_worker_thread_that_cannot_be_started_fails_start_and_the_next_start_runs(
    mx: Any, dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No thread left (a container's pids limit): start() raised the bare RuntimeError,
    # where it promises a WorkerError, and kept the thread that never ran as its worker:
    # every later start() said "already started", and nothing was ever delivered.
    restore = refuse_thread(monkeypatch, "mailstrom-worker")
    store = MemoryStore()
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="thread")
    try:
        with pytest.raises(WorkerError, match="can't start new thread"):
            ms.start()
        assert not ms.worker_status.running
        restore()
        ms.start()
        mid = ms.send_email(hello("bob@example.org"))
        assert ms.wait(mid, timeout=10).state is RecipientState.DELIVERED
    finally:
        ms.stop()
        store.close()


async def test_a_worker_task_started_again_after_stop_delivers(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    store = MemoryStore()
    ms = AsyncMailstrom(config(dns_server, mx.port), store=store, worker="task")
    try:
        for n in range(3):
            await ms.start()
            mid = await ms.send_email(hello("bob@example.org", n))
            assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
            assert ms.worker_status.running
            await ms.stop()
    finally:
        await ms.stop()
        store.close()


@pytest.mark.parametrize(("store", "worker"), [("memory:", "thread"), ("q.db", "process")])
def test_a_facade_that_closed_the_store_it_opened_does_not_start_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, store: str, worker: Any
) -> None:
    # start() "succeeded" on the closed store: a thread worker on a closed memory store,
    # a worker process while send_email raised StoreError. Reopening is no answer either:
    # memory: would be a new, empty queue.
    url = store if store == "memory:" else str(tmp_path / store)
    ms = Mailstrom(config(dns_server, mx.port), store=url, worker=worker)
    ms.start()
    ms.stop()
    try:
        with pytest.raises(WorkerError, match="closed the store it opened"):
            ms.start()
        assert not ms.worker_status.running
    finally:
        ms.stop()


async def test_an_async_facade_that_closed_the_store_it_opened_does_not_start_again(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    ms = AsyncMailstrom(config(dns_server, mx.port), store="memory:", worker="task")
    await ms.start()
    await ms.stop()
    try:
        with pytest.raises(WorkerError, match="closed the store it opened"):
            await ms.start()
    finally:
        await ms.stop()


async def test_stop_closes_connections_with_deliveries_in_flight(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, caplog: pytest.LogCaptureFixture
) -> None:
    """Deliveries still waiting for their final reply when the drain timeout ends are
    cancelled. Their connections used to stay open, timers armed, on the application's
    loop: the server kept them until the reply timeout fired, and asyncio then logged
    "Future exception was never retrieved" for the transactions pipelined behind."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    ms = AsyncMailstrom(config(dns_server, mx.port, timeouts=FAST), store=MemoryStore())
    await ms.start()
    for i in range(3):
        await ms.send_email(hello(f"u{i}@example.org", i))
    for _ in range(500):
        if mx.received:
            break
        await asyncio.sleep(0.01)
    assert mx.received
    await ms.stop(timeout=0.2)
    for _ in range(100):  # well before the 2 s reply timeout (it began before the stop)
        if mx.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert mx.open_connections == 0
    await asyncio.sleep(FAST.data_end + 0.5)  # past the reply timeout the sockets had
    gc.collect()  # asyncio logs a never-retrieved error when the future is collected
    assert "never retrieved" not in caplog.text


async def test_the_status_after_a_stop_shows_nothing_in_flight(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Deliveries cancelled by the stop (their recipients given back to the store) were
    still counted in ``worker_status.in_flight`` once the worker had stopped: the status
    of a stopped worker said mail was being delivered, for good."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = MemoryStore()
    ms = AsyncMailstrom(config(dns_server, mx.port, timeouts=FAST), store=store)
    await ms.start()
    ids = [await ms.send_email(hello(f"u{i}@example.org", i)) for i in range(3)]
    for _ in range(500):
        if mx.received:
            break
        await asyncio.sleep(0.01)
    assert mx.received and ms.worker_status.in_flight == 3
    await ms.stop(timeout=0.2)
    status = ms.worker_status
    assert not status.running
    assert (status.in_flight, status.transactions, status.sessions) == (0, 0, 0), status
    assert all(not store.status(i).is_final for i in ids)  # given back, not lost


async def test_stop_opens_no_connection_for_the_work_queued_behind(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """A session cancelled by the stop used to start the next one for the work queued
    behind it as it ended: a connection opened after the idle ones were closed, and was
    left open for good (a flaky test above found it)."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    cfg = config(dns_server, mx.port, timeouts=FAST, max_connections=1, max_per_destination=1)
    ms = AsyncMailstrom(cfg, store=MemoryStore())
    await ms.start()
    for i in range(8):  # more than one session pipelines
        await ms.send_email(hello(f"u{i}@example.org", i))
    for _ in range(500):
        if mx.received:
            break
        await asyncio.sleep(0.01)
    assert mx.received and mx.connections == 1
    await ms.stop(timeout=0.2)
    await asyncio.sleep(0.5)  # a session started by the stop would have connected by now
    assert mx.connections == 1
    assert mx.open_connections == 0


def test_without_a_worker_a_separate_worker_process_delivers(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """worker=None only queues; a `mailstrom worker` started on its own, idle and polling
    once in 30 s, is woken by the enqueue itself (engine v2 #5)."""
    path = tmp_path / "q.db"
    env = {
        **os.environ,
        "MAILSTROM_ALLOW_LOOPBACK": "1",
        "MAILSTROM_POLL_INTERVAL": "30",
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    store = SQLiteStore(path)
    command = [
        sys.executable,
        "-m",
        "mailstrom",
        "worker",
        "--no-live",
        "--store",
        f"sqlite:///{path}",
        "--dns-server",
        f"127.0.0.1:{dns_server.port}",
        "--smtp-port",
        str(mx.port),
        "--helo-name",
        "client.test",
    ]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as worker:
        try:
            assert worker.stderr is not None
            assert "worker started" in worker.stderr.readline()
            with Mailstrom(config(dns_server, mx.port), store=store, worker=None) as ms:
                assert ms.worker_mode is None
                assert not ms.worker_status.running
                for n in range(3):
                    started = time.monotonic()
                    mid = ms.send_email(hello(f"w{n}@example.org", n))
                    mx.wait_for_messages(n + 1, timeout=10)
                    # Far below the 30 s poll: the worker was woken, not polling.
                    assert time.monotonic() - started < 5
                    assert _wait_until(lambda: ms.query_status(mid).is_final, 5)  # noqa: B023
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
    assert worker.returncode == 0
    store.close()


async def test_async_facade_with_a_worker_process(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    async with AsyncMailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        assert ms.worker_mode == "process"
        mid = await ms.send_email(hello("async@example.org"))
        await mx.await_messages(1)
        assert _wait_until(lambda: len(results.all) == 1, 10)
        assert (await ms.query_status(mid)).state is RecipientState.DELIVERED
    assert AsyncMailstrom(config(dns_server, mx.port), store=MemoryStore()).worker_mode == "task"
    store.close()


def test_a_worker_process_forwards_its_log_records(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attempt lines of a worker process reach this process's logging, as they would
    from a thread."""
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted"
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    with (
        caplog.at_level(logging.INFO, logger="mailstrom"),
        Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms,
    ):
        mid = ms.send_email(hello("grey@example.org"))
        results.wait_count(1)
        assert _wait_until(lambda: any("Greylisted" in r.getMessage() for r in caplog.records), 10)
        [recorded] = ms.query_status(mid).recipient("grey@example.org").history
        child = ms.worker.pid  # type: ignore[union-attr]
    [record] = [r for r in caplog.records if "Greylisted" in r.getMessage()]
    assert record.name == "mailstrom.attempts"
    # Made in the child, where it says (not in this process, at no line of no file).
    assert (record.process, record.processName) == (child, "MainProcess")
    assert (record.module, record.funcName, record.filename) == (
        "attemptlog",
        "log_attempt",
        "attemptlog.py",
    )
    assert record.lineno > 0
    assert record.levelno == logging.WARNING
    assert record.fields["rcpt"] == "grey@example.org"  # type: ignore[attr-defined]
    assert record.fields["reason_class"] == "greylisted"  # type: ignore[attr-defined]
    # The result crossed the pipe as a tuple, its class with it.
    [result] = results.all
    assert result.attempt.reason_class is ReasonClass.GREYLISTED
    # Every field crossed, the attempt's TLS policy among them (it was left behind).
    assert recorded.tls_policy is not None
    assert result.attempt.tls_policy == recorded.tls_policy
    store.close()


def test_a_worker_process_log_record_keeps_the_time_it_was_made(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forwarded record carries the child's time in every field a formatter shows:
    ``msecs`` and ``relativeCreated`` were this process's, of when the frame was handled,
    so ``%(asctime)s`` showed the child's second with this process's milliseconds."""
    mx.rcpt_replies["grey1@example.org"] = "451 4.7.1 Greylisted"
    mx.rcpt_replies["grey2@example.org"] = "451 4.7.1 Greylisted"
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")

    def on_result(result: Any) -> None:
        results(result)
        if result.address == "grey1@example.org":
            # The second record is made meanwhile, and handled here half a second late.
            ms.send_email(hello("grey2@example.org"))
            time.sleep(0.5)

    with (
        caplog.at_level(logging.INFO, logger="mailstrom"),
        Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result) as ms,
    ):
        ms.send_email(hello("grey1@example.org"))
        results.wait_count(2)
        assert _wait_until(lambda: any("grey2" in r.getMessage() for r in caplog.records), 10)
    [record] = [
        r for r in caplog.records if "Greylisted" in r.getMessage() and "grey2" in r.getMessage()
    ]
    fresh = logging.LogRecord("x", logging.INFO, "", 0, "", (), None)

    def apart(a: float, b: float) -> float:  # milliseconds, on the clock's face
        return min(abs(a - b), 1000 - abs(a - b))

    assert apart(record.msecs, record.created % 1 * 1000) < 2
    stamp = logging.Formatter("%(asctime)s").format(record)
    assert apart(int(stamp[-3:]), record.created % 1 * 1000) < 2
    # relativeCreated: milliseconds since logging was loaded in this process.
    loaded = fresh.created - fresh.relativeCreated / 1000
    assert record.relativeCreated == pytest.approx((record.created - loaded) * 1000, abs=5.0)
    store.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize(
    ("package", "shaping_level", "seen"),
    [(logging.INFO, logging.ERROR, False), (logging.ERROR, logging.WARNING, True)],
    ids=["silenced", "raised"],
)
def test_a_worker_process_heeds_the_level_of_every_mailstrom_logger(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    package: int,
    shaping_level: int,
    seen: bool,
) -> None:
    """The level the application gave a logger of mailstrom decides whether its records
    are seen, in a worker process as in a thread. Only four loggers' levels reached the
    child: one silenced on its own (``mailstrom.shaping`` at ERROR) still spoke there, at
    the package's level, and one let through on its own stayed silent."""
    slow = smtp_server(greeting="421 4.7.28 Too much mail from you - gsmtp")
    dns_server.mx("slow.test", [(10, "mx1.slow.test")])
    dns_server.a("mx1.slow.test", slow.host)
    shaping = ShapingConfig(rules=(DestinationRule(match="*.slow.test"),), provider_defaults=False)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    loggers = [logging.getLogger("mailstrom"), logging.getLogger("mailstrom.shaping")]
    before = [logger.level for logger in loggers]
    loggers[0].setLevel(package)
    loggers[1].setLevel(shaping_level)
    try:
        cfg = config(dns_server, slow.port, shaping=shaping)
        with Mailstrom(cfg, store=store, on_result=results, worker=mode) as ms:  # type: ignore[arg-type]
            assert ms.worker_mode == mode
            ms.send_email(hello("a@slow.test"))
            results.wait_count(1)
            time.sleep(0.5)  # what the child logged is in the pipe behind its result
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)
        store.close()
    throttled = [r for r in caplog.records if "throttled until" in r.getMessage()]
    assert [r.name for r in throttled] == (["mailstrom.shaping"] if seen else [])


PARENT = textwrap.dedent(
    """
    import sys
    from mailstrom import Config, Email, Mailstrom, Timeouts
    from mailstrom.stores import SQLiteStore
    from mailstrom.client import process
    from mailstrom.config import DNSConfig

    process.ORPHAN_DRAIN = 1.0  # the stuck delivery's drain, once its parent is gone
    port, dns_port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    config = Config(helo_name="client.test", smtp_port=port, allow_loopback=True,
                    dns=DNSConfig(nameservers=("127.0.0.1",), port=dns_port),
                    timeouts=Timeouts(greeting=60))
    ms = Mailstrom(config, store=SQLiteStore(path), worker="process")
    ms.start()
    ms.send_email(Email(from_="a@sender.test", to=["stuck@example.org"], text="x"))
    print(ms.worker.pid, flush=True)
    sys.stdin.readline()  # until killed
    """
)


def test_a_worker_process_dies_with_its_parent(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """SIGKILL the application: its worker process notices at once, lets its delivery
    drain (``ORPHAN_DRAIN``, 1 s here), gives back what it had not delivered (due now)
    and exits; nothing is left running or leased."""
    mx.stall_on = "greeting"
    path = tmp_path / "q.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, str(mx.port), str(dns_server.port), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _wait_until(lambda: mx.connections == 1, 10)  # the delivery is under way
        parent.kill()
        parent.wait()
    assert _wait_until(lambda: _gone(child), 15), "the worker process outlived its parent"
    store = SQLiteStore(path)
    [message] = store.recent()
    assert message.recipients[0].state is RecipientState.QUEUED
    # Given back, not left under a lease until it expires: due right now.
    lease = store.lease(now=_utc_now(), limit=10, lease_for=_minutes(5))
    assert lease is not None
    store.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1].startswith("Z")


def _wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # polling a status snapshot; nothing to wait on
    return bool(predicate())


def _utc_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _minutes(n: int) -> Any:
    from datetime import timedelta

    return timedelta(minutes=n)


def test_a_worker_process_outlives_the_thread_that_started_it(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Started from a short-lived thread (a web request, say), the worker process keeps
    running after that thread ends. (PR_SET_PDEATHSIG, which Linux sends when the
    starting *thread* ends, killed it.)"""
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results)
    starter = threading.Thread(target=ms.start)
    starter.start()
    starter.join()
    try:
        time.sleep(1.0)  # time for a signal that should not come
        assert ms.worker_status.running
        ms.send_email(hello("after@example.org"))
        results.wait_count(1)
    finally:
        ms.stop()
        store.close()


FORKER = textwrap.dedent(
    """
    import os, sys, time
    from mailstrom import Config, Mailstrom
    from mailstrom.stores import SQLiteStore

    ms = Mailstrom(Config(helo_name="client.test"), store=SQLiteStore(sys.argv[1]),
                   worker="process")
    ms.start()
    print(ms.worker.pid, flush=True)
    child = os.fork()
    if child == 0:   # a pre-forking server's child: it outlives its parent
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    sys.stdin.readline()  # until killed
    """
)


def test_a_fork_of_the_application_does_not_keep_the_worker_alive(tmp_path: Path) -> None:
    """A process forked from the application inherits the worker's control pipe.
    It lets go of it at the fork, so when the application dies the worker still sees its
    control pipe close and exits, even while the forked process lives on."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with subprocess.Popen(
        [sys.executable, "-c", FORKER, str(tmp_path / "q.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,
    ) as parent:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        forked = int(parent.stdout.readline())
        try:
            parent.kill()
            parent.wait()
            assert _wait_until(lambda: _gone(worker), 15), "the worker outlived its parent"
            assert not _gone(forked), "the forked process, holding a copy of the pipe, is gone"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(forked, signal.SIGKILL)


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_worker_status_names_the_holder_the_store_lists_among_the_living(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, worker: str
) -> None:
    """What ``mailstrom workers`` lists can be matched to an application's worker."""
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, worker=worker) as ms:
        # Known at once: the thread's worker is built with it, the parent chose the child's.
        holder = ms.worker_status.holder
        assert holder is not None
        pid = os.getpid() if worker == "thread" else ms.worker.pid  # type: ignore[union-attr]
        assert _wait_until(lambda: store.live_holders(), 20)  # from the worker's first look
        [live] = store.live_holders()
        assert (live.holder, live.pid) == (holder, pid)
    store.close()


def test_stop_from_on_result_in_a_thread_lets_the_deliveries_in_flight_be_recorded(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """stop() from the callback joined its own thread (RuntimeError), and the store the
    facade had opened was closed under the worker: the delivery still in flight was
    never recorded, and sent again once its lease ran out."""
    fast = smtp_server()
    slow = smtp_server(host="127.0.0.2", port=fast.port)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", fast.host)
    dns_server.mx("slow.example", [(10, "mx.slow.test")])
    dns_server.a("mx.slow.test", slow.host)
    slow.data_delay = 1.0
    outcome: list[str] = []

    def on_result(result: Any) -> None:
        if result.address == "first@example.org":
            try:
                ms.stop()
                outcome.append("returned")
            except BaseException as exc:  # reported to the test
                outcome.append(repr(exc))

    path = tmp_path / "q.db"
    ms = Mailstrom(config(dns_server, fast.port), store=path, on_result=on_result, worker="thread")
    ms.start()
    thread = ms._thread
    ms.send_email(hello("later@slow.example"))
    assert _wait_until(lambda: len(slow.received) == 1, 10)  # in flight, its reply delayed
    ms.send_email(hello("first@example.org"))
    assert thread is not None
    thread.join(30)
    assert outcome == ["returned"] and not thread.is_alive()
    with pytest.raises(WorkerError, match="closed the store it opened"):
        ms.start()  # closed once the worker had ended
    store = SQLiteStore(path)
    try:
        states = {
            r.address: (r.state, r.attempts) for m in store.recent(limit=10) for r in m.recipients
        }
    finally:
        store.close()
    assert states["later@slow.example"] == (RecipientState.DELIVERED, 1)


def test_wait_from_on_result_in_a_thread_is_refused_not_left_to_stall_the_worker(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """wait() from the callback ran on the worker's own thread, which delivers nothing
    until the callback returns: it held every delivery for its whole timeout, then
    returned a status that could not have changed. It is refused, as start() is."""
    outcome: list[object] = []
    done = threading.Event()

    def on_result(result: Any) -> None:
        if result.address != "first@example.org":
            return
        try:
            later = ms.send_email(hello("second@example.org", 2))
            outcome.append(ms.wait(later, 5))
        except BaseException as exc:  # reported to the test
            outcome.append(exc)
        finally:
            done.set()

    store = MemoryStore()
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result, worker="thread")
    try:
        with ms:
            ms.send_email(hello("first@example.org", 1))
            assert done.wait(30)
            assert len(outcome) == 1 and isinstance(outcome[0], WorkerError), outcome
            assert "on_result" in str(outcome[0])
            assert _wait_until(lambda: len(mx.received) == 2, 30)  # the worker goes on
    finally:
        store.close()


class _Interrupted(Exception):
    """What a signal handler of the application raises (as Ctrl-C raises KeyboardInterrupt)."""


def test_a_stop_interrupted_by_a_signal_leaves_the_store_to_the_worker_until_it_ends(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Ctrl-C while stop() waited for the delivery in flight (in a REPL or a notebook,
    which go on) closed the store the facade had opened under the worker thread, which
    went on: its delivery was never recorded, and sent again once its lease ran out.
    Nor did the next stop() wait for that thread."""
    slow = smtp_server()
    dns_server.mx("slow.example", [(10, "mx.slow.test")])
    dns_server.a("mx.slow.test", slow.host)
    slow.data_delay = 1.0
    path = tmp_path / "q.db"
    ms = Mailstrom(config(dns_server, slow.port), store=path, worker="thread")
    ms.start()
    worker, thread = ms.worker, ms._thread
    assert isinstance(worker, Worker) and thread is not None
    ms.send_email(hello("later@slow.example"))
    assert _wait_until(lambda: len(slow.received) == 1, 10)  # in flight, its reply delayed

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    def send_signal() -> None:
        if _wait_until(lambda: worker._stopping, 10):  # stop() waits for the worker now
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    before = signal.signal(signal.SIGUSR1, interrupt)
    sender = threading.Thread(target=send_signal)
    sender.start()
    try:
        with pytest.raises(_Interrupted):
            ms.stop()
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, before)
    with pytest.raises(WorkerError, match="has not ended yet"):
        ms.start()  # the thread still lives
    ms.stop()  # waits for it
    assert not thread.is_alive()
    with pytest.raises(StoreError, match="closed"):
        ms.store.recent()  # closed once the worker had ended
    store = SQLiteStore(path)
    try:
        [message] = store.recent(limit=10)
    finally:
        store.close()
    assert [(r.state, r.attempts) for r in message.recipients] == [(RecipientState.DELIVERED, 1)]


class _Abort(BaseException):
    """What an application may raise to get out of everything (not an Exception)."""


@pytest.mark.parametrize("worker", ["thread", "process"])
@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, _Abort])
def test_an_on_result_that_raises_a_base_exception_stops_no_delivery(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    worker: str,
    raised: type[BaseException],
) -> None:
    """Raised on a thread of mailstrom's, where no signal lands, a BaseException can only
    be the callback's own: logged like any other bug of it. It ended the worker thread
    (send_email went on returning ids for mail nobody delivered, worker_status giving
    "CancelledError" as the reason); a worker process was killed and started again, the
    rest of its results never passed on."""
    calls: list[str] = []

    def buggy(result: Any) -> None:
        calls.append(result.address)
        raise raised("out of here")

    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=buggy, worker=worker) as ms:
        for i in range(3):
            ms.send_email(hello(f"u{i}@example.org", i))
            assert _wait_until(lambda: len(calls) == i + 1, 10)  # noqa: B023
        assert ms.worker_status.running
        assert ms.worker_status.restarts == 0
        assert ms.worker_status.error is None
    store.close()
    assert len(mx.messages) == 3
    failed = [r for r in caplog.records if r.getMessage() == "on_result callback failed"]
    assert len(failed) == 3 and all(r.exc_info for r in failed)


async def test_an_on_result_that_raises_a_base_exception_stops_no_task_off_the_main_thread(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """A task worker on a loop of another thread: the same as a worker thread."""
    calls: list[str] = []

    def buggy(result: Any) -> None:
        calls.append(result.address)
        raise _Abort("out of here")

    async def main() -> bool:
        async with AsyncMailstrom(
            config(dns_server, mx.port), store=MemoryStore(), on_result=buggy
        ) as ms:
            for i in range(3):
                mid = await ms.send_email(hello(f"u{i}@example.org", i))
                assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
            return ms.worker_status.running

    assert await asyncio.to_thread(asyncio.run, main())
    assert len(calls) == 3


async def test_an_on_result_that_raises_a_base_exception_stops_no_task_on_the_main_thread(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    calls: list[str] = []

    def buggy(result: Any) -> None:
        calls.append(result.address)
        raise _Abort("out of here")

    async with AsyncMailstrom(
        config(dns_server, mx.port), store=MemoryStore(), on_result=buggy
    ) as ms:
        for i in range(3):
            mid = await ms.send_email(hello(f"u{i}@example.org", i))
            assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
        assert ms.worker_status.running
    assert len(calls) == 3


def test_a_keyboard_interrupt_in_on_result_on_the_main_thread_still_ends_the_loop(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """On the main thread a KeyboardInterrupt may be the user's Ctrl-C, landed in the
    callback of a worker task: it ends the loop, as asyncio has it, and is not logged
    away."""

    def on_result(result: Any) -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        async with AsyncMailstrom(
            config(dns_server, mx.port), store=MemoryStore(), on_result=on_result
        ) as ms:
            await ms.send_email(hello("bob@example.org"))
            await asyncio.sleep(30)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    assert time.monotonic() - started < 20


def test_start_from_two_threads_at_once_starts_one_worker(
    mx: Any, dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both passed the "already started" check before either had a thread: two workers
    ran, the first one no longer known to the facade (stop() stopped the other)."""
    to_start = Mailstrom._worker_to_start

    def slowly(self: Mailstrom, worker: Any) -> Any:
        time.sleep(0.2)  # widens the window between the check and the start
        return to_start(self, worker)

    monkeypatch.setattr(Mailstrom, "_worker_to_start", slowly)
    store = MemoryStore()
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="thread")
    gate = threading.Barrier(2)
    outcomes: list[str] = []

    def start() -> None:
        gate.wait()
        try:
            ms.start()
            outcomes.append("started")
        except WorkerError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(2)]
    before = set(threading.enumerate())  # (a worker thread another test left is not ours)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["already started", "started"]
        workers = [t for t in set(threading.enumerate()) - before if t.name == "mailstrom-worker"]
        assert len(workers) == 1
    finally:
        ms.stop()
    assert not workers[0].is_alive()
    store.close()


def test_stop_from_two_threads_at_once_returns_once_the_worker_has_ended(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The second stop() found no thread to wait for and closed the store this facade had
    opened at once, under the worker still draining: the delivery in flight was never
    recorded (sent again once its lease ran out), and that stop() returned with the
    worker still running."""
    slow = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", slow.host)
    slow.data_delay = 1.0
    path = tmp_path / "q.db"
    ms = Mailstrom(config(dns_server, slow.port), store=path, worker="thread")
    ms.start()
    thread = ms._thread
    assert thread is not None
    ms.send_email(hello("bob@example.org"))
    assert _wait_until(lambda: len(slow.received) == 1, 10)  # in flight, its reply delayed
    gate = threading.Barrier(2)
    worker_alive_after: list[bool] = []

    def stop() -> None:
        gate.wait()
        ms.stop(timeout=5)
        worker_alive_after.append(thread.is_alive())

    stoppers = [threading.Thread(target=stop) for _ in range(2)]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(30)
    assert worker_alive_after == [False, False]
    store = SQLiteStore(path)
    try:
        [message] = store.recent()
    finally:
        store.close()
    assert (message.recipients[0].state, message.recipients[0].attempts) == (
        RecipientState.DELIVERED,
        1,
    )


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_stop_from_on_result_while_another_thread_stops_waits_for_neither(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, worker: str
) -> None:
    """A stop() from the callback while the application's own stop() waits for the
    worker: neither may wait for the other (the callback's stop() returns at once, the
    other once the worker has ended), and the facade can start again."""
    entered = threading.Event()
    outcome: list[str] = []

    def on_result(result: Any) -> None:
        if not outcome:
            assert entered.wait(10)
            time.sleep(0.3)  # the other stop() is waiting for this thread by now
            started = time.monotonic()
            ms.stop()
            outcome.append(f"{time.monotonic() - started:.0f}")

    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result, worker=worker)
    ms.start()
    ms.send_email(hello("bob@example.org"))
    # The callback runs on the worker's thread; this test's thread is the application's.
    assert _wait_until(lambda: len(mx.messages) == 1, 10)
    entered.set()
    started = time.monotonic()
    ms.stop()
    assert time.monotonic() - started < 10
    assert _wait_until(lambda: bool(outcome), 10)
    assert outcome == ["0"]
    assert not ms.worker_status.running
    ms.start()
    try:
        mid = ms.send_email(hello("again@example.org", 1))
        assert ms.wait(mid, timeout=10).state is RecipientState.DELIVERED
    finally:
        ms.stop()
    store.close()


def _slow_mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    slow = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", slow.host)
    slow.data_delay = 1.0
    return slow


def _recorded_once(path: Path) -> bool:
    store = SQLiteStore(path)
    try:
        [message] = store.recent()
    finally:
        store.close()
    recipient = message.recipients[0]
    return (recipient.state, recipient.attempts) == (RecipientState.DELIVERED, 1)


async def test_stop_from_two_tasks_at_once_returns_once_the_worker_has_ended(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """As with threads: the second stop() closed the store under the draining worker."""
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker="task")
    await ms.start()
    worker = ms.worker
    assert worker is not None
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    await asyncio.gather(ms.stop(timeout=5), ms.stop(timeout=5))
    assert not worker.status.running
    assert _recorded_once(path)


async def test_a_stop_that_is_cancelled_leaves_the_store_to_the_worker_until_it_ends(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A cancelled stop() (a shutdown given up, a timeout around the ``async with``)
    closed the store the facade had opened at once, under the worker still draining: the
    delivery in flight was never recorded, and went out again once its lease ran out.
    The worker goes on stopping, as asked, and the store is closed once it has ended."""
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker="task")
    await ms.start()
    worker = ms.worker
    assert worker is not None
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await ms.stop(timeout=5)
    assert await asyncio.to_thread(worker.wait_stopped, 10)
    assert _recorded_once(path)
    # Closed as the worker's task ends (in a thread, which _store_closed does not wait for).
    assert await asyncio.to_thread(_wait_until, lambda: _refuses_as_closed(ms.store), 5)


def _refuses_as_closed(store: Store) -> bool:
    try:
        store.recent()
    except StoreError as exc:
        return "closed" in str(exc)
    return False


@pytest.mark.parametrize("mode", ["task", "process"])
async def test_a_cancelled_stop_closes_the_store_off_the_event_loop(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """A cancelled stop() left the store it had opened to be closed as the worker ended,
    by a callback on the event loop: the loop was held for the close (a SQLite
    checkpoint and fsync, a PostgreSQL session's goodbye), as the plain stop() never
    holds it. It is closed in a thread now, as stop() closes it."""
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker=mode)  # type: ignore[arg-type]
    closed_on: list[threading.Thread] = []
    close = ms.store.close

    def recording_close() -> None:
        closed_on.append(threading.current_thread())
        close()

    ms.store.close = recording_close  # type: ignore[method-assign]
    await ms.start()
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await ms.stop(timeout=5)
    assert await asyncio.to_thread(_wait_until, lambda: ms._store_closed, 10)
    assert await asyncio.to_thread(_wait_until, lambda: len(closed_on) == 1, 10)
    assert closed_on == [closed_on[0]] and closed_on[0] is not threading.current_thread()
    assert _recorded_once(path)


@pytest.mark.parametrize("mode", ["task", "process"])
def test_a_cancelled_stop_as_asyncio_run_ends_leaves_nothing_open(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """A stop() given up on (a shutdown's timeout) just before asyncio.run() returns:
    the store the facade opened is closed, and no thread of ours is left, once run()
    has returned."""
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    before = set(threading.enumerate())

    async def main() -> AsyncMailstrom:
        ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker=mode)  # type: ignore[arg-type]
        await ms.start()
        await ms.send_email(hello("bob@example.org"))
        assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await ms.stop(timeout=5)
        return ms

    ms = asyncio.run(main())
    assert ms._store_closed
    with pytest.raises(StoreError, match="closed"):
        ms.store.recent()
    assert ms.worker is not None and ms.worker.wait_stopped(0)
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("mailstrom")]
    assert left == []


@pytest.mark.parametrize("bad", [float("inf"), 1e10, float("nan"), "5", True])
def test_stop_with_a_timeout_it_cannot_wait_refuses_it_before_anything(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path, bad: Any
) -> None:
    """stop(timeout=math.inf) asked the worker to stop, then failed to wait for it
    (OverflowError from Thread.join) and closed the store this facade had opened under
    the worker still draining: the delivery in flight was never recorded. A string
    reached the worker's drain as a TypeError."""
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = Mailstrom(config(dns_server, slow.port), store=path, worker="thread")
    ms.start()
    try:
        ms.send_email(hello("bob@example.org"))
        assert _wait_until(lambda: len(slow.received) == 1, 10)  # in flight
        with pytest.raises(InvalidArgument, match="timeout"):
            ms.stop(timeout=bad)
        with pytest.raises(InvalidArgument, match="timeout"):
            ms.start(timeout=bad)
        assert ms.worker_status.running
    finally:
        ms.stop()
    assert _recorded_once(path)


async def test_an_async_stop_with_a_timeout_it_cannot_wait_refuses_it(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    async with AsyncMailstrom(config(dns_server, mx.port), store=MemoryStore()) as ms:
        with pytest.raises(InvalidArgument, match="timeout"):
            await ms.stop(timeout="5")  # type: ignore[arg-type]
        assert ms.worker_status.running


def test_a_worker_thread_that_missed_starts_timeout_does_not_run_on(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """start() raised "did not start within" and the worker came up all the same: it
    delivered behind a start() that had said it failed, worker_status said running, and
    start() again said "already started". A worker process is killed in that case; a
    worker thread is now asked to stop, and the next start() begins afresh."""
    slow = threading.Event()
    slow.set()

    class SlowToStart(MemoryStore):
        def watch(self, callback: Any) -> Any:
            if slow.is_set():
                time.sleep(1)  # a store slow to answer as the worker starts
            return super().watch(callback)

    store = SlowToStart()
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="thread")
    try:
        before = set(threading.enumerate())
        with pytest.raises(WorkerError, match=r"did not start within 0\.2 s"):
            ms.start(timeout=0.2)
        slow.clear()
        [thread] = [t for t in set(threading.enumerate()) - before if t.name == "mailstrom-worker"]
        thread.join(10)
        assert not thread.is_alive()
        assert not ms.worker_status.running
        ms.start()
        mid = ms.send_email(hello("bob@example.org"))
        assert ms.wait(mid, timeout=10).state is RecipientState.DELIVERED
    finally:
        ms.stop()
    store.close()


async def test_an_async_start_that_is_cancelled_does_not_leave_its_worker_running(
    mx: Any, dns_server: LoopbackDNS
) -> None:
    """start() cancelled while its worker task was still starting (a timeout around it,
    a shutdown) raised CancelledError and left the task to come up behind it: the worker
    delivered behind a start() that never returned, and the next start() said "already
    started". As for a worker thread that missed start()'s timeout, the worker now ends,
    and the next start() begins afresh."""
    entered, release = threading.Event(), threading.Event()

    class SlowToStart(MemoryStore):
        in_process = False  # its calls in a thread, as PostgreSQL's: the loop runs on

        def last_event_id(self) -> int:
            if not entered.is_set():
                entered.set()
                release.wait(30)  # a store slow to answer as the worker starts
            return super().last_event_id()

    store = SlowToStart()
    ms = AsyncMailstrom(config(dns_server, mx.port), store=store, worker="task")
    worker = ms.worker
    assert isinstance(worker, Worker)
    try:
        starting = asyncio.create_task(ms.start())
        assert await asyncio.to_thread(entered.wait, 10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        release.set()
        assert await asyncio.to_thread(worker.wait_stopped, 10)
        assert not ms.worker_status.running
        for _ in range(100):  # the task ends just after its worker
            if ms._ending is None or ms._ending.done():
                break
            await asyncio.sleep(0.01)
        await ms.start()
        mid = await ms.send_email(hello("bob@example.org"))
        assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
    finally:
        release.set()
        await ms.stop()
    store.close()


async def test_no_task_is_started_while_the_one_stop_gave_up_on_lives(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guide: a worker task stop() gave up on is left to end by itself, "and the
    facade will not start another while it lives". start() started one at once."""
    from mailstrom.client import aio

    monkeypatch.setattr(aio, "STOP_GRACE", 0.0)
    slow = _slow_mx(smtp_server, dns_server)
    store = MemoryStore()
    ms = AsyncMailstrom(config(dns_server, slow.port), store=store, worker="task")
    await ms.start()
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    worker = ms.worker
    assert worker is not None
    await ms.stop(timeout=0)  # gives up at once, the delivery's reply still to come
    assert worker.status.running
    with pytest.raises(WorkerError, match="has not ended yet"):
        await ms.start()
    assert await asyncio.to_thread(worker.wait_stopped, 10)
    for _ in range(100):  # the task ends just after its worker
        if ms._ending is None or ms._ending.done():
            break
        await asyncio.sleep(0.01)
    await ms.start()
    await ms.stop()
    store.close()


async def test_a_worker_task_stop_had_to_cancel_does_not_read_as_dead(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stop() past its bound cancels the worker task, as it kills a worker process: that
    task's status read "CancelledError: " and dead, as if the worker had died of an
    error, where a worker process killed so reads as stopped."""
    from mailstrom.client import aio

    monkeypatch.setattr(aio, "STOP_GRACE", 0.0)
    slow = _slow_mx(smtp_server, dns_server)
    store = MemoryStore()
    ms = AsyncMailstrom(config(dns_server, slow.port), store=store, worker="task")
    await ms.start()
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    await ms.stop(timeout=0)  # gives up at once, the delivery's reply still to come
    ending = ms._ending
    assert ending is not None
    await asyncio.wait({ending}, timeout=10)
    status = ms.worker_status
    assert not status.running
    assert status.error is None and not status.dead, status
    store.close()


def test_a_fork_while_another_thread_stops_the_facade_can_stop_it_too(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """start() and stop() hold a lock; a fork (a pre-forking server, multiprocessing)
    while another thread held it must not leave it held for ever in the child, whose own
    stop() (at exit, say) would never return."""
    slow = _slow_mx(smtp_server, dns_server)
    store = MemoryStore()
    ms = Mailstrom(config(dns_server, slow.port), store=store, worker="thread")
    ms.start()
    ms.send_email(hello("bob@example.org"))
    assert _wait_until(lambda: len(slow.received) == 1, 10)  # in flight: stop() waits
    stopping = threading.Thread(target=ms.stop)
    stopping.start()
    assert _wait_until(lambda: ms._under_way == "stop", 10)  # it holds the lock
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked process
        ms.stop(timeout=0)
        os._exit(0)
    try:
        assert _wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 10), (
            "the fork's stop() waited for a lock nobody there will release"
        )
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    stopping.join(30)
    store.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_worker_process_heeds_logging_disable(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """``logging.disable(level)`` (a test suite's settings, a quiet mode) silences the
    records of a worker process as it does a thread's: its level was not among those the
    child got, and every forwarded record was handled here whatever the application had
    disabled."""
    mx.rcpt_replies["grey@example.org"] = "451 4.7.1 Greylisted"
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    caplog.set_level(logging.INFO, "mailstrom")
    logging.disable(logging.WARNING)
    try:
        with Mailstrom(
            config(dns_server, mx.port),
            store=store,
            on_result=results,
            worker=mode,  # type: ignore[arg-type]
        ) as ms:
            ms.send_email(hello("grey@example.org"))
            results.wait_count(1)
            time.sleep(0.5)  # what the child logged is in the pipe behind its result
    finally:
        logging.disable(logging.NOTSET)
        store.close()
    assert [r.getMessage() for r in caplog.records if r.levelno <= logging.WARNING] == []


def test_a_stop_cancelled_on_a_loop_then_closed_leaves_the_worker_task_of_another_loop(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """stop() from one loop of a worker task on a loop another thread runs, cancelled (a
    timeout around it) as the worker drained, then its loop closed (loop.close()): what
    it left ending was its own loop's follower of that task, which nothing ends once its
    loop is closed. Every later start(), on any loop, said the worker "has not ended
    yet", for good, though it had."""
    slow = _slow_mx(smtp_server, dns_server)
    store = MemoryStore()
    ms = AsyncMailstrom(config(dns_server, slow.port), store=store, worker="task")
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    try:
        asyncio.run_coroutine_threadsafe(ms.start(), other).result(timeout=30)
        worker = ms.worker
        assert worker is not None
        asyncio.run(ms.send_email(hello("bob@example.org")))
        assert _wait_until(lambda: len(slow.received) == 1, 10)

        async def cancelled_stop() -> None:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await ms.stop(timeout=5)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(cancelled_stop())
        finally:
            loop.close()
        assert worker.wait_stopped(10)

        def starts() -> bool:
            try:
                asyncio.run_coroutine_threadsafe(ms.start(), other).result(timeout=30)
            except WorkerError as exc:
                if "has not ended yet" not in str(exc):
                    raise
                return False  # (the task ends just after its worker)
            return True

        assert _wait_until(starts, 10)
        assert ms.worker_status.running
    finally:
        asyncio.run_coroutine_threadsafe(ms.stop(), other).result(timeout=60)
        other.call_soon_threadsafe(other.stop)
        runner.join()
        other.close()
        store.close()
