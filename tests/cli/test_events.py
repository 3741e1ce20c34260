"""``mailstrom events``: the outbox's delivery events for scripts, listed and followed."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailstrom.status import RecipientState
from mailstrom.stores import open_store
from tests.cli.conftest import CLI, MailEnv


def send(env: MailEnv, to: str) -> str:
    out = env.cli.ok("send", "--from", "app@client.test", "--to", to, "--text", "Hi").out
    return out.strip()


def test_events_list_and_follow(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.env["MAILSTROM_EVENTS"] = "1"  # the outbox is written without a hook
    mail_env.mx.rcpt_replies["later@example.test"] = "451 4.7.1 Try again later"
    first = send(mail_env, "bob@example.test")
    second = send(mail_env, "later@example.test")
    cli.ok("worker", "--once", "--no-live")

    lines = cli.ok("events", "--json").out.splitlines()
    events = [json.loads(line) for line in lines]
    assert [
        (e["message_id"], e["recipient"], e["type"])
        for e in sorted(events, key=lambda e: e["recipient"])
    ] == [
        (first, "bob@example.test", "delivered"),
        (second, "later@example.test", "deferred"),
    ]
    assert all(e["attempt"] == 1 for e in events)
    text = cli.ok("events").out
    assert "delivered bob@example.test attempt=1" in text
    assert "451 4.7.1 Try again later" in text
    # --after and --limit page through them.
    last = max(e["id"] for e in events)
    assert cli.ok("events", "--after", str(last)).out == ""
    assert len(cli.ok("events", "--limit", "1").out.splitlines()) == 1

    # --follow prints what workers record from now on, and nothing it printed before.
    follow = cli.popen("events", "--follow", "--json", "--interval", "0.05")
    try:
        assert follow.stdout is not None
        got: list[dict[str, object]] = []
        ready = threading.Event()

        def read() -> None:
            assert follow.stdout is not None
            for line in follow.stdout:
                got.append(json.loads(line))
                if len(got) == 3:
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        third = send(mail_env, "carol@example.test")
        cli.ok("worker", "--once", "--no-live")
        assert ready.wait(30), got
        assert [e["recipient"] for e in got[2:]] == ["carol@example.test"]
        assert got[2]["message_id"] == third
    finally:
        follow.terminate()
        follow.wait(10)
        if follow.stdout is not None:
            follow.stdout.close()
        if follow.stderr is not None:
            follow.stderr.close()


def test_a_cancelled_recipient_ends_in_the_events(mail_env: MailEnv) -> None:
    """Was: ``mailstrom cancel`` wrote no event: a deferred recipient's last event said
    deferred for ever, while ``mailstrom status`` said failed (cancelled). Now each
    recipient the cancel fails has one ``failed`` event; a second cancel adds none."""
    cli = mail_env.cli
    cli.env["MAILSTROM_EVENTS"] = "1"
    mail_env.mx.rcpt_replies["later@example.test"] = "451 4.7.1 Try again later"
    deferred = send(mail_env, "later@example.test")
    cli.ok("worker", "--once", "--no-live")
    queued = send(mail_env, "never@example.test")
    cli.ok("cancel", deferred, queued)
    cli.ok("cancel", deferred, queued)

    events = [json.loads(line) for line in cli.ok("events", "--json").out.splitlines()]
    assert [(e["message_id"], e["type"], e["attempt"], e["error"]) for e in events] == [
        (deferred, "deferred", 1, None),
        *sorted([(deferred, "failed", 1, "cancelled"), (queued, "failed", 0, "cancelled")]),
    ]


def test_events_prune_keeps_unsent(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.env["MAILSTROM_EVENTS"] = "1"
    send(mail_env, "bob@example.test")
    cli.ok("worker", "--once", "--no-live")
    assert cli.ok("events", "--prune", "0s", "--json").json() == {"pruned": 0}
    assert len(cli.ok("events").out.splitlines()) == 1


def test_events_prune_unsent_removes_what_no_hook_sends(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.env["MAILSTROM_EVENTS"] = "1"
    send(mail_env, "bob@example.test")
    cli.ok("worker", "--once", "--no-live")
    assert cli.ok("events", "--prune", "1h", "--unsent", "--json").json() == {"pruned": 0}
    assert cli.ok("events", "--prune", "0s", "--unsent", "--json").json() == {"pruned": 1}
    assert cli.ok("events").out == ""
    refused = cli("events", "--unsent")
    assert refused.code == 64
    assert "--unsent goes with --prune" in refused.err


def test_prune_refuses_the_listing_options_it_would_ignore(cli: CLI, workdir: Path) -> None:
    """``--prune`` deletes every event old enough: ``--after``, ``--limit`` and
    ``--follow`` beside it were ignored without a word, and ``events --prune 0s --unsent
    --after ID`` deleted the events up to ID too. A usage error now, as the queue's
    summaries refuse the filters they would drop; nothing is deleted."""
    from tests.contract.support import lease_all, message, results_for

    at = datetime.now(UTC) - timedelta(hours=1)
    store = open_store(f"sqlite:///{workdir / 'queue.db'}")
    try:
        store.enable_events()
        store.enqueue(message("a@x.test", "b@x.test"), now=at)
        store.record(results_for(lease_all(store, now=at), RecipientState.DELIVERED, at=at))
        first = store.read_events()[0].id
    finally:
        store.close()
    for extra in (["--after", str(first)], ["--after", "0"], ["--limit", "1"], ["--follow"]):
        refused = cli("events", "--prune", "0s", "--unsent", *extra, timeout=30)
        assert refused.code == 64, (extra, refused.err)
        assert refused.err_lines == [f"mailstrom: --prune takes no {extra[0]}"]
    assert len(cli.ok("events").out.splitlines()) == 2
    assert cli.ok("events", "--prune", "0s", "--unsent", "--json").json() == {"pruned": 2}


def test_events_json_escapes_what_a_terminal_would_obey(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.env["MAILSTROM_EVENTS"] = "1"
    value = "abc\u202edef"  # a bidi override: the line shown reversed
    cli.ok(
        "send",
        "--from",
        "app@client.test",
        "--to",
        "bob@example.test",
        "--text",
        "Hi",
        "--meta",
        f"note={value}",
    )
    cli.ok("worker", "--once", "--no-live")
    out = cli.ok("events", "--json").out
    assert "\u202e" not in out
    assert json.loads(out)["metadata"] == {"note": value}


def test_events_on_an_empty_store(cli: object) -> None:
    from tests.cli.conftest import CLI

    assert isinstance(cli, CLI)
    assert cli.ok("events").out == ""
    assert cli("events", "--after", "x").code == 64


def _sleeping(pid: int) -> bool:
    """Whether process ``pid`` sleeps in time.sleep() (its kernel wait channel)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "nanosleep" in f.read()
    except OSError:
        return False


