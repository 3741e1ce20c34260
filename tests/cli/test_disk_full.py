"""The command on a full disk: writes exit 75 (try again later) with one line saying the
disk is full, views go on reading, and ``mailstrom worker`` keeps what it delivered until
it can record it.

Two full disks: the one of tests/support/disk_full.py (SQLITE_FULL on demand, in a
wrapper of the command), and a real one, a small tmpfs filled to the last byte in a
private mount namespace (where the machine allows it): ENOSPC for every file SQLite
writes, its ``-shm`` included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom import RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.sqlite_schema import migrations
from mailstrom.testing.smtp import ReceivedMessage
from tests.cli.conftest import CLI, MailEnv, Result
from tests.cli.test_errors import assert_one_line_error
from tests.contract.support import NOW, message
from tests.support.disk_full import MARKER_VARIABLE
from tests.support.private_hosts import private_mounts

ROOT = Path(__file__).parents[2]
BIG_TEXT = "x" * 40_000
"""A body that needs pages of its own: it never fits a full disk."""


@dataclasses.dataclass
class FullDisk:
    """The command as it runs with a disk that is full while ``marker`` exists."""

    cli: CLI
    marker: Path

    def fill(self) -> None:
        self.marker.touch()

    def free(self) -> None:
        self.marker.unlink()


@pytest.fixture
def full_disk(cli: CLI, tmp_path: Path) -> FullDisk:
    env = dict(cli.env)
    env[MARKER_VARIABLE] = str(tmp_path / "disk-is-full")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    wrapped = dataclasses.replace(cli, env=env, module="tests.support.disk_full")
    return FullDisk(cli=wrapped, marker=tmp_path / "disk-is-full")


def queued(cli: CLI) -> str:
    """A store in the command's directory with one message queued (made here: fast)."""
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        return store.enqueue(message(), now=NOW)
    finally:
        store.close()


def test_send_on_a_full_disk_exits_75_and_views_still_read(full_disk: FullDisk) -> None:
    mid = queued(full_disk.cli)
    cli = full_disk.cli
    send = ("send", "--from", "a@client.test", "--to", "b@example.test", "--text", BIG_TEXT)
    full_disk.fill()
    assert_one_line_error(cli(*send), 75, "disk", "full", "queue.db", "free space")
    status = cli.ok("status", "--json", mid).json()
    assert status["id"] == mid


# --- mailstrom worker --------------------------------------------------------------------

REPLY = "250 2.0.0 queued as " + "Q" * 400
"""Kept with each recipient and attempt: forty of them need new pages (see
tests/integration/test_disk_full.py)."""
RECIPIENTS = [f"u{i:02}@example.test" for i in range(40)]


@pytest.fixture
def worker_env(mail_env: MailEnv, full_disk: FullDisk) -> Iterator[subprocess.Popen[bytes]]:
    """``mailstrom worker`` through the wrapper, with its stderr readable line by line."""
    proc = full_disk.cli.popen("worker", "--no-live")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def read_until(proc: subprocess.Popen[bytes], fragment: str) -> list[str]:
    """stderr lines up to and with the first holding ``fragment`` (the test's timeout
    ends a worker that never says it)."""
    assert proc.stderr is not None
    lines: list[str] = []
    while line := proc.stderr.readline().decode():
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"the worker ended without saying {fragment!r}: {''.join(lines)}")


def test_the_worker_command_rides_out_a_full_disk(
    mail_env: MailEnv, full_disk: FullDisk, worker_env: subprocess.Popen[bytes]
) -> None:
    """The disk fills as the server takes the message: the worker cannot record the
    results, logs it once, keeps them and does not exit; once space is freed it records
    them (every recipient delivered once) and logs that the store works again."""
    mx = mail_env.mx
    mx.data_reply = REPLY
    received = mx.record

    def record(taken: ReceivedMessage, *, accepted: bool) -> None:
        full_disk.fill()
        received(taken, accepted=accepted)

    mx.record = record  # type: ignore[method-assign]
    read_until(worker_env, "worker started")
    store = SQLiteStore(mail_env.workdir / "queue.db")
    try:
        mid = store.enqueue(message(*RECIPIENTS), now=datetime.now(UTC))
        [failing] = read_until(worker_env, "store failing")[-1:]
        assert "record" in failing and "disk" in failing and "full" in failing, failing
        time.sleep(0.3)  # the worker retries meanwhile, with backoff
        assert worker_env.poll() is None
        assert [r.state for r in store.status(mid).recipients] == [RecipientState.QUEUED] * 40
        full_disk.free()
        read_until(worker_env, "store working again")
        recipients = store.status(mid).recipients
    finally:
        store.close()
    [delivered] = mx.messages
    assert sorted(delivered.rcpt_tos) == RECIPIENTS
    assert {(r.state, r.attempts) for r in recipients} == {(RecipientState.DELIVERED, 1)}


# --- a real full disk ----------------------------------------------------------------------

