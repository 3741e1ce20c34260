"""Unit tests of the command's pure parts: sendmail flags, output, log formats, parsing."""

from __future__ import annotations

import argparse
import io
import json
import logging
import socket
import sys
from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.cli import localnames, sendmail
from mailstrom.cli.exits import UsageError
from mailstrom.cli.logs import JSONFormatter, KeyValueFormatter
from mailstrom.cli.main import COMMAND_MODULES, _split_sendmail, build_parser, main
from mailstrom.cli.output import age, print_table, to_jsonable
from mailstrom.errors import HeaderTooLong, TooManyHeaderFields
from mailstrom.runtime.attemptlog import attempt_fields
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    ReasonClass,
    RecipientState,
    SMTPReply,
    WorkerStatus,
)
from mailstrom.stores.base import RecipientResult

# --- sendmail ----------------------------------------------------------------------------


def test_sendmail_flags() -> None:
    a = sendmail.parse_args(
        ["-t", "-oi", "-odb", "-oem", "-fbounce@x.test", "-F", "Cron", "-bm", "--", "-bob@x"]
    )
    assert (a.extract, a.ignore_dots, a.sender, a.full_name) == (
        True,
        True,
        "bounce@x.test",
        "Cron",
    )
    assert a.recipients == ["-bob@x"]


def test_sendmail_clustered_and_valued_ignored_options() -> None:
    a = sendmail.parse_args(["-ti", "-N", "never", "-Rhdrs", "-r", "s@x.test", "a@x", "b@x"])
    assert (a.extract, a.ignore_dots, a.sender) == (True, True, "s@x.test")
    assert a.recipients == ["a@x", "b@x"]


@pytest.mark.parametrize(
    "argv",
    [
        ["-tif", "s@x.test", "a@x"],
        ["-tifs@x.test", "a@x"],
        ["-it", "-f", "s@x.test", "a@x"],
        ["-ti", "-e", "m", "-f", "s@x.test", "a@x"],
        ["-ti", "-d", "0.1", "-A", "c", "-fs@x.test", "a@x"],
        ["-t", "-o", "i", "-b", "m", "-rs@x.test", "a@x"],
    ],
)
def test_sendmail_options_as_getopt_reads_them(argv: list[str]) -> None:
    """Sendmail and Postfix read their options with getopt: a cluster may end with an
    option that takes a value (``-tif ADDR`` was "unknown option", 64), and -d, -A and -e
    take a value that may be the next argument (``-e m`` queued mail for ``m@origin``)."""
    a = sendmail.parse_args(argv)
    assert (a.extract, a.ignore_dots, a.sender) == (True, True, "s@x.test")
    assert a.recipients == ["a@x"]


@pytest.mark.parametrize(
    "argument", ["a@x.test, b@x.test, ", "a@x.test,,b@x.test", ", a@x.test, (c) b@x.test"]
)
def test_sendmail_recipient_argument_with_empty_elements(argument: str) -> None:
    """An address list may have empty elements (RFC 5322 §4.4), as a list joined with a
    trailing ", " has: such an argument was one malformed address (exit 65)."""
    args = sendmail.parse_args([argument])
    _, recipients = sendmail.build(b"Subject: x\n\nhi\n", args, default_domain="h.test")
    assert recipients == ["a@x.test", "b@x.test"]


def test_sendmail_options_stop_at_first_recipient() -> None:
    a = sendmail.parse_args(["a@x.test", "-t"])
    assert a.extract is False
    assert a.recipients == ["a@x.test", "-t"]


@pytest.mark.parametrize(
    "argv", [["-bs"], ["-bs", "-i"], ["-tbs"], ["-b", "s", "-oi", "-f", "x@x.test"], ["-bp", "-bs"]]
)
def test_sendmail_bs_is_smtp_mode(argv: list[str]) -> None:
    """-bs (as Laravel and Symfony Mailer run it) with the flags that come with it."""
    a = sendmail.parse_args(argv)
    assert (a.smtp, a.list_queue) == (True, False)


