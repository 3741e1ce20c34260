"""SQLite's cross-process wake-ups (``stores/wakeup.py``) between real processes: a burst
of enqueues costs the listener one callback per burst, never a lost last wake-up."""

from __future__ import annotations

import errno
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom.stores.wakeup import WakeupDirectory
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import Results, loopback_config

SEND = """
import sys
from mailstrom.stores.wakeup import WakeupDirectory
wakeups = WakeupDirectory(sys.argv[1])
for _ in range(int(sys.argv[2])):
    wakeups.notify()
wakeups.close()
wakeups.notify()  # after close: nothing is sent, nothing raises
"""


def _send(database: Path, count: int) -> None:
    subprocess.run([sys.executable, "-c", SEND, str(database), str(count)], check=True, timeout=60)


def test_a_burst_of_wake_ups_is_answered_together_and_the_last_is_never_lost(
    tmp_path: Path,
) -> None:
    """The first wake-up's callback is held until the burst is sent: what came meanwhile
    (as much as the socket's queue holds; the rest is dropped, harmless) is answered by
    one callback, and nothing after it. A wake-up of our own, sent before the callback is
    let go, makes sure something is left to answer (the first callback may have come
    after the whole burst was queued, and taken it all)."""
    database = tmp_path / "q.db"
    database.touch()
    calls = 0
    called = threading.Condition()
    first_done = threading.Event()

    def callback() -> None:
        nonlocal calls
        with called:
            calls += 1
            called.notify_all()
        assert first_done.wait(10)  # the first call waits for the burst to be sent

    def answered(count: int) -> bool:
        with called:
            return called.wait_for(lambda: calls >= count, 10)

    stop = WakeupDirectory(str(database)).listen(callback)
    sender = WakeupDirectory(str(database))
    try:
        _send(database, 2000)
        assert answered(1)
        sender.notify()  # queued behind the burst (or dropped behind a queue it filled)
        first_done.set()
        # Answered together: one callback for all that came during the first.
        assert answered(2)
        # A wake-up after a quiet spell is answered at once, however many came before;
        # and the burst left nothing to answer besides (the second call took all of it,
        # the last datagram included, as nothing else was sent).
        _send(database, 1)
        assert answered(3)
        with called:
            assert calls == 3
    finally:
        first_done.set()
        sender.close()
        stop()


def test_one_sending_socket_serves_every_wake_up(tmp_path: Path) -> None:
    database = tmp_path / "q.db"
    database.touch()
    listener = WakeupDirectory(str(database))
    woken = threading.Event()
    stop = listener.listen(woken.set)
    sender = WakeupDirectory(str(database))
    try:
        sender.notify()
        first = sender._sender
        assert first is not None
        for _ in range(50):
            sender.notify()
        assert sender._sender is first
        assert woken.wait(10)
        sender.close()
        assert first.fileno() == -1  # closed with the directory
        sender.notify()  # after close: nothing sent, nothing raised, no new socket
        assert sender._sender is None
    finally:
        stop()


def test_a_directory_dropped_without_close_closes_its_socket(tmp_path: Path) -> None:
    """A store the application forgets to close leaves no socket for the collector to
    complain about (pytest runs with warnings as errors: a ResourceWarning fails this)."""
    database = tmp_path / "q.db"
    database.touch()
    listener = WakeupDirectory(str(database))
    stop = listener.listen(lambda: None)
    try:
        sender = WakeupDirectory(str(database))
        sender.notify()
        sock = sender._sender
        assert sock is not None
        del sender
        gc.collect()
        assert sock.fileno() == -1
    finally:
        stop()


