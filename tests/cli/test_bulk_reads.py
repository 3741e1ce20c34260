"""What the bulk commands read to choose their messages: ids, never the messages' bytes.

``cancel --domain x`` (and hold, release, retry, purge by filters) chose its messages by
reading their whole statuses from rows whose later columns (tags, metadata, priority,
send_at, expires_at, idempotency_key: schema version 5 added them after ``data``) SQLite
reached only by walking each message's overflow pages: a queue of a million 50 kB
messages read some 50 GB to find the ids it then changed. Since schema version 20 the
bytes lie in ``message_data``, which choosing messages must not read."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailstrom import Mailstrom
from mailstrom.config import Config
from mailstrom.stores import QueueFilter, SQLiteStore
from tests.cli.conftest import CLI
from tests.contract.support import message
from tests.support.column_reads import FILE_VARIABLE, column_reads, reads_of_bytes

ROOT = Path(__file__).resolve().parents[2]
BODY = b"Subject: big\r\n\r\n" + b"x" * 50_000 + b"\r\n"
"""A message of 50 kB: its bytes fill a dozen overflow pages."""


def fill(path: Path) -> None:
    """Three pending messages to x.test and two cancelled ones to y.test, an hour old."""
    store = SQLiteStore(path)
    try:
        then = datetime.now(UTC) - timedelta(hours=1)
        for to in ("a@x.test", "b@x.test", "c@x.test", "d@y.test", "e@y.test"):
            store.enqueue(dataclasses.replace(message(to), data=BODY), now=then)
        ids = [m.id for m in store.query(now=then, where=QueueFilter(domain="y.test"))]
        store.cancel_many(ids, now=then)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (("cancel", "--domain", "x.test"), "3 recipients cancelled (3 messages)"),
        (("hold", "--domain", "x.test"), "3 messages held"),
        (("retry", "--older-than", "1m"), "3 recipients due now (3 messages)"),
        (("cancel", "--state", "any", "--all"), "3 recipients cancelled (5 messages)"),
        (("purge", "--domain", "y.test"), "2 messages purged"),
    ],
)
def test_a_bulk_command_by_filters_reads_no_message_bytes(
    cli: CLI, tmp_path: Path, command: tuple[str, ...], said: str
) -> None:
    fill(cli.cwd / "queue.db")
    reads = tmp_path / "reads.txt"
    reads.touch()
    env = {**cli.env, FILE_VARIABLE: str(reads)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    watched = dataclasses.replace(cli, env=env, module="tests.support.column_reads")
    assert watched.ok(*command).out.strip() == said
    read = set(reads.read_text().split())
    assert "id" in read  # the authorizer saw the selection
    past = reads_of_bytes(read)
    assert not past, f"read the message's bytes: {sorted(past)}"


def test_the_facade_s_bulk_methods_by_filter_read_no_message_bytes(tmp_path: Path) -> None:
    """``ms.cancel_many(QueueFilter(...))`` chose its messages as the command did."""
    path = tmp_path / "queue.db"
    fill(path)
    read: set[str] = set()
    with (
        column_reads(read.add),
        Mailstrom(Config(helo_name="client.test"), store=SQLiteStore(path), worker=None) as ms,
    ):
        assert ms.hold(QueueFilter(domain="x.test")) == 3
        assert ms.cancel_many(QueueFilter(domain="x.test")) == 3
        assert ms.purge(timedelta(0), messages=QueueFilter(domain="y.test")) == 2
    assert "id" in read
    past = reads_of_bytes(read)
    assert not past, f"read the message's bytes: {sorted(past)}"