def test_sendmail_long_options() -> None:
    assert sendmail.parse_args(["--help"]).help is True
    # mailstrom's own options are refused (see test_security for why).
    for argv in (["--store=memory:"], ["--config", "c.toml"], ["--store", "memory:"]):
        with pytest.raises(UsageError, match="unknown option --"):
            sendmail.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        # Address test mode (and every other mode but -bm and -bp) was taken as -bm:
        # a user testing how an address is rewritten queued the message.
        (["-bt"], "-bt is not supported"),
        (["-b", "t"], "-bt is not supported"),
        (["-bh"], "-bh is not supported"),
        (["-bP"], "-bP is not supported"),
        (["-b", ""], "-b is not supported"),
        (["-tq"], "-q is not supported"),
        (["-tZ"], "unknown option -tZ"),
        (["-tif"], "-f requires an argument"),
        (["-q1h"], "-q1h is not supported"),
        (["-f"], "-f requires an argument"),
        (["-Z"], "unknown option -Z"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_sendmail_bad_flags(argv: list[str], reason: str) -> None:
    with pytest.raises(UsageError, match=reason):
        sendmail.parse_args(argv)


def test_read_message_lone_dot() -> None:
    stream = io.BytesIO(b"Subject: x\n\nbody\n.\nleft over\n")
    assert sendmail.read_message(stream, ignore_dots=False, limit=1000) == b"Subject: x\n\nbody\n"
    stream = io.BytesIO(b"Subject: x\r\n\r\n..\r\n.\r\n")
    assert (
        sendmail.read_message(stream, ignore_dots=False, limit=1000) == b"Subject: x\r\n\r\n..\r\n"
    )
    stream = io.BytesIO(b"Subject: x\n\n.\nmore\n")
    assert sendmail.read_message(stream, ignore_dots=True, limit=1000) == b"Subject: x\n\n.\nmore\n"


def test_read_message_drops_mbox_separator() -> None:
    stream = io.BytesIO(b"From bob@x.test Mon Jan  1 00:00:00 2024\nSubject: x\n\nb\n")
    assert sendmail.read_message(stream, ignore_dots=True, limit=1000) == b"Subject: x\n\nb\n"


@pytest.mark.parametrize(
    "line", [b"From : Alice <a@x.test>", b"From\t: a@x.test", b"From :a@x.test"]
)
def test_read_message_keeps_a_from_field_written_the_obsolete_way(line: bytes) -> None:
    """``From : x`` (white space before the colon, RFC 5322 §4.5.3) is the From field, not
    an mbox separator: it was dropped, and the message went out from ``$USER@`` the
    origin instead of its author."""
    data = line + b"\nTo: b@x.test\n\nb\n"
    assert sendmail.read_message(io.BytesIO(data), ignore_dots=True, limit=1000) == data


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("Name <root@localhost>", "root@host.example.test"),
        ("Name <Root@LocalHost>", "Root@host.example.test"),
        ('"Cron Daemon" <ann@example.test>', "ann@example.test"),
        ("ann@example.test (Ann)", "ann@example.test"),
        ("root@localhost", "root@host.example.test"),
        ("Cron <root>", "root@host.example.test"),
    ],
)
def test_sendmail_f_with_a_display_name_is_its_address(sender: str, expected: str) -> None:
    """``-f 'Name <root@localhost>'``: Postfix's sendmail takes the address of such a
    sender (tok822 parsing, the phrase dropped), and a name at localhost is a local name
    there as it is written alone; it was passed on as written, and prepare() refused
    localhost as a special-use name (exit 65)."""
    assert sendmail.envelope_sender(sender, "host.example.test") == expected


@pytest.mark.parametrize(
    "sender",
    [
        "a@example.test, b@example.test",
        "Name <a@example.test>\nBcc: x@example.test",
        "G: a@x.test;",
    ],
)
def test_sendmail_f_naming_more_than_one_mailbox_is_left_for_prepare(sender: str) -> None:
    """Two addresses, a line break or a group are no envelope sender: passed on as
    written, for prepare() to refuse with its reason (see the CLI test)."""
    assert sendmail.envelope_sender(sender, "host.example.test") == sender


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("root@localhost.localdomain", "root@host.example.test"),
        ("root@LocalHost.LocalDomain", "root@host.example.test"),
        ("root@db.localdomain", "root@db.localdomain"),  # another machine, maybe
        ("root@localhost.localdomain.example.test", "root@localhost.localdomain.example.test"),
    ],
)
def test_localhost_localdomain_is_a_local_name(address: str, expected: str) -> None:
    """This machine by Red Hat's /etc/hosts and Postfix's default mydestination on a host
    without a domain; other names under ``localdomain`` are left as they are."""
    assert localnames.qualify(address, "host.example.test") == expected


