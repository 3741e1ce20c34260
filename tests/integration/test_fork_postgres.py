"""A PostgreSQL store used in a process forked from the one that opened it: the fork
opens sessions of its own, and nothing it does reaches its parent's (see
:mod:`mailstrom.stores.forks`)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import pytest

from mailstrom import Email, RecipientState
from mailstrom.message import prepare
from mailstrom.readmodel.postgres import PostgresReadModel
from mailstrom.stores.postgres import PostgresStore
from tests.support.forking import in_fork

pytestmark = pytest.mark.postgres

HOLDER = "0a1b2c3d"


def _message(n: int) -> Any:
    return prepare(
        Email(from_="app@sender.test", to=[f"u{n}@example.org"], subject=f"n{n}", text="hi")
    )


def _queue(store: PostgresStore, first: int, count: int) -> list[str]:
    ids = []
    for n in range(first, first + count):
        mid = store.enqueue(_message(n), now=datetime.now(UTC))
        assert store.status(mid).recipients[0].address == f"u{n}@example.org"
        ids.append(mid)
    return ids


def test_a_fork_and_its_parent_each_use_sessions_of_their_own(postgres_url: str) -> None:
    """Both sent statements over the same inherited sockets at once: replies went to the
    wrong process, and the child's exit (its driver's goodbye) ended the parent's
    sessions."""
    store = PostgresStore(postgres_url, min_size=2, max_size=4)
    _queue(store, 0, 2)  # the pool's connections have been used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked process
        os.close(read)
        try:
            said = " ".join(_queue(store, 100, 30))
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        os.write(write, said.encode()[:60000])
        os._exit(0)
    os.close(write)
    try:
        mine = _queue(store, 200, 30)  # meanwhile
    finally:
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read().decode()
        os.waitpid(pid, 0)
    theirs = said.split(" ")
    assert all(len(mid) == 32 for mid in theirs), said[:500]
    assert len(theirs) == 30
    # After the fork ended: the parent's sessions are still there, and so is every message.
    for mid in mine + theirs:
        assert store.status(mid).state is RecipientState.QUEUED
    store.close()


def test_a_fork_that_closes_the_store_leaves_its_parents_workers_alive(
    postgres_url: str,
) -> None:
    """close() says this store object's holders stopped, so that their leases go back at
    once. A fork's close() said so of its parent's, whose worker went on delivering what
    the other workers then took from it."""
    store = PostgresStore(postgres_url)
    store.release_dead_holders(alive=HOLDER)  # the parent's worker beats
    assert HOLDER in {h.holder for h in store.live_holders()}
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked process
        store.close()
        os._exit(0)
    os.waitpid(pid, 0)
    assert HOLDER in {h.holder for h in store.live_holders()}
    store.close()


def test_a_fork_reads_the_dashboards_views_over_sessions_of_its_own(postgres_url: str) -> None:
    """The dashboard's read model in a forked server process (gunicorn --preload)."""
    store = PostgresStore(postgres_url)
    _queue(store, 0, 3)
    views = PostgresReadModel(postgres_url)
    assert views.overview(now=datetime.now(UTC)).messages == 3

    def child() -> str:
        return str(views.overview(now=datetime.now(UTC)).messages)

    assert in_fork(child) == "3"
    assert views.overview(now=datetime.now(UTC)).messages == 3  # the parent's sessions
    views.close()
    store.close()
