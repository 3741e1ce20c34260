"""Contract: idempotent submission. A second enqueue with a key another message holds returns
that message's id and queues nothing, also when threads and processes race on one key; the
key is free again once its window has passed or its message was purged."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta

from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import NOW, SECOND, at_once, lease_all, message, results_for

DAY = timedelta(days=1)


def keyed(
    key: str, *, until: datetime = NOW + DAY, prepared: PreparedMessage | None = None
) -> PreparedMessage:
    base = prepared or message("alice@example.org")
    return dataclasses.replace(
        base, attributes=QueueAttributes(idempotency_key=key, idempotency_until=until)
    )


def test_a_repeated_key_returns_the_first_id_and_queues_nothing(store: Store) -> None:
    first = store.enqueue(keyed("order-42"), now=NOW)
    again = store.enqueue(keyed("order-42", prepared=message("bob@example.org")), now=NOW + SECOND)
    other = store.enqueue(keyed("order-43"), now=NOW + SECOND)
    assert again == first != other
    assert len(store.recent()) == 2
    assert store.status(first).idempotency_key == "order-42"
    assert [r.address for r in store.status(first).recipients] == ["alice@example.org"]
    lease = lease_all(store, now=NOW + SECOND)
    assert sorted(item.message_id for item in lease.items) == sorted([first, other])


def test_a_batch_shares_keys_with_itself_and_with_the_queue(store: Store) -> None:
    first = store.enqueue(keyed("k1"), now=NOW)
    ids = store.enqueue_many([keyed("k1"), keyed("k2"), keyed("k2"), message()], now=NOW)
    assert ids[0] == first
    assert ids[1] == ids[2] != first
    assert len(set(ids)) == 3
    assert len(store.recent()) == 3


def test_the_key_is_free_again_after_its_window(store: Store) -> None:
    first = store.enqueue(keyed("k", until=NOW + DAY), now=NOW)
    assert store.enqueue(keyed("k"), now=NOW + DAY - SECOND) == first
    later = store.enqueue(keyed("k", until=NOW + 3 * DAY), now=NOW + DAY)
    assert later != first
    assert store.enqueue(keyed("k"), now=NOW + 2 * DAY) == later
    assert len(store.recent()) == 2


def test_the_key_is_free_once_its_message_is_purged(store: Store) -> None:
    first = store.enqueue(keyed("k", until=NOW + 30 * DAY), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert store.purge(finished_before=NOW + SECOND) == 1
    again = store.enqueue(keyed("k"), now=NOW + 2 * SECOND)
    assert again != first
    assert store.status(again).idempotency_key == "k"


def test_eight_threads_racing_on_one_key_queue_one_message(store_backend: Backend) -> None:
    stores = [store_backend.open() for _ in range(8)]  # one store object each
    start = threading.Barrier(8)
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def submit(store: Store) -> None:
        try:
            start.wait(timeout=30)
            mid = store.enqueue(keyed("order-42-receipt"), now=NOW)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            return
        with lock:
            ids.append(mid)

    threads = [threading.Thread(target=submit, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(ids) == 8 and len(set(ids)) == 1
    assert [m.id for m in stores[0].recent()] == ids[:1]


def test_batches_sharing_keys_in_opposite_orders_both_go_in(store_backend: Backend) -> None:
    """Each batch waits for the other's claim of a shared key: claimed in the callers'
    orders, the two waited for each other and PostgreSQL failed one (a deadlock)."""
    stores = [store_backend.open() for _ in range(2)]
    keys = [f"order-{n:04d}" for n in range(1000)]
    ids: dict[str, str] = {}

    def submit(store: Store, order: list[str]) -> None:
        found = store.enqueue_many([keyed(k) for k in order], now=NOW)
        for key, mid in zip(order, found, strict=True):
            assert ids.setdefault(key, mid) == mid  # both batches: one id per key

    at_once(lambda: submit(stores[0], keys), lambda: submit(stores[1], keys[::-1]))
    assert len(ids) == len(set(ids.values())) == len(keys)
    assert len(stores[0].recent(limit=2000)) == len(keys)


RACER = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime, timedelta
    from mailstrom.message.attributes import QueueAttributes
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.stores import open_store

    store = open_store(sys.argv[1])
    now = datetime.fromisoformat(sys.argv[2])
    prepared = PreparedMessage(
        data=b"Subject: receipt\\r\\n\\r\\nhi\\r\\n", envelope_from="shop@example.com",
        recipients=("x@example.org",),
        attributes=QueueAttributes(idempotency_key="order-42-receipt",
                                   idempotency_until=now + timedelta(days=1)),
    )
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal: every racer is ready
    print(json.dumps({"id": store.enqueue(prepared, now=now)}), flush=True)
    store.close()
    """
)


def test_four_processes_racing_on_one_key_queue_one_message(store_backend: Backend) -> None:
    store_backend.require_durable()
    store = store_backend.open()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store_backend.url, NOW.isoformat()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        ids = []
        for racer in racers:
            out, _ = racer.communicate(timeout=60)
            assert racer.returncode == 0
            ids.append(json.loads(out)["id"])
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    assert len(set(ids)) == 1
    assert [m.id for m in store.recent()] == ids[:1]