@pytest.mark.parametrize("fqdn", ["localhost.localdomain", "ip6.localhost"])
def test_no_default_origin_at_localhost(monkeypatch: pytest.MonkeyPatch, fqdn: str) -> None:
    """A host without a name of its own has ``localhost.localdomain`` for its fully
    qualified name (Red Hat's /etc/hosts), which was the origin bare names got: a domain
    no mail can be sent to. ``helo_name`` is the origin then, as for a name without a dot."""
    monkeypatch.setattr(localnames.socket, "getfqdn", lambda: fqdn)
    assert localnames.default_origin("mail.example.test") == "mail.example.test"


@pytest.mark.parametrize(
    "fqdn",
    [
        "host.localdomain",  # an installer's name for a host without a domain
        "Host.LocalDomain.",
        "host.local",  # mDNS (RFC 6762): no address may have it
        "printer.home.arpa",  # a home network's (RFC 8375): nor this
        "host.invalid",  # RFC 6761 §6.4
        "db.internal",  # private use (ICANN, 2024)
        "nas.lan",  # a home router's
        "my_laptop.example.com",  # no address may have an underscore in its domain
    ],
)
def test_no_default_origin_at_a_private_or_unusable_name(
    monkeypatch: pytest.MonkeyPatch, fqdn: str
) -> None:
    """The host's fully qualified name was the origin of bare names whenever it had a dot:
    ``root`` became ``root@host.localdomain``, a domain no mail reaches from outside the
    host's network, and ``root@host.local`` or ``root@printer.home.arpa``, which no
    address may have, so every message with a bare name was refused (exit 65) on such a
    host. ``helo_name``, the name the host gives itself to the world, is the origin then."""
    monkeypatch.setattr(localnames.socket, "getfqdn", lambda: fqdn)
    assert localnames.default_origin("mail.example.test") == "mail.example.test"


def test_default_origin_is_a_public_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localnames.socket, "getfqdn", lambda: "Web1.Example.COM.")
    assert localnames.default_origin("mail.example.test") == "web1.example.com"


def test_build_adds_from_and_collects_recipients() -> None:
    args = sendmail.parse_args(["-t", "-F", "Zoë", "-f", "me@x.test", "extra@x.test"])
    data, rcpts = sendmail.build(
        b"To: A <a@x.test>, b@x.test\nBcc: c@x.test\n\nhi\n", args, default_domain="h.test"
    )
    assert data.startswith(b"From: =?utf-8?")
    assert b"<me@x.test>" in data.splitlines()[0]
    assert rcpts == ["a@x.test", "b@x.test", "c@x.test", "extra@x.test"]


def test_build_keeps_existing_from_and_splits_argument_lists() -> None:
    args = sendmail.parse_args(["Bob <bob@x.test>, carol@x.test"])
    data, rcpts = sendmail.build(b"From: a@x.test\n\nhi\n", args, default_domain="h.test")
    assert data == b"From: a@x.test\n\nhi\n"
    assert rcpts == ["bob@x.test", "carol@x.test"]


def test_build_gives_an_empty_message_its_from_header() -> None:
    """As Postfix's cleanup does for ``sendmail -bs`` DATA ended at once; the stdin path
    refuses empty input before build() (66, tests/cli/test_errors.py)."""
    args = sendmail.parse_args(["-f", "a@x.test", "b@x.test"])
    data, rcpts = sendmail.build(b"", args, default_domain="h.test")
    assert data == b"From: a@x.test\n"
    assert rcpts == ["b@x.test"]


