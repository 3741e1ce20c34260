"""``stop()`` called from a signal handler (a SIGTERM handler of the application's, the
usual way a service shuts down): the handler runs on the main thread, between two of its
bytecodes, wherever that thread was. Each scenario runs in a program of its own, bounded,
so that a deadlock fails the test instead of hanging the run; the worker delivers to a
loopback SMTP server, its queue is a SQLite file.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import config

mx = test_worker_modes.mx
"""A server that answers everything (the same fixture: pytest finds it by this name)."""

_PROGRAM = """\
import faulthandler, os, pickle, signal, sys, threading, time
faulthandler.dump_traceback_later(20, exit=True)  # a deadlock: where each thread waits
from mailstrom import Email, Mailstrom
from mailstrom.client.process import WorkerProcess

cfg = pickle.loads(open(sys.argv[1], "rb").read())
entered = threading.Event()

def on_result(result):
    entered.set()
    time.sleep(1.0)  # a slow callback: the main thread's stop() waits for it

ms = Mailstrom(cfg, store=sys.argv[2], on_result=on_result, worker=sys.argv[3])
signal.signal(signal.SIGUSR1, lambda *_: (ms.stop(), print("handler stopped", flush=True)))
ms.start()
"""


def _run(tmp_path: Path, cfg: Any, mode: str, body: str) -> str:
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    program = _PROGRAM + textwrap.dedent(body)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", program, str(path), str(tmp_path / "q.db"), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - faulthandler ends it
        pytest.fail(f"deadlocked: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_stop_from_a_signal_handler_during_stop_returns(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """A SIGTERM handler calling stop() while the main thread is in stop() already (the
    ``with`` block's, draining): the handler waited for the lock that the stop() it
    interrupted holds, on the same thread, for ever. It now leaves the stop to the one
    under way, which then ends as it would have."""
    out = _run(
        tmp_path,
        config(dns_server, mx.port),
        mode,
        """
        ms.send_email(Email(from_="a@sender.test", to=["b@example.org"], subject="s", text="t"))
        assert entered.wait(30)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        ms.stop()
        print("stopped", ms.worker_status.running)
        """,
    )
    assert out == "handler stopped\nstopped False\n"


def test_stop_from_a_signal_handler_while_a_wake_writes_to_the_child(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """send_email() wakes a worker process with a frame written under a lock; a signal
    handler's stop() that came while the main thread held it (right after its write)
    waited for it to send "stop", for ever."""
    out = _run(
        tmp_path,
        config(dns_server, mx.port),
        "process",
        """
        worker = ms.worker
        assert isinstance(worker, WorkerProcess)
        with worker._write_lock:  # where the main thread is as wake() writes
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)  # the handler runs here, at once
        print("stopped", ms.worker_status.running)
        """,
    )
    assert out == "handler stopped\nstopped False\n"


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_stop_from_a_signal_handler_during_start_stops_once_started(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """A SIGTERM handler calling stop() while the main thread waits in start() for its
    worker: it waited for the lock that start() holds, for ever. The start() goes on
    and stops the worker as it ends."""
    out = _run(
        tmp_path,
        config(dns_server, mx.port),
        mode,
        """
        from mailstrom.stores import SQLiteStore
        ms.stop()
        store = SQLiteStore(sys.argv[2])
        ms = Mailstrom(cfg, store=store, worker=sys.argv[3])
        original = ms._start

        def start(timeout):
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs at once, in start()
            original(timeout)

        ms._start = start
        ms.start()
        print("started", ms.worker_status.running)
        store.close()
        """,
    )
    assert out == "handler stopped\nstarted False\n"


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_stop_from_a_signal_handler_during_send_email_returns(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, mode: str
) -> None:
    """A SIGTERM handler calling stop() while the main thread is in send_email(), in the
    store's write (where a sending program spends its time): closing the store the
    facade opened waited for the write lock that the interrupted write holds, on the
    same thread, for ever. The write now ends, the store closes behind it, and the next
    send_email() hears that it is closed."""
    out = _run(
        tmp_path,
        config(dns_server, mx.port),
        mode,
        """
        from mailstrom.errors import StoreError
        store = ms.store
        begin = store._begin_immediate

        def begin_interrupted(conn, deadline):  # under the write lock of send_email
            if threading.current_thread() is threading.main_thread():  # not the worker's
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.01)  # the handler runs here, at once
            begin(conn, deadline)

        store._begin_immediate = begin_interrupted
        message = Email(from_="a@sender.test", to=["b@example.org"], subject="s", text="t")
        message_id = ms.send_email(message)
        print("queued", len(message_id) > 0)
        try:
            ms.send_email(message)
        except StoreError as exc:
            print("then", exc)
        """,
    )
    assert out == "handler stopped\nqueued True\nthen the store is closed\n"


def test_stop_from_a_signal_handler_during_send_email_while_the_worker_waits_to_write(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The same while the worker thread waits for the write lock that the interrupted
    send_email() holds (a lease, a record): stop() waited for that thread to end, which
    it could not before the handler returned, until stop()'s bound. The worker now ends
    once the write is done, and closes the store behind it."""
    out = _run(
        tmp_path,
        config(dns_server, mx.port),
        "thread",
        """
        from mailstrom.errors import StoreError
        store = ms.store
        begin = store._begin_immediate
        worker_thread = ms._worker_thread

        def waits_to_write():
            frame = sys._current_frames().get(worker_thread.ident)
            while frame is not None and frame.f_code.co_name != "_exclusive":
                frame = frame.f_back
            return frame is not None

        def begin_interrupted(conn, deadline):  # under the write lock of send_email
            if threading.current_thread() is threading.main_thread():
                ms.worker.wake()  # it leases, and waits for this write to end
                until = time.monotonic() + 10
                while not waits_to_write() and time.monotonic() < until:
                    time.sleep(0.005)
                print("worker waits", waits_to_write(), flush=True)
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.01)  # the handler runs here, at once
            begin(conn, deadline)

        store._begin_immediate = begin_interrupted
        message = Email(from_="a@sender.test", to=["b@example.org"], subject="s", text="t")
        message_id = ms.send_email(message)
        print("queued", len(message_id) > 0)
        try:
            ms.send_email(message)
        except StoreError as exc:
            print("then", exc)
        worker_thread.join(10)
        print("worker ended", not worker_thread.is_alive(), ms.worker_status.running)
        """,
    )
    assert out == (
        "worker waits True\nhandler stopped\nqueued True\nthen the store is closed\n"
        "worker ended True False\n"
    )


