"""A store used in a process forked from the one that opened it (gunicorn ``--preload``,
``multiprocessing`` with fork, the application's own ``os.fork()``).

The fork must use none of the parent's connections and none of its locks: a copy of a lock
another thread held at the fork stays held there for good, and SQLite forbids carrying a
connection across a fork.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.errors import StoreError
from mailstrom.message import prepare
from mailstrom.readmodel.sqlite import SQLiteReadModel
from mailstrom.stores import SQLiteStore, forks
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import loopback_config
from tests.support.forking import in_fork

ROOT = Path(__file__).parents[2]


def _message(n: int = 0) -> Any:
    return prepare(
        Email(from_="app@sender.test", to=[f"u{n}@example.org"], subject=f"n{n}", text="hi")
    )


def test_a_fork_can_write_while_a_thread_of_its_parent_was_writing(tmp_path: Path) -> None:
    """A worker thread writes every few milliseconds: a fork taken meanwhile (a request
    handler starting a multiprocessing pool, say) inherited its lock held, and every
    enqueue of the fork failed with StoreLocked after busy_timeout."""
    store = SQLiteStore(tmp_path / "q.db", busy_timeout=5)
    inside, leave = threading.Event(), threading.Event()

    def writing() -> None:
        with store._write():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=writing)
    thread.start()
    try:
        assert inside.wait(10)
        threading.Timer(0.3, leave.set).start()  # the parent's write ends soon after
        said = in_fork(lambda: store.enqueue(_message(), now=datetime.now(UTC)))
    finally:
        leave.set()
        thread.join()
    assert len(said) == 32, said  # an id
    assert store.status(said).state is RecipientState.QUEUED
    store.close()


def test_a_fork_uses_none_of_its_parents_connections(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    store.enqueue(_message(), now=datetime.now(UTC))  # a connection goes back to the pool
    inherited = {id(conn) for conn in store._idle}
    assert inherited

    def child() -> str:
        mid = store.enqueue(_message(1), now=datetime.now(UTC))
        used = {id(conn) for conn in store._idle}
        return f"{mid} {sorted(used & inherited)}"

    mid, shared = in_fork(child).split(" ", 1)
    assert shared == "[]"
    assert store.status(mid).state is RecipientState.QUEUED
    store.close()


FORK_AND_DIE = textwrap.dedent(
    """
    import os, sys, time
    from mailstrom.stores import SQLiteStore

    store = SQLiteStore(sys.argv[1])
    store._holders.hold("0a1b2c3d")
    child = os.fork()
    if child == 0:  # a child that lives on after its parent
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the test reads stdout to its end
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)  # dead, as far as its lock file knows: no close()
    """
)


def test_a_fork_does_not_keep_its_dead_parents_holder_alive(tmp_path: Path) -> None:
    """The leases of a dead holder are given back at the next look of another worker, as
    its lock file is free. A child forked from it held a copy of the lock, so the
    holder looked alive while the child lived (its leases waited for lease_for)."""
    db = tmp_path / "q.db"
    SQLiteStore(db).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    parent = subprocess.run(
        [sys.executable, "-c", FORK_AND_DIE, str(db)],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout)
    store = SQLiteStore(db)
    try:
        assert os.path.exists(store._holders.file("0a1b2c3d"))  # never closed
        assert "0a1b2c3d" not in {h.holder for h in store.live_holders()}
    finally:
        store.close()
        os.kill(child, signal.SIGKILL)


def test_mail_a_fork_queues_wakes_its_parents_worker_thread(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The parent's worker hears of the fork's mail at once, not at its next poll."""
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    config = loopback_config(dns_server, server.port, poll_interval=60)
    with Mailstrom(config, store=SQLiteStore(tmp_path / "q.db"), worker="thread") as ms:
        mid = in_fork(
            lambda: ms.send_email(
                Email(from_="app@sender.test", to=["u@example.org"], subject="s", text="hi")
            )
        )
        assert len(mid) == 32, mid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if ms.query_status(mid).state is RecipientState.DELIVERED:
                break
            time.sleep(0.02)
        assert ms.query_status(mid).state is RecipientState.DELIVERED


def test_a_fork_taken_while_a_write_goes_on_and_on_says_why_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork waits FORK_WAIT at most for the statements under way. Past it, the store
    is of no use in the fork (SQLite's state there names a lock for good): it says so at
    once, where it waited busy_timeout and failed with StoreLocked at every call."""
    monkeypatch.setattr(forks, "FORK_WAIT", 0.1)
    store = SQLiteStore(tmp_path / "q.db", busy_timeout=30)
    inside, leave = threading.Event(), threading.Event()

    def writing() -> None:
        with store._write():
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=writing)
    thread.start()
    try:
        assert inside.wait(10)

        def child() -> str:
            began = time.monotonic()
            try:
                store.enqueue(_message(), now=datetime.now(UTC))
            except StoreError as exc:
                return f"{time.monotonic() - began:.1f} {exc}"
            return "queued"

        said = in_fork(child)
    finally:
        leave.set()
        thread.join()
    waited, why = said.split(" ", 1)
    assert "forked while another thread" in why
    assert float(waited) < 5  # not busy_timeout (30 s)
    store.close()


def test_the_dashboards_views_in_a_fork_use_none_of_its_parents_connections(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    store.enqueue(_message(), now=datetime.now(UTC))
    views = SQLiteReadModel(str(tmp_path / "q.db"))
    assert views.overview(now=datetime.now(UTC)).messages == 1
    inherited = {id(conn) for conn in views._idle}
    assert inherited

    def child() -> str:
        messages = views.overview(now=datetime.now(UTC)).messages
        return f"{messages} {sorted({id(conn) for conn in views._idle} & inherited)}"

    assert in_fork(child) == "1 []"
    views.close()
    store.close()
