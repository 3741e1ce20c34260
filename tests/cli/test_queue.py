"""Queue operations through the command: listing, filters, hold/release, retry, cancel, purge."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta

from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore
from tests.cli.conftest import CLI, MailEnv
from tests.contract.support import lease_all, message, results_for


def send(cli: CLI, to: str, *extra: str) -> str:
    out = cli.ok("send", "--from", "app@client.test", "--to", to, "--text", "x", *extra).out
    return out.strip()


def test_queue_filters_and_counts(cli: CLI) -> None:
    first = send(cli, "bob@example.test")
    second = send(cli, "carol@other.test", "--hold")
    third = send(cli, "dave@other.test")

    def ids(*args: str) -> list[str]:
        return [m["id"] for m in cli.ok("queue", "--json", *args).json()]

    assert ids() == [third, second, first]  # newest first
    assert ids("--domain", "other.test") == [third, second]
    assert ids("--domain", "OTHER.test") == [third, second]
    assert ids("--domain", "other.test.") == [third, second]
    assert ids("--held") == [second]
    assert ids("--not-held") == [third, first]
    assert ids("--state", "queued", "--limit", "1") == [third]
    assert ids("--state", "delivered") == []
    assert ids("--older-than", "1h") == []
    assert ids("--older-than", "0s") == [third, second, first]

    counts = cli.ok("queue", "--counts", "--json").json()
    assert counts["by_state"]["queued"] == 3
    assert counts["pending_by_domain"] == {"example.test": 1, "other.test": 2}
    assert counts["held"] == 1

    plain = cli.ok("queue").out.splitlines()
    assert plain[0].split() == [
        *("ID", "STATE", "AGE", "SIZE", "FROM", "RCPTS", "NEXT", "ATTEMPT", "LAST", "REASON")
    ]
    assert [line.split()[0] for line in plain[1:]] == [third, second, first]
    assert "other.test" in cli.ok("queue", "--counts").out

    # The summaries cover the whole queue: a filter given with them was dropped without a
    # word, so `--counts --domain example.test` showed other.test's mail as its own.
    for view in ("--counts", "--shape", "--suspended"):
        for extra in (
            ["--domain", "example.test"], ["--state", "failed"], ["--older-than", "1h"],
            ["--tag", "t"], ["--held"], ["--not-held"], ["--limit", "5"],
        ):  # fmt: skip
            refused = cli("queue", view, *extra)
            assert refused.code == 64, (view, extra, refused.out)
            assert refused.err == f"mailstrom: {view} takes no filters or --limit\n"


def test_hold_release_and_delivery(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    message_id = send(cli, "bob@example.test")
    assert cli.ok("hold", message_id).out.strip() == "1 message held"
    assert cli.ok("status", "--json", message_id).json()["held"] is True

    cli.ok("worker", "--once", "--no-live")
    assert mx.messages == []  # held: not delivered

    released = cli.ok("release", "--json", message_id).json()
    assert released == {"action": "release", "selected": 1, "changed": 1}
    cli.ok("worker", "--once", "--no-live")
    assert len(mx.messages) == 1
    assert cli.ok("status", "--json", message_id).json()["state"] == "delivered"


def test_deferred_then_retry_delivers(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["grey@example.test"] = ["451 4.7.1 Greylisted", "250 2.1.5 OK"]
    message_id = send(cli, "grey@example.test")
    cli.ok("worker", "--once", "--no-live")

    status = cli.ok("status", "--json", message_id).json()
    [rcpt] = status["recipients"]
    assert rcpt["state"] == "deferred"
    assert rcpt["reply"]["code"] == 451
    next_at = datetime.fromisoformat(rcpt["next_attempt_at"])
    assert next_at > datetime.now(UTC)  # minutes away: another --once does nothing
    text = cli.ok("status", message_id).out
    assert "deferred" in text
    assert "451 4.7.1 Greylisted" in text

    assert [m["id"] for m in cli.ok("queue", "--json", "--state", "deferred").json()] == [
        message_id
    ]
    assert cli.ok("retry", "--json", "--all-deferred").json() == {
        "rescheduled": 1,
        "held": 0,
        "suspended": 0,
        "throttled": 0,
    }
    cli.ok("worker", "--once", "--no-live")
    final = cli.ok("status", "--json", message_id).json()
    assert final["state"] == "delivered"
    assert final["recipients"][0]["attempts"] == 2

    history = cli.ok("status", "--history", message_id).out
    assert "temporary" in history
    assert "delivered" in history


def test_retry_one_message(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["grey@example.test"] = ["451 4.7.1 Greylisted", "250 2.1.5 OK"]
    message_id = send(cli, "grey@example.test")
    cli.ok("worker", "--once", "--no-live")
    assert cli.ok("retry", message_id).out.strip() == "1 recipient due now (1 message)"
    cli.ok("worker", "--once", "--no-live")
    assert len(mx.messages) == 1


def test_retrying_held_messages_says_they_wait_to_be_released(cli: CLI) -> None:
    """Was "2 recipients due now (2 messages)" with one of them held: no worker leases it
    until it is released."""
    free = send(cli, "bob@example.test")
    held = send(cli, "carol@example.test", "--hold")
    assert cli.ok("retry", free, held).out.strip() == (
        "1 recipient due now (1 message); 1 recipient due once released (1 held message)"
    )
    assert cli.ok("retry", "--json", held).json() == {
        "action": "retry",
        "selected": 1,
        "changed": 1,
        "held": 1,
        "suspended": 0,
        "throttled": 0,
    }
    assert cli.ok("retry", held).out.strip() == "1 recipient due once released (1 held message)"
    assert cli.ok("status", "--json", held).json()["held"] is True


def test_retrying_free_and_held_messages_is_all_or_nothing(cli: CLI) -> None:
    """The held messages of a selection were retried in a second transaction: a store
    failing between the two (a lock timeout, a full disk) left the free ones due now and
    the held ones not, under an error that said nothing had been done. One transaction
    now: nothing changes, and running it again does it all."""
    free = send(cli, "bob@example.test")
    held = send(cli, "carol@example.test", "--hold")

    def due() -> list[tuple[str, int]]:
        with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn:
            rows = conn.execute("SELECT address, next_attempt_at FROM recipients ORDER BY 1")
            return rows.fetchall()

    with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF next_attempt_at ON recipients"
            " WHEN OLD.address = 'carol@example.test' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
    before = due()
    failed = cli("retry", free, held)
    assert failed.code == 75 and "refused" in failed.err
    assert due() == before
    with closing(sqlite3.connect(cli.cwd / "queue.db")) as conn:
        conn.execute("DROP TRIGGER refuse")
        conn.commit()
    assert cli.ok("retry", free, held).out.strip() == (
        "1 recipient due now (1 message); 1 recipient due once released (1 held message)"
    )
    assert all(after > was for (_, after), (_, was) in zip(due(), before, strict=True))


def test_retrying_mail_to_a_suspended_destination_says_it_waits_for_it(cli: CLI) -> None:
    """Was "2 recipients due now (1 message)" with one of them at a suspended destination:
    no worker leases it until the destination is resumed, as a held message's recipients
    wait until it is released."""
    mid = send(cli, "bob@example.test", "--to", "carol@paused.test", "--to", "dan@paused.test")
    cli.ok("suspend", "paused.test")
    assert cli.ok("retry", mid).out.strip() == (
        "1 recipient due now (1 message); "
        "2 recipients at a suspended destination, due once it is resumed"
    )
    assert cli.ok("retry", "--json", mid).json() == {
        "action": "retry",
        "selected": 1,
        "changed": 3,
        "held": 0,
        "suspended": 2,
        "throttled": 0,
    }
    held = send(cli, "erin@paused.test", "--hold")  # held first: it waits to be released
    assert cli.ok("retry", held).out.strip() == "1 recipient due once released (1 held message)"
    # A large selection is read by destination, not message by message: the same count.
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        many = store.enqueue_many(
            [message("x@example.test", "y@paused.test")] * 150, now=datetime.now(UTC)
        )
    finally:
        store.close()
    assert cli.ok("retry", "--domain", "example.test").out.strip() == (
        "151 recipients due now (151 messages); "
        "152 recipients at a suspended destination, due once it is resumed"
    )
    assert len(many) == 150
    cli.ok("resume", "paused.test")
    assert cli.ok("retry", mid).out.strip() == "3 recipients due now (1 message)"


def test_retrying_all_deferred_says_which_wait_for_a_release_or_a_resume(cli: CLI) -> None:
    """Was "5 deferred recipients due now" with two of them at a suspended destination and
    two in a held message: no worker leases those until it is resumed or released."""
    now = datetime.now(UTC)
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        free = store.enqueue(message("a@example.test", "b@paused.test", "c@paused.test"), now=now)
        held = store.enqueue(message("d@example.test", "e@paused.test"), now=now)
        store.record(results_for(lease_all(store, now=now), RecipientState.DEFERRED, at=now))
        store.set_held(held, True)
        store.enqueue(message("f@paused.test"), now=now)  # queued: not --all-deferred's
    finally:
        store.close()
    cli.ok("suspend", "paused.test")
    assert cli.ok("retry", "--all-deferred").out.strip() == (
        "1 deferred recipient due now; "
        "2 recipients at a suspended destination, due once it is resumed; "
        "2 recipients due once released (1 held message)"
    )
    assert cli.ok("retry", "--all-deferred", "--json").json() == {
        "rescheduled": 5,
        "held": 2,
        "suspended": 2,
        "throttled": 0,
    }
    cli.ok("resume", "paused.test")
    cli.ok("release", held)
    assert cli.ok("retry", "--all-deferred").out.strip() == "5 deferred recipients due now"
    assert cli.ok("status", "--json", free).json()["state"] == "deferred"


def test_cancel(cli: CLI) -> None:
    message_id = send(cli, "bob@example.test")
    cancelled = cli.ok("cancel", "--json", message_id).json()
    assert cancelled == {"action": "cancel", "selected": 1, "changed": 1}
    status = cli.ok("status", "--json", message_id).json()
    assert status["state"] == "failed"
    assert status["recipients"][0]["error"] == "cancelled"
    assert cli.ok("cancel", message_id).out.strip() == "0 recipients cancelled (1 message)"


def test_purge_only_finished_and_old_enough(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    delivered = send(cli, "bob@example.test")
    cli.ok("worker", "--once", "--no-live")
    pending = send(cli, "carol@example.test", "--hold")

    assert cli.ok("purge", "--json", "--delivered-before", "1h").json() == {"purged": 0}
    assert cli.ok("purge", "--delivered-before", "0s").out.strip() == "1 message purged"
    assert cli.queue_ids() == [pending]
    gone = cli("status", delivered)
    assert gone.code == 66
    assert gone.err == f"mailstrom: unknown message id: {delivered}\n"


def test_db_migrate(cli: CLI, workdir: object) -> None:
    result = cli.ok("db", "migrate", "--json").json()
    assert result["store"] == "sqlite:///queue.db"
    assert isinstance(result["schema_version"], int)
    assert result["schema_version"] >= 1
    again = cli.ok("db", "migrate").out
    assert again.strip() == f"sqlite:///queue.db: schema version {result['schema_version']}"


def test_the_queue_shows_why_a_failed_message_failed(cli: CLI) -> None:
    """Was: LAST REASON was the first recipient's reply that had one, pending recipients
    first; on a failed message, whose recipients are all final, that was the delivered
    recipient's "250 ...", not the refusal that failed it."""
    now = datetime.now(UTC)
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        mid = store.enqueue(message("a@example.test", "b@example.test"), now=now)
        lease = lease_all(store, now=now)
        store.record(results_for(lease, RecipientState.DELIVERED, at=now, only=["a@example.test"]))
        store.record(results_for(lease, RecipientState.FAILED, at=now, only=["b@example.test"]))
    finally:
        store.close()
    [_, row] = cli.ok("queue", "--state", "failed").out.splitlines()
    assert row.split()[:2] == [mid, "failed"]
    assert row.endswith("550 5.0.0 line one line two")


