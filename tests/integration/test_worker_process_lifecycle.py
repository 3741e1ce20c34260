"""The life of a worker process seen from its facade (client/process.py): a start that
fails, a stop() that comes while results are still being passed on, from ``on_result``
or while a child hangs before reading its spec, and a fork of the application after
stop(). Each child is a real one, delivering to a loopback SMTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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

from mailstrom import AsyncMailstrom, Mailstrom, RecipientState
from mailstrom.client import process, supervision
from mailstrom.client.aio_loops import over
from mailstrom.client.process import WorkerProcess
from mailstrom.errors import StoreError, WorkerError
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import (
    _gone,
    _recorded_once,
    _refuses_as_closed,
    _slow_mx,
    _wait_until,
    config,
    hello,
)
from tests.support.delivery import Results

mx = test_worker_modes.mx
"""A server that answers everything (the same fixture: pytest finds it by this name)."""

STALL = "MAILSTROM_TEST_CHILD_STALL"
PIPE_SIZE = 65536
"""What a Linux pipe holds by default."""


def _worker(ms: Mailstrom) -> WorkerProcess:
    assert isinstance(ms.worker, WorkerProcess)
    return ms.worker


def _in_each_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: str) -> None:
    """Run ``code`` at the start of every worker child started from now on: a child
    inherits the environment, and a ``sitecustomize`` on its PYTHONPATH runs ``code``
    (indented under the test that it is a worker child; ``sys`` is imported)."""
    site = tmp_path / name
    site.mkdir()
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    (site / "sitecustomize.py").write_text(
        f'import sys\nif "mailstrom.runtime.child" in sys.orig_argv:\n{body}\n'
    )
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), path) if p))


def _gated_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file whose creation lets worker children started from now on go on: until then
    each waits at its start (30 s at most), as a child that is slow to come up."""
    gate = tmp_path / "go"
    _in_each_child(
        tmp_path,
        monkeypatch,
        "gate",
        f"""
        import os, time
        for _ in range(3000):  # until the test lets it go on (30 s at most)
            if os.path.exists({str(gate)!r}):
                break
            time.sleep(0.01)
        """,
    )
    return gate


async def _a_stop_timed_out_while_delivering(ms: AsyncMailstrom, slow: Any) -> None:
    """``ms`` started, one message on its way to ``slow`` (``_slow_mx``), and a
    stop(timeout=30) given up after 0.2 s, the child still draining that delivery."""
    await ms.start()
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await ms.stop(timeout=30)


@pytest.fixture
def stall_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``stall_child(seconds)``: worker children started from now on hang that long
    before reading their spec (swapping, a stuck import); ``stall_child(0)`` ends it. A
    child inherits the environment, and this ``sitecustomize`` on its PYTHONPATH."""
    _in_each_child(
        tmp_path,
        monkeypatch,
        "stall",
        f"""
        import os, time
        time.sleep(float(os.environ.get({STALL!r}, "0")))  # killed before it ends
        """,
    )

    def stall(seconds: float) -> None:
        monkeypatch.setenv(STALL, str(seconds))

    return stall


def _pipes() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                fds.add(int(name))
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return fds


def test_a_fork_after_stop_leaves_the_descriptors_the_application_reused_alone(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The numbers of the worker's pipes are free again after stop(); the application's
    next files take them. A fork then (multiprocessing, a pre-forking server) pointed
    them at /dev/null in the forked process: a SimpleQueue's result was silently lost."""
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    before = _pipes()
    ms.start()
    numbers = _pipes() - before  # the worker's stdin and stdout
    assert len(numbers) == 2
    ms.stop()
    data = tmp_path / "data.txt"
    data.write_text("the application's\n")
    opened = [os.open(data, os.O_RDONLY) for _ in range(64)]  # the lowest free numbers
    try:
        assert numbers <= set(opened)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the forked process
            kept = all(os.readlink(f"/proc/self/fd/{fd}") == str(data) for fd in numbers)
            os._exit(0 if kept else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the fork lost the application's files"
        assert all(os.pread(fd, 100, 0) == b"the application's\n" for fd in numbers)
    finally:
        for fd in opened:
            os.close(fd)
    store.close()


def test_a_start_that_failed_can_be_tried_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, stall_child: Any
) -> None:
    """A cold start on a busy machine missed start()'s timeout: its child is killed, and
    the next start() starts another (it said "already started", forever)."""
    stall_child(30)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results)
    with pytest.raises(WorkerError, match=r"failed to start: no answer within 0\.5 s"):
        ms.start(timeout=0.5)
    assert ms.worker.pid is None  # type: ignore[union-attr]
    status = ms.worker_status
    assert not status.running and status.error == "no answer within 0.5 s"

    stall_child(0)
    ms.start()
    try:
        assert ms.worker_status.running and ms.worker_status.error is None
        mid = ms.send_email(hello("retried@example.org"))
        results.wait_count(1, timeout=30)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    finally:
        ms.stop()
    store.close()


def test_stop_returns_after_the_last_result_and_the_next_child_is_not_judged_by_it(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """An on_result busy (a webhook, say) after its child exited: stop() gave up on it
    after 5 s, so on_result went on after stop() returned, and that reader's end later
    marked the next, healthy child stopped."""
    busy = threading.Event()
    carry_on = threading.Event()
    done = threading.Event()
    stop_returned = threading.Event()
    next_child = threading.Event()  # from then on, results are the next child's
    after_stop: list[str] = []
    results = Results()

    def on_result(result: Any) -> None:
        if not busy.is_set():
            busy.set()
            carry_on.wait(30)
        if stop_returned.is_set() and not next_child.is_set():
            after_stop.append(result.address)
        results(result)
        done.set()

    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result)
    ms.start()
    ms.send_email(hello("slow@example.org"))
    assert busy.wait(30)
    pid = ms.worker.pid  # type: ignore[union-attr]
    assert pid is not None

    def stop() -> None:
        ms.stop()
        stop_returned.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert _wait_until(lambda: _gone(pid), 30)  # nothing but the callback is left
    # Longer than the 5 s stop() used to give the reader once the child had exited.
    stop_returned.wait(5.5)
    carry_on.set()
    assert done.wait(30)
    stopper.join(30)
    assert stop_returned.is_set()
    assert after_stop == [], "on_result was called after stop() returned"

    next_child.set()
    ms.start()
    try:
        new = ms.worker.pid  # type: ignore[union-attr]
        assert new is not None and new != pid
        mid = ms.send_email(hello("next@example.org", 1))
        results.wait_count(2, timeout=30)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
        status = ms.worker_status
        assert status.running and status.error is None
        assert ms.worker.pid == new  # type: ignore[union-attr]
    finally:
        ms.stop()
    store.close()


