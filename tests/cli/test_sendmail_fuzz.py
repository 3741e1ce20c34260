"""Fuzzing ``mailstrom sendmail`` in-process: whatever its arguments and the message on its
standard input hold, it exits with a sysexits code that says whose fault it was (0, or 64,
65, 66 for bad input) and never 70 (a crash); when it exits 0 exactly one message is
queued, without Bcc, with the body it was given and no recipient it was not given, and
otherwise nothing is queued.

Messages are built from valid seeds (To/Cc/Bcc, Resent-*, groups, comments, encoded
words, route addresses, 8-bit, local names) and then mutated: hostile octets (NUL, CR,
8-bit, controls) put anywhere, line ends swapped for LF, CR or a mix, the blank line
dropped, lines duplicated or cut, dot lines with and without -i.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (150 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/cli/test_sendmail_fuzz.py``.
"""

from __future__ import annotations

import binascii
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.cli import sendmail
from mailstrom.cli.exits import EX_DATAERR, EX_NOINPUT, EX_OK, EX_USAGE
from mailstrom.stores import open_store

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "150"))
ORIGIN = "host.example.test"
ACCEPTED_CODES = {EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT}

# --- the inputs ------------------------------------------------------------------------

ADDRESSES = [
    "bob@example.test",
    "Bob@Example.Test",
    '"Bob, Jr." <bob@example.test>',
    "<carol@example.test>",
    "dave@example.test (Dave the admin)",
    "=?utf-8?q?B=C3=B6b?= <bob@example.test>",
    "=?utf-8?b?w7Zz?= <os@example.test>",
    "<@route.test:eve@example.test>",
    "frank@[127.0.0.1]",
    "ñoño@bücher.example",
    "root",
    "www-data",
    "team: ann@example.test, ben@example.test;",
    "undisclosed-recipients:;",
    '"quoted local"@example.test',
    "a@b",
    "x" * 64 + "@example.test",
    "bob@example.test, carol@example.test",
    "<>",
    "@",
    "bob@@example.test",
    "bob@example..test",
    "(comment only)",
    "bob@-example.test",
]
HEADER_NAMES = [
    "To",
    "Cc",
    "Bcc",
    "From",
    "Sender",
    "Reply-To",
    "Resent-To",
    "Resent-Cc",
    "Resent-Bcc",
    "Resent-From",
    "Resent-Date",
    "to",
    "BCC",
]
OTHER_HEADERS = [
    b"Subject: hello",
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=",
    "Subject: Grüße".encode(),
    b"Message-ID: <m1@example.test>",
    b"Message-ID: not-an-id",
    b"Date: Mon, 30 Nov 2026 09:00:00 +0000",
    b"Date: yesterday",
    b"MIME-Version: 1.0",
    b"Content-Type: text/plain; charset=utf-8",
    b'Content-Type: multipart/mixed; boundary="B"',
    b"Content-Transfer-Encoding: 8bit",
    b"X-Long: " + b"y" * 990,
    b"X-Folded: one\n two\n\tthree",
    b"Subject:",
    b" leading continuation",
    b"no colon here",
    b"From bob@example.test Mon Nov 30 09:00:00 2026",
]
BODY_LINES = [
    b"Hello",
    b".",
    b"..",
    b". ",
    b".\r",
    b"From the start",
    b"--B",
    b"--B--",
    "Grüße".encode(),
    b"\xff\xfe",
    b"z" * 998,
    b"z" * 1200,
    b"",
]
HOSTILE = [b"\0", b"\r", b"\n", b"\r\n", b"\xff", b"\x1b[2J", b"\x7f", b":", b"<", b">", b","]
SENDERS = [
    "app@example.test",
    "",
    "<>",
    "<app@example.test>",
    "root",
    "-t",
    "a b@example.test",
    "app@example.test\n",
    "\0",
    "ñoño@bücher.example",
    "bounces+{token}@example.test",
    "@",
    "x" * 400 + "@example.test",
]
FULL_NAMES = ["Cron Daemon", "", "Zoë Ünicode", 'Quote " and \\ backslash', "New\nline", "\0"]


@st.composite
def header_lines(draw: Any) -> list[bytes]:
    lines: list[bytes] = []
    if draw(st.integers(0, 3)):  # mostly a message with somewhere to go
        lines.append(b"To: " + draw(st.sampled_from(ADDRESSES[:6])).encode())
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(HEADER_NAMES))
            values = draw(st.lists(st.sampled_from(ADDRESSES), min_size=0, max_size=3))
            lines.append(f"{name}: {', '.join(values)}".encode())
        else:
            lines.append(draw(st.sampled_from(OTHER_HEADERS)))
    return lines


