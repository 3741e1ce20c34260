"""A queue row changed by hand so that it cannot be read back: the operator's commands name
it, or leave it out with a warning, and keep showing the rest (never a traceback)."""

from __future__ import annotations

import sqlite3

from tests.cli.conftest import CLI


def send(cli: CLI, to: str) -> str:
    return cli.ok("send", "--from", "app@client.test", "--to", to, "--text", "x").out.strip()


def damage(cli: CLI, message_id: str) -> None:
    conn = sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)
    conn.execute("UPDATE messages SET created_at = 'yesterday' WHERE id = ?", (message_id,))
    conn.close()


def test_status_names_the_unreadable_row(cli: CLI) -> None:
    bad = send(cli, "bob@example.test")
    damage(cli, bad)
    result = cli("status", bad)
    assert result.code == 65  # EX_DATAERR: the data is wrong, trying again will not help
    assert result.err_lines == [
        f"mailstrom: message {bad}: queue row unreadable: created_at is 'yesterday',"
        " not a time in microseconds"
    ]


def test_queue_lists_the_rest(cli: CLI) -> None:
    good = send(cli, "carol@example.test")
    bad = send(cli, "bob@example.test")
    damage(cli, bad)
    result = cli.ok("queue", "--json")
    assert [m["id"] for m in result.json()] == [good]
    assert result.err_lines == [
        f"mailstrom: warning: message {bad} left out: queue row unreadable: created_at is"
        " 'yesterday', not a time in microseconds"
    ]
    assert "Traceback" not in result.err