def test_build_bounds_the_header_section_before_parsing_it() -> None:
    """The stdlib parsers build() uses on the header section would take a second per
    million fields: the section is refused first, as prepare() refuses it."""
    many = b"".join(b"X-%d: v\n" % i for i in range(1001))
    with pytest.raises(TooManyHeaderFields):
        sendmail.build(many + b"\nhi\n", sendmail.parse_args(["-t"]), default_domain="h.test")
    huge = b"To: " + b",\n ".join(b"u%d@x.test" % i for i in range(100_000)) + b"\n"
    with pytest.raises(HeaderTooLong):
        sendmail.build(huge + b"\nhi\n", sendmail.parse_args(["-t"]), default_domain="h.test")


def test_build_ends_the_header_section_within_its_bounds() -> None:
    """The body starts at the first line that is no header field, looked for only as far
    as a header section may reach: fields past that are refused, not taken for a body."""
    args = sendmail.parse_args(["a@x.test"])
    data, _ = sendmail.build(b"Subject: x\nno field\n", args, default_domain="h.test")
    assert data.endswith(b"Subject: x\n\nno field\n")
    fields = b"X-A: v\n" * 200_000  # 1.4 MB
    with pytest.raises(HeaderTooLong):
        sendmail.build(fields + b"no field\n", args, default_domain="h.test")


# --- argument parsing --------------------------------------------------------------------


def test_global_options_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--store", "memory:", "queue"])
    after = parser.parse_args(["queue", "--store", "memory:"])
    assert before.store == after.store == "memory:"
    assert parser.parse_args(["--store", "memory:", "queue", "--limit", "3"]).store == "memory:"


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "--from", "a@x.test", "--from", "b@x.test", "--to", "c@x.test"],
        ["send", "--subject", "one", "--to", "c@x.test", "--subj", "two"],
        ["queue", "--limit", "5", "--limit=6"],
        ["queue", "--store", "memory:", "--store", "sqlite:///other.db"],
        ["--store", "memory:", "--store", "sqlite:///other.db", "queue"],
        ["--store", "memory:", "queue", "--store", "sqlite:///other.db"],
        ["--smtp-port", "25", "send", "--to", "a@x.test", "--smtp-port=2525"],
        ["purge", "--delivered-before", "30d", "--delivered-before", "1s"],
    ],
)
def test_a_single_value_option_given_twice_is_a_usage_error(argv: list[str]) -> None:
    """The first value was dropped without a word: ``send --from a --from b`` sent as b,
    ``purge --delivered-before 30d --delivered-before 1s`` purged what finished a second
    ago. Options that collect values (``--to``, ``--dns-server``) still repeat."""
    with pytest.raises(UsageError, match="given twice"):
        build_parser(next(a for a in argv if a in COMMAND_MODULES)).parse_args(argv)
    repeated = ["--dns-server", "127.0.0.1", "--dns-server", "127.0.0.2", "send"]
    args = build_parser("send").parse_args([*repeated, "--to", "a@x.test", "--to", "b@x.test"])
    assert args.dns_server == ["127.0.0.1", "127.0.0.2"]


def test_split_sendmail() -> None:
    assert _split_sendmail(["sendmail", "-t"]) == ([], ["-t"])
    assert _split_sendmail(["--store", "memory:", "sendmail", "-oi", "a@x"]) == (
        ["--store", "memory:"],
        ["-oi", "a@x"],
    )
    assert _split_sendmail(["send", "--subject", "sendmail"]) is None
    assert _split_sendmail(["--store", "sendmail", "queue"]) is None


def test_redact() -> None:
    from mailstrom.stores.url import redact_url as redact

    assert redact("postgresql://u:secret@db/m") == "postgresql://u:***@db/m"
    assert redact("postgresql://u@db/m") == "postgresql://u@db/m"
    assert redact("sqlite:///q.db") == "sqlite:///q.db"


# --- output ------------------------------------------------------------------------------


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_table_aligns_and_fills_empty_cells() -> None:
    out = io.StringIO()
    print_table(["A", "LONGER"], [["x", None], ["yyyy", "multi\nline"]], stream=out)
    assert out.getvalue().splitlines() == ["A     LONGER", "x     -", "yyyy  multi line"]


