"""The mail of one domain in any state but delivered on PostgreSQL (``mailstrom queue
--domain d``: the pending mail; ``query``/``select_ids``/``count`` with a domain and the
pending, the failed or no states) is read from the indexes of that domain's recipients
(recipients_pending_domain, recipients_delivered_domain, recipients_failed_domain): the
filter's domain test sits in an OR with its NULL test, which PostgreSQL never turns into a
join, so each list probed every message of the queue newest first (20,000 probes for the
few messages of the domain)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import QueueFilter
from mailstrom.stores.operator import PENDING_STATES
from mailstrom.stores.postgres import PostgresStore
from tests.support.pg_plans import analyzed, listing_of, rows_touched, statements_run

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
BULK = 20_000
"""Pending messages at fifty other domains, one recipient each."""
PENDING = QueueFilter(states=PENDING_STATES, domain="rare.test")
FAILED = QueueFilter(states=frozenset({RecipientState.FAILED}), domain="rare.test")
ANY = QueueFilter(domain="rare.test")

Listing = Callable[[PostgresStore], list[str]]
LISTINGS: dict[str, tuple[Listing, str]] = {
    # name: (the listing, which of the domain's messages it finds)
    "query": (lambda s: [m.id for m in s.query(now=NOW, where=PENDING)], "pending"),
    "select_ids": (lambda s: s.select_ids(now=NOW, where=PENDING), "pending"),
    "count": (lambda s: [str(s.count(now=NOW, where=PENDING, cap=1000))], "pending"),
    "queued": (
        lambda s: s.select_ids(
            now=NOW, where=QueueFilter(state=RecipientState.QUEUED, domain="rare.test")
        ),
        "queued",
    ),
    "failed": (lambda s: s.select_ids(now=NOW, where=FAILED), "failed"),
    "failed count": (lambda s: [str(s.count(now=NOW, where=FAILED, cap=1000))], "failed"),
    "any state": (lambda s: s.select_ids(now=NOW, where=ANY), "any"),
    "any count": (lambda s: [str(s.count(now=NOW, where=ANY, cap=1000))], "any"),
}


def _message(*recipients: str) -> PreparedMessage:
    return PreparedMessage(
        data=b"Subject: x\r\n\r\nx\r\n", envelope_from="app@sender.test", recipients=recipients
    )


@pytest.fixture(scope="module")
def queue(postgres_server: Any) -> tuple[str, dict[str, list[str]]]:
    """A database of BULK pending messages elsewhere and five at rare.test, whose
    recipients there are queued, deferred, delivered and failed; which of those five
    each kind of listing finds, newest first."""
    url = postgres_server.create_database()
    with PostgresStore(url, max_size=2) as store:
        for start in range(0, BULK, 5000):
            batch = [_message(f"u{i}@d{i % 50}.test") for i in range(start, start + 5000)]
            store.enqueue_many(batch, now=T0 + timedelta(seconds=start))
        late = T0 + timedelta(hours=12)
        ids = [
            store.enqueue_many([_message(*rcpts)], now=late + timedelta(seconds=n))[0]
            for n, rcpts in enumerate(
                [
                    ("a@rare.test",),  # queued
                    ("b@rare.test", "b@d1.test"),  # deferred at rare.test
                    ("c@rare.test", "c@d1.test"),  # delivered there, queued elsewhere
                    ("d@rare.test", "d@d1.test"),  # failed there, queued elsewhere
                    ("e@rare.test", "e@d2.test"),  # delivered there, failed elsewhere
                ]
            )
        ]
    with psycopg.connect(url, autocommit=True) as conn:
        # Setup, not under test: the outcomes of the recipients, as leases record them.
        for address, state in [
            ("b@rare.test", "deferred"),
            ("c@rare.test", "delivered"),
            ("d@rare.test", "failed"),
            ("e@rare.test", "delivered"),
            ("e@d2.test", "failed"),
        ]:
            conn.execute(
                "UPDATE recipients SET state = %s, attempts = 1, last_attempt_at = %s,"
                " finished_at = CASE WHEN %s = 'deferred' THEN NULL ELSE %s END,"
                " next_attempt_at = CASE WHEN %s = 'deferred' THEN %s END WHERE address = %s",
                (state, T0, state, T0, state, NOW, address),
            )
        conn.execute("VACUUM ANALYZE")
    newest = ids[::-1]
    found = {
        "pending": newest[1:],
        "queued": [ids[3], ids[2], ids[0]],
        "failed": [ids[4]],
        "any": newest,
    }
    return url, found


@pytest.mark.parametrize("name", list(LISTINGS))
def test_the_mail_of_a_domain_is_read_from_its_indexes(
    name: str, queue: tuple[str, dict[str, list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, found = queue
    listing, kind = LISTINGS[name]
    with (
        PostgresStore(url, max_size=2) as store,
        statements_run(monkeypatch, listing_of("rare.test")) as seen,
    ):
        listed = listing(store)
    expected = found[kind]
    assert listed == ([str(len(expected))] if "count" in name else expected)
    ((sql, params),) = seen
    plan = analyzed(url, sql, params)
    text = repr(plan)
    index = "recipients_failed_domain" if kind == "failed" else "recipients_pending_domain"
    assert index in text, text
    assert rows_touched(plan[0]["Plan"]) < 200, text
