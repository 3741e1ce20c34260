"""``mailstrom workers`` lists the workers running on the store, and ``mailstrom queue``
notes when queued mail has nobody to deliver it."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import CLI, MailEnv, ended
from tests.cli.test_delivery import send

NOBODY = "no worker is running on this store: queued mail waits until one starts"


def _workers(cli: CLI) -> tuple[int, list[dict[str, Any]]]:
    result = cli("workers", "--json")
    return result.code, result.json()


def _wait_for_workers(cli: CLI, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        _, found = _workers(cli)
        if len(found) == count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_workers_lists_a_running_worker_and_queue_notes_when_none_runs(
    mail_env: MailEnv, store: str, request: pytest.FixtureRequest
) -> None:
    cli = mail_env.cli
    if store == "postgres":
        cli.env["MAILSTROM_STORE"] = f"{request.getfixturevalue('postgres_url')}?dead_after=2s"
    later = send(cli, "--text", "Later", "--at", "2099-01-01T00:00:00Z")  # waits anyway

    nobody = cli("workers")
    assert (nobody.code, nobody.out.strip()) == (
        69,
        f"{NOBODY} (`mailstrom worker`, or an application's Mailstrom)",
    )
    assert _workers(cli) == (69, [])
    queue = cli.ok("queue")
    assert f"mailstrom: note: {NOBODY}" in queue.err
    assert "Later" not in queue.err  # the note is on stderr; the table on stdout
    assert f"mailstrom: note: {NOBODY}" in cli.ok("status", later).err
    assert cli.ok("queue", "--json").err == cli.ok("status", "--json", later).err == ""

    worker = cli.popen("worker", "--no-live")
    try:
        [found] = _wait_for_workers(cli, 1)
        assert (found["pid"], found["host"], found["leased"]) == (
            worker.pid,
            socket.gethostname(),
            0,
        )
        assert len(found["holder"]) == 16 and found["started_at"]
        table = cli.ok("workers")
        assert found["holder"] in table.out and str(worker.pid) in table.out
        assert "note:" not in cli.ok("queue").err
        assert "note:" not in cli.ok("status", later).err
    finally:
        ended(worker)
    # Its lock file went with it (SQLite), its row was marked stopped (PostgreSQL).
    assert _workers(cli) == (69, [])


def test_workers_on_a_queue_not_created_yet_says_nobody_runs(cli: CLI, workdir: Path) -> None:
    """A store file nothing has opened yet (a fresh host, the worker not started): nobody
    delivers from it, which is exit 69 as the docs say, not a usage error about a memory
    store the user never named."""
    nobody = cli("workers")
    assert (nobody.code, nobody.out.strip(), nobody.err) == (
        69,
        f"{NOBODY} (`mailstrom worker`, or an application's Mailstrom)",
        "",
    )
    assert _workers(cli) == (69, [])
    assert not (workdir / "queue.db").exists()
    # A memory store only looked at is an empty queue, as docs/cli.md says of every
    # command that only looks: nobody delivers from it (exit 69), not a usage error (64)
    # for a store setting the commands that change the store refuse with 78.
    memory = cli("--store", "memory:", "workers")
    assert (memory.code, memory.out.strip(), memory.err) == (69, nobody.out.strip(), "")
    memory_json = cli("--store", "memory:", "workers", "--json")
    assert (memory_json.code, memory_json.json(), memory_json.err) == (69, [], "")
