"""The sendmail personality reads what Sendmail and Postfix read: the null sender of
``-f ''``, header fields written the obsolete way (``Bcc : x``), and messages without a
header section or without the empty line that ends it."""

from __future__ import annotations

import array
import contextlib
import email
import email.policy
import fcntl
import getpass
import os
import pwd
import signal
import socket
import subprocess
import sys
import termios
import time

import pytest

from tests.cli.conftest import CLI

AUTO_REPLY = b"""From: Auto Responder <auto@example.test>
To: bob@example.test
Subject: Out of office
Auto-Submitted: auto-replied

I am away.
"""


def _origin(cli: CLI) -> None:
    cli.env["MAILSTROM_SENDMAIL_ORIGIN"] = "host.example.test"
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""


@pytest.mark.parametrize("null", ["", "<>"])
def test_f_empty_or_angle_brackets_is_the_null_sender(cli: CLI, null: str) -> None:
    """Vacation programs and bounce generators send with ``-f ''`` or ``-f '<>'`` so that
    nothing answers them: the From address (or ``<>@origin``, refused) was used instead."""
    _origin(cli)
    cli.ok("sendmail", "-i", "-f", null, "bob@example.test", stdin=AUTO_REPLY)
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == ""


def test_null_sender_without_from_header_signs_as_the_user(cli: CLI) -> None:
    _origin(cli)
    cli.ok("sendmail", "-i", "-f", "<>", "bob@example.test", stdin=b"Subject: x\n\ny\n")
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == ""
    headers = cli.ok("show", "--headers", queued["id"]).out
    assert f"From: {getpass.getuser()}@host.example.test" in headers


def test_t_reads_fields_with_white_space_before_the_colon(cli: CLI) -> None:
    """RFC 5322 §4.5.3 allows ``Bcc : x``. prepare() drops such a Bcc from the message;
    -t read the headers with the stdlib's parser, which ended the header section there,
    so the Bcc address was removed and never got the mail."""
    _origin(cli)
    message = b"From: a@example.test\nTo: bob@example.test\nBcc : audit@other.test\n\nbody\n"
    cli.ok("sendmail", "-t", "-i", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in queued["recipients"]] == [
        "bob@example.test",
        "audit@other.test",
    ]
    assert "audit@" not in cli.ok("show", "--raw", queued["id"]).out


def test_fields_after_an_obsolete_one_are_still_seen(cli: CLI) -> None:
    """A ``Cc :`` before To left -t with no recipients (64); a ``Subject :`` before From
    hid the From, so a second one was added and the message refused (65)."""
    _origin(cli)
    cli.ok(
        "sendmail",
        "-t",
        "-i",
        stdin=b"From: a@example.test\nCc : c@other.test\nTo: b@example.test\n\nx\n",
    )
    cli.ok("sendmail", "-i", "b@example.test", stdin=b"Subject : hi\nFrom: a@example.test\n\nx\n")
    queued = cli.ok("queue", "--json").json()
    assert sorted(r["address"] for m in queued for r in m["recipients"]) == [
        "b@example.test",
        "b@example.test",
        "c@other.test",
    ]
    assert {m["envelope_from"] for m in queued} == {"a@example.test"}


