"""A facade watches its worker process (client/process.py, runtime/child.py): a restarted
child that hangs at start, or one that freezes later, is killed and started again; one
whose parent died lets its deliveries in flight finish before it exits.

Every child is a real one, hung by a ``sitecustomize`` (see ``stall_child``) or frozen by
SIGSTOP, and delivers to a real loopback SMTP server.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Mailstrom, RecipientState, Timeouts
from mailstrom.client import process
from mailstrom.client.process import WorkerProcess
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration import test_worker_modes, test_worker_process_lifecycle
from tests.integration.test_worker_modes import ROOT, _gone, _wait_until, config, hello
from tests.integration.test_worker_restart import _first_status
from tests.support.delivery import Results

mx = test_worker_modes.mx
"""A server that answers everything (the same fixture: pytest finds it by this name)."""
stall_child = test_worker_process_lifecycle.stall_child
"""``stall_child(seconds)``: children started from now on hang that long at start."""

PATIENT = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=60)
"""The child waits for a slow server's final reply well past the test's own waits."""


def _worker(ms: Mailstrom) -> WorkerProcess:
    assert isinstance(ms.worker, WorkerProcess)
    return ms.worker


@pytest.fixture
def slow_mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    """A server that takes 3 s to answer the final dot."""
    server = smtp_server()
    server.data_delay = 3.0
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


# --- a restarted child that hangs at start -------------------------------------------------


def test_a_restarted_worker_process_that_hangs_at_start_is_killed_and_started_again(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    stall_child: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child started again after a death hung before it answered (its store's open
    blocked on a lock, a dead NFS mount; here a stuck import): nothing bounded it, no
    restart came, and worker_status said "started again, not answering yet" for ever.
    It has as long to answer as start() gave the first child."""
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    ms.start(timeout=10)  # a loaded machine takes seconds to start one
    try:
        old = _worker(ms).pid
        assert old is not None
        stall_child(60)  # the next child hangs (killed long before it would go on)
        os.kill(old, signal.SIGKILL)

        hung = _first_status(ms, lambda s: "no answer within" in (s.error or ""), 30)
        assert hung.error == (
            "worker process killed: no answer within 10 s of its start; starting it again in 2 s"
        )
        assert not hung.running and hung.dead
        stall_child(0)  # the one after comes up
        back = _first_status(ms, lambda s: s.running, 30)
        assert back.restarts == 2 and back.error is None
        mid = ms.send_email(hello("after@example.org"))
        assert ms.wait(mid, timeout=30).state is RecipientState.DELIVERED
    finally:
        ms.stop()
        store.close()
    killing = [r for r in caplog.records if "killing it" in r.getMessage()]
    assert killing and killing[0].levelno == logging.ERROR
    assert "no answer within 10 s of its start" in killing[0].getMessage()


# --- a child that freezes ------------------------------------------------------------------


def test_a_frozen_worker_process_is_killed_and_started_again(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child whose loop stopped answering (SIGSTOP here; a callback stuck on its loop
    alike) went unnoticed: worker_status said running while nothing was delivered."""
    monkeypatch.setattr(process, "FROZEN_AFTER", 1.5)
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, worker="process") as ms:
        old = _worker(ms).pid
        assert old is not None
        os.kill(old, signal.SIGSTOP)

        gap = _first_status(ms, lambda s: not s.running, 20)
        assert gap.error == (
            "worker process killed: no answer to its pings for 1.5 s (frozen: stopped, "
            "or its event loop blocked); starting it again in 1 s"
        )
        assert _wait_until(lambda: _gone(old), 10)
        mid = ms.send_email(hello("after@example.org"))
        back = _first_status(ms, lambda s: s.running, 30)
        assert back.restarts == 1 and back.error is None
        assert ms.wait(mid, timeout=30).state is RecipientState.DELIVERED
    store.close()
    killing = [r for r in caplog.records if "killing it" in r.getMessage()]
    assert killing and killing[0].levelno == logging.ERROR


def test_a_worker_process_with_slow_deliveries_and_a_slow_log_handler_is_not_frozen(
    slow_mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its loop answers while a delivery waits 3 s for the server, and while this process
    takes 3 s over each of its log records (the child's answers wait in the pipe behind
    them): twice the time a frozen child gets, and not killed."""
    monkeypatch.setattr(process, "FROZEN_AFTER", 1.5)

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(3)  # an application's handler that blocks (a remote log sink)

    attempts = logging.getLogger("mailstrom.attempts")
    handler, level = Slow(), attempts.level
    attempts.addHandler(handler)
    attempts.setLevel(logging.INFO)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, slow_mx.port, timeouts=PATIENT)
    try:
        with Mailstrom(cfg, store=store, on_result=results, worker="process") as ms:
            pid = _worker(ms).pid
            ms.send_email(hello("one@example.org"))
            ms.send_email(hello("two@example.org", 1))
            [first, second] = results.wait_count(2, timeout=40)
            assert {first.state, second.state} == {RecipientState.DELIVERED}
            status = ms.worker_status
            assert status.running and status.restarts == 0 and status.error is None
            assert _worker(ms).pid == pid
    finally:
        attempts.removeHandler(handler)
        attempts.setLevel(level)
        store.close()


