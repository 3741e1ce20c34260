"""Input is read only up to the message size limit: one octet past it, the command refuses
the message (exit 65) without reading the rest — an endless pipe or /dev/zero must not be
held in memory first."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom.bounds import MAX_INTEGER
from mailstrom.cli.reading import FileBudget, read_limited
from mailstrom.cli.sendmail import SendmailArgs, build, read_message
from mailstrom.errors import InvalidMessage, MessageTooLarge, TooManyRecipients
from mailstrom.message.envelope import MAX_OTHER_MAILBOXES
from tests.cli.conftest import CLI

LIMIT = 1000
HEAD = b"From: a@client.test\nTo: b@example.test\nSubject: x\n\n"


class Endless:
    """A stream that never ends: it hands out ``a`` octets as long as it is asked, and
    fails a test that reads it to its end (which would never come)."""

    def __init__(self, *, lines: bool) -> None:
        self.given = 0
        self._line = b"aaa\n" if lines else b""

    def read(self, size: int = -1, /) -> bytes:
        assert size >= 0, "read to the end of an endless stream"
        self.given += size
        return b"a" * size

    def readline(self, size: int = -1, /) -> bytes:
        assert size >= 0, "read a whole endless line"
        line = self._line[:size] if self._line else b"a" * size
        self.given += len(line)
        return line


@pytest.mark.parametrize("ignore_dots", [True, False])
@pytest.mark.parametrize("lines", [True, False])
def test_sendmail_stops_reading_one_octet_past_the_limit(ignore_dots: bool, lines: bool) -> None:
    stream = Endless(lines=lines)
    with pytest.raises(MessageTooLarge, match=f"limit of {LIMIT} octets") as info:
        read_message(stream, ignore_dots=ignore_dots, limit=LIMIT)
    assert LIMIT < stream.given <= LIMIT + 4
    assert info.value.limit == LIMIT


def test_sendmail_takes_a_message_of_exactly_the_limit() -> None:
    body = b"x" * (LIMIT - len(HEAD) - 1) + b"\n"
    message = HEAD + body
    assert len(message) == LIMIT
    for ignore_dots in (True, False):
        got = read_message(io.BytesIO(message), ignore_dots=ignore_dots, limit=LIMIT)
        assert got == message
    # The lone dot still ends the message when it comes just at the limit...
    stream = io.BytesIO(message + b".\r\nafter\n")
    assert read_message(stream, ignore_dots=False, limit=LIMIT) == message
    # ...and a line that only starts with a dot is part of it, so one octet over.
    with pytest.raises(MessageTooLarge):
        read_message(io.BytesIO(message + b".x\n"), ignore_dots=False, limit=LIMIT)
    with pytest.raises(MessageTooLarge):
        read_message(io.BytesIO(message + b"y"), ignore_dots=True, limit=LIMIT)


@pytest.mark.parametrize("ignore_dots", [True, False])
def test_a_message_of_many_short_lines_takes_about_its_size_in_memory(ignore_dots: bool) -> None:
    """Read up to a lone dot, each line was an object of its own: some 40 octets for one
    of "a\r\n", so 35 MB of them took 1.5 GB before the message was even built."""
    message = HEAD + b"a\r\n" * 300_000
    stream = io.BytesIO(message + b".\r\n")
    tracemalloc.start()
    try:
        got = read_message(stream, ignore_dots=ignore_dots, limit=len(message) + 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == (message if not ignore_dots else message + b".\r\n")
    assert peak < 3 * len(message)


def test_the_files_of_one_message_share_the_limit() -> None:
    budget = FileBudget(LIMIT)
    assert budget.read(io.BytesIO(b"t" * 600), source="text.txt") == b"t" * 600
    with pytest.raises(MessageTooLarge, match=r"report\.pdf with the files before it"):
        budget.read(io.BytesIO(b"p" * 401), source="report.pdf")
    stream = Endless(lines=False)
    with pytest.raises(MessageTooLarge, match=r"^zero holds more than"):
        FileBudget(LIMIT).read(stream, source="zero")
    assert stream.given == LIMIT + 1


# --- through the command: a pipe that is never closed -------------------------------------


@pytest.fixture
def small_limit(cli: CLI) -> CLI:
    cli.env["MAILSTROM_MAX_MESSAGE_SIZE"] = str(LIMIT)
    return cli


def exits_without_end_of_input(
    cli: CLI, *args: str, data: bytes
) -> subprocess.CompletedProcess[str]:
    """Run the command with ``data`` on a standard input that stays open: a command that
    read it to its end would wait for ever (the test then fails on the timeout)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailstrom", *args],
        cwd=cli.cwd,
        env=cli.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)  # far less than a pipe holds: never blocks
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 65, result.stderr
    assert f"more than the message size limit of {LIMIT} octets" in result.stderr