def _many_cas_context(n: int = 300) -> ssl.SSLContext:
    """A verifying context trusting ``n`` CAs: its spec is larger than a pipe holds."""
    pem = "".join(trustme.CA().cert_pem.bytes().decode() for _ in range(n))
    context = ssl.create_default_context(cadata=pem)
    assert sum(map(len, context.get_ca_certs(binary_form=True))) > 2 * PIPE_SIZE
    return context


def test_start_is_bounded_by_its_timeout_when_the_spec_is_larger_than_the_pipe(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, stall_child: Any
) -> None:
    """A child that hangs before reading its spec: start(timeout=1) waited for it to
    read the spec (here 10 s, or forever) before its timeout even began."""
    stall_child(10)
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, tls_context=_many_cas_context())
    ms = Mailstrom(cfg, store=store)
    began = time.monotonic()
    with pytest.raises(WorkerError, match=r"no answer within 1 s"):
        ms.start(timeout=1)
    assert time.monotonic() - began < 8
    assert ms.worker.pid is None  # type: ignore[union-attr]

    stall_child(0)  # the spec itself goes through to a child that reads it
    ms.start()
    try:
        assert ms.worker_status.running
    finally:
        ms.stop()
    store.close()


def test_stop_is_prompt_while_a_restarted_child_hangs_before_reading_its_spec(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    stall_child: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The restart wrote the spec under the lock stop() takes: stop() (and every wake
    of send_email) waited for the hung child to read it."""
    monkeypatch.setattr(supervision, "FIRST_DELAY", 0.1)
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, tls_context=_many_cas_context())
    ms = Mailstrom(cfg, store=store)
    ms.start()
    old = ms.worker.pid  # type: ignore[union-attr]
    assert old is not None
    stall_child(10)
    os.kill(old, signal.SIGKILL)
    assert _wait_until(lambda: ms.worker.pid not in (None, old), 30)  # type: ignore[union-attr]
    new = ms.worker.pid  # type: ignore[union-attr]
    assert new is not None
    began = time.monotonic()
    ms.send_email(hello("queued@example.org"))
    ms.stop()
    assert time.monotonic() - began < 5
    assert _gone(new)
    status = ms.worker_status
    assert not status.running and status.error is None  # stopped before it answered
    store.close()


def test_stop_from_on_result_stops_and_start_works_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """stop() called from the callback joined its own thread: RuntimeError, and the
    facade stayed "already started"."""
    outcome: list[str] = []
    stopped = threading.Event()
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")

    def on_result(result: Any) -> None:
        results(result)
        if not outcome:
            try:
                ms.stop()
                outcome.append("returned")
            except BaseException as exc:  # reported to the test
                outcome.append(repr(exc))
            stopped.set()

    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result)
    ms.start()
    pid = ms.worker.pid  # type: ignore[union-attr]
    assert pid is not None
    ms.send_email(hello("first@example.org"))
    assert stopped.wait(30)
    assert outcome == ["returned"]
    assert _gone(pid)
    assert ms.worker.pid is None  # type: ignore[union-attr]
    status = ms.worker_status
    assert not status.running and status.error is None

    ms.start()
    try:
        mid = ms.send_email(hello("second@example.org", 1))
        results.wait_count(2, timeout=30)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
        assert ms.worker_status.running
    finally:
        ms.stop()
    store.close()


class _BuggyFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        raise RuntimeError("a bug in the application's logging")


def test_a_forwarded_record_the_application_cannot_log_costs_no_result(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader ended on it: the child delivered on, unseen (no more on_result, a
    status frozen at running)."""
    caplog.set_level(logging.INFO, "mailstrom")
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    attempts = logging.getLogger("mailstrom.attempts")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results)
    ms.start()
    attempts.addFilter(buggy := _BuggyFilter())
    try:
        pid = ms.worker.pid  # type: ignore[union-attr]
        for i in range(3):
            ms.send_email(hello(f"u{i}@example.org", i))
            results.wait_count(i + 1, timeout=30)
        assert ms.worker.pid == pid  # type: ignore[union-attr]
        assert ms.worker_status.delivered == 3
    finally:
        attempts.removeFilter(buggy)
        ms.stop()
    assert any("frame could not be handled" in r.getMessage() for r in caplog.records)
    store.close()


class _Abort(BaseException):
    """Not an Exception: nothing on the way catches it."""


