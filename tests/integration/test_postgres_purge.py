"""PostgreSQL specifics of a purge by age: which messages it judges final (as purge_many
and the other stores do), and how much of the queue one statement deletes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.errors import StoreLocked
from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.store import PURGE_SPAN
from tests.support.pg_tables import messages_in_bulk, small_message

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url) as opened:
        yield opened


def cancelled(store: PostgresStore, *addresses: str) -> str:
    """A message whose recipients are all final (failed: cancelled) at T0."""
    mid = store.enqueue(small_message(*addresses), now=T0)
    assert store.cancel(mid, now=T0) == len(addresses)
    return mid


def remaining(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {mid for (mid,) in conn.execute("SELECT id FROM messages")}


@pytest.mark.parametrize("state", [None, RecipientState.FAILED])
def test_a_final_recipient_without_a_finish_time_keeps_its_message_as_purge_many_does(
    postgres_url: str, store: PostgresStore, state: RecipientState | None
) -> None:
    """When a recipient became final is what a purge judges by (purge_many, and the
    SQLite and memory stores): one without it (a row changed by hand) is not known to
    have finished before the cutoff. purge and purge_state took its last attempt
    instead, and deleted mail that ``purge --domain`` (purge_many) left alone."""
    cancelled(store, "a@example.org")
    unknown = cancelled(store, "b@example.org", "c@example.org")
    with psycopg.connect(postgres_url) as conn:
        conn.execute(
            "UPDATE recipients SET finished_at = NULL, last_attempt_at = %s"
            " WHERE message_id = %s AND address = 'c@example.org'",
            (T0, unknown),
        )
    assert store.purge_many([unknown], finished_before=LATER) == 0
    if state is None:
        assert store.purge(finished_before=LATER) == 1
    else:
        assert store.purge_state(finished_before=LATER, state=state) == 1
    assert remaining(postgres_url) == {unknown}


def finished_in_bulk(url: str, count: int) -> None:
    """``count`` messages of one recipient delivered at T0."""
    messages_in_bulk(url, count, at=T0, delivered=True)


@pytest.mark.parametrize("state", [None, RecipientState.DELIVERED])
def test_a_purge_of_a_large_queue_fits_a_statement_timeout(
    postgres_url: str, state: RecipientState | None
) -> None:
    """One DELETE over 100,000 messages ran about 1.7 s here, a span of them 12 ms: under a
    server's 400 ms ``statement_timeout`` it was cancelled, and rolled back whole, on every
    run (``mailstrom purge`` never deleted anything). In spans, each far inside it, the
    purge completes."""
    total = 200 * PURGE_SPAN
    with PostgresStore(postgres_url) as opened:
        kept = opened.enqueue(small_message("a@example.org"), now=T0)
    finished_in_bulk(postgres_url, total)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" SET statement_timeout = 400')
    with PostgresStore(postgres_url) as store:
        if state is None:
            assert store.purge(finished_before=LATER) == total
        else:
            assert store.purge_state(finished_before=LATER, state=state) == total
    assert remaining(postgres_url) == {kept}


def test_a_purge_that_fails_keeps_what_it_deleted_and_goes_on_when_called_again(
    postgres_url: str,
) -> None:
    """A purge stopped part way (here by a lock held on its last message) keeps the spans
    it finished, and the next one deletes the rest: one statement deleted nothing, each
    time, until nothing stood in its way."""
    total = 3 * PURGE_SPAN
    finished_in_bulk(postgres_url, total)
    with psycopg.connect(postgres_url) as holder:
        [(last,)] = holder.execute(
            "SELECT id FROM messages ORDER BY id DESC LIMIT 1 FOR UPDATE"
        ).fetchall()
        with PostgresStore(postgres_url + "?lock_timeout=200ms") as store:
            with pytest.raises(StoreLocked):
                store.purge(finished_before=LATER)
            left = remaining(postgres_url)
            assert last in left and len(left) <= PURGE_SPAN
            holder.rollback()
            assert store.purge(finished_before=LATER) == len(left)
    assert remaining(postgres_url) == set()


def test_a_purge_of_a_long_list_fits_a_statement_timeout(postgres_url: str) -> None:
    """purge_many (``mailstrom purge --domain``, up to 100,000 ids) was one DELETE of the
    whole list, cancelled under a 400 ms ``statement_timeout`` and rolled back whole on
    every run, as purge was; in lists of 500, each far inside it, it completes."""
    total = 200 * PURGE_SPAN
    finished_in_bulk(postgres_url, total)
    listed = remaining(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET statement_timeout = 400')
    with PostgresStore(postgres_url) as store:
        assert store.purge_many(sorted(listed), finished_before=LATER) == total
    assert remaining(postgres_url) == set()