def test_stop_from_a_signal_handler_inside_send_emails_transaction_leaves_the_child_to_end(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The handler came once send_email's transaction had begun, holding the database's
    write lock, while the worker process had a delivery in flight: asked to stop, the
    child gives back what it leased, and so waits for that lock, which the interrupted
    write cannot let go of before the handler returns. stop() waited for the child its
    whole bound (stop(1) took 13 s), then killed it. It now returns at once; the child
    ends once the write is done, and a later stop() waits for that."""
    server = smtp_server(stall_on="dot")  # the first message stays in flight
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    out = _run(
        tmp_path,
        config(dns_server, server.port),
        "process",
        """
        from mailstrom.errors import StoreError
        message = Email(from_="a@sender.test", to=["b@example.org"], subject="s", text="t")
        ms.send_email(message)
        until = time.monotonic() + 10
        while ms.worker_status.in_flight == 0 and time.monotonic() < until:
            time.sleep(0.05)
        print("in flight", ms.worker_status.in_flight)
        import logging

        class Killed(logging.Handler):
            def emit(self, record):
                if "did not stop" in record.getMessage():
                    print("killed", flush=True)

        logging.getLogger("mailstrom.worker").addHandler(Killed())
        # A short drain (the old wait, its bound and a kill, ends before faulthandler).
        signal.signal(signal.SIGUSR1, lambda *_: (ms.stop(1), print("handler stopped")))
        store = ms.store
        begin = store._begin_immediate

        def begin_interrupted(conn, deadline):
            begin(conn, deadline)  # the write lock is this transaction's from here
            if threading.current_thread() is threading.main_thread():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.01)  # the handler runs here, at once

        store._begin_immediate = begin_interrupted
        message_id = ms.send_email(message)
        print("queued", len(message_id) > 0)
        try:
            ms.send_email(message)
        except StoreError as exc:
            print("then", exc)
        ms.stop(0)
        print("stopped", ms.worker_status.running, ms.worker.pid)
        """,
    )
    assert out == (
        "in flight 1\nhandler stopped\nqueued True\nthen the store is closed\nstopped False None\n"
    )