@pytest.mark.parametrize(
    ("message", "subject", "body"),
    [
        (b"disk /var is 95% full\n", None, "disk /var is 95% full"),
        (b"Subject: backup failed\nsee /var/log/backup.log\n", "backup failed", "see /var/"),
        (b"Subject: x\r\n folded\r\nError on line 3: y\r\n", "x folded", "Error on line 3: y"),
        (b" indented first line\n", None, " indented first line"),
    ],
)
def test_the_body_starts_at_the_first_line_that_is_no_header_field(
    cli: CLI, message: bytes, subject: str | None, body: str
) -> None:
    """``echo text | sendmail root``: Sendmail and Postfix start the body at the first
    line that is not a header field; mailstrom refused it (65), so the mail was lost."""
    _origin(cli)
    cli.ok("sendmail", "bob@example.test", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    raw = cli.ok("show", "--raw", queued["id"]).out.replace("\r\n", "\n")
    head, _, text = raw.partition("\n\n")
    assert text.startswith(body)
    fields = head.replace("\n ", " ").splitlines()
    assert f"From: {getpass.getuser()}@host.example.test" in fields
    assert any(field.startswith("Message-ID: ") for field in fields)
    assert [f for f in fields if f.startswith("Subject:")] == (
        [] if subject is None else [f"Subject: {subject}"]
    )


def test_a_line_that_looks_like_a_field_is_one(cli: CLI) -> None:
    """As to Postfix's is_header(): a name and a colon make a header field, so a first
    line ``Note: disk full`` is a field (and the message has an empty body)."""
    _origin(cli)
    cli.ok("sendmail", "bob@example.test", stdin=b"Note: disk full\n")
    [queued] = cli.ok("queue", "--json").json()
    assert "Note: disk full" in cli.ok("show", "--headers", queued["id"]).out


def test_send_file_stays_strict(cli: CLI) -> None:
    result = cli("send", "--file", "-", "--to", "bob@example.test", stdin=b"Subject: x\nbody\n")
    assert result.code == 65
    assert cli.queue_ids() == []


@pytest.mark.parametrize(
    "sender", ["<ann@example.test>", "Ann <ann@example.test>", "ann@example.test (Ann)"]
)
def test_full_name_with_a_sender_written_with_more_than_its_address(cli: CLI, sender: str) -> None:
    """``-f '<addr>'`` (and ``-f 'Name <addr>'``) is an envelope sender that sendmail
    reads as its address. With ``-F`` the From field put it inside angle brackets as
    written, ``Ann <<ann@example.test>>``, and the message was refused as malformed
    (exit 65); ``-F Ann -f 'ann@example.test (Ann)'`` wrote the comment inside them."""
    _origin(cli)
    cli.ok(
        "sendmail", "-F", "Ann Smith", "-f", sender, "bob@example.test", stdin=b"Subject: x\n\ny\n"
    )
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == "ann@example.test"
    headers = cli.ok("show", "--headers", queued["id"]).out
    assert "From: Ann Smith <ann@example.test>" in headers.splitlines()


def _reading_a_pipe(pid: int) -> bool:
    """Whether process ``pid`` is blocked reading a pipe (its kernel wait channel)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe_read" in f.read()
    except OSError:
        return False


def test_ctrl_c_while_the_message_is_typed_is_no_traceback(cli: CLI) -> None:
    """``sendmail bob`` typing a message at a terminal and Ctrl-C: the KeyboardInterrupt
    left sendmail's own error handling and Python printed its traceback (the other
    commands end with 130, as a shell reports an interrupted command)."""
    if not os.path.exists(f"/proc/{os.getpid()}/wchan"):
        pytest.skip("needs /proc/PID/wchan to see the command wait for its input")
    _origin(cli)
    proc = subprocess.Popen(
        [sys.executable, "-m", cli.module, "sendmail", "bob@example.test"],
        cwd=cli.cwd,
        env=cli.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"Subject: half typed\n\nnot the end yet\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not _reading_a_pipe(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the kernel's state of the process; nothing to wait on
        assert _reading_a_pipe(proc.pid), "sendmail never waited for the rest of its input"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert cli.queue_ids() == []


def _unread(fd: int) -> int:
    """Octets waiting in the pipe ``fd`` reads (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


@pytest.mark.parametrize("args", [["-i"], []])
def test_a_non_blocking_stdin_is_read_to_its_end(cli: CLI, args: list[str]) -> None:
    """A standard input left non-blocking (O_NONBLOCK is shared by everyone holding the
    same open pipe or terminal): a read finding the pipe empty for a moment was taken
    for the end of input, and the message was queued cut short, with exit 0."""
    _origin(cli)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    proc = subprocess.Popen(
        [sys.executable, "-m", cli.module, "sendmail", *args, "bob@example.test"],
        cwd=cli.cwd,
        env=cli.env,
        stdin=read_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        os.write(write_end, b"Subject: in two parts\n\nfirst part\n")
        deadline = time.monotonic() + 60
        while _unread(read_end) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until sendmail has read the first part; nothing to wait on
        with contextlib.suppress(BrokenPipeError):  # it took the first part for all
            os.write(write_end, b"second part\n")
        os.close(write_end)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    [mid] = cli.queue_ids()
    raw = cli.ok("show", "--raw", mid).out.replace("\r\n", "\n")
    assert raw.endswith("\n\nfirst part\nsecond part\n")


@pytest.mark.parametrize(
    ("sender", "author"),
    [
        ("<root>", "root@host.example.test"),
        ("Cron <root>", "Cron <root@host.example.test>"),
        ("root (Cron Daemon)", "Cron Daemon <root@host.example.test>"),
    ],
)
@pytest.mark.parametrize("has_from", [True, False])
def test_a_bare_sender_in_angle_brackets_gets_the_origin(
    cli: CLI, sender: str, author: str, has_from: bool
) -> None:
    """``-f '<root>'`` (or ``-f 'Cron <root>'``) names the local user root, as Postfix
    reads it; the origin was appended to the text as written, ``<root>@host...``, and the
    message was refused (65) for a malformed From header it did not have."""
    _origin(cli)
    head = b"From: app@example.test\n" if has_from else b""
    cli.ok("sendmail", "-i", "-f", sender, "bob@example.test", stdin=head + b"Subject: x\n\ny\n")
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == "root@host.example.test"
    fields = cli.ok("show", "--headers", queued["id"]).out.splitlines()
    assert f"From: {'app@example.test' if has_from else author}" in fields


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [
        (b"Content-Type: text/html; charset=UTF-8\n", "quoted-printable"),
        (b"", "quoted-printable"),
        (b"Content-Type: application/json\nContent-Transfer-Encoding: 8bit\n", "base64"),
    ],
)
def test_a_body_line_over_998_octets_is_encoded_not_refused(
    cli: CLI, content_type: bytes, encoding: str
) -> None:
    """PHP's mail() hands sendmail its HTML on one line, cron and logwatch a long log
    line; Postfix and Sendmail send such mail on. mailstrom refused it (exit 65, RFC 5322
    §2.1.1's 998 octets): the mail was lost. The body is encoded instead, unchanged."""
    _origin(cli)
    body = "<p>" + "Grüße, " * 1000 + "</p>\n"
    message = b"To: bob@example.test\nSubject: long\n" + content_type + b"\n" + body.encode()
    cli.ok("sendmail", "-t", "-i", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    raw = cli.ok("show", "--raw", queued["id"]).out.encode()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Content-Transfer-Encoding"] == encoding
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_payload(decode=True) == body.encode().replace(b"\n", b"\r\n")


def test_a_header_line_over_998_octets_is_folded_not_refused(cli: CLI) -> None:
    """PHP's mail() writes its To field on one line however many recipients it names;
    Postfix folds such a line and sends the mail on. mailstrom refused it (exit 65, RFC
    5322 §2.1.1's 998 octets). It is folded at its white space now, the field unchanged
    once unfolded."""
    _origin(cli)
    recipients = [f"user{i}@example.test" for i in range(80)]
    subject = "a long subject " * 80
    message = f"To: {', '.join(recipients)}\nSubject: {subject}\n\nbody\n".encode()
    cli.ok("sendmail", "-t", "-i", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in queued["recipients"]] == recipients
    raw = cli.ok("show", "--raw", queued["id"]).out.encode()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert parsed["To"].replace("\r\n", "") == ", ".join(recipients)
    assert parsed["Subject"].replace("\r\n", "").rstrip() == subject.rstrip()


def test_a_part_with_a_line_over_998_octets_is_encoded_not_refused(cli: CLI) -> None:
    """The multipart/alternative a PHP script builds by hand, its HTML part on one line:
    refused (exit 65) as a single-part message with such a body was. The long part is
    encoded now; the other part, the delimiters and the preamble are left as they were."""
    _origin(cli)
    html = "<p>" + "Grüße, " * 1000 + "</p>"
    message = (
        "To: bob@example.test\nSubject: long\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="XX"\n\nThis is MIME.\n'
        "--XX\nContent-Type: text/plain; charset=UTF-8\n\nGrüße\n"
        f"--XX\nContent-Type: text/html; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n\n{html}\n"
        "--XX--\n"
    ).encode()
    cli.ok("sendmail", "-t", "-i", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    raw = cli.ok("show", "--raw", queued["id"]).out.encode()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert b"\r\n\r\nThis is MIME.\r\n--XX\r\n" in raw
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    plain, rich = parsed.iter_parts()
    assert plain["Content-Transfer-Encoding"] is None
    assert plain.get_content().rstrip("\n") == "Grüße"
    assert rich["Content-Transfer-Encoding"] == "quoted-printable"
    assert rich.get_payload(decode=True) == html.encode()


def test_a_header_section_in_the_declared_charset_is_read_as_such(cli: CLI) -> None:
    """A PHP site kept in ISO-8859-1 writes its Subject (and From name) in ISO-8859-1 and
    declares that charset; Postfix sends such mail on, mailstrom refused it (exit 65,
    raw 8-bit headers must be UTF-8). The header section is read in the declared charset
    now; without a declaration nothing is guessed, and the message is still refused."""
    _origin(cli)
    head = "To: bob@example.test\nSubject: Bestätigung\nFrom: Jörg <shop@example.test>\n"
    body = b"Vielen Dank\n"  # ASCII: the CLI helper reads what `show` prints as UTF-8
    declared = b"Content-Type: text/plain; charset=ISO-8859-1\n\n"
    cli.ok("sendmail", "-t", "-i", stdin=head.encode("latin-1") + declared + body)
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == "shop@example.test"
    raw = cli.ok("show", "--raw", queued["id"]).out.encode()
    fields = raw.partition(b"\r\n\r\n")[0].decode("utf-8").splitlines()
    # Text fields and display names as encoded words: no SMTPUTF8 needed for them (a
    # raw UTF-8 From name made servers without it refuse the message, 553 5.6.7).
    [subject] = [f for f in fields if f.startswith("Subject:")]
    [sender] = [f for f in fields if f.startswith("From:")]
    assert subject.isascii() and sender.isascii()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Bestätigung"
    assert str(parsed["From"]) == "Jörg <shop@example.test>"
    assert raw.endswith(b"\r\n\r\n" + body.replace(b"\n", b"\r\n"))

    undeclared = cli("sendmail", "-t", "-i", stdin=head.encode("latin-1") + b"\n" + body)
    assert undeclared.code == 65, undeclared.err
    assert "not UTF-8" in undeclared.err


def test_a_keywords_field_in_8bit_is_written_as_encoded_phrases(cli: CLI) -> None:
    """Keywords is plain text too (RFC 5322 §3.6.5, a list of phrases): in ISO-8859-1
    from a script it was made raw UTF-8, so the message needed SMTPUTF8 and servers without it
    refused it for good, while Subject and Comments beside it were encoded. Each
    phrase is encoded on its own, so readers still split the list at its commas."""
    _origin(cli)
    head = "To: bob@example.test\nSubject: Grüße\nKeywords: Grüße, Köln, plain\n"
    declared = b"Content-Type: text/plain; charset=ISO-8859-1\n\n"
    cli.ok("sendmail", "-t", "-i", stdin=head.encode("latin-1") + declared + b"Hello\n")
    [queued] = cli.ok("queue", "--json").json()
    raw = cli.ok("show", "--raw", queued["id"]).out.encode()
    fields = raw.partition(b"\r\n\r\n")[0].decode("utf-8").splitlines()
    [keywords] = [f for f in fields if f.startswith("Keywords:")]
    assert keywords.isascii(), keywords
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    phrases = [p.strip() for p in str(parsed["Keywords"]).split(",")]
    assert phrases == ["Grüße", "Köln", "plain"]


@pytest.mark.parametrize(
    ("args", "code"),
    [(["-x", "bob@example.test"], 64), (["bob@@example.test"], 65), (["bob@example.test"], 75)],
)
def test_a_closed_standard_error_keeps_the_exit_code(cli: CLI, args: list[str], code: int) -> None:
    """Run with standard error closed (``2>&-``, a daemon that closed its descriptors),
    every failure ended with exit 1 (writing its line failed): a caller that reads
    sysexits codes, Postfix's pipe(8) say, took a "try again" (75) for a bounce."""
    _origin(cli)
    if code == 75:  # a store that cannot be reached now: try again
        with socket.socket() as unused:  # a loopback port nothing listens on
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        cli.env["MAILSTROM_STORE"] = f"postgresql://mailstrom@127.0.0.1:{port}/queue"
    script = 'm="$1"; shift; exec "$0" -m "$m" sendmail "$@" 2>&-'
    proc = subprocess.run(
        ["sh", "-c", script, sys.executable, cli.module, *args],
        cwd=cli.cwd,
        env=cli.env,
        input=b"Subject: x\n\ny\n",
        stdout=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert proc.returncode == code
    if code != 75:
        assert cli.queue_ids() == []


def test_a_long_line_in_a_part_header_or_an_attached_message_is_not_refused(cli: CLI) -> None:
    """A line over 998 octets in a MIME part's own header section (a PHP script's
    Content-Disposition naming a long filename list, on one line) or inside an attached
    message/rfc822 (a forwarded message's long To field or body line) was still refused
    (exit 65): the mail was lost, as it was for the top-level cases fixed before. The
    part's field is folded at its white space, the attached message's body encoded, its
    header folded; unfolded and decoded everything reads as it was."""
    _origin(cli)
    note = "a long description " * 60
    recipients = ", ".join(f"user{i}@example.test" for i in range(80))
    line = "log " * 400
    message = (
        "To: bob@example.test\nSubject: long\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="XX"\n\n'
        f"--XX\nContent-Type: text/plain; charset=UTF-8\nContent-Description: {note}\n\nhi\n"
        "--XX\nContent-Type: message/rfc822\n\n"
        f"From: a@example.test\nTo: {recipients}\nSubject: fwd\n\n{line}\n"
        "--XX--\n"
    ).encode()
    result = cli("sendmail", "-t", "-i", stdin=message)
    assert result.code == 0, result.err
    [queued] = cli.ok("queue", "--json").json()
    raw = cli.ok("show", "--raw", queued["id"]).out.encode()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    text, attached = parsed.get_payload()
    assert text["Content-Description"].replace("\r\n", "") == note
    assert text.get_payload() == "hi"
    [inner] = attached.get_payload()
    assert inner["To"].replace("\r\n", "") == recipients
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert inner["MIME-Version"] == "1.0"
    assert inner.get_payload(decode=True) == line.encode()  # the CRLF is the delimiter's


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root")
def test_a_user_without_a_name_is_told_to_give_a_sender() -> None:
    """A container run with a uid of no passwd entry (OpenShift's, ``docker run -u``) and
    no LOGNAME or USER: a message without From and without -f has no author to sign with,
    and getpass's KeyError was an "internal error" (70), a bug to report. It is a message
    that needs a From or -f (65), and the error says so; with -f it is signed by that."""
    from mailstrom.cli.exits import exit_code_for, reason_for
    from mailstrom.cli.sendmail import SendmailArgs, build

    uid = 54321
    assert all(entry.pw_uid != uid for entry in pwd.getpwall())
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        answer = "?"
        try:
            for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
                os.environ.pop(name, None)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            message = b"Subject: x\n\nbody\n"
            results = []
            for sender in (None, "app@example.test"):
                args = SendmailArgs(sender=sender, recipients=["bob@example.test"])
                try:
                    data, _ = build(message, args, default_domain="host.example.test")
                    results.append(f"ok {data.splitlines()[0].decode()}")
                except Exception as exc:
                    results.append(f"{exit_code_for(exc)} {reason_for(exc)}")
            answer = "\n".join(results)
        finally:
            os.write(write, answer.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        refused, signed = pipe.read().decode().split("\n")
    os.waitpid(child, 0)
    assert refused.startswith("65 "), refused
    assert "internal error" not in refused
    assert "-f" in refused and "From" in refused
    assert signed == "ok From: app@example.test"


@pytest.mark.parametrize(
    "argv",
    [
        ["bob@example.test", "-oi"],
        ["bob@example.test", "-f", "app@example.test"],
        ["-i", "bob", "-t"],
    ],
)
def test_an_option_after_a_recipient_is_refused_not_mailed_to(cli: CLI, argv: list[str]) -> None:
    """Options end at the first recipient, so ``sendmail bob@example.test -oi`` queued the
    message for ``-oi@origin`` too, and ``... -f app@example.test`` for ``-f@origin`` and
    for the would-be sender as a recipient (exit 0). Sendmail on glibc reads such options
    as options and Postfix bounces the ``-`` addresses (allow_min_user=no); no user name
    starts with ``-``: it is a misplaced option, 64, and nothing is queued."""
    _origin(cli)
    result = cli("sendmail", *argv, stdin=b"Subject: x\n\nbody\n")
    assert result.code == 64, result.err
    assert "option" in result.err and "before" in result.err
    assert cli.queue_ids() == []


@pytest.mark.parametrize(
    "argv",
    [["sendmail", "bob@example.test"], ["send", "--file", "-", "--to", "bob@example.test"]],
)
def test_a_warning_that_cannot_be_written_does_not_stop_the_queueing(
    cli: CLI, argv: list[str]
) -> None:
    """A configuration file others may change is warned of on stderr before the message is
    read. With stderr a pipe whose reader has gone (a daemon whose logger restarted), that
    write was a BrokenPipeError, taken for a reader of the output gone: exit 0, and
    nothing was queued. The warning is lost; the message is queued."""
    _origin(cli)
    config = cli.cwd / "config.toml"
    config.write_text("")
    config.chmod(0o666)
    cli.env["MAILSTROM_CONFIG"] = str(config)
    proc = cli.gone_reader(
        *argv, stream="stderr", stdin=b"From: app@example.test\nSubject: x\n\nbody\n"
    )
    assert proc.returncode == 0
    assert len(cli.queue_ids()) == 1


@pytest.mark.parametrize("args", [["-i", "bob@example.test"], ["bob@example.test"], ["-bs"]])
def test_a_standard_input_that_cannot_be_read_is_no_input_not_a_bug(
    cli: CLI, args: list[str]
) -> None:
    """Standard input open for writing only (a daemon's fd 0 reused for its log): the
    read's EBADF was an "internal error" (70), which says mailstrom has a bug, where
    the caller gave it no input it could read (66, as for a closed one)."""
    _origin(cli)
    with open(cli.cwd / "log", "wb") as write_only:
        proc = subprocess.run(
            [sys.executable, "-m", cli.module, "sendmail", *args],
            cwd=cli.cwd,
            env=cli.env,
            stdin=write_only,
            capture_output=True,
            timeout=60,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 66, err
    assert "cannot read" in err and "Bad file descriptor" in err, err
    assert "internal error" not in err
    assert cli.queue_ids() == []


# What PHP's mail($to, $subject, $message, $headers) writes to "sendmail -t -i": its own
# To and Subject, then the caller's headers, here those of the PHP manual's HTML example.
PHP_MAIL = (
    b"To: johny@example.test, sally@example.test\r\n"
    b"Subject: Birthday Reminders for August\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-type: text/html; charset=iso-8859-1\r\n"
    b"To: Mary <mary@example.test>, Kelly <kelly@example.test>\r\n"
    b"From: Birthday Reminder <birthday@example.test>\r\n"
    b"Cc: birthdayarchive@example.test\r\n"
    b"Bcc: birthdaycheck@example.test\r\n"
    b"\r\n"
    b"<html><body>Birthdays</body></html>\r\n"
)


@pytest.mark.parametrize(
    ("message", "to"),
    [
        (
            PHP_MAIL,
            "To: johny@example.test, sally@example.test,\n"
            " Mary <mary@example.test>, Kelly <kelly@example.test>",
        ),
        # mail('', ...) with the To in the headers: an empty To, then the caller's.
        (b"To: \nSubject: x\nTo: bob@example.test\nCc: a@example.test\n\nhi\n", None),
        # mail($to, ...) with the same To in the headers again.
        (b"To: bob@example.test\nSubject: x\nTo:  bob@example.test\n\nhi\n", None),
    ],
)
def test_a_repeated_to_field_is_merged_not_refused(
    cli: CLI, message: bytes, to: str | None
) -> None:
    """PHP's mail() writes a To field and then the caller's headers, which often hold one
    of their own (the PHP manual's HTML example does): Postfix sends both fields on, and
    mailstrom refused the message (exit 65, "2 To header fields"), so mail() returned
    false and the mail was lost. The repeated To (or Cc, Reply-To) is merged into one
    field naming every address, an empty or identical one dropped."""
    _origin(cli)
    cli.ok("sendmail", "-t", "-i", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    recipients = [r["address"] for r in queued["recipients"]]
    raw = cli.ok("show", "--raw", queued["id"]).out.replace("\r\n", "\n")
    head = raw.partition("\n\n")[0]
    parsed = email.message_from_string(raw, policy=email.policy.default)
    assert len(parsed.get_all("To") or []) == 1, head
    if message is PHP_MAIL:
        assert recipients == [
            *("johny@example.test", "sally@example.test", "mary@example.test"),
            *("kelly@example.test", "birthdayarchive@example.test"),
            "birthdaycheck@example.test",
        ]
        assert to in head
        assert "Bcc" not in head
    else:
        assert recipients[0] == "bob@example.test"
        assert "To: bob@example.test\n" in head
