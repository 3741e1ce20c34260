"""Store failures through the command: permanent ones exit 74, views read read-only stores."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from mailstrom import Config, Email, Mailstrom
from mailstrom.stores import SQLiteStore
from tests.cli.conftest import CLI, MailEnv, Result
from tests.cli.test_delivery import send as send_to_bob
from tests.cli.test_errors import assert_one_line_error
from tests.support.private_hosts import private_mounts
from tests.unit.test_sqlite_open import corrupt

MESSAGE = b"From: a@client.test\nSubject: x\n\nbody\n"


def send(cli: CLI) -> str:
    out = cli.ok("send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x")
    return out.out.strip()


def every_command_exits_74(cli: CLI, *fragments: str) -> None:
    for args, stdin in [
        (["queue"], None),
        (["queue", "--counts"], None),
        (["status", "0123456789abcdef0123456789abcdef"], None),
        (["send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x"], None),
        (["sendmail", "-i", "b@example.test"], MESSAGE),
        (["worker", "--once", "--no-live"], None),
        (["retry", "--all-deferred"], None),
        (["db", "migrate"], None),
    ]:
        result = cli(*args, stdin=stdin)
        assert_one_line_error(result, 74, *fragments)


def test_not_a_database_exits_74(cli: CLI) -> None:
    """Hardening #18: a store file that is no database exits 74, not 75 (try again), so a
    supervisor does not restart-loop on it."""
    (cli.cwd / "queue.db").write_text("this is not a queue\n" * 100)
    every_command_exits_74(cli, "not a mailstrom database")


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_store_path_that_is_no_file_exits_74(cli: CLI, kind: str) -> None:
    """A directory where the queue's file should be exited 75 ("disk I/O error": try
    again, for ever); a FIFO hung every view in opening it for reading."""
    path = cli.cwd / "queue.db"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    every_command_exits_74(cli, "not a regular file")


def test_malformed_database_exits_74(cli: CLI) -> None:
    """Hardening #18: "database disk image is malformed" exits 74."""
    for _ in range(10):
        cli.ok("send", "--from", "a@client.test", "--to", "b@x.test", "--text", "y" * 5000)
    corrupt(cli.cwd / "queue.db")
    result = cli("queue")
    assert_one_line_error(result, 74, "malformed")


def test_newer_schema_exits_74(cli: CLI) -> None:
    """Hardening #18: a store written by a newer mailstrom exits 74 and says so."""
    send(cli)
    with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn, conn:
        conn.execute("PRAGMA user_version = 9999")
    every_command_exits_74(cli, "newer")


def test_exit_74_is_documented() -> None:
    """Hardening #18: --help, sendmail --help and docs/cli.md list exit code 74."""
    from mailstrom.cli.main import EPILOG
    from mailstrom.cli.sendmail import HELP

    assert "74 store damaged" in EPILOG
    assert "74 store damaged" in HELP
    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    assert "| 74 | EX_IOERR |" in doc


def test_views_never_create_a_store(cli: CLI) -> None:
    """Hardening #18: status and queue only read; a missing store is an empty queue, and
    no file appears."""
    assert cli.ok("queue", "--json").json() == []
    assert cli.ok("queue", "--counts", "--json").json()["messages"] == 0
    assert cli("status", "0123456789abcdef0123456789abcdef").code == 66
    assert not (cli.cwd / "queue.db").exists()


# --- read-only media -----------------------------------------------------------------------


def on_read_only_mount(cli: CLI, *args: str) -> Result:
    """Run the command with its working directory (the store's) bind-mounted read-only
    onto itself, in a private mount namespace that ends with the process."""
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    proc = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"),
            *(str(cli.cwd), sys.executable, "-m", "mailstrom", *args),
        ],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


needs_ro_mount = pytest.mark.skipif(
    not private_mounts(),
    reason="needs unshare(1) and mount(8) with the right to make a mount namespace",
)


@needs_ro_mount
def test_views_work_on_a_read_only_mount(cli: CLI) -> None:
    """Hardening #18: status and queue work on a read-only mount (EROFS for any write).

    Opening used to write (page_size, journal_mode=WAL, migrations) and failed with
    "unable to open database file". The last writer closed cleanly, so there is no -wal
    file and SQLite cannot create the -shm it needs: the store is read as immutable.
    """
    mid = send(cli)
    assert not (cli.cwd / "queue.db-wal").exists()
    status = on_read_only_mount(cli, "status", "--json", mid)
    assert status.code == 0, status.err
    assert status.json()["id"] == mid
    queue = on_read_only_mount(cli, "queue", "--json")
    assert queue.code == 0, queue.err
    assert [m["id"] for m in queue.json()] == [mid]
    counts = on_read_only_mount(cli, "queue", "--counts", "--json")
    assert counts.code == 0, counts.err
    assert counts.json()["by_state"]["queued"] == 1
    # The mount really is read-only: a writer fails there, as before (try again later).
    assert on_read_only_mount(cli, "hold", mid).code == 75