@pytest.mark.parametrize(
    ("args", "data"),
    [
        (["sendmail", "-i", "b@example.test"], HEAD + b"line\n" * LIMIT),
        (["sendmail", "b@example.test"], HEAD + b"a" * 2 * LIMIT),  # one line, no end
        (["send", "--file", "-"], HEAD + b"line\n" * LIMIT),
        (
            ["send", "--from", "a@client.test", "--to", "b@example.test", "--text-file", "-"],
            b"a" * 2 * LIMIT,
        ),
    ],
    ids=["sendmail -i", "sendmail one line", "send --file -", "send --text-file -"],
)
def test_stdin_is_read_up_to_the_limit_only(small_limit: CLI, args: list[str], data: bytes) -> None:
    assert_refused(exits_without_end_of_input(small_limit, *args, data=data))
    assert small_limit.queue_ids() == []


@pytest.fixture
def endless_fifo(workdir: Path) -> Iterator[Path]:
    """A named pipe holding more than LIMIT octets, kept open for writing by the test."""
    path = workdir / "endless"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)  # Linux: opens at once, and the reader never sees EOF
    try:
        os.write(fd, b"a" * 2 * LIMIT)
        yield path
    finally:
        os.close(fd)


@pytest.mark.parametrize("option", ["--attach", "--html-file", "--text-file"])
def test_files_are_read_up_to_the_limit_only(
    small_limit: CLI, endless_fifo: Path, option: str
) -> None:
    args = ["send", "--from", "a@client.test", "--to", "b@example.test", option, "endless"]
    assert_refused(exits_without_end_of_input(small_limit, *args, data=b""))


def test_sendmail_under_the_limit_is_queued(small_limit: CLI) -> None:
    small_limit.ok("sendmail", "b@example.test", stdin=HEAD + b"hello\n.\nignored\n")
    assert len(small_limit.queue_ids()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["sendmail", "-i", "b@example.test"],
        ["send", "--file", "-"],
        ["send", "--from", "a@client.test", "--to", "b@example.test", "--text-file", "-"],
    ],
    ids=["sendmail -i", "send --file -", "send --text-file -"],
)
def test_a_limit_far_above_any_message_reads_it(cli: CLI, args: list[str]) -> None:
    """The readers asked for ``limit + 1`` octets in one read(), for which Python sets
    aside a buffer of that size first: with a limit of 100 GB (a limit set high to
    mean "none") every message was an "internal error: MemoryError" (exit 70), with the
    largest limit the setting takes "OverflowError: cannot fit 'int' into an
    index-sized integer". Input is now read in pieces, the limit only bounding their
    sum."""
    cli.env["MAILSTROM_MAX_MESSAGE_SIZE"] = str(MAX_INTEGER)
    cli.ok(*args, stdin=HEAD + b"hello\n")
    assert len(cli.queue_ids()) == 1


def test_read_limited_takes_a_stream_that_gives_little_at_a_time() -> None:
    """A stream may give less than asked before its end (a raw pipe): what is read is
    read to the end, and the limit counts it all."""

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1, /) -> bytes:
            piece, self.data = self.data[:3], self.data[3:]
            return piece[: max(size, 0)] if size >= 0 else piece

    assert read_limited(Trickle(b"a" * 10), 10, source="x") == b"a" * 10
    with pytest.raises(MessageTooLarge):
        read_limited(Trickle(b"a" * 11), 10, source="x")


class Targets(list[str]):
    """An alias's targets that count how often they are walked."""

    walked = 0

    def __iter__(self) -> Iterator[str]:
        self.walked += 1
        return super().__iter__()


