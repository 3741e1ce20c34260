"""A program that ends without ``stop()``: returning from its main, or a SIGTERM that a
handler turns into SystemExit. The facade's worker must not be cut off in the middle of
its deliveries, the server's acceptance unrecorded (sent again by the next worker)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Mailstrom, RecipientState, Timeouts
from mailstrom.client import sync
from mailstrom.client.process import ORPHAN_DRAIN, STOP_GRACE
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import config
from tests.support.waiting import eventually

mx = test_worker_modes.mx

SLOW = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=30)

_HEAD = """\
import faulthandler, pickle, sys
faulthandler.dump_traceback_later(80, exit=True)
"""
_BODY = """\
from mailstrom import Email, Mailstrom
from mailstrom.stores import SQLiteStore

class Threaded(SQLiteStore):
    in_process = False  # hands each call to a thread, as PostgreSQLStore does

cfg = pickle.loads(open(sys.argv[1], "rb").read())
store = sys.argv[2]
if store.endswith(".threaded"):
    store = Threaded(store.removesuffix(".threaded"))
ms = Mailstrom(cfg, store=store, worker="thread")
ms.start()
for i in range(3):
    ms.send_email(Email(from_="a@sender.test", to=[f"u{i}@example.org"], text=str(i)))
print("queued", flush=True)
sys.stdin.readline()  # the test says when a final dot has reached the server
"""


def _program(body: str, *, before: str = "") -> str:
    return _HEAD + textwrap.dedent(before) + _BODY + textwrap.dedent(body)


def _run(mx: Any, dns: LoopbackDNS, tmp_path: Path, program: str, store: str) -> str:
    """Run ``program`` on ``store`` (a SQLite path, ``.threaded`` for one whose calls go
    through threads, or a PostgreSQL URL) until a final dot has reached the server, let it
    end, then deliver what is left with another worker: each message must arrive once.
    Returns the program's output."""
    mx.data_delay = 1.0  # the server holds its reply to each final dot
    cfg = config(dns, mx.port, timeouts=SLOW, lease_for=timedelta(seconds=1))
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", program, str(path), store],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "queued\n"
        assert eventually(lambda: len(mx.received) >= 1, within=30)
        child.stdin.write("\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=90)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err[-2000:]
    assert "could not be recorded" not in err, err[-2000:]
    # Another worker on the same queue, once any lease left behind has run out.
    mx.data_delay = 0.0
    with Mailstrom(cfg, store=store.removesuffix(".threaded"), worker="thread") as ms:
        delivered = RecipientState.DELIVERED
        assert eventually(lambda: all(s.state is delivered for s in ms.query()), within=30)
    return out


def _expect_each_once(mx: Any, *extra: str) -> None:
    got = sorted(m.rcpt_tos[0] for m in mx.messages)
    assert got == sorted(["u0@example.org", "u1@example.org", "u2@example.org", *extra])


@pytest.mark.parametrize(
    "ending",
    [
        "",  # returns from main
        "raise SystemExit(0)",  # a SIGTERM handler's exit, as most services have it
    ],
)
def test_exit_without_stop_records_what_the_server_took(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, ending: str
) -> None:
    """The program ends while the server holds its reply to a final dot it has taken.
    The worker thread, a daemon, was frozen there: the message stayed leased, and the
    next worker sent it a second time. It now drains at exit, as stop() would."""
    _run(mx, dns_server, tmp_path, _program(ending), str(tmp_path / "q.db"))
    _expect_each_once(mx)


def test_exit_drain_records_through_a_store_called_in_threads(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A store whose calls the worker hands to threads (as PostgreSQL's): at exit the
    executor refused them ("cannot schedule new futures after shutdown"), the drain
    recorded nothing, and the next worker sent the message again."""
    _run(mx, dns_server, tmp_path, _program(""), str(tmp_path / "q.db.threaded"))
    _expect_each_once(mx)


@pytest.mark.postgres
def test_exit_drain_records_in_postgresql(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, postgres_url: str
) -> None:
    _run(mx, dns_server, tmp_path, _program(""), postgres_url)
    _expect_each_once(mx)


def test_exit_drains_a_worker_whose_stop_was_interrupted(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The program's own stop() is cut short by a SIGTERM handler raising SystemExit:
    its worker, left to end by itself, was skipped at exit and frozen mid-delivery."""
    interrupted = """\
        import signal
        def handler(*args):
            raise SystemExit(0)
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        ms.stop(30)
    """
    _run(mx, dns_server, tmp_path, _program(interrupted), str(tmp_path / "q.db"))
    _expect_each_once(mx)


def test_exit_drains_a_worker_another_thread_is_stopping(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The program returns while a daemon thread of its own is inside stop(): that stop
    had taken the worker's thread and not yet given up on it, the exit skipped the
    worker, and it was frozen mid-delivery with the stop."""
    elsewhere = """\
        import threading, time
        threading.Thread(target=ms.stop, args=(30,), daemon=True).start()
        for _ in range(6000):  # bounds a hang only
            if ms._thread is None:  # that stop has the worker's thread
                break
            time.sleep(0.01)
    """
    _run(mx, dns_server, tmp_path, _program(elsewhere), str(tmp_path / "q.db"))
    _expect_each_once(mx)


def test_an_earlier_exit_hook_can_still_queue_mail(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """An application's atexit hook registered before mailstrom was imported runs after
    the drain (last in, first out): it found the store closed. Its mail is queued, and
    the next run delivers it."""
    hook = """\
        import atexit
        def last_words():
            ms.send_email(Email(from_="a@sender.test", to=["late@example.org"], text="bye"))
            print("late mail queued", flush=True)
        atexit.register(last_words)
    """
    out = _run(mx, dns_server, tmp_path, _program("", before=hook), str(tmp_path / "q.db"))
    assert "late mail queued" in out
    _expect_each_once(mx, "late@example.org")


class _NeverEnds(threading.Event):
    """The end of a worker thread stuck for good (in a store call that never returns):
    each wait lasts its whole bound, on a clock of the test's own (``clock[0]``)."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.clock[0] += timeout
        return False


def test_stuck_workers_share_one_bound_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three facades whose worker threads never end: each added ORPHAN_DRAIN +
    STOP_GRACE (40 s) to the program's exit, 120 s in all. They now share one bound."""
    clock = [0.0]
    monkeypatch.setattr(sync, "monotonic", lambda: clock[0])
    facades = [Mailstrom(store="memory:", worker="thread") for _ in range(3)]
    try:
        for facade in facades:
            thread = sync._WorkerThread(lambda: None)
            thread.ended = _NeverEnds(clock)
            facade._thread = facade._worker_thread = thread
        sync._stop_at_exit(facades)  # these only: not a worker another test left running
    finally:
        for facade in facades:
            facade._thread = facade._stuck = None
            facade.stop()
    assert clock[0] <= ORPHAN_DRAIN + STOP_GRACE


_AFTER_MAIN = """\
import faulthandler, threading
faulthandler.dump_traceback_later(80, exit=True)
main_returned = threading.Event()
# Registered before concurrent.futures.thread is imported, so run after its exit hook:
# set once the thread pools refuse new work.
threading._register_atexit(main_returned.set)
if {pool_exists}:  # a pool was used before (concurrent.futures.thread imported)
    import concurrent.futures
    concurrent.futures.ThreadPoolExecutor(1).submit(int).result()
from datetime import timedelta
from mailstrom import Config, Mailstrom
from mailstrom.config import EventLoop, RetentionConfig
from mailstrom.runtime import worker_retention

walked = threading.Event()
purge_batch = worker_retention.purge_batch
def watched(*args, **kwargs):
    try:
        return purge_batch(*args, **kwargs)
    finally:
        walked.set()
worker_retention.purge_batch = watched

def serve():
    main_returned.wait()
    # asyncio's loop: importing uvloop imports concurrent.futures.thread, which a
    # program that made no pool before cannot do now.
    loop = EventLoop.AUTO if {pool_exists} else EventLoop.ASYNCIO
    cfg = Config(retention=RetentionConfig(delivered=timedelta(days=7)), event_loop=loop)
    ms = Mailstrom(cfg, store="memory:", worker="thread")
    ms.start()
    for _ in range(1200):  # bounds a hang only
        if walked.wait(0.05) or not ms.worker_status.running:
            break
    print("walked", walked.is_set(), "error", ms.worker_status.error, flush=True)
    ms.stop()

threading.Thread(target=serve).start()
"""


@pytest.mark.parametrize("pool_exists", [True, False])
def test_retention_runs_in_a_program_whose_main_returned(pool_exists: bool) -> None:
    """A program whose main starts a serving thread and returns: from then on the thread
    pools refuse new work (a pool made first raised "can't register atexit after
    shutdown"), and the retention walk's hand-off to a thread killed the worker."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    program = _AFTER_MAIN.format(pool_exists=pool_exists)
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout == "walked True error None\n", done.stderr
    assert done.returncode == 0, done.stderr