def test_rich_table_on_a_terminal() -> None:
    out = _TTY()
    print_table(["STATE", "N"], [["queued", 3]], title="Counts", stream=out)
    text = out.getvalue()
    assert "Counts" in text
    assert "queued" in text
    assert "─" in text or "━" in text  # drawn by rich, not plain text


def test_rich_table_shows_brackets_as_written() -> None:
    out = _TTY()
    reply = "550 [/bold] listed [see https://bl.example/q]"
    print_table(["REPLY"], [[reply]], stream=out)
    assert reply in out.getvalue()


def test_to_jsonable() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    value = to_jsonable(
        {RecipientState.QUEUED: [when, timedelta(minutes=2), SMTPReply(code=250, text="OK")]}
    )
    assert value == {
        "queued": [
            "2024-01-02T03:04:05+00:00",
            120.0,
            {"code": 250, "text": "OK", "enhanced": None},
        ]
    }


def test_age() -> None:
    now = datetime(2024, 1, 2, tzinfo=UTC)
    assert [age(now - timedelta(seconds=s), now) for s in (5, 120, 7200, 3 * 86400)] == [
        "5s",
        "2m",
        "2h",
        "3d",
    ]


# --- logs --------------------------------------------------------------------------------


def _record() -> logging.LogRecord:
    result = RecipientResult(
        message_id="m1",
        address="bob@example.test",
        lease_token="t1",
        state=RecipientState.DEFERRED,
        attempt=Attempt(
            at=datetime(2024, 1, 1, tzinfo=UTC),
            outcome=AttemptOutcome.TEMPORARY,
            duration=0.25,
            mx_host="mx.test",
            ip="127.0.0.1",
            port=25,
            reply=SMTPReply(code=451, enhanced="4.7.1", text="Greylisted, try later"),
            reason_class=ReasonClass.GREYLISTED,
        ),
        next_attempt_at=datetime(2024, 1, 1, 0, 5, tzinfo=UTC),
    )
    record = logging.LogRecord("mailstrom.attempts", logging.WARNING, "", 0, "attempt", (), None)
    record.event = "attempt"
    record.fields = attempt_fields(result)
    return record


def test_key_value_format() -> None:
    line = KeyValueFormatter().format(_record())
    assert " level=warning logger=mailstrom.attempts event=attempt message_id=m1 " in line
    assert "rcpt=bob@example.test state=deferred outcome=temporary host=mx.test" in line
    assert 'reason="451 4.7.1 Greylisted, try later" reason_class=greylisted ' in line
    assert "help=" not in line  # no provider rule knows this reply
    assert "next_attempt=2024-01-01T00:05:00+00:00" in line
    assert "tls=" not in line  # absent values are left out
    assert "\n" not in line


def test_key_value_values_and_timestamp() -> None:
    record = _record()
    record.created = 1767225600.0456  # 2026-01-01T00:00:00.045Z
    record.fields = {"code": 451, "duration": 0.25, "uncertain": True, "ok": False, "n": None}
    line = KeyValueFormatter().format(record)
    assert line.startswith("ts=2026-01-01T00:00:00.045Z level=warning ")
    assert line.endswith(" code=451 duration=0.25 uncertain=true ok=false")


def test_attempt_fields_delay_size_and_sender() -> None:
    record = _record()
    result = RecipientResult(
        message_id="m1",
        address="bob@example.test",
        lease_token="t1",
        state=RecipientState.DELIVERED,
        attempt=Attempt(
            at=datetime(2024, 1, 1, 0, 2, 3, 500000, tzinfo=UTC), outcome=AttemptOutcome.DELIVERED
        ),
        queued_at=datetime(2024, 1, 1, tzinfo=UTC),
        size=2048,
        envelope_from="",
    )
    record.fields = attempt_fields(result)
    line = KeyValueFormatter().format(record)
    # The null sender shows as from="" (Postfix: from=<>).
    assert ' message_id=m1 from="" rcpt=bob@example.test size=2048 delay=123.5 ' in line


def test_json_format() -> None:
    obj = json.loads(JSONFormatter().format(_record()))
    assert obj["event"] == "attempt"
    assert obj["code"] == 451
    assert obj["duration"] == 0.25
    assert obj["state"] == "deferred"
    assert "tls" not in obj


# --- live view ---------------------------------------------------------------------------


