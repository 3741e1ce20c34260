"""``mailstrom send`` reports the id of what it queued, whatever fails after that: a
message queued whose id is lost can be neither found nor cancelled, and is sent."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing

import pytest

from tests.cli.conftest import CLI
from tests.cli.test_output_errors import FULL, to_full_disk

BUILD = ["send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x"]


def unreadable_once_queued(cli: CLI) -> None:
    """Each message queued from now on is a row that cannot be read back (a store that
    fails between the enqueue and the read of the message, made so with a trigger)."""
    cli.ok(*BUILD)  # the store and its schema
    with closing(sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)) as conn:
        conn.execute(
            "CREATE TRIGGER unreadable AFTER INSERT ON messages BEGIN "
            "UPDATE messages SET created_at = 'yesterday' WHERE id = NEW.id; END"
        )


def queued_ids(cli: CLI) -> list[str]:
    with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM messages ORDER BY id")]


@pytest.mark.parametrize("wait", [[], ["--wait", "--timeout", "5"]], ids=["queued", "wait"])
def test_send_json_reports_the_queued_id_when_reading_it_back_fails(
    cli: CLI, wait: list[str]
) -> None:
    # The message was queued, then the store failed as it was read back: `--json`
    # printed nothing, and the exit code (65, "nothing was queued") said it was not.
    unreadable_once_queued(cli)
    before = queued_ids(cli)
    result = cli(*BUILD, "--json", *wait)
    [queued] = [i for i in queued_ids(cli) if i not in before]
    assert result.code != 0
    assert json.loads(result.out) == {"id": queued}
    assert f"mailstrom: message {queued} is queued" in result.err


def test_send_text_reports_the_queued_id_when_reading_it_back_fails(cli: CLI) -> None:
    # Printed first, as ever; the failure now says the message is queued all the same.
    unreadable_once_queued(cli)
    before = queued_ids(cli)
    result = cli(*BUILD, "--wait", "--timeout", "5")
    [queued] = [i for i in queued_ids(cli) if i not in before]
    assert result.code != 0
    assert result.out.split() == [queued]
    assert f"mailstrom: message {queued} is queued" in result.err


@pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full")
@pytest.mark.parametrize("json_out", [[], ["--json"]], ids=["text", "json"])
def test_send_to_a_full_disk_says_on_stderr_which_message_it_queued(
    cli: CLI, json_out: list[str]
) -> None:
    # `send > out` on a full disk: the id could go to neither stream, and exit 73 (what
    # a failed output file gives) read as nothing done, so a script sent it again.
    cli.ok(*BUILD)  # the store and its schema
    before = queued_ids(cli)
    ran = to_full_disk(cli, *BUILD, *json_out)
    [queued] = [i for i in queued_ids(cli) if i not in before]
    assert ran.returncode == 73, ran.stderr
    assert f"mailstrom: message {queued} is queued" in ran.stderr, ran.stderr
    assert "cannot write standard output" in ran.stderr
