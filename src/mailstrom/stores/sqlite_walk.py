"""When a SQLite listing collects its matches from an index rather than walking the
queue newest first: one cost rule for the store's operator listings
(:mod:`mailstrom.stores.sqlite_operator`) and the dashboard's pages
(:mod:`mailstrom.readmodel.sqlite`).

Collecting ``n`` matches reads ``n`` index rows and sorts them; a walk finds ``limit``
of them after about ``limit * messages / n`` probes (the matches spread over the queue).
The set costs less while ``n * n <= (limit + 1) * messages``, so no count of a set needs
to go past :func:`walk_bound`.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence


def messages_span(conn: sqlite3.Connection) -> int:
    """About how many messages the queue holds: the span of their insertion numbers, two
    seeks of the primary key (a purge's gaps count, which only favours an index)."""
    (span,) = conn.execute(
        "SELECT coalesce((SELECT max(seq) FROM messages) - (SELECT min(seq) FROM messages) + 1, 0)"
    ).fetchone()
    return int(span)


def walk_bound(conn: sqlite3.Connection, limit: int) -> int:
    """The most matches a set may hold for collecting them to cost less than walking the
    queue for ``limit`` of them."""
    return math.isqrt((limit + 1) * messages_span(conn))


def count_upto(conn: sqlite3.Connection, sql: str, params: Sequence[object], cap: int) -> int:
    """The rows ``sql`` selects, counted up to one past ``cap`` (all a choice needs to
    know): counted whole, a million pending recipients were read for each page."""
    (n,) = conn.execute(f"SELECT count(*) FROM ({sql} LIMIT {int(cap) + 1})", params).fetchone()
    return int(n)