def test_live_view_frame() -> None:
    from rich.console import Console

    from mailstrom.cli.live import render
    from mailstrom.config import Config
    from mailstrom.runtime.worker import Worker
    from mailstrom.status import QueueStats
    from mailstrom.stores import MemoryStore

    store = MemoryStore()
    try:
        worker = Worker(Config(helo_name="client.test"), store)
        result = RecipientResult(
            message_id="m1",
            address="bob@example.test",
            lease_token="t1",
            state=RecipientState.DELIVERED,
            attempt=Attempt(
                at=datetime(2024, 1, 1, 12, 30, tzinfo=UTC),
                outcome=AttemptOutcome.DELIVERED,
                mx_host="mx.test",
                tls_version="TLSv1.3",
                reply=SMTPReply(code=250, text="OK"),
            ),
        )
        stats = QueueStats(by_state={RecipientState.DEFERRED: 7}, messages=9, held=2)
        out = io.StringIO()
        Console(file=out, width=120).print(render(worker, stats, [result]))
    finally:
        store.close()
    text = out.getvalue()
    assert "mailstrom worker stopped" in text
    assert "12:30:00" in text
    assert "bob@example.test" in text
    assert "TLSv1.3" in text
    assert "250 OK" in text
    assert " 7 " in text  # deferred count


class _StatusOnly:
    """What render() reads of a Worker: its status (rendering needs nothing else)."""

    def __init__(self, status: WorkerStatus) -> None:
        self.status = status


def _frame_lines(status: WorkerStatus) -> list[str]:
    from rich.console import Console

    from mailstrom.cli.live import render

    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(_StatusOnly(status), None, []))  # type: ignore[arg-type]
    return console.export_text().splitlines()


def test_live_view_head_of_a_healthy_worker_is_unchanged() -> None:
    """A guard for the frame, not a fix: no problem line, the same head as before."""
    lines = _frame_lines(
        WorkerStatus(running=True, in_flight=2, delivered=5, deferred=1, clock_skew=29.0)
    )
    assert lines[0] == (
        "mailstrom worker running   in flight: 2   delivered: 5   deferred: 1   failed: 0"
    )
    assert lines[1].startswith("Recent attempts")


def test_live_view_says_the_store_is_failing_with_its_text_shown_literally() -> None:
    lines = _frame_lines(
        WorkerStatus(
            running=True, store_error="record results: [red]x[/red] \x1b[2Jgone", unrecorded=3
        )
    )
    assert lines[0].startswith("mailstrom worker store trouble   in flight: 0")
    assert lines[1] == (
        "  store failing, retrying: record results: [red]x[/red] \\x1b[2Jgone"
        " (3 results not recorded yet)"
    )
    assert not any("\x1b" in line for line in lines)


def test_live_view_bounds_a_long_store_error_to_one_line() -> None:
    lines = _frame_lines(WorkerStatus(running=True, store_error="x\n" * 5000))
    assert lines[1].startswith("  store failing, retrying: x x x")
    assert lines[1].endswith("…")
    assert len(lines[1]) <= 120
    assert lines[2].startswith("Recent attempts")


def test_live_view_says_the_worker_is_paused_and_why() -> None:
    reason = "clock: 450.0 s ahead of PostgreSQL server db:5432 (± 0.001 s), beyond 300 s"
    lines = _frame_lines(WorkerStatus(running=True, paused=reason, clock_skew=450.0))
    assert lines[0].startswith("mailstrom worker paused   in flight: 0")
    assert lines[1] == f"  paused, takes no new work: {reason}"
    # The pause's reason already gives the skew: no second line about the clock.
    assert lines[2].startswith("Recent attempts")


def test_live_view_says_the_worker_is_draining() -> None:
    # Told to stop (SIGTERM), the worker leases nothing new and finishes what it holds,
    # up to its drain timeout; the head line said "running" all the while.
    lines = _frame_lines(WorkerStatus(running=True, stopping=True, in_flight=3))
    assert lines[0] == (
        "mailstrom worker draining   in flight: 3   delivered: 0   deferred: 0   failed: 0"
    )
    assert lines[1].startswith("Recent attempts")
    # Draining outranks a pause (no new work either way, and none will come); a failing
    # store, which still holds the results being drained, outranks draining.
    paused = WorkerStatus(running=True, stopping=True, paused="store: not reached for 60 s")
    assert _frame_lines(paused)[0].startswith("mailstrom worker draining   in flight: 0")
    failing = WorkerStatus(running=True, stopping=True, store_error="disk I/O error")
    assert _frame_lines(failing)[0].startswith("mailstrom worker store trouble   in flight")