def test_a_wake_up_without_a_socket_to_send_from_does_not_fail_the_enqueue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify() runs after the enqueue committed: an error from it would make a caller
    that retries queue the message twice. Out of descriptors, it sends nothing."""
    from mailstrom.stores import SQLiteStore, wakeup
    from tests.contract.support import NOW, message

    store = SQLiteStore(tmp_path / "queue.db")
    try:
        listener = WakeupDirectory(str(tmp_path / "queue.db"))
        directory = Path(listener.path)
        directory.mkdir(exist_ok=True)
        (directory / "999999-other.sock").touch()  # another process's, to be woken

        def no_socket(*args: object, **kwargs: object) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(wakeup.socket, "socket", no_socket)
        mid = store.enqueue(message("a@example.org"), now=NOW)
        monkeypatch.undo()
        assert store.status(mid).recipients[0].address == "a@example.org"
        assert len(store.recent(limit=10)) == 1
    finally:
        store.close()


def test_a_store_wakes_the_watcher_of_another_store_object_in_its_process(
    tmp_path: Path,
) -> None:
    """Two store objects on one file in one process (a facade's worker thread, and code
    that opened the store again to queue): each is the other's listener. The wake-ups
    skipped every socket named with this process's id, so the worker waited for its next
    poll (5 s by default); its own store's watchers still get one callback, not two."""
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW, message

    worker_store = SQLiteStore(tmp_path / "queue.db")
    sender = SQLiteStore(tmp_path / "queue.db")
    calls: list[str] = []
    woken = threading.Event()

    def woke(who: str) -> None:
        calls.append(who)
        woken.set()

    unwatch = worker_store.watch(lambda: woke("worker"))
    try:
        sender.enqueue(message("a@example.org"), now=NOW)
        assert woken.wait(5), "the other store's watcher was never woken"
        woken.clear()
        worker_store.enqueue(message("b@example.org"), now=NOW)
        assert woken.wait(5)
        time.sleep(0.1)  # a second callback, if its own socket were sent one too
        assert calls == ["worker", "worker"]
    finally:
        unwatch()
        sender.close()
        worker_store.close()


LISTEN_AS = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
print("ready", flush=True)
sock.settimeout(10)
try:
    sock.recv(64)
    print("woken", flush=True)
except TimeoutError:
    print("never woken", flush=True)