def test_a_worker_process_waiting_for_a_write_lock_held_elsewhere_is_not_frozen(
    slow_mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program held the database's write lock for longer than FROZEN_AFTER while
    the child waited to record a result: its SQLite calls run on its loop, which answered
    no ping meanwhile, and the child was killed as frozen (and its delivery recorded by
    nobody, to be sent again). A store that waits as it was told to is not stuck: the
    child goes on by itself once the lock is free."""
    monkeypatch.setattr(process, "FROZEN_AFTER", 1.5)
    path = tmp_path / "q.db"
    results = Results()
    store = SQLiteStore(path, busy_timeout=60)
    cfg = config(dns_server, slow_mx.port, timeouts=PATIENT)
    try:
        with Mailstrom(cfg, store=store, on_result=results, worker="process") as ms:
            pid = _worker(ms).pid
            mid = ms.send_email(hello("one@example.org"))
            slow_mx.wait_for_received(1, timeout=15)  # the final reply comes in 3 s
            holder = sqlite3.connect(path, isolation_level=None)
            try:
                holder.execute("BEGIN IMMEDIATE")
                # The reply comes and the child waits for the lock, 4 s past the 1.5 s.
                time.sleep(7)  # the lock held: nothing to wait on but the time
                assert results.all == []  # its record is waiting for the lock
                holder.execute("ROLLBACK")
            finally:
                holder.close()
            [result] = results.wait_count(1, timeout=30)
            assert result.state is RecipientState.DELIVERED
            status = ms.worker_status
            assert status.running and status.restarts == 0 and status.error is None
            assert _worker(ms).pid == pid
            assert ms.query_status(mid).recipients[0].attempts == 1
    finally:
        store.close()
    assert len(slow_mx.messages) == 1


# --- a child whose parent died ---------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import pickle, sys
    from mailstrom import Email, Mailstrom
    from mailstrom.stores import SQLiteStore

    with open(sys.argv[2], "rb") as f:
        config = pickle.load(f)
    ms = Mailstrom(config, store=SQLiteStore(sys.argv[1]), worker="process")
    ms.start()
    mid = ms.send_email(Email(from_="app@sender.test", to=["u@example.org"], subject="Hi",
                              text="Hello"))
    print(ms.worker.pid, mid, flush=True)
    sys.stdin.readline()  # until killed
    """
)


