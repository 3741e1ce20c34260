"""The memory store lets go of what its messages no longer need once they are purged."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from tests.contract.support import NOW, SECOND, lease_all, message, results_for

from mailstrom.message.attributes import QueueAttributes
from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore

DAY = timedelta(days=1)


def test_purging_messages_forgets_their_idempotency_keys() -> None:
    # SQLite and PostgreSQL delete a purged message's key with it (ON DELETE CASCADE);
    # the memory store kept every key for good, one per keyed message ever purged.
    store = MemoryStore()
    for n in range(6):
        keyed = dataclasses.replace(
            message(f"user{n}@example.org"),
            attributes=QueueAttributes(idempotency_key=f"order-{n}", idempotency_until=NOW + DAY),
        )
        store.enqueue(keyed, now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    ids = [m.id for m in store.recent()]
    assert store.purge_many(ids[:2]) == 2
    assert store.purge_state(finished_before=NOW + SECOND, state=RecipientState.FAILED) == 0
    assert store.purge(finished_before=NOW + SECOND) == 4
    assert store.recent() == []
    assert store._keys == {}