"""


def test_a_listener_whose_pid_is_ours_in_another_pid_namespace_is_woken(
    tmp_path: Path,
) -> None:
    """A worker in a container of its own and the application in another, on one
    volume: both are often pid 1 (or 7...). The worker's socket, named with its pid, was
    taken for the sender's own and never sent a wake-up. Another process here binds the
    name such a worker would."""
    database = tmp_path / "q.db"
    database.touch()
    sender = WakeupDirectory(str(database))
    directory = Path(sender.path)
    directory.mkdir()
    name = directory / f"{os.getpid()}-0badcafe.sock"
    with subprocess.Popen(
        [sys.executable, "-c", LISTEN_AS, str(name)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            sender.notify()
            assert child.stdout.readline().strip() == "woken"
        finally:
            sender.close()
            child.kill()


def test_a_worker_starts_and_polls_when_no_wake_up_thread_can_be_started(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
) -> None:
    """The thread that hears other processes' wake-ups could not be started (a
    container's pids.max reached: "can't start new thread"): the RuntimeError failed the
    worker's start (WorkerError), where a socket that cannot be made is a logged fallback
    to polling. The worker polls and delivers, and no socket is left behind unheard."""
    from mailstrom import Email, Mailstrom
    from mailstrom.status import RecipientState

    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    start = threading.Thread.start

    def no_wake_thread(thread: threading.Thread) -> None:
        if thread.name == "mailstrom-sqlite-wake":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_wake_thread)
    database = tmp_path / "queue.db"
    results = Results()
    config = loopback_config(dns_server, mx.port, poll_interval=0.2)
    with Mailstrom(config, store=database, worker="thread", on_result=results) as ms:
        ms.send_email(Email(from_="a@sender.test", to=["bob@example.org"], subject="x", text="y"))
        [result] = results.wait_count(1)
        assert result.state is RecipientState.DELIVERED
        assert not list(Path(f"{database}-wake").glob("*.sock"))


def test_a_store_opened_through_a_symlink_wakes_one_opened_by_the_file_s_own_name(
    tmp_path: Path,
) -> None:
    """One database, named two ways: its file, and a symlink to it (a deployment's
    ``current/queue.db`` linking to a shared one). SQLite resolves the link and works on
    the one file (its -wal and -shm beside the target); the wake-up directory was named
    after the name given, so the worker's store listened in one directory and the
    application's enqueues were sent to the other, and every message waited for the
    worker's next poll. A holder's lock file, likewise, was where no other worker looked."""
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW, message

    (tmp_path / "shared").mkdir()
    (tmp_path / "release").mkdir()
    real = tmp_path / "shared" / "queue.db"
    link = tmp_path / "release" / "queue.db"
    worker_store = SQLiteStore(real)
    link.symlink_to(real)
    sender = SQLiteStore(link)
    woken = threading.Event()
    unwatch = worker_store.watch(woken.set)
    try:
        sender.enqueue(message("a@example.org"), now=NOW)
        assert woken.wait(5), "the worker's store, opened by the file's name, was not woken"
        lease = sender.lease(now=NOW, limit=10, lease_for=timedelta(minutes=5), holder="a" * 16)
        assert lease is not None
        assert [info.holder for info in worker_store.live_holders()] == ["a" * 16]
    finally:
        unwatch()
        sender.close()
        worker_store.close()


def test_a_listener_bound_within_the_tick_of_the_last_listing_is_woken(tmp_path: Path) -> None:
    """A sender lists the directory once per change of its modification time. Where
    that time has a coarse clock (a jiffy, 1 to 10 ms, on Linux before 6.13; a second on
    ext3), a socket bound in the same tick as the listing leaves the time as it was: the
    sender kept the listing without it, and that listener was never woken (a worker
    binds its work and its cancel sockets back to back as it starts, while the
    application enqueues). The tick is made here as such a clock makes it: the time put
    back to what the listing saw."""
    database = tmp_path / "q.db"
    database.touch()
    sender = WakeupDirectory(str(database))
    directory = Path(sender.path)
    first = threading.Event()
    stop_first = WakeupDirectory(str(database)).listen(first.set)
    second = threading.Event()
    stop_second: Any = None
    try:
        sender.notify()
        assert first.wait(5)
        listed = os.stat(directory)
        stop_second = WakeupDirectory(str(database)).listen(second.set)
        os.utime(directory, ns=(listed.st_atime_ns, listed.st_mtime_ns))
        sender.notify()
        assert second.wait(5), "a socket bound in the listing's tick was never woken"
    finally:
        if stop_second is not None:
            stop_second()
        stop_first()
        sender.close()


def test_a_forked_process_that_stops_a_watch_of_its_parent_leaves_the_parent_listening(
    tmp_path: Path,
) -> None:
    """A process forked from one that watches the store (a facade's wait(), whose watch
    the fork's stop() ends) has the function that stops the watch, and called it: it
    removed the parent's socket, which nobody could reach any more, and the parent heard
    of no other process's mail. As a holder's lock file, the socket is its maker's."""
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW, message

    store = SQLiteStore(tmp_path / "queue.db")
    woken = threading.Event()
    unwatch = store.watch(woken.set)
    sender = None
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the forked process
            try:
                unwatch()
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert list(Path(f"{tmp_path / 'queue.db'}-wake").glob("*.sock")), "socket removed"
        woken.wait(0.5)  # a wake-up the fork may have sent on its way out
        woken.clear()
        sender = SQLiteStore(tmp_path / "queue.db")
        sender.enqueue(message("a@example.org"), now=NOW)
        assert woken.wait(5), "the parent's socket was removed by the forked process"
    finally:
        unwatch()
        if sender is not None:
            sender.close()
        store.close()
