"""A PostgreSQL restart longer than ``dead_after`` stops every worker's beats: no worker
may take another for dead by that time (stores/postgres/holders.py), nor soon after,
because one was slower than another to reconnect. The server is a real one, stopped and
started again (``own_postgres``); two stores beat from threads of their own, as workers
do.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mailstrom.errors import StoreError
from mailstrom.stores.postgres import PostgresStore
from tests.contract.support import LEASE_FOR, NOW, leased_addresses, message
from tests.fixtures.postgres import ThrowawayPostgres

pytestmark = pytest.mark.postgres

X = "0123abcd0123abcd"
Y = "89abcdef89abcdef"
DEAD_AFTER = 2.0


def _beating(store: PostgresStore, holder: str, done: threading.Event, given: list[int]) -> None:
    """Look (and beat) every ``reap_every`` until ``done``, as a worker does; a look the
    server did not answer is tried again at the next."""
    while not done.is_set():
        with contextlib.suppress(StoreError):
            given.append(store.release_dead_holders(holder))
        done.wait(store.reap_every)


@contextlib.contextmanager
def _beats(given: list[int]) -> Iterator[Callable[[PostgresStore, str], None]]:
    """Start a thread beating for a store and holder at each call of what it yields,
    each adding to ``given`` what its looks gave back; stopped on leaving."""
    done = threading.Event()
    threads: list[threading.Thread] = []

    def beat(store: PostgresStore, holder: str) -> None:
        threads.append(threading.Thread(target=_beating, args=(store, holder, done, given)))
        threads[-1].start()

    try:
        yield beat
    finally:
        done.set()
        for thread in threads:
            thread.join(30)


def _leased_by_x(url: str) -> PostgresStore:
    """A store on ``url`` whose holder X lives and leases the one recipient queued."""
    store = PostgresStore(url, timeout=2)
    store.enqueue(message("a@example.org"), now=NOW)
    store.release_dead_holders(X)
    lease = store.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X)
    assert leased_addresses(lease) == ["a@example.org"]
    return store


def _judge(url: str) -> PostgresStore:
    """The store of the worker that may take X for dead. It waits for a connection as a
    worker's store does by default (30 s), not 2 s: a look made during the outage goes
    as soon as the server is back (X's worst case), and the last lease of the test is not
    failed (StoreError) by a pool still reconnecting on a loaded host."""
    return PostgresStore(url)


def _x_was_never_taken_for_dead(given: list[int], judge: PostgresStore) -> None:
    assert given and sum(given) == 0
    # X still holds its lease: nothing is due for anyone else.
    assert judge.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=Y) is None


def test_a_restart_longer_than_dead_after_takes_no_live_worker_for_dead(
    own_postgres: ThrowawayPostgres,
) -> None:
    url = f"{own_postgres.create_database()}?dead_after={DEAD_AFTER:g}s"
    alive = _leased_by_x(url)
    judge = _judge(url)
    try:
        given: list[int] = []
        with _beats(given) as beat:
            beat(alive, X)
            beat(judge, Y)
            time.sleep(DEAD_AFTER + 0.5)  # both judge by now: their runs are long enough
            own_postgres.restart(down_for=DEAD_AFTER + 1)  # nobody beats for longer
            time.sleep(DEAD_AFTER + 1)  # both look again, longer than dead_after
        _x_was_never_taken_for_dead(given, judge)
    finally:
        alive.close()
        judge.close()


def test_a_worker_back_from_a_long_outage_beats_before_another_may_judge(
    own_postgres: ThrowawayPostgres,
) -> None:
    # psycopg_pool on its own backs off (1 s, 2 s, 4 s, 8 s, ...): after this outage the
    # first worker's next attempt would come some 5 s after the server is back, while a
    # worker that reached it at once judges after DEAD_AFTER (stores/postgres/connect.py).
    url = f"{own_postgres.create_database()}?dead_after={DEAD_AFTER:g}s"
    stores = [_leased_by_x(url)]
    try:
        given: list[int] = []
        with _beats(given) as beat:
            beat(stores[0], X)
            own_postgres.restart(down_for=4 * DEAD_AFTER)
            stores.append(_judge(url))  # back at once
            beat(stores[1], Y)
            time.sleep(DEAD_AFTER + 1.5)  # the judge judges for more than a second
        _x_was_never_taken_for_dead(given, stores[1])
    finally:
        for store in stores:
            store.close()
