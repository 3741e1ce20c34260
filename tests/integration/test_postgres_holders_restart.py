"""A PostgreSQL restart longer than ``dead_after`` stops every worker's beats: no worker
may take another for dead by that time (stores/postgres/holders.py). The server is a
real one, stopped and started again (``own_postgres``); two stores beat from threads of
their own, as workers do, through the outage.
"""

from __future__ import annotations

import contextlib
import threading
import time

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


def test_a_restart_longer_than_dead_after_takes_no_live_worker_for_dead(
    own_postgres: ThrowawayPostgres,
) -> None:
    url = f"{own_postgres.create_database()}?dead_after={DEAD_AFTER:g}s"
    alive, judge = PostgresStore(url, timeout=2), PostgresStore(url, timeout=2)
    try:
        alive.enqueue(message("a@example.org"), now=NOW)
        alive.release_dead_holders(X)
        lease = alive.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=X)
        assert leased_addresses(lease) == ["a@example.org"]
        given: list[int] = []
        done = threading.Event()
        threads = [
            threading.Thread(target=_beating, args=(store, holder, done, given))
            for store, holder in ((alive, X), (judge, Y))
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(DEAD_AFTER + 0.5)  # both judge by now: their runs are long enough
            own_postgres.restart(down_for=DEAD_AFTER + 1)  # nobody beats for longer
            time.sleep(DEAD_AFTER + 1)  # both look again, longer than dead_after
        finally:
            done.set()
            for thread in threads:
                thread.join(30)
        assert given and sum(given) == 0  # X was never taken for dead
        # X still holds its lease: nothing is due for anyone else.
        assert judge.lease(now=NOW, limit=10, lease_for=LEASE_FOR, holder=Y) is None
    finally:
        alive.close()
        judge.close()
