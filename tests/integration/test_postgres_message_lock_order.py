"""On PostgreSQL every store call that writes both a message row and its recipients
locks them in one order, the message first: otherwise two such calls wait for each other
in a cycle, and PostgreSQL aborts one ("deadlock detected", SQLSTATE 40P01), which the
caller gets as a StoreError although nothing was wrong.

A worker's record that carries a DKIM outcome (its message signed anew as it went)
writes the message's ``dkim`` in the record's transaction; an operator's cancel or
hold writes the message row (its held flag) and locks its recipients. Here a third
session holds the recipient FOR KEY SHARE, which the operator's FOR UPDATE waits for and
the worker's write (of no key column) passes: the operator holds the message and waits
for the recipient; the worker writes the recipient and then asks for the message; the
third session lets go, and each waits for the other unless the worker too locks the
message first. (set_held's own statement locked the recipients first: against it the
worker's record did not deadlock, but against it cancel and hold_many did; see below.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import DKIMStatus
from mailstrom.stores import Lease
from mailstrom.stores.postgres import PostgresStore
from tests.integration.test_postgres_lock_order import deferred, waiting

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
RESIGNED = DKIMStatus(reason="signed anew: no key for the From domain")


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as s:
        yield s


OPERATOR: dict[str, Callable[[PostgresStore, str], object]] = {
    "cancel": lambda s, mid: s.cancel(mid, now=T0),
    "cancel_many": lambda s, mid: s.cancel_many([mid], now=T0),
    "hold": lambda s, mid: s.set_held(mid, True),
    "hold_many": lambda s, mid: s.hold_many([mid], True),
    "release": lambda s, mid: s.set_held(mid, False),
    "release_many": lambda s, mid: s.hold_many([mid], False),
}


def leased(store: PostgresStore, *, held: bool) -> tuple[str, Lease]:
    """A message leased; then held (its delivery in flight) when ``held``."""
    mid = store.enqueue(
        PreparedMessage(
            data=b"Subject: x\r\n\r\nx\r\n",
            envelope_from="app@sender.test",
            recipients=("a@big.test",),
        ),
        now=T0,
    )
    lease = store.lease(now=T0, limit=10, lease_for=LEASE, holder="0123abcd")
    assert lease is not None
    if held:
        store.set_held(mid, True)
    return mid, lease


@pytest.mark.parametrize("operator", list(OPERATOR))
def test_a_record_with_a_dkim_outcome_and_an_operator_action_lock_in_one_order(
    store: PostgresStore, postgres_url: str, operator: str
) -> None:
    # A hold finds the message not held; the others act on one held in flight.
    mid, lease = leased(store, held=operator not in ("hold", "hold_many"))
    results = [replace(r, dkim=RESIGNED) for r in deferred(lease)]
    with psycopg.connect(postgres_url) as third, ThreadPoolExecutor(2) as pool:
        third.execute("SELECT 1 FROM recipients WHERE message_id = %s FOR KEY SHARE", (mid,))
        acting = pool.submit(OPERATOR[operator], store, mid)
        waiting(postgres_url, 1)  # holds the message, waits for the recipient
        writing = pool.submit(store.record, results)
        waiting(postgres_url, 2)  # wrote the recipient, waits for the message
        third.commit()
        acting.result(timeout=30)
        writing.result(timeout=30)


# set_held against an operator action that locks the message first: a third session
# holds the message FOR SHARE, which both wait for; the first in line (`first`) gets it
# once the third lets go, and then asks for the recipient the second (set_held) locked
# while it waited, unless set_held too locks the message first.
RACES = {
    "hold_many, hold": ("hold_many", False, lambda s, mid: s.set_held(mid, True)),
    "cancel, release": ("cancel", True, lambda s, mid: s.set_held(mid, False)),
    "release_many, release": ("release_many", True, lambda s, mid: s.set_held(mid, False)),
}


@pytest.mark.parametrize("race", list(RACES))
def test_set_held_and_another_operator_action_lock_in_one_order(
    store: PostgresStore, postgres_url: str, race: str
) -> None:
    first, held, second = RACES[race]
    mid, _ = leased(store, held=held)
    with psycopg.connect(postgres_url) as third, ThreadPoolExecutor(2) as pool:
        third.execute("SELECT 1 FROM messages WHERE id = %s FOR SHARE", (mid,))
        acting = pool.submit(OPERATOR[first], store, mid)
        waiting(postgres_url, 1)  # waits for the message, first in line
        holding = pool.submit(second, store, mid)
        waiting(postgres_url, 2)  # locked the recipient, waits for the message
        third.commit()
        acting.result(timeout=30)
        holding.result(timeout=30)


def test_cancel_many_locks_the_messages_in_id_order(
    store: PostgresStore, postgres_url: str
) -> None:
    """cancel_many wrote the held messages in the order its scan met them, which is
    where their rows lie, not their ids' order, while a record carrying DKIM outcomes
    locks them in id order. Two messages held in flight, the later held first (its row
    version now lies before the other's), recorded and cancelled at once: the record
    waits for the first message behind a third session (FOR SHARE), the cancel takes
    the second and waits for the first too; the third lets go, and the record, first in
    line, then asks for the second."""
    made = [
        store.enqueue(
            PreparedMessage(
                data=b"Subject: x\r\n\r\nx\r\n",
                envelope_from="app@sender.test",
                recipients=(f"{name}@big.test",),
            ),
            now=T0,
        )
        for name in "ab"
    ]
    first, second = sorted(made)
    lease = store.lease(now=T0, limit=10, lease_for=LEASE, holder="0123abcd")
    assert lease is not None
    store.set_held(second, True)
    store.set_held(first, True)
    with psycopg.connect(postgres_url, autocommit=True) as look:
        rows = look.execute("SELECT id FROM messages ORDER BY ctid").fetchall()
        assert [m for (m,) in rows] == [second, first]
    results = [replace(r, dkim=RESIGNED) for r in deferred(lease)]
    with psycopg.connect(postgres_url) as third, ThreadPoolExecutor(2) as pool:
        third.execute("SELECT 1 FROM messages WHERE id = %s FOR SHARE", (first,))
        writing = pool.submit(store.record, results)
        waiting(postgres_url, 1)  # waits for the first message, first in line
        acting = pool.submit(store.cancel_many, [first, second], now=T0)
        waiting(postgres_url, 2)  # the cancel too: it holds the second
        third.commit()
        writing.result(timeout=30)
        acting.result(timeout=30)


def test_a_hold_of_finished_messages_and_their_purge_do_not_wait_in_a_cycle(
    store: PostgresStore, postgres_url: str
) -> None:
    """A hold of finished messages writes none of them (nothing pending to hold), and
    must lock none: a purge deletes them in the order its scan meets them (where their
    rows lie), not in id order. A third session holds the first FOR KEY SHARE, which the
    purge's delete waits for and a lock for an update passes."""
    made = [
        store.enqueue(
            PreparedMessage(
                data=b"Subject: x\r\n\r\nx\r\n",
                envelope_from="app@sender.test",
                recipients=(f"{name}@big.test",),
            ),
            now=T0,
        )
        for name in "ab"
    ]
    first, second = sorted(made)
    with psycopg.connect(postgres_url, autocommit=True) as setup:
        setup.execute("UPDATE messages SET held = held WHERE id = %s", (first,))
    for mid in made:
        store.cancel(mid, now=T0)
    with psycopg.connect(postgres_url) as third, ThreadPoolExecutor(2) as pool:
        third.execute("SELECT 1 FROM messages WHERE id = %s FOR KEY SHARE", (first,))
        purging = pool.submit(store.purge_many, [first, second], finished_before=T0 + LEASE)
        waiting(postgres_url, 1)  # deleted the second, waits for the first
        # Locking the first (passing the KEY SHARE) and then the second, which the
        # purge holds, it would wait for the purge, which waits for the first.
        assert pool.submit(store.hold_many, [first, second], True).result(timeout=30) == 0
        third.commit()
        assert purging.result(timeout=30) == 2
