"""``PostgresStore.query`` reads the recipients of the messages it lists by the primary
key, whatever plan PostgreSQL makes of it: joined to the listed messages in one plan with
them, the recipients were read whole (a hash join, or a sequential scan per listed
message) when the planner misjudged the list, as a prepared statement's generic plan does
(20,000 recipients read a hundred times over for a page of a hundred messages)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores import QueueFilter
from mailstrom.stores.operator import PENDING_STATES
from mailstrom.stores.postgres import PostgresStore
from tests.support.pg_plans import generic_plan, rows_touched

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
BULK = 20_000
"""Pending messages at fifty domains, one recipient each."""
FILTERS = {
    "no filter": QueueFilter(),
    "pending": QueueFilter(states=PENDING_STATES),
    "domain": QueueFilter(domain="d7.test", limit=20),
}


@pytest.fixture(scope="module")
def queue(postgres_server: Any) -> str:
    url = postgres_server.create_database()
    with PostgresStore(url, max_size=2) as store:
        for start in range(0, BULK, 5000):
            batch = [
                PreparedMessage(
                    data=b"Subject: x\r\n\r\nx\r\n",
                    envelope_from="app@sender.test",
                    recipients=(f"u{i}@d{i % 50}.test",),
                )
                for i in range(start, start + 5000)
            ]
            store.enqueue_many(batch, now=T0 + timedelta(seconds=start))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return url


@pytest.mark.parametrize("name", list(FILTERS))
def test_query_reads_the_recipients_of_the_listed_messages_alone(
    name: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = FILTERS[name]
    seen: list[tuple[bytes, Any]] = []
    execute = psycopg.Cursor.execute

    def noting(cur: psycopg.Cursor[Any], query: Any, params: Any = None, **kw: Any) -> Any:
        text = query if isinstance(query, bytes) else str(query).encode()
        if b"FROM selected s" in text:
            seen.append((text, params))
        return execute(cur, query, params, **kw)

    with PostgresStore(queue, max_size=2) as store, monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", noting)
        listed = store.query(now=T0 + timedelta(days=1), where=where)
    assert len(listed) == where.limit
    ((sql, params),) = seen
    plan = generic_plan(queue, sql, params)
    text = repr(plan)
    assert "recipients_pkey" in text, text
    # The page's messages and their recipients, and what the filter probes for them:
    # not the 20,000 recipients of the queue, once or per listed message.
    assert rows_touched(plan) < 5 * BULK // 10, text