def test_follow_started_before_the_queue_exists_sees_its_events(mail_env: MailEnv) -> None:
    """A view of a queue whose SQLite file does not exist yet reads an empty stand-in
    (views never create the store). ``events --follow`` kept polling that stand-in: once
    the first message created the file and a worker recorded events, it printed nothing,
    ever (a follower started at boot, before the first mail)."""
    if not os.path.exists(f"/proc/{os.getpid()}/wchan"):
        pytest.skip("needs /proc/PID/wchan to see the follower wait between looks")
    cli = mail_env.cli
    cli.env["MAILSTROM_EVENTS"] = "1"
    assert not (mail_env.workdir / "queue.db").exists()
    follow = cli.popen("events", "--follow", "--json", "--interval", "0.05")
    try:
        deadline = time.monotonic() + 60
        while not _sleeping(follow.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the kernel's state of the process; nothing to wait on
        assert _sleeping(follow.pid), "the follower never started following"
        got: list[dict[str, object]] = []
        ready = threading.Event()

        def read() -> None:
            assert follow.stdout is not None
            for line in follow.stdout:
                got.append(json.loads(line))
                ready.set()

        threading.Thread(target=read, daemon=True).start()
        first = send(mail_env, "bob@example.test")
        cli.ok("worker", "--once", "--no-live")
        assert ready.wait(30), "the follower printed no event"
        assert [(e["message_id"], e["type"]) for e in got] == [(first, "delivered")]
    finally:
        follow.terminate()
        follow.wait(10)
        for stream in (follow.stdout, follow.stderr):
            if stream is not None:
                stream.close()


def test_the_last_events_across_a_gap_in_the_ids(cli: object, workdir: Path) -> None:
    """``mailstrom events --limit N`` shows the last N events. It read the N ids below the
    last one, and ids have gaps: a prune deletes the events a hook sent, which need not be
    the oldest (two senders, one of whose batches failed), and PostgreSQL's sequence skips
    the ids of rolled-back transactions. With events 1 and 4 left, ``--limit 2`` showed 4
    alone."""
    from tests.cli.conftest import CLI
    from tests.contract.support import LEASE_FOR, NOW, lease_all, message, results_for

    assert isinstance(cli, CLI)
    store = open_store(f"sqlite:///{workdir / 'queue.db'}")
    try:
        store.enable_events()
        store.enqueue(message("a@x.test", "b@x.test", "c@x.test", "d@x.test"), now=NOW)
        store.record(results_for(lease_all(store), RecipientState.DELIVERED))
        first = store.lease_events(now=NOW, limit=1, lease_for=LEASE_FOR)
        sent = store.lease_events(now=NOW, limit=2, lease_for=LEASE_FOR)
        assert first is not None and sent is not None
        store.ack_events(sent, now=NOW)
        assert store.prune_events(sent_before=NOW + timedelta(seconds=1)) == 2
        kept = [e.id for e in store.read_events()]
    finally:
        store.close()
    assert len(kept) == 2 and kept[1] - kept[0] == 3
    lines = cli.ok("events", "--limit", "2", "--json").out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == kept
    lines = cli.ok("events", "--limit", "1", "--json").out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == kept[1:]


def _record_delivered(url: str, *addresses: str) -> None:
    """A delivered-recipient event in the outbox of the store at ``url`` per address."""
    from tests.contract.support import NOW, lease_all, message, results_for

    store = open_store(url)
    try:
        store.enable_events()
        store.enqueue(message(*addresses), now=NOW)
        store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    finally:
        store.close()


class Follower:
    """``mailstrom events --follow --json`` running, its output read line by line."""

    def __init__(self, cli: CLI, *args: str) -> None:
        self.proc = cli.popen("events", "--follow", "--json", "--interval", "0.05", *args)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, lines: queue.Queue[str]) -> None:
        for line in stream:
            lines.put(line.decode())
        lines.put("")  # the end: the follower exited

    def recipient(self) -> str:
        """The recipient of the next event printed (within 30 s)."""
        line = self.out.get(timeout=30)
        assert line, f"the follower exited ({self.proc.wait()})"
        recipient: str = json.loads(line)["recipient"]
        return recipient

    def said(self, text: str, within: float = 30) -> str:
        """The next line on stderr holding ``text`` (within ``within`` seconds); the lines
        before it are kept in :attr:`skipped`."""
        self.skipped: list[str] = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.err.get(timeout=left)
            except queue.Empty:
                break
            if text in line:
                return line
            assert line, f"the follower exited ({self.proc.wait()}): {''.join(self.skipped)}"
            self.skipped.append(line)
        raise AssertionError(f"not said: {text!r}; said: {''.join(self.skipped)}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.postgres
def test_follow_goes_on_past_a_store_that_fails_for_a_while(postgres_url: str, cli: CLI) -> None:
    """``events --follow`` ended at the first failed read (exit 75): a lock held past the
    store's wait for it (PostgreSQL's ``lock_timeout``, SQLite's busy timeout), a
    database restarting, a lost connection ended a follower meant to run for as long as
    the workers do. It says so on stderr, tries again with backoff, and goes on printing
    once the store answers."""
    _record_delivered(postgres_url, "ann@example.test")
    follow = Follower(cli, "--store", f"{postgres_url}?lock_timeout=100ms")
    try:
        assert follow.recipient() == "ann@example.test"
        with psycopg.connect(postgres_url) as operator:
            operator.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # until the end
            follow.said("cannot read the events, trying again")
            time.sleep(0.5)  # the lock held a while: a few more tries fail
            assert follow.proc.poll() is None
        _record_delivered(postgres_url, "bob@example.test")
        assert follow.recipient() == "bob@example.test"
        assert "after" in follow.said("reading the events again")
        assert follow.proc.poll() is None
    finally:
        follow.close()


def test_follow_ends_on_a_store_that_waiting_cannot_mend(cli: CLI, workdir: Path) -> None:
    """A store file replaced while in use (a restore under a running follower) is no
    failure to wait out: the follower ends, exit 74, as a worker does."""
    _record_delivered(f"sqlite:///{workdir / 'queue.db'}", "ann@example.test")
    follow = Follower(cli)
    try:
        assert follow.recipient() == "ann@example.test"
        shutil.copy(workdir / "queue.db", workdir / "copy.db")
        os.replace(workdir / "copy.db", workdir / "queue.db")
        assert "was replaced while in use" in follow.said("mailstrom: ")
        assert follow.proc.wait(10) == 74
    finally:
        follow.close()


@pytest.mark.postgres
def test_follow_says_the_pool_warnings_as_its_own(own_postgres: Any, cli: CLI) -> None:
    """While PostgreSQL is down, psycopg's pool logs each failed connection attempt
    (logger ``psycopg.pool``). Nobody had configured logging in ``events``, so Python's
    last resort wrote them raw among the command's lines: "error connecting in
    'mailstrom': ..." and a tab-indented half line. They are the command's warnings now,
    one line each, as its own are."""
    url = own_postgres.create_database()
    _record_delivered(url, "ann@example.test")
    follow = Follower(cli, "--store", url)
    try:
        assert follow.recipient() == "ann@example.test"
        own_postgres.take_down()
        line = follow.said("Connection refused")
        assert line.startswith("mailstrom: warning: error connecting in 'mailstrom': ")
        assert line.endswith(
            "failed: Connection refused Is the server running on that host"
            " and accepting TCP/IP connections?\n"
        )
        assert all(seen.startswith("mailstrom: warning: ") for seen in follow.skipped)
    finally:
        follow.close()


@pytest.mark.postgres
def test_follow_warns_soon_after_postgres_goes_down(own_postgres: Any, cli: CLI) -> None:
    """Each read waited up to the store's 30 s for a pooled connection: with PostgreSQL
    down, the follower said it could not read the events half a minute after the fact.
    A command that only reads waits a few seconds; it warns within them, and reads on
    once the server is back."""
    url = own_postgres.create_database()
    _record_delivered(url, "ann@example.test")
    follow = Follower(cli, "--store", url)
    try:
        assert follow.recipient() == "ann@example.test"
        own_postgres.take_down()
        follow.said("cannot read the events, trying again", within=15)
        own_postgres.bring_up()
        follow.said("reading the events again")
        _record_delivered(url, "bob@example.test")
        assert follow.recipient() == "bob@example.test"
    finally:
        follow.close()


@pytest.mark.postgres
def test_follow_started_while_postgres_is_down_waits_for_it(own_postgres: Any, cli: CLI) -> None:
    """``events --follow`` reads what is there, then follows. A passing trouble while
    following is waited out; the same trouble in the first part (PostgreSQL restarting
    as the follower starts at boot) ended it, exit 75. It waits there too, saying so."""
    url = own_postgres.create_database()
    _record_delivered(url, "ann@example.test")
    own_postgres.take_down()
    follow = Follower(cli, "--store", url)
    try:
        follow.said("cannot read the events, trying again")
        assert follow.proc.poll() is None
        own_postgres.bring_up()
        assert follow.recipient() == "ann@example.test"
        follow.said("reading the events again")
        _record_delivered(url, "bob@example.test")
        assert follow.recipient() == "bob@example.test"
    finally:
        follow.close()


@pytest.mark.parametrize(
    ("make", "code", "said"),
    [
        (lambda spool: spool.write_text("a file\n"), 78, "Not a directory"),
        (lambda spool: (spool / "queue.db").mkdir(), 74, "not a regular file"),
    ],
    ids=["a file in place of its directory", "a directory in place of the file"],
)
def test_follow_waiting_for_the_store_file_ends_on_a_path_that_cannot_be_one(
    cli: CLI, workdir: Path, make: Any, code: int, said: str
) -> None:
    """``events --follow`` on a SQLite store not created yet waits for its first writer.
    A path that can never be the store ends that wait: its directory became a file (a
    lookup fails ENOTDIR, as it fails EACCES for a user who may not search it, which
    root cannot be shown), or a directory stands where the file goes. The lookup's
    failure read as "no file yet", and the follower waited for ever, saying nothing."""
    if not os.path.exists(f"/proc/{os.getpid()}/wchan"):
        pytest.skip("needs /proc/PID/wchan to see the follower wait between looks")
    spool = workdir / "spool"
    spool.mkdir()
    follow = Follower(cli, "--store", f"sqlite:///{spool / 'queue.db'}")
    try:
        deadline = time.monotonic() + 60
        while not _sleeping(follow.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the kernel's state of the process; nothing to wait on
        assert _sleeping(follow.proc.pid), "the follower never started waiting"
        if code == 78:
            spool.rmdir()
        make(spool)
        line = follow.said("mailstrom: ", within=10)
        assert said in line and "spool" in line
        assert follow.proc.wait(10) == code
    finally:
        follow.close()


def test_follow_on_a_store_path_through_a_file_ends_at_once(cli: CLI, workdir: Path) -> None:
    """Started on such a path, the follower ends at once as the views do (78), rather
    than wait, as it waits out a passing trouble of its first reads."""
    (workdir / "file").write_text("not a directory\n")
    cli.env["MAILSTROM_STORE"] = "sqlite:///file/queue.db"
    result = cli("events", "--follow", timeout=30)
    assert result.code == 78, result.err
    assert "Not a directory" in result.err