@st.composite
def messages(draw: Any) -> bytes:
    """A message from valid seeds, then mutated."""
    head = draw(header_lines())
    body = draw(st.lists(st.sampled_from(BODY_LINES), min_size=1, max_size=6))
    lines = [*head, b"", *body] if draw(st.integers(0, 9)) else [*head, *body]  # no blank
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # hostile octets anywhere
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        line = lines[at]
        cut = draw(st.integers(0, len(line)))
        lines[at] = line[:cut] + draw(st.sampled_from(HOSTILE)) + line[cut:]
    if lines and draw(st.integers(0, 9)) == 0:  # a line duplicated or dropped
        at = draw(st.integers(0, len(lines) - 1))
        lines[at:at] = [lines[at]] if draw(st.booleans()) else []
        if not draw(st.booleans()):
            del lines[at]
    ending = draw(st.sampled_from([b"\r\n", b"\n", b"\n", b"\r", b"mixed"]))
    if ending == b"mixed":
        data = b"".join(line + draw(st.sampled_from([b"\r\n", b"\n"])) for line in lines)
    else:
        data = ending.join(lines) + (ending if draw(st.integers(0, 5)) else b"")
    if draw(st.integers(0, 19)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def command_lines(draw: Any) -> list[str]:
    options: list[list[str]] = []
    if draw(st.booleans()):
        options.append([draw(st.sampled_from(["-t", "-ti", "-it"]))])
    if draw(st.booleans()):
        options.append([draw(st.sampled_from(["-i", "-oi", "-oitrue", "-oifalse"]))])
    if draw(st.booleans()):
        sender = draw(st.sampled_from(SENDERS))
        options.append(draw(st.sampled_from([["-f", sender], ["-f" + sender], ["-r", sender]])))
    if draw(st.integers(0, 3)) == 0:
        options.append(["-F", draw(st.sampled_from(FULL_NAMES))])
    if draw(st.integers(0, 5)) == 0:
        options.append(draw(st.sampled_from([["-odi"], ["-v"], ["-oem"], ["-N", "never"]])))
    ordered = draw(st.permutations(options))
    recipients = draw(st.lists(st.sampled_from([*ADDRESSES, "-", "--"]), max_size=3))
    if not recipients and draw(st.booleans()):
        recipients = ["bob@example.test"]
    return [arg for option in ordered for arg in option] + recipients


# --- running it ------------------------------------------------------------------------


@contextmanager
def sendmail_environment(store: Path) -> Iterator[None]:
    """MAILSTROM_* as a host would set them, none from the developer's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(
        MAILSTROM_STORE=f"sqlite:///{store}",
        MAILSTROM_HELO_NAME="client.example.test",
        MAILSTROM_SENDMAIL_ORIGIN=ORIGIN,
        MAILSTROM_SENDMAIL_ALIASES="",
    )
    with (
        mock.patch.dict(os.environ, env, clear=True),
        mock.patch.object(sendmail, "SYSTEM_CONFIG_PATH", Path("/nonexistent/config.toml")),
        mock.patch.object(sendmail.getpass, "getuser", return_value="app"),
    ):
        yield


def run_sendmail(argv: list[str], stdin: bytes) -> tuple[int, str]:
    """(exit code, stderr) of ``sendmail argv`` fed ``stdin``."""
    err = io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="ascii", errors="strict")
    with (
        mock.patch.object(sys, "stdin", fake_stdin),
        mock.patch.object(sys, "stderr", err),
        mock.patch.object(sys, "stdout", io.StringIO()),
    ):
        code = sendmail.main(argv)
    return code, err.getvalue()


def first_field(data: bytes) -> bytes:
    """The first line of the message below the Received field sendmail put on top."""
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"Received: by "), data
    return next(line for line in lines[1:] if not line.startswith((b" ", b"\t")))


def queued(store: Path) -> dict[str, tuple[bytes, list[str]]]:
    """The messages in the store: id → (data, recipients)."""
    if not store.exists():
        return {}
    from datetime import UTC, datetime

    opened = open_store(f"sqlite:///{store}")
    try:
        return {
            m.id: (opened.message_data(m.id), [r.address for r in m.recipients])
            for m in opened.query(now=datetime.now(UTC))
        }
    finally:
        opened.close()


def normalized_body(data: bytes) -> bytes:
    """The body after the first empty line, with every line end as CRLF."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data.startswith(b"\r\n"):
        return data[2:]
    return data.partition(b"\r\n\r\n")[2]


_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


def input_body(stdin: bytes) -> bytes:
    """The body of ``stdin`` as Sendmail and Postfix read it, every line end as CRLF:
    after the first empty line, or from the first line that is neither a header field (a
    name and a colon) nor a continuation, when that comes first; an mbox ``From `` line
    is dropped first."""
    if stdin.startswith(b"From "):
        stdin = stdin.partition(b"\n")[2]
    lines = re.sub(rb"\r\n|\r|\n", b"\r\n", stdin).split(b"\r\n")
    for at, line in enumerate(lines):
        if not line:
            return b"\r\n".join(lines[at + 1 :])
        if not (_FIELD.match(line) or (at and line[:1] in b" \t")):
            return b"\r\n".join(lines[at:])
    return b""


def check_queued(argv: list[str], stdin: bytes, data: bytes, recipients: list[str]) -> None:
    """What a queued message must be: no Bcc, the body it was given, and no recipient
    that appears neither in the arguments nor in the message."""
    head = data.partition(b"\r\n\r\n")[0]
    assert not re.search(rb"(?im)^(resent-)?bcc:", head), "a Bcc field was queued"
    given = " ".join(argv).encode("utf-8", "surrogateescape") + stdin
    for address in recipients:
        local = address.rpartition("@")[0].strip('"').lower().encode()
        assert local.split(b" ")[0] in given.lower(), f"{address} was not given"
    # The body as read: to the end, or (without -i) to a lone dot line.
    expected, got = input_body(stdin), normalized_body(data)
    cte = re.findall(rb"(?im)^content-transfer-encoding:[ \t]*(\S+)", head)
    given_cte = rb"(?im)^content-transfer-encoding:[ \t]*"
    if cte and not re.search(given_cte + re.escape(cte[-1]), stdin):
        # An encoding sendmail gave a body with a line over 998 octets: its content.
        decode = binascii.a2b_qp if cte[-1].lower() == b"quoted-printable" else binascii.a2b_base64
        got = re.sub(rb"\r\n|\r|\n", b"\r\n", decode(got))
    if expected and got != expected:
        # Without -i a lone dot ends the message: then the body is a prefix.
        assert expected.startswith(got.rstrip(b"\r\n")), "body changed"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(argv=command_lines(), stdin=messages())
def test_sendmail_exits_with_a_reason_and_queues_what_it_was_given(
    argv: list[str], stdin: bytes
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "queue.db"
        with sendmail_environment(store):
            code, err = run_sendmail(argv, stdin)
        assert code in ACCEPTED_CODES, f"exit {code}: {err}"
        event(f"exit {code}")
        found = queued(store)
        if code != EX_OK:
            assert found == {}, "something was queued by a failed run"
            assert err.startswith("mailstrom: ") and err.count("\n") == 1, err
            return
        [(data, recipients)] = found.values()
        check_queued(argv, stdin, data, recipients)


# --- what the fuzzing found ------------------------------------------------------------


def sendmail_once(argv: list[str], stdin: bytes) -> tuple[int, str, list[tuple[bytes, list[str]]]]:
    """(exit code, stderr, the messages queued) of one run against an empty queue."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "queue.db"
        with sendmail_environment(store):
            code, err = run_sendmail(argv, stdin)
        return code, err, list(queued(store).values())


def test_a_sender_in_utf8_gets_its_from_header() -> None:
    # Was: exit 70, "internal error: UnicodeEncodeError" (formataddr takes ASCII only).
    for argv in (["-f", "ñoño@bücher.example"], ["-F", "Zoë", "-f", "ñoño@bücher.example"]):
        code, err, [(data, recipients)] = sendmail_once(
            [*argv, "bob@example.test"], b"Subject: hi\n\nbody\n"
        )
        assert code == EX_OK, err
        assert recipients == ["bob@example.test"]
        assert first_field(data) in (
            "From: ñoño@bücher.example".encode(),
            'From: "Zoë" <ñoño@bücher.example>'.encode(),
        )


def test_a_bare_name_in_utf8_gets_the_origin() -> None:
    # Was: exit 70, "internal error: UnicodeEncodeError" while giving it the origin.
    code, err, [(data, recipients)] = sendmail_once(
        ["-t"], "From: app@example.test\nTo: Zoë <ñoño>\n\nbody\n".encode()
    )
    assert code == EX_OK, err
    assert recipients == [f"ñoño@{ORIGIN}"]
    assert f'\r\nTo: "Zoë" <ñoño@{ORIGIN}>\r\n'.encode() in data
    # 8-bit octets that are not UTF-8 beside a bare name: refused, not a crash.
    for field in (b"\xff, root", b"b@example.test (\xff the admin), root"):
        message = b"From: app@example.test\nTo: " + field + b"\n\nbody\n"
        code, err, found = sendmail_once(["-t"], message)
        assert (code, found) == (EX_DATAERR, []), err


def test_t_sends_a_resent_message_to_its_resent_recipients() -> None:
    # Was: queued for the first recipient again (To), and Resent-Bcc's lost: prepare
    # removes the field, and -t read To, Cc and Bcc only.
    message = (
        b"From: app@example.test\nTo: first@example.test\nResent-From: ops@example.test\n"
        b"Resent-To: next@example.test\nResent-Bcc: hidden@example.test, root\n\nbody\n"
    )
    code, err, [(data, recipients)] = sendmail_once(["-t", "-i"], message)
    assert code == EX_OK, err
    assert recipients == ["next@example.test", "hidden@example.test", f"root@{ORIGIN}"]
    assert b"hidden" not in data
    assert b"\r\nTo: first@example.test\r\n" in data


def test_t_sends_a_message_resent_twice_to_its_newest_block_only() -> None:
    """Each resend prepends its own resent block (RFC 5322 §3.6.6); the older block names
    who got the earlier resend. -t queued the message for the recipients of every
    block, so next@ got it a second time; prepare() reads the newest block alone."""
    message = (
        b"Resent-Date: Tue, 02 Jan 2024 00:00:00 +0000\nResent-From: desk@example.test\n"
        b"Resent-To: again@example.test\nResent-Bcc: root\n"
        b"Resent-Date: Mon, 01 Jan 2024 00:00:00 +0000\nResent-From: ops@example.test\n"
        b"Resent-To: next@example.test\nResent-Bcc: hidden@example.test\n"
        b"From: app@example.test\nTo: first@example.test\n\nbody\n"
    )
    code, err, [(data, recipients)] = sendmail_once(["-t", "-i"], message)
    assert code == EX_OK, err
    assert recipients == ["again@example.test", f"root@{ORIGIN}"]
    assert b"hidden" not in data
    assert b"\r\nResent-To: next@example.test\r\n" in data


def test_a_resent_message_without_resent_from_gets_one() -> None:
    """As Postfix's cleanup does with From: a message resent without Resent-From (RFC
    5322 §3.6.6 requires one, and prepare() now refuses a resent message without it)
    gets one naming the invoking user ("app" here), or -f, and -F's name; one given is kept."""
    message = (
        b"From: app@example.test\nTo: first@example.test\nResent-To: next@example.test\n\nbody\n"
    )
    for argv, field in [
        (["-t"], f"Resent-From: app@{ORIGIN}".encode()),
        (["-t", "-f", "ops", "-F", "Ops Desk"], f"Resent-From: Ops Desk <ops@{ORIGIN}>".encode()),
        (["next@example.test"], f"Resent-From: app@{ORIGIN}".encode()),
    ]:
        code, err, [(data, recipients)] = sendmail_once(argv, message)
        assert code == EX_OK, err
        assert recipients == ["next@example.test"]
        assert first_field(data) == field, data
        assert data.count(b"Resent-From:") == 1
    given = b"Resent-From: desk@example.test\n" + message
    code, err, [(data, _)] = sendmail_once(["-t"], given)
    assert code == EX_OK, err
    assert data.count(b"Resent-From:") == 1 and b"Resent-From: desk@example.test" in data


def test_t_reads_utf8_addresses_as_they_are() -> None:
    # Was: queued for "\ufffd\ufffdo\ufffd\ufffdo@example.test", another address (each
    # octet past ASCII became U+FFFD), and with a UTF-8 domain refused (exit 65).
    for address, envelope in [
        ("ñoño@example.test", "ñoño@example.test"),
        ("ñoño@bücher.example", "ñoño@xn--bcher-kva.example"),
    ]:
        message = f"From: app@example.test\nTo: Zoë <{address}>\n\nbody\n".encode()
        code, err, [(data, recipients)] = sendmail_once(["-t"], message)
        assert code == EX_OK, err
        assert recipients == [envelope]
        assert f"\r\nTo: Zoë <{address}>\r\n".encode() in data
