"""Make a real store fail partway through writing suppression entries, as a full disk, a
lost connection or a lock timeout would: a trigger in the database refuses one target."""

from __future__ import annotations

import contextlib
import sqlite3

import psycopg

REASON = "refused by a trigger"

_PG_REFUSE = """
CREATE FUNCTION refuse_target() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.target = {target} THEN
        RAISE EXCEPTION '{reason}';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE INSERT ON suppressions
    FOR EACH ROW EXECUTE FUNCTION refuse_target();
"""


def refuse_suppression(url: str, target: str) -> None:
    """From now on the store at ``url`` (SQLite or PostgreSQL, schema made) fails any write
    of an entry for ``target`` (a plain address: it is quoted as an SQL literal)."""
    literal = "'" + target.replace("'", "''") + "'"
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            conn.execute(
                f"CREATE TRIGGER refuse BEFORE INSERT ON suppressions WHEN NEW.target = {literal}"
                f" BEGIN SELECT RAISE(ABORT, '{REASON}'); END"
            )
            conn.commit()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_PG_REFUSE.format(target=literal, reason=REASON).encode())


def stop_refusing(url: str) -> None:
    """Undo :func:`refuse_suppression` (the trouble has passed)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            conn.execute("DROP TRIGGER refuse")
            conn.commit()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER refuse ON suppressions")
