"""A queue row changed by hand so that it cannot be read back: the operator's commands name
it, or leave it out with a warning, and keep showing the rest (never a traceback)."""

from __future__ import annotations

import json
import sqlite3

import pytest

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


def strict_json(text: str) -> object:
    """``text`` parsed as RFC 8259 JSON: Python's parser also takes NaN and Infinity,
    which no other does (jq, JavaScript's JSON.parse)."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is no JSON")

    return json.loads(text, parse_constant=refuse)


def test_an_infinite_duration_stays_json(cli: CLI) -> None:
    """An attempt row whose duration is infinite (SQLite's REAL holds one; the store never
    writes it) made ``status --json`` and ``show --json`` write ``"duration": Infinity``,
    which jq refuses: the number is null now, the rest as it was."""
    mid = send(cli, "bob@example.test")
    conn = sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)
    (rid,) = conn.execute(
        "SELECT r.id FROM recipients r JOIN messages m ON m.seq = r.message_seq WHERE m.id = ?",
        (mid,),
    ).fetchone()
    conn.execute(
        "INSERT INTO attempts (recipient_id, at, outcome, duration)"
        " VALUES (?, 1, 'temporary', 9e999)",
        (rid,),
    )
    conn.close()
    for command in ("status", "show"):
        data = strict_json(cli.ok(command, "--json", mid).out)
        assert isinstance(data, dict)
        [attempt] = data["recipients"][0]["history"]
        assert attempt["duration"] is None
        assert attempt["outcome"] == "temporary"


@pytest.mark.parametrize(("value", "shown"), [("'abc'", "'abc'"), ("x'00'", "b'\\x00'")])
def test_status_history_names_an_attempt_row_without_a_duration(
    cli: CLI, value: str, shown: str
) -> None:
    """An attempt row changed by hand, a text or a blob where its duration goes, made
    ``status --history`` an internal error (70, "Unknown format code 'f' for object of
    type 'str'"): it names the row now (65), as for a message's own row."""
    bad = send(cli, "bob@example.test")
    conn = sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)
    (rid,) = conn.execute(
        "SELECT r.id FROM recipients r JOIN messages m ON m.seq = r.message_seq WHERE m.id = ?",
        (bad,),
    ).fetchone()
    conn.execute(
        "INSERT INTO attempts (recipient_id, at, outcome, duration)"
        f" VALUES (?, 1, 'temporary', {value})",
        (rid,),
    )
    conn.close()
    result = cli("status", "--history", bad)
    assert result.code == 65, result.err
    assert result.err_lines == [
        f"mailstrom: message {bad}: queue row unreadable: attempts.duration is {shown},"
        " not a number of seconds"
    ]


def test_status_history_shows_attempt_details_stored_as_blobs(cli: CLI) -> None:
    """Blobs where an attempt's TLS version and cipher go (a row written by another tool:
    SQLite keeps a blob in a TEXT column as it is) made ``status --history`` an internal
    error (70, "sequence item 0: expected str instance, bytes found"). They are shown as
    text, an octet that is not UTF-8 as U+FFFD, as the message's own shown columns are."""
    mid = send(cli, "bob@example.test")
    conn = sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)
    (rid,) = conn.execute(
        "SELECT r.id FROM recipients r JOIN messages m ON m.seq = r.message_seq WHERE m.id = ?",
        (mid,),
    ).fetchone()
    conn.execute(
        "INSERT INTO attempts (recipient_id, at, outcome, duration, mx_host, ip, tls_version,"
        " tls_cipher, tls_policy) VALUES (?, 1, 'temporary', 1.5, CAST('mx.example.test' AS"
        " BLOB), x'ff', CAST('TLSv1.3' AS BLOB), x'41ff', CAST('dane' AS BLOB))",
        (rid,),
    )
    conn.execute("UPDATE recipients SET mx_host = x'6d78ff', ip = x'ff' WHERE id = ?", (rid,))
    conn.close()
    shown = cli.ok("status", "--history", mid).out
    assert "TLSv1.3 A\ufffd" in shown
    assert "mx.example.test" in shown
    assert "mx\ufffd" in shown
    assert "b'" not in shown  # no bytes' repr
    [recipient] = cli.ok("status", "--json", mid).json()["recipients"]
    assert recipient["mx_host"] == "mx\ufffd"
    [attempt] = recipient["history"]
    assert (attempt["tls_version"], attempt["tls_cipher"]) == ("TLSv1.3", "A\ufffd")
    assert (attempt["mx_host"], attempt["tls_policy"]) == ("mx.example.test", "dane")