def test_retrying_mail_held_back_by_a_destination_pause_says_it_waits_for_it(cli: CLI) -> None:
    """Was "2 recipients due now (1 message)" with one of them at a destination that
    throttled (421 "too many connections"): a worker leases it and gives it back at once,
    due at the pause's end, as its status says, so it is not sent before."""
    now = datetime.now(UTC)
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        mid = store.enqueue(message("a@example.test", "b@busy.test"), now=now)
        store.record(results_for(lease_all(store, now=now), RecipientState.DEFERRED, at=now))
        store.throttle(
            "*.busy.test",
            now=now,
            reply="421 4.7.0 Too many connections",
            first=timedelta(hours=1),
            maximum=timedelta(hours=2),
            recipients=[(mid, "b@busy.test")],
        )
    finally:
        store.close()
    assert cli.ok("retry", mid).out.strip() == (
        "1 recipient due now (1 message); "
        "1 recipient at a throttled destination, due once its pause ends"
    )
    assert cli.ok("retry", "--json", mid).json() == {
        "action": "retry",
        "selected": 1,
        "changed": 2,
        "held": 0,
        "suspended": 0,
        "throttled": 1,
    }
    assert cli.ok("retry", "--all-deferred").out.strip() == (
        "1 deferred recipient due now; "
        "1 recipient at a throttled destination, due once its pause ends"
    )
    # A large selection is read by a query, not message by message: the same count.
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        many = store.enqueue_many([message("c@example.test")] * 150, now=now)
    finally:
        store.close()
    assert cli.ok("retry", mid, *many).out.strip() == (
        "151 recipients due now (151 messages); "
        "1 recipient at a throttled destination, due once its pause ends"
    )


def test_a_listing_whose_stderr_reader_is_gone_still_lists(cli: CLI) -> None:
    """A listing ended as a listing read by ``head`` ends (exit 0) on a BrokenPipeError
    from any descriptor: with its standard error a pipe whose reader had gone (a logger
    restarted), the note that no worker runs made ``queue`` print no table and exit 0, an
    empty queue to whoever read it. Only standard output's reader ends a listing; a note
    on standard error is lost, and the table is printed."""
    first = send(cli, "bob@example.test")
    proc = cli.gone_reader("queue", stream="stderr")
    assert proc.returncode == 0
    assert first in proc.stdout.decode()
    proc = cli.gone_reader("status", first, stream="stderr")
    assert proc.returncode == 0
    assert first in proc.stdout.decode()
