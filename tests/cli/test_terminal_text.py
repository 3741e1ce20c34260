"""Text from a message or a peer reaches the terminal with its control characters shown
as escapes: a crafted Subject or reply cannot recolour, rewrite or forge lines of the
operator's terminal. JSON output keeps the text as it is (json escapes it)."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from mailstrom.cli.events import _print as print_event
from mailstrom.cli.exits import reason_for
from mailstrom.cli.output import (
    cell,
    echo,
    print_fields,
    print_json,
    print_json_list,
    print_table,
    visible,
    visible_lines,
)
from mailstrom.errors import InvalidMessage
from mailstrom.status import DeliveryEvent, RecipientState, SMTPReply
from tests.cli.conftest import CLI

ESC = "\x1b"
HOSTILE = f"hi\r\nFAKE LINE{ESC}[31mRED\x9b2J\u2028x\u202eevil\x07"
"""An ESC colour sequence, an 8-bit CSI (clear screen), a line break and a line
separator that forge a line, a right-to-left override, a bell."""


def assert_harmless(text: str) -> None:
    assert not any(c in text for c in "\r\x1b\x9b\u2028\u202e\x07"), repr(text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, é 😀", "plain text, é 😀"),
        (f"{ESC}[31mRED", r"\x1b[31mRED"),
        ("a\x9bb\x7fc\x00", r"a\x9bb\x7fc\x00"),
        ("x\u2028y\u2029z", r"x\u2028y\u2029z"),
        ("abc\u202edcba\u2066\u200f", r"abc\u202edcba\u2066\u200f"),
        ("tab\tand\nline", r"tab\x09and\x0aline"),
    ],
)
def test_visible_shows_controls_as_escapes(text: str, shown: str) -> None:
    assert visible(text) == shown


# What surrogateescape makes of b"mailto:\xff@x\xed\xa0\x80": an octet that is no UTF-8
# becomes a lone surrogate, which no UTF-8 output can hold.
UNDECODED = b"mailto:\xff@x\xed\xa0\x80".decode("utf-8", "surrogateescape")


def test_octets_that_are_no_utf8_show_as_escapes() -> None:
    assert visible(UNDECODED) == r"mailto:\xff@x\xed\xa0\x80"
    assert visible("lone \ud800") == r"lone \ud800"
    out = io.StringIO()
    echo(UNDECODED, out)
    print_table(["RECORD"], [[UNDECODED]], stream=out)
    out.getvalue().encode("utf-8")  # strict: no surrogate left


def test_json_output_is_utf8_whatever_the_strings_hold() -> None:
    out = io.StringIO()
    print_json({"record": UNDECODED, "other": "\ud800", "fine": "é"}, out)
    assert json.loads(out.getvalue().encode("utf-8")) == {
        "record": "mailto:\ufffd@x\ufffd\ufffd\ufffd",
        "other": "\ufffd",
        "fine": "é",
    }


def test_json_output_escapes_what_a_terminal_would_obey() -> None:
    """json escapes C0 controls only: with ensure_ascii=False an 8-bit CSI (U+009B), a
    line separator or a right-to-left override in a stored Subject (decoded from an
    encoded word) or metadata value reached the terminal of `status --json` raw. Written
    as JSON escapes they are the same value to a parser."""
    out = io.StringIO()
    print_json({"subject": HOSTILE, "list": [HOSTILE], "fine": "é 😀"}, out)
    assert_harmless(out.getvalue())
    assert "\x7f" not in out.getvalue() and "é 😀" in out.getvalue()
    assert json.loads(out.getvalue()) == {"subject": HOSTILE, "list": [HOSTILE], "fine": "é 😀"}


def test_a_cell_is_one_line_without_controls() -> None:
    assert cell(HOSTILE) == r"hi FAKE LINE\x1b[31mRED\x9b2J x\u202eevil\x07"


def test_fields_and_tables_show_controls_as_escapes() -> None:
    out = io.StringIO()
    print_fields([("Subject", HOSTILE), ("Meta k", f"v{ESC}]0;title\x07")], stream=out)
    print_table(["REPLY"], [[HOSTILE]], title=f"Attempts for a{ESC}[2J@example.org", stream=out)
    assert_harmless(out.getvalue())
    assert out.getvalue().count("\n") == 2 + 3  # no forged line
    assert r"Attempts for a\x1b[2J@example.org" in out.getvalue()


def test_plain_table_columns_line_up_with_wide_characters() -> None:
    # A CJK character takes two columns of a terminal: padded by its count of
    # characters, every column after an address such as 收件人@例子.example started
    # one column further to the right per such character than in the other rows.
    out = io.StringIO()
    print_table(
        ["RECIPIENT", "STATE"],
        [["收件人@例子.example", "queued"], ["b@example.org", "delivered"], ["e\u0301@x.org", "-"]],
        stream=out,
    )
    # The first column is 19 terminal columns wide: 5 CJK characters (2 each) and 9
    # others; the combining accent takes none.
    assert out.getvalue().splitlines() == [
        "RECIPIENT" + " " * 12 + "STATE",
        "收件人@例子.example" + " " * 2 + "queued",
        "b@example.org" + " " * 8 + "delivered",
        "e\u0301@x.org" + " " * 14 + "-",
    ]
    fields = io.StringIO()
    print_fields([("Meta 订单", "42"), ("Subject", "x")], stream=fields)
    assert fields.getvalue().splitlines() == ["Meta 订单:  42", "Subject:    x"]


def test_echo_and_error_lines_show_controls_as_escapes() -> None:
    out = io.StringIO()
    echo(f"bob@example.org: {HOSTILE}", out)
    assert_harmless(out.getvalue())
    assert out.getvalue().count("\n") == 1
    reason = reason_for(InvalidMessage(f"bad header {HOSTILE}"))
    assert_harmless(reason)
    assert reason.startswith("bad header hi FAKE LINE\\x1b[31mRED")


def test_an_event_line_shows_the_reply_s_controls_as_escapes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    event = DeliveryEvent(
        id=1,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        message_id="m1",
        address="bob@example.org",
        state=RecipientState.FAILED,
        attempt=1,
        reply=SMTPReply(code=550, text=HOSTILE),
        mx_host=f"mx{ESC}[8m.example.org",
        tags=(f"t{ESC}",),
    )
    print_event(event, as_json=False)
    plain = capsys.readouterr().out
    assert_harmless(plain)
    assert plain.count("\n") == 1
    print_event(event, as_json=True)
    assert json.loads(capsys.readouterr().out)["reply"]["text"] == HOSTILE


def test_a_message_shown_on_a_terminal_keeps_its_lines_only() -> None:
    data = f"Subject: x\r\n\r\nhello\tworld\r\nover\rwrite {ESC}[2J\xe9\n".encode() + b"\xff\n"
    shown = visible_lines(data)
    assert shown == "Subject: x\r\n\r\nhello\tworld\r\nover\\x0dwrite \\x1b[2J\xe9\n\\xff\n"


SUBJECT_MESSAGE = (
    b"From: a@client.test\r\nTo: b@example.test\r\n"
    b"Subject: =?utf-8?q?hi=0D=0AFAKE_LINE=1B[31mRED?=\r\n\r\nx\r\n"
)


def test_status_shows_a_subject_s_escape_as_text(cli: CLI) -> None:
    message_id = cli.ok("send", "--file", "-", stdin=SUBJECT_MESSAGE).out.strip()
    out = cli.ok("status", message_id).out
    assert_harmless(out)
    assert r"Subject:     hi FAKE LINE\x1b[31mRED" in out.splitlines()
    # JSON is for programs: the Subject as decoded, escaped by json only.
    document = cli.ok("status", "--json", message_id).json()
    assert document["subject"] == f"hi\r\nFAKE LINE{ESC}[31mRED"


def test_a_metadata_key_read_from_the_store_is_shown_escaped(cli: CLI) -> None:
    """`status` shows each metadata key in its label ("Meta KEY:"), and print_fields wrote
    labels as they were: a key validated when queued, but read back from a store changed
    by hand or by another writer, reached the terminal with its ESC and CR."""
    message_id = cli.ok(
        "send",
        "--from",
        "a@client.test",
        "--to",
        "b@example.test",
        "--text",
        "x",
        "--meta",
        "order=42",
    ).out.strip()
    conn = sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)
    conn.execute(
        "UPDATE messages SET metadata = ? WHERE id = ?",
        (json.dumps({HOSTILE: "v"}, ensure_ascii=False), message_id),
    )
    conn.close()
    out = cli.ok("status", message_id).out
    assert_harmless(out)
    assert r"Meta hi\x0d\x0aFAKE LINE\x1b[31mRED" in out
    out = io.StringIO()
    print_fields([(f"Meta {HOSTILE}", "v")], stream=out)
    assert_harmless(out.getvalue())
    assert out.getvalue().count("\n") == 1


def test_an_ambiguous_id_s_candidates_are_shown_escaped(cli: CLI) -> None:
    """The candidates of an ambiguous prefix are the store's ids, shown as they were
    read: one changed by hand reached the terminal with its ESC, the only error line
    written without the escapes every other reason gets."""
    args = ("send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x")
    first = cli.ok(*args).out.strip()
    second = cli.ok(*args).out.strip()
    conn = sqlite3.connect(cli.cwd / "queue.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute(
        "UPDATE messages SET id = ? WHERE id = ?", (first[:8] + f"{ESC}[2J" + first[8:], second)
    )
    conn.close()
    result = cli("status", first[:8])
    assert result.code == 66, result.err
    assert "ambiguous message id" in result.err
    assert_harmless(result.err)
    assert r"\x1b[2J" in result.err


NON_ASCII_MESSAGE = (
    b"From: a@client.test\r\nTo: b@example.test\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9_=F0=9F=98=80?=\r\n\r\nx\r\n"
)


def test_output_to_a_stream_that_is_not_utf8(cli: CLI) -> None:
    """Standard output in a locale that is not UTF-8 (de_DE.ISO-8859-1; ASCII here, the
    strictest): an "é" in a Subject was a UnicodeEncodeError, and `status` or `status
    --json` ended as an internal error (70). Text shows what it cannot hold as escapes;
    JSON as \\u escapes, the same value to a parser."""
    message_id = cli.ok("send", "--file", "-", stdin=NON_ASCII_MESSAGE).out.strip()
    ascii_out = CLI(cwd=cli.cwd, env=cli.env | {"PYTHONIOENCODING": "ascii"})
    out = ascii_out.ok("status", message_id).out
    assert r"Subject:     caf\xe9 \U0001f600" in out.splitlines()
    text = ascii_out.ok("status", "--json", message_id).out
    assert text.isascii() and json.loads(text)["subject"] == "café 😀"
    listed = ascii_out.ok("queue", "--json").out
    assert listed.isascii() and json.loads(listed)[0]["subject"] == "café 😀"


def test_output_in_the_c_locale_without_utf8_mode(cli: CLI) -> None:
    """In the C (POSIX) locale with UTF-8 mode off (``PYTHONUTF8=0``), Python writes
    standard output in ASCII with ``surrogateescape``, not ``strict``: the escapes
    tolerant_stdout() asks for were not set, and an "é" in a Subject ended `status` as an
    internal error (70), its lines cut off. It shows as an escape, as in any other
    locale that is not UTF-8."""
    message_id = cli.ok("send", "--file", "-", stdin=NON_ASCII_MESSAGE).out.strip()
    env = {k: v for k, v in cli.env.items() if k not in ("PYTHONIOENCODING", "LANG")}
    c_locale = CLI(cwd=cli.cwd, env=env | {"LC_ALL": "C", "PYTHONUTF8": "0"})
    out = c_locale.ok("status", message_id).out
    assert r"Subject:     caf\xe9 \U0001f600" in out.splitlines()
    text = c_locale.ok("status", "--json", message_id).out
    assert text.isascii() and json.loads(text)["subject"] == "café 😀"


def test_json_for_a_stream_that_is_not_utf8() -> None:
    latin = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    print_json({"s": "é 😀\u202e"}, latin)
    latin.flush()
    written = latin.buffer.getvalue()  # type: ignore[attr-defined]
    assert written.isascii() and json.loads(written) == {"s": "é 😀\u202e"}


def test_commands_with_standard_output_closed(cli: CLI) -> None:
    """`mailstrom queue >&-`: Python sets a closed standard output to None, and every view
    (queue, status, show) ended as "internal error: AttributeError" (70) after it had
    read the store. Output to a closed stream goes nowhere, as print() has it."""
    message_id = cli.ok("send", "--file", "-", stdin=NON_ASCII_MESSAGE).out.strip()
    for args in (["queue"], ["queue", "--json"], ["status", message_id], ["show", message_id]):
        proc = subprocess.run(
            ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "mailstrom", *args],
            cwd=cli.cwd,
            env=cli.env,
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, (args, proc.stderr.decode())
        assert b"internal error" not in proc.stderr


def test_a_command_that_acts_with_standard_output_closed(cli: CLI) -> None:
    """`mailstrom send ... >&-`: the /dev/null put in place of the closed standard output
    was wrapped so that it outlives its reader, and the wrapper kept only its descriptor:
    the stream was collected and closed it, and printing the id failed with EBADF. The
    message was queued, yet the command exited 120, a failure to its caller."""
    argv = ["send", "--from", "a@example.test", "--to", "b@example.test", "--text", "x"]
    for stream in (">&-", "2>&-"):
        proc = subprocess.run(
            ["sh", "-c", f'exec "$@" {stream}', "sh", sys.executable, "-m", "mailstrom", *argv],
            cwd=cli.cwd,
            env=cli.env,
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, (stream, proc.stderr.decode())
    assert len(cli.queue_ids()) == 2


@pytest.mark.parametrize("encoding", ["utf-8", "iso-8859-1"])
@pytest.mark.parametrize(
    "items",
    [
        [],
        [{}],
        [[]],
        ["a\nb", 1, None],
        [{"subject": HOSTILE, "tags": ["x", "y\n"], "n": {"deep": [1, {"k": UNDECODED}]}}] * 3,
        [{"fine": "é 😀", "empty": {}, "list": []}, {"other": "\ud800"}],
    ],
)
def test_a_list_written_element_by_element_is_the_text_print_json_writes(
    items: list[object], encoding: str
) -> None:
    """``queue --json`` writes its list one element at a time (the whole text of 100,000
    messages took 800 MB before its first octet was written): the same text, octet for
    octet, in any output encoding."""
    whole, each = (io.TextIOWrapper(io.BytesIO(), encoding=encoding) for _ in range(2))
    print_json(items, whole)
    print_json_list(iter(items), each)
    for stream in (whole, each):
        stream.flush()
    assert each.buffer.getvalue() == whole.buffer.getvalue()  # type: ignore[attr-defined]


def test_a_list_is_written_before_its_last_element_is_made() -> None:
    out = io.StringIO()

    def elements() -> Iterator[dict[str, int]]:
        yield {"first": 1}
        assert '"first": 1' in out.getvalue(), "nothing written before the whole list"
        yield {"second": 2}

    print_json_list(elements(), out)
    assert json.loads(out.getvalue()) == [{"first": 1}, {"second": 2}]


EIGHT_BIT_BODY = (
    b"From: a@client.test\r\nTo: b@example.test\r\nSubject: x\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "caf\u00e9 \u00db2J gone\r\n".encode()
)
"""A body whose "Û" is C3 9B in UTF-8: 0x9B, on its own, is the 8-bit CSI to a terminal
that is not in UTF-8 mode (the Linux console, xterm in a Latin-1 locale)."""


def _on_a_terminal(cli: CLI, env: dict[str, str], *args: str) -> bytes:
    """What ``mailstrom ARGS`` writes to a pseudo-terminal."""
    import os
    import pty

    screen, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", cli.module, *args],
        cwd=cli.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(screen, 65536)
            except OSError:  # EIO: the command has ended and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(screen)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    return shown


@pytest.mark.parametrize(
    ("locale", "shown"),
    [
        ({"PYTHONIOENCODING": "iso-8859-1"}, "caf\u00e9 \u00db2J gone".encode("iso-8859-1")),
        ({"PYTHONIOENCODING": "ascii"}, rb"caf\xe9 \xdb2J gone"),
        ({"LC_ALL": "C", "PYTHONUTF8": "0"}, rb"caf\xe9 \xdb2J gone"),
    ],
)
def test_a_message_shown_on_a_terminal_that_is_not_utf8(
    cli: CLI, locale: dict[str, str], shown: bytes
) -> None:
    """`show` wrote a message to a terminal as UTF-8 whatever its locale: on one that is
    not UTF-8 a "Û" (C3 9B) reached it as an 8-bit CSI, and "Û2J" cleared the screen.
    The message is shown in the terminal's encoding, as every other line of text is:
    what it cannot hold as an escape."""
    message_id = cli.ok("send", "--file", "-", stdin=EIGHT_BIT_BODY).out.strip()
    env = {k: v for k, v in cli.env.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_ALL")}
    out = _on_a_terminal(cli, env | locale, "show", message_id)
    assert b"\x9b" not in out
    assert shown in out


def test_a_suppression_export_shown_on_a_terminal_that_is_not_utf8(cli: CLI) -> None:
    """`suppress export` wrote its CSV as UTF-8 to a terminal whatever its locale: a
    server's reply kept with a hard bounce ("Û" is C3 9B) reached a terminal that is not
    UTF-8 as an 8-bit CSI, and "Û2J" cleared the screen. On a terminal the CSV is shown
    in its encoding; into a file or a pipe it is still UTF-8, as import reads it."""
    reply = "550 5.1.1 \u00db2J unknown"
    cli.ok("suppress", "add", "--source", "hard_bounce", "--reason", reply, "bob@example.test")
    env = {k: v for k, v in cli.env.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_ALL")}
    out = _on_a_terminal(cli, env | {"PYTHONIOENCODING": "iso-8859-1"}, "suppress", "export")
    assert b"\x9b" not in out
    assert reply.encode("iso-8859-1") in out
    out = _on_a_terminal(cli, env | {"PYTHONIOENCODING": "ascii"}, "suppress", "export")
    assert b"\x9b" not in out
    assert rb"550 5.1.1 \xdb2J unknown" in out
    assert reply in cli.ok("suppress", "export").out  # a pipe: UTF-8
