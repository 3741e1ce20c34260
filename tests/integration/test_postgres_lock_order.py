"""On PostgreSQL a worker's writes to its leased recipients and an operator's action on
the same recipients lock them in one order, (message_id, address), so that neither
waits for the other in a cycle: PostgreSQL would abort one ("deadlock detected"), and
the operator's suspend, cancel or hold, or the worker's extend, release, postpone,
record, throttle marks or give-back of a holder's leases (release_holder, the reaper),
failed with a StoreError although nothing was wrong.

The lease lists a message's recipients by position; here b@ comes before a@, the
reverse of the operator's order. A third session holds b@ FOR KEY SHARE, which the
operator's FOR UPDATE waits for and the worker's UPDATE (of no key column) does not:
the operator locks a@ and waits on b@; the worker then writes b@ and asks for a@; the
third session lets go, and each waits for the other unless the worker too locks a@
first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import AttemptOutcome, RecipientState
from mailstrom.stores import Lease, RecipientResult
from mailstrom.stores.postgres import PostgresStore
from tests.contract.support import attempt

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
HOLDER = "0123abcd"


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as s:
        yield s


def waiting(url: str, count: int) -> None:
    """Wait until ``count`` sessions of ``url``'s database wait for a lock."""
    with psycopg.connect(url, autocommit=True) as look:
        for _ in range(1000):
            (n,) = look.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone() or (0,)
            if n >= count:
                return
            time.sleep(0.01)
    raise AssertionError(f"fewer than {count} sessions wait for a lock")


def deferred(lease: Lease) -> list[RecipientResult]:
    return [
        RecipientResult(
            message_id=item.message_id,
            address=r.address,
            lease_token=lease.token,
            ref=r.ref,
            state=RecipientState.DEFERRED,
            attempt=attempt(AttemptOutcome.TEMPORARY, at=T0, code=451),
            next_attempt_at=T0 + LEASE,
        )
        for item in lease.items
        for r in item.recipients
    ]


def reap(store: PostgresStore) -> int:
    """The reaper's give-back of a holder that stopped (judged dead without a look)."""
    with psycopg.connect(store.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO lease_holders (holder, host, pid, started_at, seen_at, stopped)"
            " VALUES (%s, 'host', 1, now(), now(), true)",
            (HOLDER,),
        )
    return store.release_dead_holders()


def throttle(store: PostgresStore, lease: Lease) -> object:
    pairs = [(i.message_id, r.address) for i in lease.items for r in i.recipients]
    return store.throttle(
        "big.test", now=T0, reply="421 busy", first=LEASE, maximum=LEASE, recipients=pairs
    )


WORKER: dict[str, Callable[[PostgresStore, Lease], object]] = {
    "extend": lambda s, lease: s.extend(lease, until=T0 + 2 * LEASE),
    "release": lambda s, lease: s.release(lease),
    "postpone": lambda s, lease: s.postpone(lease.items, until=T0 + LEASE),
    "record": lambda s, lease: s.record(deferred(lease)),
    "release_holder": lambda s, lease: s.release_holder(HOLDER),
    "reap": lambda s, lease: reap(s),
    "throttle": throttle,
}

OPERATOR: dict[str, Callable[[PostgresStore, str], object]] = {
    "suspend": lambda s, mid: s.suspend("big.test", now=T0),
    "cancel": lambda s, mid: s.cancel(mid, now=T0),
    "cancel_many": lambda s, mid: s.cancel_many([mid], now=T0),
    "hold": lambda s, mid: s.set_held(mid, True),
    "hold_many": lambda s, mid: s.hold_many([mid], True),
}


@pytest.mark.parametrize("operator", list(OPERATOR))
@pytest.mark.parametrize("worker", list(WORKER))
def test_a_worker_write_and_an_operator_action_lock_in_one_order(
    store: PostgresStore, postgres_url: str, worker: str, operator: str
) -> None:
    mid = store.enqueue(
        PreparedMessage(
            data=b"Subject: x\r\n\r\nx\r\n",
            envelope_from="app@sender.test",
            recipients=("b@big.test", "a@big.test"),
        ),
        now=T0,
    )
    lease = store.lease(now=T0, limit=10, lease_for=LEASE, holder=HOLDER)
    assert lease is not None
    assert [r.address for i in lease.items for r in i.recipients] == [
        "b@big.test",
        "a@big.test",
    ]
    with psycopg.connect(postgres_url) as third, ThreadPoolExecutor(2) as pool:
        third.execute(
            "SELECT 1 FROM recipients WHERE message_id = %s AND address = 'b@big.test'"
            " FOR KEY SHARE",
            (mid,),
        )
        acting = pool.submit(OPERATOR[operator], store, mid)
        waiting(postgres_url, 1)  # holds a@, waits for b@
        writing = pool.submit(WORKER[worker], store, lease)
        waiting(postgres_url, 2)  # wrote b@, waits for a@
        third.commit()
        acting.result(timeout=30)
        writing.result(timeout=30)
