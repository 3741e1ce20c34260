"""The operator's tools through the command: short ids, bulk changes, the pending queue
view, --shape, show, suspend/resume (issue 14 §1)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailstrom.cli.selection import MAX_BULK
from mailstrom.stores import SQLiteStore
from tests.cli.conftest import CLI, MailEnv
from tests.contract.support import message
from tests.support.sqlite_copies import copies_of_a_message


def send(cli: CLI, to: str, *extra: str) -> str:
    out = cli.ok("send", "--from", "app@client.test", "--to", to, "--text", "x", *extra).out
    return out.strip()


def ids_of(result_json: list[dict[str, object]]) -> list[str]:
    return [str(m["id"]) for m in result_json]


# --- ids -----------------------------------------------------------------------------------


def test_a_unique_prefix_works_everywhere_and_an_ambiguous_one_lists_candidates(
    cli: CLI,
) -> None:
    first, second = send(cli, "bob@example.test"), send(cli, "carol@example.test")
    # Time-ordered ids share their beginning; the random end tells them apart.
    short = {mid: mid[:20] for mid in (first, second)}
    assert cli.ok("status", "--json", short[first]).json()["id"] == first
    assert cli.ok("status", "--json", short[first].upper()).json()["id"] == first
    assert cli.ok("hold", short[second]).out.strip() == "1 message held"
    assert cli.ok("status", "--json", second).json()["held"] is True
    assert "*** MESSAGE CONTENTS ***" in cli.ok("show", short[first]).out

    common = first[:6]
    assert second.startswith(common)
    for command in ("status", "show", "hold", "retry", "cancel", "purge"):
        result = cli(command, common)
        assert result.code == 66, (command, result.err)
        assert result.err_lines == [
            f"mailstrom: ambiguous message id '{common}': it starts {first}, {second}"
        ]
    unknown = cli("release", first, "0" * 32)
    assert unknown.code == 66
    assert unknown.err == f"mailstrom: unknown message id: {'0' * 32}\n"
    assert cli.ok("status", "--json", first).json()["held"] is False  # nothing changed


# --- bulk ----------------------------------------------------------------------------------


def test_bulk_commands_take_many_ids_stdin_and_filters(cli: CLI) -> None:
    a = send(cli, "a@example.test")
    b = send(cli, "b@example.test")
    c = send(cli, "c@other.test")

    assert cli.ok("hold", a[:20], b).out.strip() == "2 messages held"
    assert cli.ok("hold", a).out.strip() == "0 messages held (1 already held or finished)"
    stdin = f"{a}\n\n# a comment\n{b[:16]}\n".encode()
    assert cli.ok("release", "-", stdin=stdin).out.strip() == "2 messages released"

    dry = cli.ok("hold", "--domain", "example.test", "--dry-run").out.splitlines()
    assert dry == [b, a, "would hold 2 messages (dry run: nothing changed)"]
    assert cli.ok("queue", "--json", "--held").json() == []
    assert cli.ok("hold", "--json", "--domain", "other.test").json() == {
        "action": "hold",
        "selected": 1,
        "changed": 1,
    }
    assert ids_of(cli.ok("queue", "--json", "--held").json()) == [c]
    assert cli.ok("release", "--all").out.strip() == "1 message released"

    assert cli.ok("retry", "--all").out.strip() == "3 recipients due now (3 messages)"
    assert (
        cli.ok("cancel", "--older-than", "1h").out.strip() == "0 recipients cancelled (0 messages)"
    )
    assert cli.ok("cancel", "--state", "queued", "--domain", "other.test").out.strip() == (
        "1 recipient cancelled (1 message)"
    )
    assert cli.ok("queue", "--json", "--state", "failed").json()[0]["id"] == c

    nothing = cli("hold")
    assert nothing.code == 64
    assert "name messages" in nothing.err_lines[-1]
    both = cli("hold", a, "--all")
    assert both.code == 64
    too_long = cli("hold", "-", stdin=b"x" * 500 + b"\n")
    assert too_long.code == 65


def test_hold_leaves_finished_messages_as_they_are(cli: CLI) -> None:
    """A finished message (every recipient final) has nothing to keep from delivery:
    ``hold`` marked it held all the same, said it changed it, and its status read held."""
    finished, pending = send(cli, "a@example.test"), send(cli, "b@example.test")
    assert cli.ok("cancel", finished).out.strip() == "1 recipient cancelled (1 message)"

    dry = cli.ok("hold", finished, pending, "--dry-run").out.splitlines()
    assert dry == [pending, "would hold 1 message (dry run: nothing changed)"]
    assert cli.ok("hold", finished).out.strip() == "0 messages held (1 already held or finished)"
    assert cli.ok("hold", "--state", "any", "--json").json() == {
        "action": "hold",
        "selected": 2,
        "changed": 1,
    }
    assert cli.ok("status", "--json", finished).json()["held"] is False
    assert cli.ok("status", "--json", pending).json()["held"] is True


def test_release_of_a_message_that_finished_while_held_says_it_is_not_held(cli: CLI) -> None:
    """Held, then cancelled: the message finished while held, and is not held (nothing
    waits for a release). ``release`` changed nothing and said "(1 already so)", as if
    it had been released before; it says the message was not held or had finished."""
    mid = send(cli, "a@example.test", "--hold")
    assert cli.ok("cancel", mid).out.strip() == "1 recipient cancelled (1 message)"
    assert cli.ok("status", "--json", mid).json()["held"] is False
    assert cli.ok("release", mid, "--dry-run").out.splitlines() == [
        "would release 0 messages (dry run: nothing changed)"
    ]
    out = cli.ok("release", mid).out.strip()
    assert out == "0 messages released (1 not held or finished)"
    assert cli.ok("release", "--state", "any").out.strip() == "0 messages released"


def test_ids_with_filters_or_all_are_a_usage_error_before_anything_is_read(cli: CLI) -> None:
    """``purge ID --all`` resolved the ids first, so an unknown or ambiguous one exited 66
    where every other command said 64 (usage); ``hold - --all`` read standard input first
    (a bad line: 65). The usage message named every filter but --tag."""
    unknown = "0" * 32
    for command in ("hold", "release", "retry", "cancel", "purge"):
        for extra in (["--all"], ["--tag", "t"], ["--state", "any"]):
            result = cli(command, unknown, *extra)
            assert result.code == 64, (command, extra, result.err)
            assert result.err_lines == [
                "mailstrom: give message ids or filters"
                " (--state, --domain, --older-than, --tag, --all), not both"
            ]
        result = cli(command, "-", "--all", stdin=b"x" * 500 + b"\n")
        assert result.code == 64, (command, result.err)
    assert cli("purge", unknown, "--all", "--finished-before", "1d").code == 64
    assert cli("retry", unknown, "--all-deferred").code == 64
    nothing = cli("cancel")
    assert nothing.code == 64
    assert nothing.err_lines == [
        "mailstrom: name messages: ids, '-' for ids on standard input, filters"
        " (--state, --domain, --older-than, --tag), or --all"
    ]


def test_a_domain_filter_given_with_u_labels_finds_the_stored_a_labels(cli: CLI) -> None:
    # Recipients' domains are stored as A-labels (bücher.test is xn--bcher-kva.test).
    mid = send(cli, "a@bücher.test")
    send(cli, "b@other.test")
    assert ids_of(cli.ok("queue", "--json", "--domain", "Bücher.test").json()) == [mid]
    assert cli.ok("hold", "--domain", "bücher.test").out.strip() == "1 message held"


def test_purge_flags_say_what_they_purge(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["gone@example.test"] = ["550 5.1.1 No such user"]
    delivered = send(cli, "bob@example.test")
    failed = send(cli, "gone@example.test")
    cli.ok("worker", "--once", "--no-live")
    pending = send(cli, "carol@example.test", "--hold")

    dry = cli.ok("purge", "--failed-before", "0s", "--dry-run").out.splitlines()
    assert dry == [failed, "would purge 1 message (dry run: nothing changed)"]
    assert cli.ok("purge", "--delivered-before", "1h").out.strip() == "0 messages purged"
    assert cli.ok("purge", "--failed-before", "0s").out.strip() == "1 message purged"
    assert sorted(cli.queue_ids()) == sorted([delivered, pending])
    assert cli.ok("purge", pending[:20], "--finished-before", "0s").out.strip() == (
        "0 messages purged"  # pending mail is never purged
    )
    assert cli.ok("purge", "--json", "--delivered-before", "0s").json() == {"purged": 1}
    assert cli.queue_ids() == [pending]
    assert cli("purge").code == 64


def test_purge_flags_say_what_they_purge_of_ids_too(cli: CLI) -> None:
    """--delivered-before with ids deleted a failed (cancelled) message: of ids as of
    filters, the flag deletes only messages in its state."""
    failed = send(cli, "gone@example.test")
    cli.ok("cancel", failed)
    assert cli.ok("purge", failed, "--delivered-before", "0s", "--dry-run").out.strip() == (
        "would purge 0 messages (dry run: nothing changed)"
    )
    assert cli.ok("purge", failed, "--delivered-before", "0s").out.strip() == ("0 messages purged")
    assert cli.queue_ids() == [failed]
    assert cli.ok("purge", failed, "--failed-before", "0s").out.strip() == "1 message purged"
    assert cli.queue_ids() == []


def test_purge_flags_say_what_they_purge_of_any_state_filter(cli: CLI) -> None:
    """--delivered-before with --state any (or failed) deleted failed messages: the flag
    limits filters to its state too."""
    failed = send(cli, "gone@example.test")
    cli.ok("cancel", failed)
    for state in ("any", "finished", "failed"):
        flags = ("--state", state, "--delivered-before", "0s")
        assert cli.ok("purge", *flags, "--dry-run").out.strip() == (
            "would purge 0 messages (dry run: nothing changed)"
        )
        assert cli.ok("purge", *flags).out.strip() == "0 messages purged"
    assert cli.queue_ids() == [failed]


def test_a_dry_run_purge_of_ids_lists_only_what_purge_deletes(cli: CLI) -> None:
    """A dry run given ids listed pending messages too, which purge never deletes."""
    pending = send(cli, "bob@example.test")
    cancelled = send(cli, "gone@example.test")
    cli.ok("cancel", cancelled)
    for flags in ((), ("--finished-before", "0s"), ("--failed-before", "0s")):
        dry = cli.ok("purge", pending, cancelled, *flags, "--dry-run").out.splitlines()
        assert dry == [cancelled, "would purge 1 message (dry run: nothing changed)"], flags
    dry = cli.ok("purge", pending, cancelled, "--delivered-before", "0s", "--dry-run").out
    assert dry.strip() == "would purge 0 messages (dry run: nothing changed)"
    assert cli.ok("purge", pending, cancelled).out.strip() == "1 message purged"
    assert cli.queue_ids() == [pending]


def test_a_dry_run_of_ids_lists_only_what_the_command_changes(cli: CLI) -> None:
    """A dry run of hold, release, retry or cancel given ids listed every id given, as
    "would hold 2 messages", where the command itself then changed one ("1 message held
    (1 already so)"): it lists what would change, as purge's does."""
    held, free = send(cli, "bob@example.test"), send(cli, "carol@example.test")
    cancelled = send(cli, "gone@example.test")
    cli.ok("hold", held)
    cli.ok("cancel", cancelled)
    expected = {
        "hold": [free],  # a finished message has nothing to hold
        "release": [held],
        "retry": [held, free],  # a held message's recipients are due once released
        "cancel": [held, free],
    }
    for command, changed in expected.items():
        dry = cli.ok(command, held, free, cancelled, "--dry-run", "--json").json()
        assert (dry["selected"], dry["ids"]) == (len(changed), changed), command
    text = cli.ok("hold", held, "--dry-run").out.strip()
    assert text == "would hold 0 messages (dry run: nothing changed)"
    assert cli.ok("hold", held).out.strip() == "0 messages held (1 already held or finished)"


def test_a_dry_run_of_filters_lists_only_what_the_command_changes(cli: CLI) -> None:
    """The filters of queue select finished mail too (--state any, finished, failed): a
    dry run of retry or cancel listed it, "would cancel 2 messages", where cancel itself
    then changed one ("1 recipient cancelled"), as it did for ids given (above)."""
    cancelled = send(cli, "gone@example.test")
    cli.ok("cancel", cancelled)
    pending = send(cli, "bob@example.test")
    for command in ("retry", "cancel"):
        for state in ("any", "failed"):
            dry = cli.ok(command, "--state", state, "--dry-run", "--json").json()
            wanted = [pending] if state == "any" else []
            assert (dry["selected"], dry["ids"]) == (len(wanted), wanted), (command, state)
        text = cli.ok(command, "--state", "failed", "--dry-run").out.strip()
        assert text == f"would {command} 0 messages (dry run: nothing changed)"
    # What hold and release select by default they change; a finished message is not held.
    dry = cli.ok("hold", "--state", "any", "--dry-run", "--json").json()
    assert dry["ids"] == [pending]
    assert cli.ok("cancel", "--state", "any").out.strip() == "1 recipient cancelled (2 messages)"


def test_purge_by_age_reaches_old_mail_behind_more_than_a_run_of_recent_mail(cli: CLI) -> None:
    """A filter with an age flag selected the newest MAX_BULK finished messages and then
    kept those finished long enough ago: behind that many recent ones, an old message
    was never purged, however often purge ran."""
    now = datetime.now(UTC)
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        old = store.enqueue(message("a@example.test"), now=now - timedelta(days=2))
        store.cancel_many([old], now=now - timedelta(days=2))
        recent = store.enqueue(message("b@example.test"), now=now)
        store.cancel_many([recent], now=now)
    finally:
        store.close()
    copies_of_a_message(cli.cwd / "queue.db", recent, MAX_BULK - 1)
    flags = ("--domain", "example.test", "--finished-before", "1d")
    dry = cli.ok("purge", *flags, "--dry-run", "--json").json()
    assert (dry["selected"], dry["ids"]) == (1, [old])
    assert cli.ok("purge", *flags, "--json").json() == {"purged": 1}


def test_a_bulk_command_says_when_its_filters_match_more_than_a_run_takes(cli: CLI) -> None:
    """A run takes the newest MAX_BULK messages its filters match: ``hold --all`` on a
    larger queue said "100,000 messages held" and nothing of the older ones, which went
    on being delivered (retry's, run again, took the same newest ones again)."""
    now = datetime.now(UTC)
    queue = cli.cwd / "queue.db"
    store = SQLiteStore(queue)
    try:
        old = store.enqueue(message("a@example.test"), now=now - timedelta(days=2))
        recent = store.enqueue(message("b@example.test"), now=now)
    finally:
        store.close()
    copies_of_a_message(queue, recent, MAX_BULK - 1)
    note = (
        f"mailstrom: note: only the newest {MAX_BULK:,} of {MAX_BULK + 1:,} messages the"
        f" filters match were selected (at most {MAX_BULK:,} a run): the others are left"
        " as they are"
    )
    held = cli.ok("hold", "--all")
    assert (held.out.strip(), held.err_lines) == (f"{MAX_BULK:,} messages held", [note])
    assert cli.ok("status", "--json", old).json()["held"] is False
    # Exactly as many as a run takes: nothing left out, nothing said (a dry run too).
    dry = cli.ok("release", "--domain", "example.test", "--dry-run", "--json")
    assert (dry.json()["selected"], dry.err_lines) == (MAX_BULK, [])

    # The same queue with every message cancelled: built again, as cancelling 100,001
    # messages through the store takes longer still.
    for path in queue.parent.glob(f"{queue.name}*"):
        path.unlink()
    store = SQLiteStore(queue)
    try:
        old = store.enqueue(message("a@example.test"), now=now - timedelta(days=2))
        recent = store.enqueue(message("b@example.test"), now=now)
        store.cancel_many([old, recent], now=now)
    finally:
        store.close()
    copies_of_a_message(queue, recent, MAX_BULK - 1)
    purge = cli.ok("purge", "--all", "--json")
    assert (purge.json(), purge.err_lines) == ({"purged": MAX_BULK}, [note])
    assert cli.queue_ids() == [old]


def test_a_dry_run_purge_by_age_judges_a_cancelled_message_by_when_it_was_cancelled(
    cli: CLI,
) -> None:
    """The dry run judged a message's age by its recipients' last attempts, purge by when
    they finished: mail queued long ago and cancelled just now (never attempted) was
    listed as purgeable, and purge then left it alone."""
    now = datetime.now(UTC)
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        old = store.enqueue(message("a@example.test"), now=now - timedelta(days=2))
        store.cancel_many([old], now=now)
    finally:
        store.close()
    for flags in ((), ("--all",), (old,)):
        dry = cli.ok("purge", *flags, "--finished-before", "1d", "--dry-run", "--json")
        assert dry.json()["ids"] == [], flags
    assert cli.ok("purge", "--finished-before", "1d", "--json").json() == {"purged": 0}
    assert cli.queue_ids() == [old]


def test_a_dry_run_purge_by_age_alone_says_when_purge_deletes_more_than_it_lists(
    cli: CLI,
) -> None:
    """Purge by age alone deletes every message old enough, however many; its dry run
    lists at most MAX_BULK of them, and said "would purge 100,000 messages" of a queue
    where purge then deleted more."""
    now = datetime.now(UTC)
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        first = store.enqueue(message("a@example.test"), now=now - timedelta(days=3))
        store.cancel_many([first], now=now - timedelta(days=2))
    finally:
        store.close()
    old = [first, *copies_of_a_message(cli.cwd / "queue.db", first, MAX_BULK)]
    dry = cli.ok("purge", "--finished-before", "1d", "--dry-run", "--json").json()
    assert (dry["selected"], len(dry["ids"])) == (MAX_BULK, MAX_BULK)
    assert dry["more"] is True
    text = cli.ok("purge", "--finished-before", "1d", "--dry-run").out.splitlines()[-1]
    assert text == (
        f"would purge at least {MAX_BULK:,} messages, the {MAX_BULK:,} listed and more"
        " (dry run: nothing changed)"
    )
    assert cli.ok("purge", "--finished-before", "1d", "--json").json() == {"purged": len(old)}


# --- queue ---------------------------------------------------------------------------------


def test_queue_shows_pending_mail_with_reason_next_attempt_and_footer(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["grey@example.test"] = ["451 4.7.1 Greylisted, come back later"]
    delivered = send(cli, "bob@example.test")
    deferred = send(cli, "grey@example.test")
    cli.ok("worker", "--once", "--no-live")
    queued = [send(cli, f"q{i}@other.test", "--hold") for i in range(3)]

    assert ids_of(cli.ok("queue", "--json").json()) == [*reversed(queued), deferred]
    assert delivered in ids_of(cli.ok("queue", "--json", "--state", "any").json())
    assert ids_of(cli.ok("queue", "--json", "--state", "finished").json()) == [delivered]

    lines = cli.ok("queue").out.splitlines()
    row = next(line for line in lines if line.startswith(deferred))
    assert "451 4.7.1 Greylisted, come back later" in row
    assert " in " in row  # the next attempt, minutes away
    assert not any("showing" in line for line in lines)

    limited = cli.ok("queue", "--limit", "2").out.splitlines()
    assert limited[-1] == "showing 2 of 4 (use --limit)"
    assert cli.ok("queue", "--limit", "2", "--state", "any").out.splitlines()[-1] == (
        "showing 2 of 5 (use --limit)"
    )


def test_a_json_listing_cut_at_its_limit_says_so_on_stderr(cli: CLI) -> None:
    """`queue --json` stopped at 100 messages without a word (no footer, nothing on
    stderr): `queue --json | jq -r '.[].id' | mailstrom retry -` retried the newest 100
    of 150 and said nothing of the other 50. The JSON on stdout keeps its shape."""
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        ids = store.enqueue_many(
            [message(f"r{i}@example.test") for i in range(150)], now=datetime.now(UTC)
        )
    finally:
        store.close()

    cut = cli.ok("queue", "--json")
    assert len(cut.json()) == 100 and set(ids_of(cut.json())) < set(ids)
    assert cut.err == "mailstrom: note: showing 100 of 150 messages (use --limit for more)\n"
    limited = cli.ok("queue", "--json", "--limit", "7", "--domain", "example.test")
    assert len(limited.json()) == 7
    assert limited.err == "mailstrom: note: showing 7 of 150 messages (use --limit for more)\n"

    whole = cli.ok("queue", "--json", "--limit", "150")
    assert sorted(ids_of(whole.json())) == sorted(ids) and whole.err == ""
    assert cli.ok("queue", "--json", "--limit", "100000").err == ""


def _column(lines: list[str], row_start: str, name: str) -> str:
    """The cell under the header ``name`` in the row starting with ``row_start``."""
    header = next(line for line in lines if name in line)
    start = header.index(name)
    rest = header[start + len(name) :]
    end = start + len(name) + len(rest) - len(rest.lstrip()) if rest.strip() else None
    row = next(line for line in lines if line.startswith(row_start))
    return row[start:end].strip()


def test_a_held_message_shows_no_next_attempt(mail_env: MailEnv) -> None:
    """A held message is never leased, but the queue said its next attempt was "now" (or
    "in 4m"), status showed the deferred recipient's retry time and show its next=, as if
    it would go then."""
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["grey@example.test"] = ["451 4.7.1 Greylisted, come back later"]
    deferred = send(cli, "grey@example.test")
    cli.ok("worker", "--once", "--no-live")
    queued = send(cli, "q@other.test", "--hold")
    lines = cli.ok("queue").out.splitlines()
    assert _column(lines, queued, "NEXT ATTEMPT") == "-"
    assert _column(lines, deferred, "NEXT ATTEMPT").startswith("in ")  # not held: it shows

    cli.ok("hold", deferred)
    lines = cli.ok("queue").out.splitlines()
    assert _column(lines, deferred, "NEXT ATTEMPT") == "-"
    status = cli.ok("status", deferred).out.splitlines()
    assert _column(status, "grey@example.test", "NEXT RETRY") == "-"
    show = cli.ok("show", deferred).out
    assert "next=" not in show
    assert cli.ok("status", "--json", deferred).json()["recipients"][0]["next_attempt_at"]

    cli.ok("release", deferred)
    status = cli.ok("status", deferred).out.splitlines()
    assert _column(status, "grey@example.test", "NEXT RETRY") != "-"


def test_a_suspended_destination_shows_no_next_attempt_before_its_end(
    mail_env: MailEnv,
) -> None:
    """No worker attempts a recipient at a suspended domain, but the queue said its next
    attempt was "now" (or "in 4m") and status showed the deferred recipient's retry time:
    they now say none while the suspension has no end, and its end when it has one."""
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["grey@example.test"] = ["451 4.7.1 Greylisted, come back later"]
    deferred = send(cli, "grey@example.test")
    cli.ok("worker", "--once", "--no-live")
    queued = send(cli, "bob@example.test")
    other = send(cli, "carol@other.test")
    retry_at = cli.ok("status", "--json", deferred).json()["recipients"][0]["next_attempt_at"]
    retry_shown = datetime.fromisoformat(retry_at).strftime("%Y-%m-%d %H:%M:%S")

    cli.ok("suspend", "example.test")
    lines = cli.ok("queue").out.splitlines()
    assert _column(lines, queued, "NEXT ATTEMPT") == "-"
    assert _column(lines, deferred, "NEXT ATTEMPT") == "-"
    assert _column(lines, other, "NEXT ATTEMPT") == "now"  # another domain goes on
    status = cli.ok("status", deferred).out.splitlines()
    assert _column(status, "grey@example.test", "NEXT RETRY") == "-"

    cli.ok("suspend", "example.test", "--for", "3h")
    lines = cli.ok("queue").out.splitlines()
    assert _column(lines, queued, "NEXT ATTEMPT") == "in 2h"  # the end of the suspension
    assert _column(lines, deferred, "NEXT ATTEMPT") == "in 2h"
    status = cli.ok("status", deferred).out.splitlines()
    assert _column(status, "grey@example.test", "NEXT RETRY") > retry_shown

    cli.ok("resume", "example.test")
    lines = cli.ok("queue").out.splitlines()
    assert _column(lines, queued, "NEXT ATTEMPT") == "now"
    status = cli.ok("status", deferred).out.splitlines()
    assert _column(status, "grey@example.test", "NEXT RETRY") == retry_shown


def test_status_says_when_a_queued_recipient_is_next_tried_as_queue_does(
    mail_env: MailEnv,
) -> None:
    """A queued recipient that waits for its send_at, or for its suspended destination's
    end: the queue said "in 1h" for it, but status showed NEXT RETRY "-", as if no
    attempt were due; it now shows when it is next tried, as it does a deferred one's."""
    cli = mail_env.cli
    send_at = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    later = send(cli, "ann@other.test", "--at", send_at.isoformat())
    assert _column(cli.ok("queue").out.splitlines(), later, "NEXT ATTEMPT").startswith("in ")
    status = cli.ok("status", later).out.splitlines()
    assert _column(status, "ann@other.test", "NEXT RETRY") == f"{send_at:%Y-%m-%d %H:%M:%S}"

    waiting = send(cli, "bob@example.test")
    cli.ok("suspend", "example.test", "--for", "3h")
    assert _column(cli.ok("queue").out.splitlines(), waiting, "NEXT ATTEMPT") == "in 2h"
    status = cli.ok("status", waiting).out.splitlines()
    until = cli.ok("status", "--json", waiting).json()["recipients"][0]["next_attempt_at"]
    shown = _column(status, "bob@example.test", "NEXT RETRY")
    assert shown != "-"
    assert shown > datetime.fromisoformat(until).strftime("%Y-%m-%d %H:%M:%S")
    cli.ok("suspend", "example.test")  # without an end: no attempt is due
    status = cli.ok("status", waiting).out.splitlines()
    assert _column(status, "bob@example.test", "NEXT RETRY") == "-"


def test_queue_shape_counts_pending_recipients_by_domain_and_age(cli: CLI) -> None:
    send(cli, "a@example.test")
    send(cli, "b@other.test")
    send(cli, "c@other.test")
    lines = cli.ok("queue", "--shape").out.splitlines()
    assert lines[0].split() == [
        *("DOMAIN", "TOTAL", "0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160m+")
    ]
    assert lines[1].split() == ["TOTAL", "3", "3", "0", "0", "0", "0", "0", "0"]
    assert lines[2].split() == ["other.test", "2", "2", "0", "0", "0", "0", "0", "0"]
    assert lines[3].split() == ["example.test", "1", "1", "0", "0", "0", "0", "0", "0"]
    shape = cli.ok("queue", "--shape", "--json").json()
    assert shape[0] == {
        "domain": "other.test",
        "total": 2,
        **{"0-5m": 2, "5-10m": 0, "10-20m": 0, "20-40m": 0, "40-80m": 0, "80-160m": 0},
        "160m+": 0,
    }


# --- show ----------------------------------------------------------------------------------


def test_show_prints_the_stored_message_with_recipients_on_top(cli: CLI) -> None:
    mid = cli.ok(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--to",
        "carol@other.test", "--subject", "Report", "--text", "line one\nline two",
    ).out.strip()  # fmt: skip
    out = cli.ok("show", mid[:20]).out
    head, _, body = out.partition("*** MESSAGE CONTENTS ***\n")
    assert f"message_id: {mid}" in head
    assert "sender: app@client.test" in head
    assert "recipient: bob@example.test  queued  attempts=0" in head
    assert "recipient: carol@other.test  queued  attempts=0" in head
    assert "Subject: Report" in body and "line two" in body

    raw = cli.ok("show", "--raw", mid).out
    assert raw.startswith("Date: ") or raw.split(":", 1)[0] in ("From", "Message-ID", "To")
    assert "ENVELOPE" not in raw and "line two" in raw
    headers = cli.ok("show", "--headers", mid).out
    assert "Subject: Report" in headers and "line two" not in headers
    assert cli("show", "--raw", "--headers", mid).code == 64


def test_show_json_has_the_status_and_the_message(cli: CLI) -> None:
    """Every view that prints data takes --json (docs/cli.md); `show --json` was a usage
    error (exit 64), so a script had to parse postcat's text for the envelope."""
    mid = cli.ok(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--subject",
        "Report", "--text", "line one\nline two",
    ).out.strip()  # fmt: skip
    shown = cli.ok("show", "--json", mid[:12]).json()
    assert shown["id"] == mid
    assert [r["address"] for r in shown["recipients"]] == ["bob@example.test"]
    assert shown["message"] == cli.ok("show", "--raw", mid).out
    headers = cli.ok("show", "--json", "--headers", mid).json()
    assert "Subject: Report" in headers["message"] and "line two" not in headers["message"]
    assert cli("show", "--json", "--raw", mid).code == 64


# --- destinations --------------------------------------------------------------------------


def test_suspend_stops_one_destination_without_touching_its_messages(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    assert cli.ok("suspend", "Example.Test.").out.strip() == "example.test: suspended until resumed"
    timed = cli.ok("suspend", "other.test", "--for", "2h", "--json").json()
    assert timed["domain"] == "other.test" and timed["until"]
    listed = cli.ok("queue", "--suspended").out.splitlines()
    assert [line.split()[0] for line in listed[1:]] == ["example.test", "other.test"]
    assert cli.ok("resume", "other.test").out.strip() == "other.test: resumed"

    mid = cli.ok(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--to",
        "carol@other.test", "--text", "x",
    ).out.strip()  # fmt: skip
    cli.ok("worker", "--once", "--no-live")
    status = cli.ok("status", "--json", mid).json()
    states = {r["address"]: (r["state"], r["attempts"]) for r in status["recipients"]}
    assert states == {"bob@example.test": ("queued", 0), "carol@other.test": ("delivered", 1)}
    assert [list(m.rcpt_tos) for m in mx.messages] == [["carol@other.test"]]

    assert cli.ok("resume", "example.test").out.strip() == "example.test: resumed"
    assert cli.ok("queue", "--suspended", "--json").json() == []
    cli.ok("worker", "--once", "--no-live")
    assert cli.ok("status", "--json", mid).json()["state"] == "delivered"

    again = cli("resume", "example.test")
    assert again.code == 66 and again.err == "mailstrom: example.test is not suspended\n"
    assert cli("suspend", "not a domain").code == 64
    # RFC 1035 §2.3.4: a label has at most 63 octets; was "suspended until resumed".
    too_long = cli("suspend", "x" * 64 + ".example")
    assert too_long.code == 64 and "not a domain" in too_long.err
    assert cli.ok("queue", "--suspended", "--json").json() == []


def test_a_suspension_without_an_end_is_listed_as_lasting_until_resumed(cli: CLI) -> None:
    """`queue --suspended` showed "resumed" for a suspension with no end, the word `resume`
    prints once a destination is delivered to again: the one list of what is suspended
    read as if it had been lifted. It now says "until resumed", as `suspend` and the
    dashboard do."""
    cli.ok("suspend", "example.test")
    cli.ok("suspend", "other.test", "--for", "2h")
    header, indefinite, timed = cli.ok("queue", "--suspended").out.splitlines()
    assert header.split() == ["DOMAIN", "SUSPENDED", "UNTIL"]
    assert indefinite.startswith("example.test ") and indefinite.endswith(" until resumed")
    assert timed.startswith("other.test ") and "resumed" not in timed


def test_suspending_for_no_time_is_a_usage_error(cli: CLI) -> None:
    """`suspend example.org --for 0s` was accepted ("suspended until <now>", exit 0) and
    suspended nothing: a suspension that has ended as it is written. Like a duration that
    is no duration, it is a usage error (64), and no suspension is stored."""
    for zero in ("0s", "0", "0ms", "0.0h"):
        refused = cli("suspend", "example.test", "--for", zero)
        assert refused.code == 64, (zero, refused.out)
        assert "--for: a suspension must last longer than 0" in refused.err, refused.err
        assert refused.out == ""
    assert cli.ok("queue", "--suspended", "--json").json() == []
    short = cli.ok("suspend", "example.test", "--for", "500ms", "--json").json()
    assert short["domain"] == "example.test" and short["until"]


def test_resuming_a_suspension_that_has_ended_says_it_was_not_suspended(cli: CLI) -> None:
    """Was "example.test: resumed", exit 0, for a --for suspension past its end, one
    `queue --suspended` no longer listed: the docs say exit 66, not suspended."""
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        ago = datetime.now(UTC) - timedelta(hours=2)
        store.suspend("example.test", now=ago, until=ago + timedelta(hours=1))
    finally:
        store.close()
    assert cli.ok("queue", "--suspended", "--json").json() == []
    ended = cli("resume", "example.test")
    assert ended.code == 66 and ended.err == "mailstrom: example.test is not suspended\n"


def test_suspending_a_name_no_recipient_domain_can_have_is_a_usage_error(cli: CLI) -> None:
    """`suspend '*.google.com'` (the notation `status` shows a throttled destination in),
    `suspend example.org:25` or `suspend ex%ample.org` said "suspended until resumed",
    exit 0, and suspended nothing: recipients' domains are letter-digit-hyphen labels, so
    no recipient is ever at such a name. The docs: a value that is no domain name is 64."""
    mid = send(cli, "bob@example.test")
    for bad in ("*.example.test", "example.test:25", "ex%ample.test", "example-.test", "a;b.test"):
        refused = cli("suspend", bad)
        assert refused.code == 64, (bad, refused.out, refused.err)
        assert "not a domain" in refused.err and refused.out == ""
    assert cli.ok("queue", "--suspended", "--json").json() == []
    # A name a recipient's domain can have is still taken (digits, IDN, inner hyphens).
    for good in ("example.test", "mail-1.example.test", "bücher.example", "123.example"):
        cli.ok("suspend", good)
    suspended = [s["domain"] for s in cli.ok("queue", "--suspended", "--json").json()]
    assert suspended == [
        "123.example",
        "example.test",
        "mail-1.example.test",
        "xn--bcher-kva.example",
    ]
    assert cli.ok("status", "--json", mid).json()["state"] == "queued"
    # One an earlier version stored can still be ended.
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        store.suspend("*.example.test", now=datetime.now(UTC))
    finally:
        store.close()
    assert cli.ok("resume", "*.Example.test.").out.strip() == "*.example.test: resumed"
    assert cli("resume", "*.example.test").code == 66
