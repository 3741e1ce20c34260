"""PostgreSQL's event outbox becomes visible in id order (queries.sql, append_events).

A reader pages with ``read_events(after=)`` from the highest id it has seen (``mailstrom
events --follow``, a script's cursor). Event ids come from a sequence at INSERT and
transactions commit in any order, so without care one worker's event could commit after
another's with a higher id, and every reader already past that higher id skipped it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore, rows
from mailstrom.stores.postgres.sql import queries
from tests.contract.support import NOW, lease_all, message, results_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=4) as opened:
        opened.enable_events()
        yield opened


def _waiting_for_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
    return row is not None and row[0] > 0


def test_a_reader_past_a_committed_event_never_misses_one_committing_later(
    store: PostgresStore, postgres_url: str
) -> None:
    early = store.enqueue(message("early@example.org"), now=NOW)
    store.enqueue(message("late@example.org"), now=NOW)
    lease = lease_all(store)
    # Worker A: its record transaction (the store's own statements) has appended its event,
    # and drawn its id, and has not committed yet.
    worker_a = psycopg.connect(postgres_url)
    try:
        recorded = results_for(lease, RecipientState.DELIVERED, only=["early@example.org"])
        params = rows.record_params(recorded, [False] * len(recorded))
        worker_a.execute(queries()["record"].encode(), params)
        worker_a.execute(
            queries()["append_events"].encode(),
            {"message_ids": [early], "addresses": ["early@example.org"]},
        )
        # Worker B records its result meanwhile.
        worker_b = threading.Thread(
            target=store.record,
            args=(results_for(lease, RecipientState.DELIVERED, only=["late@example.org"]),),
        )
        worker_b.start()
        # Until B has committed, or waits for A's transaction to end.
        deadline = time.monotonic() + 30
        while worker_b.is_alive() and not _waiting_for_a_lock(postgres_url):
            assert time.monotonic() < deadline, "worker B neither committed nor waited"
            time.sleep(0.01)
        # A reader looks now and carries on from the highest id it saw.
        seen = store.read_events(after=0)
        cursor = max((e.id for e in seen), default=0)
        worker_a.commit()
        worker_b.join(30)
        assert not worker_b.is_alive()
    finally:
        worker_a.close()
    later = store.read_events(after=cursor)
    everything = store.read_events(after=0)
    assert len(everything) == 2
    assert sorted(e.id for e in seen + later) == [e.id for e in everything]