def test_an_alias_named_many_times_is_expanded_once() -> None:
    """``sendmail -t`` expanded a bare name each time the message named it: a To field of
    ``staff, staff, ...`` (a message's author writes it; the header section may hold
    1 MB of them) walked the alias's 1,000 targets per mention, minutes of work before
    the message was refused, for a handful of distinct recipients. Each name (in any
    case: aliases match case-insensitively) is now expanded once."""
    addresses = [f"u{i}@example.test" for i in range(1000)]
    staff = Targets(addresses)
    names = ", ".join(["staff", "Staff", "STAFF", "root"] * 500)
    data = f"From: a@example.test\nTo: {names}\nSubject: x\n\nbody\n".encode()
    _, recipients = build(
        data,
        SendmailArgs(extract=True, ignore_dots=True),
        default_domain="host.example.test",
        aliases={"staff": staff},
    )
    assert staff.walked == 1
    assert recipients == [*addresses, "root@host.example.test"]


@pytest.mark.parametrize("shape", ["a:", "(", "a:(b"])
@pytest.mark.parametrize("extract", [True, False])
def test_deeply_nested_address_fields_are_refused_not_a_crash(shape: str, extract: bool) -> None:
    # The stdlib's getaddresses reads a group by recursion, one level per colon, and a
    # comment one per parenthesis: such To fields crashed -t and the bare-name rewrite
    # with RecursionError (an internal error, exit 70) instead of the typed refusal.
    garbage = (shape * 3000).encode()
    data = b"To: " + garbage + b'\nTo: "x\nTo: ' + garbage + b"\nSubject: s\n\nbody\n"
    args = SendmailArgs(extract=extract, recipients=[] if extract else ["bob@example.org"])
    with pytest.raises(InvalidMessage):
        build(data, args, default_domain="example.org")


# --- address fields past the mailbox bound ----------------------------------------------

NAMES = b",".join([b"r"] * 32_000)
"""A Bcc value of 32,000 bare names, within the 64 KiB a field may hold."""


def names_message(*, latin1: bool = False) -> bytes:
    """1 MB of header: 16 Bcc fields of :data:`NAMES` (with ``latin1``, each behind a
    display name in ISO-8859-1, which the charset of the message declares)."""
    name = b"J\xf6rg <j@example.test>," if latin1 else b""
    charset = b"Content-Type: text/plain; charset=iso-8859-1\n" if latin1 else b""
    fields = b"".join(b"Bcc: " + name + NAMES + b"\n" for _ in range(16))
    return b"From: a@example.test\nSubject: x\n" + charset + fields + b"\nbody\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("latin1", [False, True], ids=["utf-8", "iso-8859-1"])
@pytest.mark.parametrize("extract", [False, True], ids=["args", "-t"])
def test_address_fields_past_the_mailbox_bound_are_refused_at_the_first_field(
    extract: bool, latin1: bool
) -> None:
    """Every bare name of a header section was parsed (by two parsers), qualified and,
    with -t, collected before prepare() refused the message: 16 s for 1 MB of names
    (22 s with -t). Counted as they are read, they are refused at the first field that
    passes prepare()'s bound, with its error: the count says how many were read."""
    args = SendmailArgs(extract=extract, recipients=[] if extract else ["bob@example.org"])
    with pytest.raises(TooManyRecipients) as refused:
        build(names_message(latin1=latin1), args, default_domain="host.example.test")
    assert refused.value.count == 1 + 32_000  # From (or Jörg) and one Bcc field's names
    assert refused.value.limit == 1000 + MAX_OTHER_MAILBOXES
    assert "name more than 11240 mailboxes" in refused.value.reason


def test_the_mailbox_bound_follows_max_recipients() -> None:
    value = ", ".join(f"u{i}" for i in range(5500)).encode()
    data = b"From: a@example.test\nTo: " + value + b"\nCc: " + value + b"\n\nbody\n"
    args = SendmailArgs(recipients=["bob@example.org"])
    build(data, args, default_domain="h.test", max_recipients=1000)  # within 11,240
    with pytest.raises(TooManyRecipients) as refused:
        build(data, args, default_domain="h.test", max_recipients=1)
    assert (refused.value.count, refused.value.limit) == (11_001, 1 + MAX_OTHER_MAILBOXES)


def test_sendmail_refuses_a_header_of_names_without_reading_them_all(cli: CLI) -> None:
    cli.env["MAILSTROM_SENDMAIL_ORIGIN"] = "host.example.test"
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""
    # Well within the time it takes to read all (16 s, 22 s with -t, on an idle machine).
    result = cli("sendmail", "-t", "-i", stdin=names_message(), timeout=12)
    assert result.code == 65, result.err
    assert "name more than 11240 mailboxes" in result.err
    assert cli.queue_ids() == []