@needs_ro_mount
def test_views_on_a_read_only_mount_see_an_open_writers_commits(cli: CLI) -> None:
    """Hardening #18 (guard of the fix): with a writer holding the store open (-wal and
    -shm present), the read-only view reads through the WAL and sees its latest commits,
    rather than reading the main file as immutable and missing them."""
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW, message

    send(cli)
    writer = SQLiteStore(cli.cwd / "queue.db")
    try:
        late = writer.enqueue(message(), now=NOW)
        assert (cli.cwd / "queue.db-wal").exists()
        queue = on_read_only_mount(cli, "queue", "--json")
        assert queue.code == 0, queue.err
        assert late in [m["id"] for m in queue.json()]
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_running_worker_stops_loudly_when_its_database_goes(
    cli: CLI, workdir: Path, how: str
) -> None:
    """Hardening #17: the store deleted (or replaced) under a running worker. The worker
    kept the unlinked file and went on silently while `send` created a new store it never
    read; now its next look at the store (the periodic poll) notices and it exits 74,
    naming the file."""
    send(cli)  # creates the store
    cli.env["MAILSTROM_POLL_INTERVAL"] = "0.2"
    worker = cli.popen("worker", "--no-live")
    try:
        assert worker.stderr is not None
        assert b"worker started" in worker.stderr.readline()
        db = workdir / "queue.db"
        if how == "deleted":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        else:
            replacement = workdir / "new.db"
            shutil.copy(db, replacement)
            replacement.replace(db)
        code = worker.wait(timeout=30)
        err = worker.stderr.read().decode()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
        if worker.stderr is not None:
            worker.stderr.close()
    assert code == 74, err
    assert "queue.db" in err and ("deleted" in err or "replaced" in err), err


# --- a newer mailstrom migrating the store under a running worker ---------------------------


def test_a_running_worker_exits_74_once_a_newer_mailstrom_migrated_its_store(
    mail_env: MailEnv,
) -> None:
    """Issue #8: ``mailstrom worker`` went on leasing and delivering with this mailstrom's
    statements on a schema it does not know, for ever; it ends as on a newer schema found
    at open (74: a supervisor does not restart it into the same failure), delivering
    nothing more, and what was queued meanwhile stays queued for the newer worker."""
    cli, mx = mail_env.cli, mail_env.mx
    send_to_bob(cli, "--text", "Hi")
    proc = cli.popen("worker", "--no-live")
    try:
        mx.wait_for_messages(1, timeout=30)
        # An application of this mailstrom that opened the queue before the migration
        # queues one more: its enqueue wakes the worker, whose next lease looks.
        store = SQLiteStore(cli.cwd / "queue.db")
        with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn, conn:
            conn.execute("PRAGMA user_version = 9999")
        with Mailstrom(Config(), store=store, worker=None) as ms:
            ms.send_email(Email(from_="a@client.test", to=["carol@example.test"], text="x"))
        store.close()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err_bytes = proc.communicate()
    err = err_bytes.decode()
    assert code == 74, err
    assert "schema version 9999 is newer than this mailstrom" in err, err
    assert [list(m.rcpt_tos) for m in mx.messages] == [["bob@example.test"]]
    with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn:
        waiting = conn.execute("SELECT address, state, lease_token FROM recipients WHERE id > 1")
        assert waiting.fetchall() == [("carol@example.test", "queued", None)]


@pytest.mark.postgres
def test_a_running_worker_exits_74_once_a_newer_mailstrom_migrated_its_postgres_store(
    mail_env: MailEnv, postgres_url: str
) -> None:
    """The same on PostgreSQL, where the worker's beat reads the schema version."""
    cli, mx = mail_env.cli, mail_env.mx
    url = f"{postgres_url}?dead_after=4s"  # a beat every half second
    send_to_bob(cli, "--store", url, "--text", "Hi")
    proc = cli.popen("worker", "--no-live", "--store", url)
    try:
        mx.wait_for_messages(1, timeout=30)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_version (version, name) VALUES (9999, 'newer')")
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err_bytes = proc.communicate()
    err = err_bytes.decode()
    assert code == 74, err
    assert "at version 9999, newer than this mailstrom knows" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["sendmail", "-i", "bob@example.test"],
        ["send", "--from", "a@client.test", "--to", "bob@example.test", "--text", "x"],
        ["send", "--file", "-", "--to", "bob@example.test"],
    ],
)
def test_a_command_that_queues_refuses_a_memory_store(cli: CLI, argv: list[str]) -> None:
    """A memory store ends with the process that opened it: ``sendmail`` and ``send``
    queued the message there, exited 0 ("queued", and ``send`` printed its id), and the
    message was gone as the command exited, before any worker could see it."""
    cli.env["MAILSTROM_STORE"] = "memory:"
    assert_one_line_error(cli(*argv, stdin=MESSAGE), 78, "memory store")