@pytest.mark.parametrize(("skew", "words"), [(45.0, "45.0 s ahead of"), (-45.0, "45.0 s behind")])
def test_live_view_warns_of_a_clock_the_worker_judges_off(skew: float, words: str) -> None:
    lines = _frame_lines(WorkerStatus(running=True, clock_skew=skew, clock_warning=True))
    assert lines[0].startswith("mailstrom worker running   in flight: 0")
    assert lines[1] == f"  clock {words} the store's server"


def test_live_view_says_nothing_of_a_skew_the_worker_does_not_judge_off() -> None:
    # 45 s read over a slow round trip: the measurement may explain it, and the worker's
    # log says nothing of it; the view used to warn by the raw figure.
    lines = _frame_lines(WorkerStatus(running=True, clock_skew=45.0, clock_warning=False))
    assert lines[1].startswith("Recent attempts")


def test_live_view_shows_the_error_a_worker_stopped_on() -> None:
    lines = _frame_lines(WorkerStatus(running=False, error="StoreError: disk I/O error"))
    assert lines[0].startswith("mailstrom worker stopped   in flight: 0")
    assert lines[1] == "  error: StoreError: disk I/O error"


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_the_command_table_lists_every_command_in_help_order() -> None:
    """A command added without an entry in COMMAND_MODULES would load only with --help."""
    assert _commands(build_parser()) == list(COMMAND_MODULES)


@pytest.mark.parametrize("command", sorted(COMMAND_MODULES))
def test_each_command_parses_with_only_its_module_loaded(command: str) -> None:
    assert command in _commands(build_parser(command))


def test_an_unknown_command_gets_the_whole_tree_in_its_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--store", "memory://", "sendmial"]) == 64
    err = capsys.readouterr().err
    assert "invalid choice: 'sendmial'" in err and "'worker'" in err and "'bounce'" in err


def test_a_listing_s_broken_pipe_elsewhere_than_its_output_is_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listing ended as a listing read by ``head`` ends, exit 0, on a BrokenPipeError
    from any descriptor: one from a socket whose peer had gone said the listing had
    worked. Only its standard output's reader ends a listing so."""
    from mailstrom.cli import views

    def broken(args: argparse.Namespace) -> int:
        ours, theirs = socket.socketpair()
        with ours:
            theirs.close()
            ours.send(b"x")  # EPIPE: a broken pipe, not standard output's
        return 0

    monkeypatch.setattr(views, "queue_command", broken)
    # The command points them at wrappers; the test's are put back after it.
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    assert main(["--store", "memory://", "queue"]) == 70  # as in a command that acts


@pytest.mark.parametrize(
    ("fqdn", "shown"), [("my_laptop", "my_laptop"), ("host.local.", "host.local")]
)
def test_no_usable_origin_names_the_host_name_not_the_fallback(
    monkeypatch: pytest.MonkeyPatch, fqdn: str, shown: str
) -> None:
    """On a host whose name no domain may be (``my_laptop``), helo_name falls back to
    ``localhost``, and the message said "this host's name localhost is not a public mail
    domain": a name the host does not have. It names the host's own name."""
    from mailstrom.config import Config
    from mailstrom.errors import ConfigError, InvalidAddress
    from mailstrom.settings import Settings

    monkeypatch.setattr(localnames.socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    settings = Settings(config=Config(), store_url="memory://")
    origin = localnames.default_origin(settings.config.helo_name)
    with pytest.raises(ConfigError) as raised, sendmail._origin_at_fault(settings, origin):
        raise InvalidAddress("invalid", address=f"root@{origin}")
    assert f"(this host's name {shown} is not a public mail domain)" in str(raised.value)
    assert "localhost" not in str(raised.value)
