"""Reading what PostgreSQL's plan of a store's statement costs: the statement caught as
the store runs it, run again under EXPLAIN ANALYZE, and the rows its nodes touched."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest


def rows_touched(plan: dict[str, Any]) -> int:
    """Rows every node of an EXPLAIN ANALYZE plan produced or filtered out, all loops."""
    loops = plan.get("Actual Loops", 1)
    own = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * loops
    return own + sum(rows_touched(child) for child in plan.get("Plans", ()))


@contextmanager
def statements_run(
    monkeypatch: pytest.MonkeyPatch, wanted: Callable[[bytes, Any], bool]
) -> Iterator[list[tuple[bytes, Any]]]:
    """The (text, parameters) of each statement run meanwhile on a psycopg cursor that
    ``wanted`` (given them) picks."""
    seen: list[tuple[bytes, Any]] = []
    execute = psycopg.Cursor.execute

    def noting(cur: psycopg.Cursor[Any], query: Any, params: Any = None, **kw: Any) -> Any:
        text = query if isinstance(query, bytes) else str(query).encode()
        if wanted(text, params):
            seen.append((text, params))
        return execute(cur, query, params, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", noting)
        yield seen


def listing_of(domain: str) -> Callable[[bytes, Any], bool]:
    """For :func:`statements_run`: a store's listing of messages whose parameters name
    ``domain``."""
    name = domain.encode()

    def wanted(text: bytes, params: Any) -> bool:
        return b"FROM messages m" in text and name in repr(params).encode()

    return wanted


def analyzed(url: str, sql: bytes, params: Any) -> Any:
    """EXPLAIN (ANALYZE, FORMAT JSON) of ``sql`` with ``params``: its JSON plan."""
    with psycopg.connect(url) as conn:
        ((plan,),) = conn.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchall()
    return plan


def generic_plan(url: str, sql: bytes, params: Any) -> dict[str, Any]:
    """The plan PostgreSQL ran ``sql`` by as a prepared statement's generic plan (one
    made without the parameters' values), as auto_explain reports it."""
    notes: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        for setting in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_analyze = on",
            "SET auto_explain.log_format = json",
            "SET auto_explain.log_level = notice",
            "SET plan_cache_mode = force_generic_plan",
        ):
            conn.execute(setting)
        conn.execute(sql, params, prepare=True).fetchall()
    [note] = [n for n in notes if "Query Text" in n]
    plan: dict[str, Any] = json.loads(note[note.index("{") :])["Plan"]
    return plan