BOUNCE = (Path(__file__).parents[1] / "samples" / "bounces" / "exim-dsn.eml").read_bytes()


@pytest.mark.parametrize(
    ("argv", "stdin"),
    [
        (["hold", "--all"], None),
        (["release", "--all"], None),
        (["retry", "--all"], None),
        (["retry", "--all-deferred"], None),
        (["cancel", "--all"], None),
        (["purge", "--all"], None),
        (["suspend", "example.org"], None),
        (["resume", "example.org"], None),
        (["suppress", "add", "bob@example.org"], None),
        (["suppress", "remove", "bob@example.org"], None),
        (["suppress", "import", "-"], b"bob@example.org\n"),
        (["bounce"], BOUNCE),
        (["events", "--prune", "30d"], None),
        (["tlsrpt", "--send"], None),
        (["web", "--listen", "127.0.0.1:0"], None),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_command_that_changes_the_store_refuses_a_memory_store(
    cli: CLI, argv: list[str], stdin: bytes | None
) -> None:
    """``suppress add`` printed "suppressed", ``hold`` "held", ``suspend`` "suspended",
    ``bounce`` its outcome, each with exit 0, and the change was gone with the memory store
    as the command exited: the next command (or a worker) never saw it. ``tlsrpt --send``
    queues its ``mailto:`` reports there; ``web`` served a queue no other process could
    fill, and its actions (hold, suspend, ...) ended with it."""
    cli.env["MAILSTROM_STORE"] = "memory:"
    assert_one_line_error(cli(*argv, stdin=stdin), 78, "memory store")


@pytest.mark.parametrize(
    "argv",
    [["queue"], ["hold", "--all", "--dry-run"], ["suppress", "list"], ["events"]],
    ids=" ".join,
)
def test_a_command_that_only_looks_reads_a_memory_store(cli: CLI, argv: list[str]) -> None:
    cli.env["MAILSTROM_STORE"] = "memory:"
    assert cli(*argv).code == 0


@pytest.mark.parametrize(("where", "code"), [("missing/queue.db", 75), ("file/queue.db", 78)])
def test_views_of_a_store_in_no_directory_say_so(cli: CLI, where: str, code: int) -> None:
    """A configured store whose directory is missing (a typo, an unmounted volume) or is
    no directory: the views showed an empty queue (exit 0), and `status` said the message
    did not exist, where the writers refuse the path. The views refuse it too: 75 for a
    directory that may yet be mounted, 78 for a path that never can be a store as it is
    (a worker waited for ever on it, a follower too)."""
    (cli.cwd / "file").write_text("not a directory\n")
    cli.env["MAILSTROM_STORE"] = f"sqlite:///{where}"
    for args in (["queue"], ["queue", "--counts"], ["status", "0123456789abcdef"], ["events"]):
        assert_one_line_error(cli(*args), code, "cannot open", where)
    assert_one_line_error(cli("hold", "--all"), code, "cannot create", where)


def test_views_of_a_store_that_is_a_dangling_link_say_so(cli: CLI) -> None:
    """A store path that is a symbolic link whose target is missing (its volume not
    mounted): the views showed an empty queue (exit 0), and `status` said the message
    did not exist, where every writer fails on it (never creating a file through the
    link). The views say what is wrong too, 75: the volume may yet be mounted."""
    (cli.cwd / "queue.db").symlink_to(cli.cwd / "unmounted" / "queue.db")
    for args in (["queue"], ["queue", "--counts"], ["status", "0123456789abcdef"], ["events"]):
        assert_one_line_error(cli(*args), 75, "cannot open", "queue.db", "unmounted/queue.db")
    assert cli("send", "--from", "a@client.test", "--to", "b@x.test", "--text", "x").code == 75


def test_a_worker_on_a_store_path_through_a_file_ends(cli: CLI) -> None:
    """Creating the store failed ENOTDIR, a StoreError worth waiting for: the worker
    tried again every 5 s for ever. It ends, 78, as on a directory it may not write."""
    (cli.cwd / "file").write_text("not a directory\n")
    cli.env["MAILSTROM_STORE"] = "sqlite:///file/queue.db"
    assert_one_line_error(cli("worker", "--no-live", timeout=30), 78, "Not a directory")