needs_mount_namespace = pytest.mark.skipif(
    not private_mounts(),
    reason="needs unshare(1) and mount(8) with the right to make a mount namespace",
)

ON_A_FULL_TMPFS = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW, message

    disk, commands = sys.argv[1], json.loads(sys.argv[2])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], check=True)
    os.chdir(disk)
    store = SQLiteStore("queue.db")
    mid = store.enqueue(message(), now=NOW)
    store.close()  # closed cleanly: no -wal, no -shm left
    filler = os.open("filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(filler, bytes(4096)):
            pass
    except OSError:  # ENOSPC: not a byte left
        pass
    os.close(filler)

    def run(args):
        return subprocess.Popen(
            [sys.executable, "-m", "mailstrom", *(a.replace("ID", mid) for a in args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    ran = [run(args) for args in commands]  # at once: each takes a Python start-up
    full = [(p.wait(), p.stdout.read().decode(), p.stderr.read().decode()) for p in ran]
    os.remove("filler")
    freed = run(commands[0])
    after = (freed.wait(), freed.stdout.read().decode(), freed.stderr.read().decode())
    print(json.dumps({"id": mid, "full": full, "freed": after}))
    """
)


@needs_mount_namespace
def test_a_really_full_disk(cli: CLI) -> None:
    """A tmpfs with not a byte left, and a store last closed cleanly: SQLite cannot even
    make its ``-shm`` file ("disk I/O error"). Writers exit 75 saying the disk is full;
    views read the file as it is (they failed with "disk I/O error"); once space is
    freed, writing works."""
    disk = cli.cwd / "disk"
    disk.mkdir()
    send = ["send", "--from", "a@client.test", "--to", "b@example.test", "--text", "hi"]
    commands = [
        send,
        ["retry", "ID"],
        ["cancel", "ID"],
        ["status", "--json", "ID"],
        ["queue", "--json"],
    ]
    proc = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private"),
            *(sys.executable, "-c", ON_A_FULL_TMPFS, str(disk), json.dumps(commands)),
        ],
        cwd=cli.cwd,
        env=cli.env | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    mid = report["id"]
    sent, retried, cancelled, status, queue = (Result(*r) for r in report["full"])
    for result in (sent, retried, cancelled):
        assert_one_line_error(result, 75, "disk", "full", "free space")
    assert status.code == 0, status.err
    assert status.json()["id"] == mid
    assert queue.code == 0, queue.err
    assert [m["id"] for m in queue.json()] == [mid]
    freed = Result(*report["freed"])
    assert freed.code == 0, freed.err


MIGRATE_ON_A_FULL_TMPFS = textwrap.dedent(
    """
    import json, os, sqlite3, subprocess, sys
    from mailstrom.stores.sqlite_schema import migrations, _statements

    disk = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], check=True)
    os.chdir(disk)
    # A queue of an older mailstrom (schema 8), which a worker still running has open:
    # its -wal and -shm are there, with no room for the migration's pages.
    old = sqlite3.connect("queue.db", isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    for number, script in migrations()[:8]:
        old.execute("BEGIN")
        for statement in _statements(script):
            old.execute(statement)
        old.execute(f"PRAGMA user_version = {number}")
        old.execute("COMMIT")
    old.execute("SELECT * FROM sqlite_master").fetchall()
    filler = os.open("filler", os.O_WRONLY | os.O_CREAT)
    for size in (4096, 1):
        try:
            while os.write(filler, bytes(size)):
                pass
        except OSError:  # ENOSPC: not a byte left
            pass
    os.close(filler)

    def migrate():
        done = subprocess.run(
            [sys.executable, "-m", "mailstrom", "db", "migrate", "--store", "queue.db"],
            capture_output=True,
        )
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    full = migrate()
    version_then = old.execute("PRAGMA user_version").fetchone()[0]
    os.remove("filler")
    freed = migrate()
    check = old.execute("PRAGMA integrity_check").fetchone()[0]
    print(json.dumps({"full": full, "version_then": version_then, "freed": freed, "check": check}))
    """
)


@needs_mount_namespace
def test_a_migration_on_a_really_full_disk_says_the_disk_is_full(cli: CLI) -> None:
    """A migration whose COMMIT finds no room for the WAL: SQLite rolls the transaction
    back itself, and the migration's ROLLBACK then failed ("cannot rollback - no
    transaction is active"), which was all `mailstrom db migrate` (or a starting worker)
    said. It says the disk is full; nothing of the migration is kept, and it completes
    once space is freed."""
    disk = cli.cwd / "disk"
    disk.mkdir()
    proc = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private"),
            *(sys.executable, "-c", MIGRATE_ON_A_FULL_TMPFS, str(disk)),
        ],
        cwd=cli.cwd,
        env=cli.env | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert_one_line_error(Result(*report["full"]), 75, "disk", "full", "free space")
    assert report["version_then"] == 8
    freed = Result(*report["freed"])
    assert freed.code == 0, freed.err
    assert freed.out.strip().endswith(f"schema version {migrations()[-1][0]}")
    assert report["check"] == "ok"
