"""Planner statistics for the queue's tables on a new database.

Until a table has been analysed, PostgreSQL plans queries on it blind. For the lease query
that means reading and sorting every due recipient instead of walking ``recipients_due``
for ``LIMIT`` rows: with 100,000 due, about 240 ms a lease instead of 7, for the first ten
or so leases on each pooled connection (``benchmarks/postgres_lease.py``). The same holds
for a database restored from a dump, which carries no statistics. Autovacuum's first
``ANALYZE`` of a table comes up to a minute or so after it filled, and not at all where
autovacuum is off, so a worker leasing from a new database with a backlog analyses the
tables itself, once: after that, autovacuum's thresholds (a share of the rows changed)
keep the statistics current as the queue grows and shrinks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

CHECK_EVERY = 2.0
"""Seconds between looks while the tables are still without statistics."""
MIN_BYTES = 64 * 1024
"""Smaller tables are left alone: any plan is fast on them, and statistics of a nearly
empty table would stand until autovacuum sees enough changes."""

TABLES = """
SELECT s.schemaname, s.relname,
       s.last_analyze IS NOT NULL OR s.last_autoanalyze IS NOT NULL,
       pg_relation_size(s.relid)
FROM pg_stat_user_tables s
WHERE s.relid = ANY (ARRAY[to_regclass('recipients'), to_regclass('messages')]::oid[])
"""
"""The queue's large tables as the store's queries name them (through search_path): has
each been analysed, and its size (exact at once, unlike the statistics views' row
counts)."""


class PlannerStatistics:
    """Whether this store still has to look for tables without statistics, and the look.

    Settled (no more looks) once each table has statistics or had one ``ANALYZE`` tried,
    whatever came of it: a role that does not own the tables gets only a warning from the
    server, and asking again would not change that.
    """

    def __init__(
        self, *, check_every: float = CHECK_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._check_every = check_every
        self._clock = clock
        self._next_at = float("-inf")
        self._settled = False
        self._tried: set[str] = set()
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        return self._settled

    def due(self) -> bool:
        """Time for a look (cheap: called before every lease)."""
        return not self._settled and self._clock() >= self._next_at

    def ensure(self, conn: psycopg.Connection[Any]) -> tuple[str, ...]:
        """Analyse the queue's large tables that have no statistics yet, on ``conn`` (in
        autocommit); the tables analysed. One thread looks at a time; the others go on
        leasing."""
        if not self._lock.acquire(blocking=False):
            return ()
        try:
            if not self.due():
                return ()
            self._next_at = self._clock() + self._check_every
            return self._look(conn)
        finally:
            self._lock.release()

    def _look(self, conn: psycopg.Connection[Any]) -> tuple[str, ...]:
        tables = conn.execute(TABLES).fetchall()
        pending = [
            (schema, name, size)
            for schema, name, analysed, size in tables
            if not analysed and name not in self._tried
        ]
        large = [(schema, name) for schema, name, size in pending if size >= MIN_BYTES]
        self._settled = len(tables) == 2 and len(pending) == len(large)
        if not large:
            return ()
        began = self._clock()
        # SKIP_LOCKED: a table another worker is analysing right now is not waited for.
        names = sql.SQL(", ").join(sql.Identifier(schema, name) for schema, name in large)
        conn.execute(sql.SQL("ANALYZE (SKIP_LOCKED) {}").format(names))
        self._tried.update(name for _, name in large)
        analysed = tuple(name for _, name in large)
        log.info(
            "analysed %s (%.0f ms): a new database, no planner statistics yet",
            ", ".join(analysed),
            (self._clock() - began) * 1000,
        )
        return analysed