def test_a_reader_ended_by_a_base_exception_does_not_leave_its_child_unseen(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A BaseException from the application's logging, as it handles a forwarded record,
    ends the reader; its child, nobody reading its pipe, is killed and started again (it
    delivered on unseen, status saying running). (One from on_result is logged, as any
    error of the callback: test_worker_modes.)"""
    monkeypatch.setattr(supervision, "FIRST_DELAY", 0.1)
    escaped: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_type))
    caplog.set_level(logging.INFO, "mailstrom")
    results = Results()
    attempts = logging.getLogger("mailstrom.attempts")
    aborting = _AbortOnce()

    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results)
    ms.start()
    attempts.addFilter(aborting)
    try:
        old = ms.worker.pid  # type: ignore[union-attr]
        ms.send_email(hello("first@example.org"))
        assert _wait_until(lambda: ms.worker_status.restarts == 1, 30)
        assert _gone(old)  # type: ignore[arg-type]
        ms.send_email(hello("second@example.org", 1))
        results.wait_for(lambda rs: "second@example.org" in {r.address for r in rs}, 30)
        assert ms.worker_status.running
    finally:
        attempts.removeFilter(aborting)
        ms.stop()
    assert escaped == [_Abort]  # it still ends the thread it was raised on
    store.close()


class _AbortOnce(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.raised:
            self.raised = True
            raise _Abort
        return True


def test_a_permanent_error_of_a_restarted_child_outlives_stop(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restarted child that failed for good before its first "ready": stop() took it
    for one still on its way and cleared the error that says why nothing delivers."""
    monkeypatch.setattr(supervision, "FIRST_DELAY", 0.1)
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    old = ms.worker.pid  # type: ignore[union-attr]
    assert old is not None
    store.close()
    for name in ("q.db-wal", "q.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    path.write_bytes(b"not a database " * 1000)  # what the next child opens
    os.kill(old, signal.SIGKILL)

    def failed_for_good() -> bool:
        status = ms.worker_status
        return status.dead and "again" not in (status.error or "")

    assert _wait_until(failed_for_good, 30)
    assert _worker(ms).wait_stopped(30)  # its end has been judged too
    error = ms.worker_status.error
    assert error is not None and "StoreCorrupt" in error
    ms.stop()
    assert ms.worker_status.error == error


def test_a_child_stop_had_to_kill_does_not_read_as_dead(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed past the grace by stop() itself: it read as "exited with status -9"."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    pid = ms.worker.pid  # type: ignore[union-attr]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it cannot stop by itself
    ms.stop(timeout=0.1)
    assert _gone(pid)
    status = ms.worker_status
    assert not status.running and status.error is None and not status.dead
    store.close()


def test_a_child_stop_had_to_kill_leaves_nothing_in_flight_in_the_status(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed past the grace by stop() (what it leased given back): the status kept the
    dead child's last snapshot, deliveries, sessions and leased bytes in flight, for
    good, as a worker thread's did before (test_worker_modes)."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    mx.stall_on = "dot"
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(3)]
    assert _wait_until(lambda: ms.worker_status.in_flight == 3, 30)
    pid = ms.worker.pid  # type: ignore[union-attr]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it cannot stop by itself
    ms.stop(timeout=0.1)
    assert _gone(pid)
    status = ms.worker_status
    assert not status.running
    live = (status.in_flight, status.transactions, status.sessions, status.leased_bytes)
    assert live == (0, 0, 0, 0), status
    assert all(not store.status(i).is_final for i in ids)  # given back, not lost
    store.close()


def test_a_child_stop_had_to_kill_as_it_drained_does_not_read_as_stopping(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed past the grace by stop() once it had said it drains: the status kept its
    last snapshot's ``stopping``, True for good, where a worker that has stopped is not
    stopping (as a worker thread's status says)."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    mx.stall_on = "dot"
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    ms.send_email(hello("u@example.org"))
    assert _wait_until(lambda: ms.worker_status.in_flight == 1, 30)
    pid = ms.worker.pid  # type: ignore[union-attr]
    assert pid is not None
    stopping = threading.Thread(target=ms.stop, kwargs={"timeout": 3.0})
    stopping.start()
    assert _wait_until(lambda: ms.worker_status.stopping, 30)  # its snapshot says so
    os.kill(pid, signal.SIGSTOP)  # it cannot end its drain by itself
    stopping.join(30)
    assert _gone(pid)
    status = ms.worker_status
    assert not status.running
    assert not status.stopping, status
    store.close()


def test_a_child_stop_from_on_result_had_to_kill_leaves_nothing_in_flight(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() from on_result, the child killed past the grace: stop() let go of the
    child before its reader (the callback's own thread) reached the child's end, and that
    end, which puts the dead child's last snapshot at rest, was then never handled: the
    status showed its deliveries, sessions and leased bytes in flight for good."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    mx.stall_on = "dot"
    store = SQLiteStore(tmp_path / "q.db")
    called = threading.Event()
    returned = threading.Event()

    def on_result(result: Any) -> None:
        if called.is_set():
            return
        called.set()
        pid = ms.worker.pid  # type: ignore[union-attr]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it cannot stop by itself
        ms.stop(timeout=0.1)
        returned.set()

    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result)
    ms.start()
    ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(3)]
    assert _wait_until(lambda: ms.worker_status.in_flight == 3, 30)
    ms.send_email(hello("nobody@unknown.test"))  # fails at once: on_result runs
    assert returned.wait(30)
    assert _worker(ms).wait_stopped(30)
    reader = _worker(ms)._reader
    assert reader is not None
    reader.join(30)  # the rest of the pipe, past the callback that stopped
    status = ms.worker_status
    assert not status.running
    live = (status.in_flight, status.transactions, status.sessions, status.leased_bytes)
    assert live == (0, 0, 0, 0), status
    assert all(not store.status(i).is_final for i in ids)  # given back, not lost
    store.close()


def test_a_slow_on_result_does_not_hold_the_worker_processs_deliveries(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The reader thread called on_result itself and read no frame meanwhile: once a
    slow callback (a webhook) had let a pipe's worth of results pile up (a hundred or
    so), the child's event loop waited to write the next ones, and every delivery of the
    worker waited with it. The results now wait for the callback in this process, up to
    a bound far above that, and the worker delivers on."""
    store = SQLiteStore(tmp_path / "q.db")
    go = threading.Event()
    results = Results()

    def on_result(result: Any) -> None:
        go.wait(60)  # busy until the test lets it go
        results(result)

    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result)
    ms.start()
    try:
        ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(400)]

        def delivered() -> int:
            return sum(store.status(i).state is RecipientState.DELIVERED for i in ids)

        assert _wait_until(lambda: delivered() == len(ids), 60), delivered()
        assert len(mx.received) == len(ids)
        assert ms.worker_status.running
    finally:
        go.set()
        ms.stop()
    assert len(results.all) == len(ids)  # every one passed on, none dropped
    store.close()


def test_stop_with_a_slow_on_result_passes_on_every_result_the_child_recorded(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow on_result (a webhook) fills the pipe: the child waits to write its next
    results, and cannot end before the callback has taken them. stop() killed it past the
    grace all the same, as if it hung, and the results it had recorded but not yet sent
    never reached on_result. The time the callback takes no longer counts against the
    child: it ends by itself, and every result it recorded is passed on. (With the
    results waiting here at their bound, as with a callback slower than the worker for
    long enough.)"""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    monkeypatch.setattr(process, "RESULTS_WAITING", 50)
    store = SQLiteStore(tmp_path / "q.db")
    go = threading.Event()
    results = Results()

    def on_result(result: Any) -> None:
        go.wait(60)  # busy until the test lets it go
        results(result)

    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=on_result)
    ms.start()
    ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(400)]

    def delivered() -> int:
        return sum(store.status(i).state is RecipientState.DELIVERED for i in ids)

    # The pipe is full: the child delivers no more until the callback takes its results.
    counts = [-1]

    def stalled() -> bool:
        counts.append(delivered())
        time.sleep(0.5)  # a look at the store's count half a second apart
        return 0 < counts[-1] == counts[-2] < len(ids)

    assert _wait_until(stalled, 60), counts
    stopper = threading.Thread(target=ms.stop, kwargs={"timeout": 0.1})
    stopper.start()
    stopper.join(1.0)  # past the bound: the child still waits for the callback
    go.set()
    stopper.join(60)
    assert not stopper.is_alive()
    passed_on = {r.message_id for r in results.all if r.state is RecipientState.DELIVERED}
    recorded = {i for i in ids if store.status(i).state is RecipientState.DELIVERED}
    assert recorded == passed_on, f"{len(recorded - passed_on)} recorded, never passed on"
    store.close()


@pytest.fixture
def failing_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker children started from now on exit at once (status 3), saying nothing."""
    _in_each_child(tmp_path, monkeypatch, "failing", "import os; os._exit(3)")


def test_a_with_block_whose_start_fails_closes_the_store_it_opened(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, failing_child: None
) -> None:
    """__enter__ raised and nobody had the facade to stop: the store it had opened (a
    SQLite connection; a PostgreSQL pool) stayed open, as a failing __init__ no longer
    leaves it."""
    facades: list[Mailstrom] = []

    class Kept(Mailstrom):
        def start(self, timeout: float = 30.0) -> None:
            facades.append(self)
            super().start(timeout)

    with (
        pytest.raises(WorkerError, match="failed to start"),
        Kept(config(dns_server, mx.port), store=tmp_path / "q.db") as ms,
    ):
        ms.send_email(hello("never@example.org"))  # pragma: no cover - not reached
    [ms] = facades
    with pytest.raises(StoreError, match="closed"):
        ms.store.recent()


async def test_an_async_with_block_whose_start_fails_closes_the_store_it_opened(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, failing_child: None
) -> None:
    facades: list[AsyncMailstrom] = []

    class Kept(AsyncMailstrom):
        async def start(self) -> None:
            facades.append(self)
            await super().start()

    with pytest.raises(WorkerError, match="failed to start"):
        async with Kept(config(dns_server, mx.port), store=tmp_path / "q.db") as ms:
            await ms.send_email(hello("never@example.org"))  # pragma: no cover
    [ms] = facades
    with pytest.raises(StoreError, match="closed"):
        ms.store.recent()


def test_a_with_block_on_a_started_facade_leaves_its_worker_running(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    try:
        with pytest.raises(WorkerError, match="already started"), ms:
            pass  # pragma: no cover - not reached
        assert ms.worker_status.running
    finally:
        ms.stop()
    store.close()


async def test_two_async_with_blocks_at_once_leave_the_first_ones_worker_running(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Two tasks entering ``async with ms`` at once: the second judged "was it started?"
    before waiting its turn, while the first's process was still coming up, so its
    "already started" stopped the worker the first block delivers with (and closed the
    store the facade opened under it)."""
    ms = AsyncMailstrom(config(dns_server, mx.port), store=tmp_path / "q.db", worker="process")
    entered = await asyncio.gather(ms.__aenter__(), ms.__aenter__(), return_exceptions=True)
    try:
        assert entered[0] is ms, entered
        assert isinstance(entered[1], WorkerError) and "already started" in str(entered[1])
        assert ms.worker_status.running
        mid = await ms.send_email(hello("bob@example.org"))
        assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
    finally:
        await ms.__aexit__(None, None, None)


def test_two_with_blocks_at_once_leave_the_first_ones_worker_running(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """As the async test above, with threads: a `with` that looked for a worker before
    another thread's `with` had started one stopped that worker on "already started"."""
    looked, first_in = threading.Event(), threading.Event()

    class Gated(Mailstrom):
        def start(self, timeout: float = 30.0) -> None:
            if threading.current_thread().name == "second":
                looked.set()  # __enter__ has judged that no worker runs
                first_in.wait(30)
            super().start(timeout)

    ms = Gated(config(dns_server, mx.port), store=tmp_path / "q.db", worker="process")
    failed: list[BaseException] = []

    def second() -> None:
        try:
            ms.__enter__()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=second, name="second")
    thread.start()
    try:
        assert looked.wait(30)
        assert ms.__enter__() is ms
        first_in.set()
        thread.join(60)
        [error] = failed
        assert isinstance(error, WorkerError) and "already started" in str(error)
        assert ms.worker_status.running
        mid = ms.send_email(hello("bob@example.org"))
        assert ms.wait(mid, timeout=10).state is RecipientState.DELIVERED
    finally:
        first_in.set()
        thread.join(60)
        ms.__exit__(None, None, None)


@pytest.fixture
def noisy_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Worker children started from now on print a banner on their standard output as
    they start (a ``sitecustomize``, a ``.pth`` file, a library's import), start a
    process that inherits it and writes there later, and another that reads its
    standard input; the file returned exists once the late write is done."""
    written = tmp_path / "written"
    _in_each_child(
        tmp_path,
        monkeypatch,
        "noisy",
        f"""
        import subprocess
        print("banner of a library")
        subprocess.Popen(["sh", "-c", "sleep 0.2; echo late; touch {written}"])
        subprocess.Popen(["sh", "-c", "head -c 1 >/dev/null"])
        """,
    )
    return written


def test_what_a_child_or_its_own_children_write_to_stdout_or_read_costs_no_frame(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, noisy_child: Path
) -> None:
    """The frames went over the child's standard output and input: a banner printed as
    it started, or a line a process it started wrote there, was read as a frame's length
    (a read of 1.7 GB that swallowed every later frame: start() timed out, on_result
    never ran), and a process reading its stdin took a byte of the spec."""
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        assert ms.worker_status.running
        assert _wait_until(noisy_child.exists, 30)
        ms.send_email(hello("bob@example.org"))
        results.wait_final({"bob@example.org"})
        assert results.states() == {"bob@example.org": RecipientState.DELIVERED}
        assert ms.worker_status.delivered == 1
    store.close()


def test_stop_returns_while_a_process_the_child_started_lives_on(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process the child started (and that outlives it) inherited the child's end of
    the frame pipe: its parent's reader never saw the end of it, and stop() waited for
    that reader for ever."""
    pid_file = tmp_path / "lingering.pid"
    _in_each_child(
        tmp_path,
        monkeypatch,
        "lingering",
        f"""
        import subprocess
        p = subprocess.Popen(["sleep", "600"], stderr=subprocess.DEVNULL)
        open({str(pid_file)!r}, "w").write(str(p.pid))
        """,
    )
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    lingering = int(pid_file.read_text())
    try:
        stopping = threading.Thread(target=ms.stop, daemon=True)
        stopping.start()
        stopping.join(60)
        assert not stopping.is_alive(), "stop() still waits for the reader"
        assert not _gone(lingering)  # it did outlive the child
    finally:
        os.kill(lingering, signal.SIGKILL)
    store.close()


def test_start_after_stop_gives_a_worker_process_fresh_counters(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With on_result, worker_status counted the results passed on by every child this
    facade ever started: after stop() and start() it still said delivered=1 (and the
    restarts of the last run) where the guide promises fresh counters."""
    monkeypatch.setattr(supervision, "FIRST_DELAY", 0.1)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results)
    ms.start()
    ms.send_email(hello("bob@example.org"))
    results.wait_final({"bob@example.org"})
    old = ms.worker.pid  # type: ignore[union-attr]
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert _wait_until(lambda: ms.worker_status.running and ms.worker_status.restarts == 1, 30)
    ms.stop()
    assert ms.worker_status.delivered == 1
    ms.start()
    try:
        status = ms.worker_status
        assert (status.delivered, status.deferred, status.failed) == (0, 0, 0)
        assert status.restarts == 0
    finally:
        ms.stop()
    store.close()


def test_a_child_that_cannot_be_started_fails_start_with_a_worker_error(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No process could be started (here: the interpreter's file is gone, as when a
    deploy rebuilt the virtualenv; or no fork, no descriptor left): start() raised the
    bare OSError, where it promises a WorkerError, and a with block's caller catching
    that saw a FileNotFoundError about a path it never gave."""
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    real = sys.executable
    monkeypatch.setattr(sys, "executable", str(tmp_path / "gone" / "python3"))
    refused = r"failed to start: no process could be started .*No such file"
    with pytest.raises(WorkerError, match=refused) as raised:
        ms.start()
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    status = ms.worker_status
    assert not status.running and status.error is not None
    assert "No such file" in status.error
    monkeypatch.setattr(sys, "executable", real)
    ms.start()  # the next start() starts one
    try:
        assert ms.worker_status.running and ms.worker_status.error is None
    finally:
        ms.stop()
    store.close()


def _no_thread_named(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Threads called ``name`` cannot be started from now on, as when a container's pids
    limit is reached (a thread counts as a process): "can't start new thread"."""
    start = threading.Thread.start

    def refusing(thread: threading.Thread) -> None:
        if thread.name == name:
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refusing)


def test_a_reader_that_cannot_be_started_fails_start_and_leaves_no_child(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread to read a child's frames (a container's pids limit, reached by the fork
    that just succeeded): start() raised the bare RuntimeError where it promises a
    WorkerError, and left the child running, waiting for a spec nobody would send it,
    while pid named it and the next start() said "already started"."""
    popen = subprocess.Popen
    children: list[subprocess.Popen[bytes]] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        child = popen(*args, **kwargs)
        children.append(child)
        return child

    monkeypatch.setattr(process.subprocess, "Popen", recorded)
    start = threading.Thread.start
    _no_thread_named(monkeypatch, "mailstrom-worker-reader")
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    try:
        with pytest.raises(WorkerError, match="can't start new thread"):
            ms.start()
        [child] = children
        assert _gone(child.pid)
        assert _worker(ms).pid is None
        assert not ms.worker_status.running and ms.worker_status.error is not None
        monkeypatch.setattr(threading.Thread, "start", start)
        ms.start()  # the next start() starts one
        assert ms.worker_status.running
    finally:
        ms.stop()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()
        store.close()


def test_a_restart_without_a_thread_to_wait_on_is_not_promised(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child died, and no thread could be started to start the next one after the
    backoff: the RuntimeError ended the reader, the status said "starting it again in
    0.1 s" for good, and stop() then raised, joining a thread that never started."""
    monkeypatch.setattr(supervision, "FIRST_DELAY", 0.1)
    escaped: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_type))
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    ms.start()
    try:
        pid = _worker(ms).pid
        assert pid is not None
        start = threading.Thread.start
        _no_thread_named(monkeypatch, "mailstrom-worker-supervisor")
        os.kill(pid, signal.SIGKILL)
        assert _worker(ms).wait_stopped(10)
        assert _wait_until(lambda: "SIGKILL" in (ms.worker_status.error or ""), 10)
        time.sleep(0.3)  # past the backoff: no restart came
        status = ms.worker_status
        assert status.dead and status.restarts == 0
        assert "not started again" in (status.error or ""), status.error
        assert escaped == []
        monkeypatch.setattr(threading.Thread, "start", start)
        ms.start()  # the next start() starts one
        assert ms.worker_status.running
    finally:
        ms.stop()
        store.close()


@pytest.mark.parametrize(
    "executable", [None, "", "/usr/sbin/apache2", "/srv/app/.venv/bin/uwsgi", "/usr/sbin/httpd"]
)
def test_a_program_without_an_interpreter_file_gets_a_worker_thread_or_a_worker_error(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    executable: str | None,
) -> None:
    """A program embedding Python may have no interpreter file to start (sys.executable
    None or empty), and under uWSGI or mod_wsgi it is the server's own program (which was
    run with the child's Python arguments): the default mode chose a worker process all
    the same, whose start() raised a TypeError (None) or failed; it delivers in a thread
    now, and a worker process asked for by name fails start() with a WorkerError that
    says why."""
    monkeypatch.setattr(sys, "executable", executable)
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        assert ms.worker_mode == "thread"
        ms.send_email(hello("bob@example.org"))
        results.wait_final({"bob@example.org"})
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    with pytest.raises(WorkerError, match="no Python interpreter to start"):
        ms.start()
    assert "sys.executable" in (ms.worker_status.error or "")
    ms.stop()
    store.close()


def test_a_frozen_program_gets_a_worker_thread_or_a_worker_error(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen program (PyInstaller, cx_Freeze) is its own sys.executable: the default
    mode started it again as the worker child, with the child's arguments, and it ran the
    whole application a second time (here: a program that leaves a mark), which never
    answered as a child. It delivers in a thread now, and a worker process asked for by
    name fails start() with a WorkerError, starting nothing."""
    mark = tmp_path / "ran again"
    program = tmp_path / "app"
    program.write_text(f"#!/bin/sh\ntouch '{mark}'\n")
    program.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(program))
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        assert ms.worker_mode == "thread"
        ms.send_email(hello("bob@example.org"))
        results.wait_final({"bob@example.org"})
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    with pytest.raises(WorkerError, match=r"no Python interpreter to start: .*frozen"):
        ms.start()
    ms.stop()
    store.close()
    assert not mark.exists()


def test_a_child_that_ends_without_a_word_before_it_is_ready_fails_start(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that exits with status 0 before its "ready", saying nothing (a program
    that is no Python interpreter, or a start-up hook that ends it), made start() return
    as if it delivered, and the facade then started such a child again and again; one
    that exits with status 1 fails start(), and so does this one now."""
    _in_each_child(tmp_path, monkeypatch, "quit", "import os; os._exit(0)")
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    with pytest.raises(WorkerError, match=r"failed to start: .*before it was ready"):
        ms.start()
    status = ms.worker_status
    assert not status.running and not ms.worker.restart_pending()  # type: ignore[union-attr]
    ms.stop()
    store.close()


def test_a_fork_while_another_thread_writes_to_the_child_can_stop_its_own(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The lock over the pipe to the child is taken by each wake() and stop(): a fork
    (a pre-forking server, multiprocessing) while another thread held it left it held for
    ever in the forked process, whose own worker process then never stopped: its stop()
    waited for the lock before it could say "stop"."""
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    ms.start()
    held, release = threading.Event(), threading.Event()

    def writing() -> None:  # a thread inside a write to the child at the fork
        with _worker(ms)._write_lock:
            held.set()
            release.wait(30)

    writer = threading.Thread(target=writing)
    writer.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the forked process
            try:
                ms.start()  # a worker process of its own
                ms.stop(timeout=0)
            finally:
                os._exit(0)
        try:
            assert _wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 30), (
                "the fork's stop() waited for a lock nobody there will release"
            )
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    finally:
        release.set()
        writer.join(30)
        ms.stop()
        store.close()


@pytest.mark.parametrize("event", ["_ready", "_stopped", "_halt"])
def test_a_fork_while_another_thread_is_inside_an_event_of_the_worker_does_not_hang(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, event: str
) -> None:
    """A fork lets go of the worker process in the forked process by clearing and
    setting the worker's events there: a fork while another thread was inside one of
    them (a reader setting "ready", start() or wait_stopped() waking, a restart's
    backoff ending) left that event's lock held there by no thread, and the forked
    process hung in the fork hook, before os.fork() even returned."""
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    ms.start()
    held, release = threading.Event(), threading.Event()

    def inside() -> None:  # a thread inside the event's set() or wait() at the fork
        with getattr(_worker(ms), event)._cond:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=inside)
    thread.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the forked process
            try:
                ms.start()  # a worker process of its own
                ms.stop(timeout=0)
            finally:
                os._exit(0)
        try:
            assert _wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 30), (
                "the fork waits for a lock nobody there will release"
            )
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join(30)
        ms.stop()
        store.close()


def test_wake_and_stop_do_not_wait_for_a_child_that_reads_nothing(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that reads nothing (stopped by SIGSTOP, frozen with its cgroup): wake()
    filled the pipe to it and then blocked the application for ever, and stop() waited
    behind it past its bound (STOP_GRACE past the timeout, then the child is killed)."""
    monkeypatch.setattr(process, "STOP_GRACE", 1.0)
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    ms.start()
    pid = _worker(ms).pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        wakes = PIPE_SIZE // 8  # more than the pipe holds
        waking = threading.Thread(target=lambda: [ms.wake() for _ in range(wakes)], daemon=True)
        waking.start()
        waking.join(10)
        assert not waking.is_alive(), "wake() waited for a child that reads nothing"
        stopping = threading.Thread(target=ms.stop, kwargs={"timeout": 0}, daemon=True)
        stopping.start()
        stopping.join(10)
        assert not stopping.is_alive(), "stop() waited past its bound"
        assert _gone(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    store.close()


async def test_an_async_start_that_is_cancelled_does_not_leave_its_process_running(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() cancelled while its worker process came up (a timeout around it, a
    shutdown) raised CancelledError, and the start went on in its thread: the process
    delivered behind a start() that never returned, and the next start() said "already
    started". It is now stopped once it is up, and the next start() begins afresh."""
    gate = _gated_children(tmp_path, monkeypatch)
    store = SQLiteStore(tmp_path / "q.db")
    ms = AsyncMailstrom(config(dns_server, mx.port), store=store, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)
    try:
        starting = asyncio.create_task(ms.start())
        assert await asyncio.to_thread(_wait_until, lambda: worker.pid is not None, 10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        gate.touch()
        assert await asyncio.to_thread(worker.wait_stopped, 30)
        for _ in range(1000):  # stopped by a task that ends just after its process
            if ms._ending is None or ms._ending.done():
                break
            await asyncio.sleep(0.01)
        await ms.start()
        mid = await ms.send_email(hello("bob@example.org"))
        assert (await ms.wait(mid, timeout=10)).state is RecipientState.DELIVERED
    finally:
        gate.touch()
        await ms.stop()
    store.close()


def test_an_async_start_given_up_as_asyncio_run_ends_leaves_no_process_running(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start() given up (``asyncio.wait_for`` around it) just before asyncio.run()
    returns: the task that was to stop its process once up was cancelled with the loop,
    the start went on in its thread, and the process delivered on after run() returned,
    behind a start() that had never returned (the next start() said "already
    started"). It is stopped before run() returns now."""
    gate = _gated_children(tmp_path, monkeypatch)
    store = SQLiteStore(tmp_path / "q.db")
    ms = AsyncMailstrom(config(dns_server, mx.port), store=store, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)

    async def main() -> None:
        starting = asyncio.create_task(ms.start())
        assert await asyncio.to_thread(_wait_until, lambda: worker.pid is not None, 10)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        # The child comes up as the loop ends.
        threading.Timer(0.2, gate.touch).start()

    try:
        asyncio.run(main())
        assert worker.pid is None, "the process of the start() given up runs on"
    finally:
        gate.touch()
        asyncio.run(ms.stop())
    store.close()


BESIDE = """
import sys
site = sys.argv[1]
# Where an installed mailstrom is: a site-packages directory, after the standard library.
sys.path.insert(next(i for i, p in enumerate(sys.path) if "-packages" in p), site)
import asyncio  # the parent's is the standard library's

import mailstrom
from mailstrom import Config, Mailstrom

assert mailstrom.__file__.startswith(site)  # this mailstrom, installed there
ms = Mailstrom(Config(helo_name="mail.example.com"), store=sys.argv[2], worker="process")
try:
    ms.start(timeout=30)
    print("started", flush=True)
finally:
    ms.stop()
"""


def test_a_worker_process_imports_the_standard_library_before_the_packages_beside_it(
    tmp_path: Path,
) -> None:
    """mailstrom installed in a site-packages directory beside a distribution that
    brings a module under a standard library name (PyPI's asyncio 3.4.3, which many
    requirements files list by mistake; enum34; pathlib): the application imports the
    standard library's, which comes first, but the worker child got that directory put
    before the standard library (as PYTHONPATH), imported the other and never started."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "mailstrom").symlink_to(Path(process.__file__).parents[1], target_is_directory=True)
    (site / "asyncio").mkdir()
    (site / "asyncio" / "__init__.py").write_text(
        'raise ImportError("the asyncio from PyPI, not the standard library\'s")\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", BESIDE, str(site), str(tmp_path / "q.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "started\n", done.stderr[-2000:]


@pytest.mark.parametrize("flag", ["-I", "-E"])
def test_a_worker_process_ignores_the_environment_its_application_was_told_to_ignore(
    tmp_path: Path, flag: str
) -> None:
    """An application run with ``python -I`` or ``-E`` (a service's unit, a system
    script's shebang) ignores PYTHONPATH; its worker child was started without the flag,
    put the directories PYTHONPATH named ahead of the standard library, imported the
    module it found there under a standard library name, and never started."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "mailstrom").symlink_to(Path(process.__file__).parents[1], target_is_directory=True)
    ignored = tmp_path / "ignored"
    (ignored / "asyncio").mkdir(parents=True)
    (ignored / "asyncio" / "__init__.py").write_text(
        'raise ImportError("from PYTHONPATH, which the application ignores")\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ignored)}
    done = subprocess.run(
        [sys.executable, flag, "-c", BESIDE, str(site), str(tmp_path / "q.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "started\n", done.stderr[-2000:]


def test_a_worker_process_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    """An application run as a script from another directory (a service's working
    directory, a shell's) has the script's directory on its path, not the working
    directory; its worker child, run with ``-c``, had the working directory first on its
    path, ahead of the standard library, imported a module there under a standard library
    name and never started."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "mailstrom").symlink_to(Path(process.__file__).parents[1], target_is_directory=True)
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text(BESIDE)
    work = tmp_path / "work"
    (work / "asyncio").mkdir(parents=True)
    (work / "asyncio" / "__init__.py").write_text(
        'raise ImportError("from the working directory, not the standard library")\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(app / "main.py"), str(site), str(tmp_path / "q.db")],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "started\n", done.stderr[-2000:]


def test_a_fork_while_a_child_is_started_holds_none_of_its_pipes(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread of the application forks (multiprocessing, a pre-forking server)
    while a worker process is being started: between the pipes' making and the closing
    of the child's ends here, the fork got a copy of each. Holding the write end of the
    child's frames, it kept the pipe open past the child's end: stop() waited for the
    reader, and the reader for an end of the pipe that came only when the fork exited."""
    popen = subprocess.Popen
    forks: list[int] = []

    def forking_meanwhile(*args: Any, **kwargs: Any) -> Any:
        forking = threading.Event()

        def fork() -> None:
            forking.set()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the forked process lives on a while
                time.sleep(60)
                os._exit(0)
            forks.append(pid)

        forker = threading.Thread(target=fork)
        forker.start()
        forking.wait(10)
        time.sleep(0.2)  # the fork comes now, or once the child is started
        try:
            return popen(*args, **kwargs)
        finally:
            monkeypatch.setattr(process.subprocess, "Popen", popen)  # forker.join() later

    monkeypatch.setattr(process.subprocess, "Popen", forking_meanwhile)
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    try:
        ms.start()
        assert _wait_until(lambda: len(forks) == 1, 10)
        stopping = threading.Thread(target=ms.stop, daemon=True)
        stopping.start()
        stopping.join(20)
        assert not stopping.is_alive(), "stop() waited for a process forked meanwhile"
    finally:
        for pid in forks:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        ms.stop()
        store.close()


async def test_an_async_stop_awaited_from_on_result_returns(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """on_result, on its own thread, waited for the async facade's stop() on the loop:
    that stop() runs in an executor thread, not on_result's, and waited for the reader
    without a bound, which waited for on_result to take the child's last results. Both
    waited for ever. The wait for on_result is bounded by stop()'s own once it takes
    nothing meanwhile."""
    monkeypatch.setattr(process, "STOP_GRACE", 1.0)
    loop = asyncio.get_running_loop()
    store = SQLiteStore(tmp_path / "q.db")
    called: list[str] = []
    outcome: list[str] = []
    done = threading.Event()

    def on_result(result: Any) -> None:
        called.append(result.address)
        if len(called) > 1:
            return
        stopping = asyncio.run_coroutine_threadsafe(ms.stop(timeout=1), loop)
        try:
            stopping.result(timeout=60)  # catches a hang only: it takes about 2 s
            outcome.append("returned")
        except BaseException as exc:  # reported to the test
            outcome.append(repr(exc))
        done.set()

    ms = AsyncMailstrom(
        config(dns_server, mx.port), store=store, worker="process", on_result=on_result
    )
    await ms.start()
    pid = ms.worker.pid  # type: ignore[union-attr]
    assert pid is not None
    await ms.send_email(hello("first@example.org"))
    assert await loop.run_in_executor(None, done.wait, 90)
    assert outcome == ["returned"]
    assert _gone(pid)
    assert not ms.worker_status.running
    store.close()
    waiting = [r for r in caplog.records if "on_result has taken nothing" in r.getMessage()]
    assert waiting and waiting[0].levelno == logging.ERROR


def test_a_stop_cancelled_on_a_loop_then_closed_does_not_refuse_every_later_start(
    tmp_path: Path, dns_server: LoopbackDNS
) -> None:
    # stop() of a worker process cancelled (a timeout around it) on a loop then closed
    # with loop.close(): the stop went on in its thread and ended, but asyncio drops
    # the outcome of a thread whose loop is closed, and its future stayed pending: every
    # later start(), on any loop, said the worker "has not ended yet", for good.
    store = SQLiteStore(tmp_path / "q.db")
    ms = AsyncMailstrom(config(dns_server, 25), store=store, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)

    async def cancelled_stop() -> None:
        stopping = asyncio.create_task(ms.stop())
        await asyncio.sleep(0)  # it is on its way: its thread asks the child to stop
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(ms.start())
        loop.run_until_complete(cancelled_stop())
    finally:
        loop.close()
    try:
        assert worker.wait_stopped(30)

        def starts() -> bool:
            try:
                asyncio.run(ms.start())
            except WorkerError as exc:
                if "has not ended yet" not in str(exc):
                    raise
                return False  # (the stop's thread returns just after the child ended)
            return True

        assert _wait_until(starts, 10)
        assert ms.worker_status.running
    finally:
        asyncio.run(ms.stop())
        store.close()


def test_a_stop_after_one_cancelled_on_a_loop_then_closed_waits_for_the_worker_process(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # stop() of a worker process still draining a delivery, cancelled (a timeout around
    # it) on a loop then closed with loop.close(): the next stop(), on another loop,
    # followed the first one's thread through its loop, closed, and so returned at once
    # with the child still delivering, and closed the store under the thread stopping it.
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)

    async def send_then_cancel_a_stop() -> None:
        await ms.start()
        await ms.send_email(hello("bob@example.org"))
        assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
        stopping = asyncio.create_task(ms.stop(timeout=30))
        await asyncio.sleep(0)  # it is on its way: its thread asks the child to stop
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(send_then_cancel_a_stop())
    finally:
        loop.close()
    asyncio.run(asyncio.wait_for(ms.stop(), 60))  # (only a hang outlasts it)
    assert worker.wait_stopped(0)
    assert _recorded_once(path)


def _strand_a_stop(ms: AsyncMailstrom, slow: Any) -> None:
    """Start ``ms`` on a loop of its own, have one message reach ``slow``, and leave a
    stop() waiting for the worker process to drain on that loop, stopped and closed."""
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, daemon=True)
    runner.start()
    try:
        asyncio.run_coroutine_threadsafe(ms.start(), other).result(timeout=60)
        asyncio.run(ms.send_email(hello("bob@example.org")))
        assert _wait_until(lambda: len(slow.received) == 1, 10)
        asyncio.run_coroutine_threadsafe(ms.stop(timeout=30), other)
        # Set in the step that hands the child's stop to a thread, before the loop stops.
        assert _wait_until(lambda: ms._stopping_now, 10)
    finally:
        other.call_soon_threadsafe(other.stop)
        runner.join()
        other.close()


def test_a_start_after_a_stop_left_on_a_closed_loop_waits_for_that_stop(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # A loop run by a thread of its own, stopped and closed while a stop() on it waited
    # for the worker process to drain (a shutdown that gave up waiting for it): its turn
    # at the lock start() and stop() share was handed on at once, the stop going on in
    # its thread. A start() on another loop then said "already started" of the child
    # that stop was ending, and nothing delivered once it had ended.
    slow = _slow_mx(smtp_server, dns_server)
    store = SQLiteStore(tmp_path / "q.db")
    ms = AsyncMailstrom(config(dns_server, slow.port), store=store, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)
    _strand_a_stop(ms, slow)

    async def start_again() -> bool:
        async with asyncio.timeout(60):  # (only a hang outlasts it)
            await ms.start()
        return ms.worker_status.running

    try:
        assert asyncio.run(start_again())
        assert _recorded_once(tmp_path / "q.db")
    finally:
        asyncio.run(ms.stop())
        store.close()
    gc.collect()  # the stop() left on the closed loop ends here, not in a later test


async def test_a_stop_after_a_cancelled_one_holds_the_worker_process_to_its_own_timeout(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # stop(timeout=60) cancelled (a timeout around it) with a delivery in flight, then
    # stop(timeout=0): the second one only waited for the first one's stop, the child
    # draining for as long as the first had asked (the delivery ran to its end, 8 s
    # here, up to 60 s and the grace), where a worker task is told the shorter timeout.
    slow = _slow_mx(smtp_server, dns_server)
    slow.data_delay = 8.0
    timeouts = dataclasses.replace(test_worker_modes.FAST, data_end=30)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(
        config(dns_server, slow.port, timeouts=timeouts), store=path, worker="process"
    )
    await ms.start()
    await ms.send_email(hello("bob@example.org"))
    assert await asyncio.to_thread(_wait_until, lambda: len(slow.received) == 1, 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await ms.stop(timeout=60)
    await ms.stop(timeout=0)
    store = SQLiteStore(path)
    try:
        [message] = store.recent()
    finally:
        store.close()
    # Given back undelivered at once, as stop(timeout=0) asks, not waited for.
    assert message.recipients[0].state is not RecipientState.DELIVERED


def test_a_stop_cancelled_on_a_loop_then_closed_closes_the_store_once_the_worker_ended(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # A cancelled stop() leaves the worker process stopping and the store the facade
    # opened to be closed once it has ended: by a callback on the loop of the stop's
    # thread, which never ran once that loop was closed (loop.close()). The store (its
    # connection, its wake-up watch) stayed open until the process ended.
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_a_stop_timed_out_while_delivering(ms, slow))
    finally:
        loop.close()
    assert worker.wait_stopped(30)
    assert _wait_until(lambda: _refuses_as_closed(ms.store), 10)
    assert _recorded_once(path)


async def test_a_stop_cancelled_behind_a_cancelled_start_closes_the_store_once_it_ended(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An `async with` given up as its worker process came up: the start() is cancelled,
    # then the stop() it does on the way out, which waits for that start, is cancelled
    # too (a second timeout, a shutdown). The store the facade opened was to be closed
    # once the process the start left had ended; only a stop() of its own was watched
    # so, and the store stayed open until this process ended.
    gate = _gated_children(tmp_path, monkeypatch)
    ms = AsyncMailstrom(config(dns_server, mx.port), store=tmp_path / "q.db", worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)
    try:
        for step in (ms.start(), ms.stop()):
            task = asyncio.create_task(step)
            assert await asyncio.to_thread(_wait_until, lambda: worker.pid is not None, 10)
            await asyncio.sleep(0.1)  # (it waits for the child, or for that start)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        gate.touch()
    assert await asyncio.to_thread(worker.wait_stopped, 30)
    assert await asyncio.to_thread(_wait_until, lambda: _refuses_as_closed(ms.store), 10)


def test_a_stop_cancelled_on_a_loop_left_idle_does_not_hold_back_a_start_on_another(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # stop() of a worker process cancelled (a timeout around it) on a loop that is then
    # left idle, not closed (run_until_complete per step): its thread ended, but asyncio
    # tells a future of it so only as that loop runs again. Until then every start() on
    # another loop said the worker "has not ended yet".
    slow = _slow_mx(smtp_server, dns_server)
    store = SQLiteStore(tmp_path / "q.db")
    ms = AsyncMailstrom(config(dns_server, slow.port), store=store, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_a_stop_timed_out_while_delivering(ms, slow))
        assert worker.wait_stopped(30)

        def starts() -> bool:
            try:
                asyncio.run(ms.start())
            except WorkerError as exc:
                if "has not ended yet" not in str(exc):
                    raise
                return False  # (the stop's thread returns just after the child ended)
            return True

        assert _wait_until(starts, 10)
        assert ms.worker_status.running
        asyncio.run(ms.stop())
    finally:
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        store.close()


def test_a_stop_cancelled_as_a_start_left_on_a_closed_loop_ends_closes_the_store_off_the_loop(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() cancelled as its worker process came up, on a loop then closed: the start
    # went on in its thread. A stop() on another loop waits for that thread, and is
    # cancelled once the thread has ended but before its loop heard so: the start's
    # future, its loop closed, was never done, and the store the facade opened was
    # closed at once, on the event loop (held for a SQLite checkpoint and fsync).
    gate = _gated_children(tmp_path, monkeypatch)
    ms = AsyncMailstrom(config(dns_server, mx.port), store=tmp_path / "q.db", worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)
    closed_on: list[threading.Thread] = []
    close = ms.store.close

    def recording_close() -> None:
        closed_on.append(threading.current_thread())
        close()

    ms.store.close = recording_close  # type: ignore[method-assign]

    async def cancelled_start() -> None:
        task = asyncio.create_task(ms.start())
        assert await asyncio.to_thread(_wait_until, lambda: worker.pid is not None, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def cancelled_stop() -> threading.Thread:
        task = asyncio.create_task(ms.stop())
        await asyncio.sleep(0.1)  # it waits for the start's thread
        gate.touch()
        # The loop held (a blocking wait) until that thread has ended: its end is told
        # to the stop() in a callback queued on this loop, which has not run yet.
        assert _wait_until(lambda: over(ms._ending), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return threading.current_thread()

    loop = asyncio.new_event_loop()
    try:
        try:
            loop.run_until_complete(cancelled_start())
        finally:
            loop.close()
        loop_thread = asyncio.run(cancelled_stop())
    finally:
        gate.touch()
    assert worker.wait_stopped(30)
    assert _wait_until(lambda: len(closed_on) == 1, 10)
    assert closed_on[0] is not loop_thread


def test_a_start_after_a_stop_left_on_a_closed_loop_refuses_as_after_any_stop(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # A stop() on a loop stopped and closed as it waited for the worker process to
    # drain: once its thread had ended, a start() on another loop found the store the
    # facade opened still open and started a worker; the stranded stop()'s coroutine,
    # collected later, closed the store under that worker ("the store is closed").
    # The stop ends as one awaited to its end does: the store closed, start() refuses.
    slow = _slow_mx(smtp_server, dns_server)
    path = tmp_path / "q.db"
    ms = AsyncMailstrom(config(dns_server, slow.port), store=path, worker="process")
    worker = ms.worker
    assert isinstance(worker, WorkerProcess)
    _strand_a_stop(ms, slow)

    async def start_again() -> None:
        async with asyncio.timeout(60):  # (only a hang outlasts it)
            await ms.start()

    try:
        with pytest.raises(WorkerError, match="closed the store"):
            asyncio.run(start_again())
        gc.collect()  # the stop() left on the closed loop ends here
        assert worker.wait_stopped(0)
        assert _refuses_as_closed(ms.store)
        assert _recorded_once(path)
    finally:
        asyncio.run(ms.stop())