def test_a_worker_process_whose_parent_died_lets_its_deliveries_finish(
    slow_mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The application killed while its worker process waited for a server's reply to
    the final dot: the child stopped at once (a drain of 0 s) and cut that delivery
    short, to be sent a second time once its lease expired. It drains as stop() does."""
    path = tmp_path / "q.db"
    settings = tmp_path / "config.pickle"
    settings.write_bytes(pickle.dumps(config(dns_server, slow_mx.port, timeouts=PATIENT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, str(path), str(settings)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,
    ) as parent:
        assert parent.stdout is not None
        child, mid = parent.stdout.readline().split()
        try:
            slow_mx.wait_for_received(1, timeout=15)  # its content is in: the reply waits
            parent.kill()
            parent.wait()
            assert _wait_until(lambda: _gone(int(child)), 30), "the worker outlived its drain"
        finally:
            if not _gone(int(child)):
                os.kill(int(child), signal.SIGKILL)
    store = SQLiteStore(path)
    try:
        [recipient] = store.status(mid).recipients
        assert recipient.state is RecipientState.DELIVERED, recipient
        assert recipient.attempts == 1
    finally:
        store.close()
    assert len(slow_mx.messages) == 1


# --- a child whose frames are garbled --------------------------------------------------------


def test_a_worker_process_whose_frames_are_garbled_is_killed_and_started_again(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes in the frame pipe that are no frame (here written by the child itself, as a
    C library writing to a descriptor number it no longer owns would): "garb" was read
    as the length of a 1.7 GB frame, for which 1.7 GB were allocated, and every later
    frame (results, status, pongs) went into it unseen until the child was taken for
    frozen, FROZEN_AFTER later. Such a frame is refused at its length: the child is
    killed at once, and started again."""
    monkeypatch.setattr(process, "FROZEN_AFTER", 600.0)  # not what ends it here
    trigger, garbled = tmp_path / "garble", tmp_path / "garbled"
    test_worker_process_lifecycle._in_each_child(
        tmp_path,
        monkeypatch,
        "garbling",
        f"""
        import os, threading, time
        def garble():
            while not os.path.exists({str(trigger)!r}):
                time.sleep(0.05)  # a timer: the test says when, once start() returned
            if not os.path.exists({str(garbled)!r}):  # the first child only
                open({str(garbled)!r}, "w").close()
                os.write(int(sys.orig_argv[-1]), b"garbage!")
        threading.Thread(target=garble, daemon=True).start()
        """,
    )
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port)
    with Mailstrom(cfg, store=store, worker="process", on_result=results) as ms:
        old = _worker(ms).pid
        assert old is not None
        trigger.touch()

        gap = _first_status(ms, lambda s: not s.running, 30)
        assert gap.error is not None
        assert gap.error.startswith(
            "worker process killed: its frames could not be read (a frame of 1734439522 bytes"
        )
        assert gap.error.endswith("; starting it again in 1 s")
        assert _wait_until(lambda: _gone(old), 10)
        back = _first_status(ms, lambda s: s.running, 30)
        assert back.restarts == 1 and back.error is None
        ms.send_email(hello("after@example.org"))
        results.wait_final({"after@example.org"})
        assert results.states() == {"after@example.org": RecipientState.DELIVERED}
    store.close()
    killing = [r for r in caplog.records if "can no longer be followed" in r.getMessage()]
    assert killing and killing[0].levelno == logging.ERROR


# --- a child that closes its frame stream and goes on ----------------------------------------


def test_a_worker_process_that_closes_its_frame_stream_is_killed_and_started_again(
    mx: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child whose frame pipe was closed under it (here pointed at /dev/null, as a
    library daemonizing its descriptors would) went on running unseen: its reader, at
    the end of the stream, waited for it without a bound, and only the frozen watch
    killed it, FROZEN_AFTER later, as "frozen". It has a short grace to exit, then is
    killed for what it did, and started again."""
    monkeypatch.setattr(process, "FROZEN_AFTER", 600.0)  # not what ends it here
    trigger, closed = tmp_path / "close", tmp_path / "closed"
    test_worker_process_lifecycle._in_each_child(
        tmp_path,
        monkeypatch,
        "closing",
        f"""
        import os, threading, time
        def close_frames():
            while not os.path.exists({str(trigger)!r}):
                time.sleep(0.05)  # a timer: the test says when, once start() returned
            if not os.path.exists({str(closed)!r}):  # the first child only
                open({str(closed)!r}, "w").close()
                os.dup2(os.open(os.devnull, os.O_WRONLY), int(sys.orig_argv[-1]))
        threading.Thread(target=close_frames, daemon=True).start()
        """,
    )
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, worker="process") as ms:
        old = _worker(ms).pid
        assert old is not None
        trigger.touch()

        gap = _first_status(ms, lambda s: not s.running, 30)  # catches a hang only
        assert gap.error == (
            "worker process killed: it closed its frame stream and went on running; "
            "starting it again in 1 s"
        )
        assert _wait_until(lambda: _gone(old), 10)
        back = _first_status(ms, lambda s: s.running, 30)
        assert back.restarts == 1 and back.error is None
        mid = ms.send_email(hello("after@example.org"))
        assert ms.wait(mid, timeout=30).state is RecipientState.DELIVERED
    store.close()
    killing = [r for r in caplog.records if "frame stream" in r.getMessage()]
    assert killing and killing[0].levelno == logging.ERROR
