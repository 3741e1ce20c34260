"""Many copies of one message in a SQLite store, made in SQL: a test that needs a queue of
100,000 messages spent most of its time (most of its pytest-timeout on a loaded machine)
making them through the store's API, which is not what it tests."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path


def _columns(conn: sqlite3.Connection, table: str, *, but: tuple[str, ...]) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] not in but]


def copies_of_a_message(path: Path, message_id: str, count: int) -> list[str]:
    """Add ``count`` copies of the message ``message_id`` of the SQLite store at ``path``
    (closed meanwhile), each column of it and of its recipients as the store wrote it
    (pending, held, cancelled, delivered...) and its bytes (not its rows of other tables,
    such as its attempts), and return their ids, oldest first: each is newer than the
    message copied, as the store orders messages by ``seq`` after ``created_at``."""
    with closing(sqlite3.connect(path)) as conn, conn:
        message_columns = ", ".join(_columns(conn, "messages", but=("seq", "id")))
        recipients = _columns(conn, "recipients", but=("id", "message_seq"))
        (seq,) = conn.execute("SELECT seq FROM messages WHERE id = ?", (message_id,)).fetchone()
        (last,) = conn.execute("SELECT max(seq) FROM messages").fetchone()
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            f" INSERT INTO messages (id, {message_columns})"
            f" SELECT printf('%s-%07d', id, i), {message_columns}"
            " FROM n, messages WHERE seq = ? ORDER BY i",
            (count, seq),
        )
        conn.execute(
            f"INSERT INTO recipients (message_seq, {', '.join(recipients)})"
            f" SELECT m.seq, {', '.join(f'r.{name}' for name in recipients)}"
            " FROM messages m, recipients r WHERE m.seq > ? AND r.message_seq = ?"
            " ORDER BY m.seq, r.position",
            (last, seq),
        )
        conn.execute(  # the bytes lie in a table of their own (schema version 20)
            "INSERT INTO message_data (seq, data) SELECT m.seq, d.data"
            " FROM messages m, message_data d WHERE m.seq > ? AND d.seq = ?",
            (last, seq),
        )
        made = conn.execute("SELECT id FROM messages WHERE seq > ? ORDER BY seq", (last,))
        return [mid for (mid,) in made]
