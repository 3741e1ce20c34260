"""PostgreSQL specifics of a purge by age: which messages it judges final (as purge_many
and the other stores do), and how much of the queue one statement deletes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore
from tests.support.pg_tables import small_message

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
