"""Two mailstrom installs in two schemas of one PostgreSQL database (each store URL with
its own ``options=-c search_path=...``): NOTIFY channels are per database, so the queues
must announce work on channels of their own, or every enqueue of one wakes the other's
workers and every cancel of one stops the other's from starting a transaction until they
have asked their store again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import psycopg
import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.postgres import PostgresStore

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = timedelta(minutes=15)
WAIT = 30.0
"""Generous: catches a hang, times nothing."""


def in_schema(url: str, schema: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(schema)))
    return url + "?options=" + quote(f"-c search_path={schema}")


def message(to: str) -> PreparedMessage:
    return PreparedMessage(
        data=f"From: app@sender.test\r\nTo: {to}\r\nSubject: hi\r\n\r\nHello.\r\n".encode(),
        envelope_from="app@sender.test",
        recipients=(to,),
    )


class Counting:
    """Counts calls from the store's listener thread; :meth:`wait_for` waits for ``n``."""

    def __init__(self) -> None:
        self.calls = 0
        self._changed = threading.Condition()

    def __call__(self) -> None:
        with self._changed:
            self.calls += 1
            self._changed.notify_all()

    def wait_for(self, n: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.calls >= n, timeout=WAIT)


def test_a_queue_in_another_schema_neither_wakes_nor_stops_these_workers(
    postgres_url: str,
) -> None:
    url_a, url_b = in_schema(postgres_url, "app_a"), in_schema(postgres_url, "app_b")
    with PostgresStore(url_b) as setup:  # queued before anyone listens, its NOTIFY sent
        waiting = setup.enqueue(message("bob@b.test"), now=T0)
    woken, told = Counting(), Counting()
    with PostgresStore(url_b) as b:
        stops: list[Callable[[], None]] = [b.watch(woken), b.watch_cancels(told)]
        # The other install queues (closed, its store has sent the NOTIFY), then leases
        # and cancels, which NOTIFYs "cancelled" as it commits.
        with PostgresStore(url_a) as a:
            cancelled = a.enqueue(message("carol@a.test"), now=T0)
        with PostgresStore(url_a) as a:
            assert a.lease(now=T0, limit=10, lease_for=LEASE) is not None
            assert a.cancel(cancelled, now=T0) == 1
        # This install's own cancel of leased mail: told at once by the store, then once
        # more through LISTEN, after whatever the other install's NOTIFYs did here (they
        # arrive in commit order). Through LISTEN, watchers are called before cancel
        # watchers, so once told twice, every NOTIFY heard so far has woken ``woken``.
        assert b.lease(now=T0, limit=10, lease_for=LEASE) is not None
        assert b.cancel(waiting, now=T0) == 1
        told.wait_for(2)
        seen = (woken.calls, told.calls)
        for stop in stops:
            stop()
    assert seen == (1, 2)
