"""``sendmail -bs``: SMTP on standard input and output, as Laravel (``sendmail -bs -i``)
and Symfony Mailer's SendmailTransport (``sendmail -bs``) speak it; each message is queued
as ``sendmail`` queues one, with the envelope of MAIL and RCPT."""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import os
import smtplib
import socket
import subprocess
import sys
import threading
import tracemalloc
from email.message import EmailMessage
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from tests.cli.conftest import CLI, MailEnv, Result
from tests.cli.test_dkim import dkim_config, publish
from tests.cli.test_sendmail_local import local_names
from tests.support.dkim import assert_all_pass, signature_tags

if TYPE_CHECKING:
    from mailstrom.cli.trace import SMTPArrival

MESSAGE = b"From: app@example.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nHello\r\n"


def replies(result: Result) -> list[str]:
    """The reply lines the session wrote (each ending CRLF)."""
    assert result.out.endswith("\r\n") or not result.out
    return result.out.split("\r\n")[:-1]


def codes(result: Result) -> list[str]:
    """The code of each reply's last line (a multiline EHLO reply counts once)."""
    return [line[:3] for line in replies(result) if line[3:4] != "-"]


def session(cli: CLI, script: bytes, *flags: str) -> Result:
    return cli("sendmail", "-bs", *flags, stdin=script)


def transaction(sender: bytes, recipients: list[bytes], data: bytes) -> bytes:
    lines = b"MAIL FROM:<%s>\r\n" % sender
    lines += b"".join(b"RCPT TO:<%s>\r\n" % r for r in recipients)
    return lines + b"DATA\r\n" + data + b".\r\n"


def test_a_symfony_dialogue_queues_the_message(cli: CLI) -> None:
    script = (
        b"EHLO [127.0.0.1]\r\n"
        + transaction(b"app@example.test", [b"bob@example.test", b"carol@example.test"], MESSAGE)
        + b"QUIT\r\n"
    )
    result = session(cli, script, "-i")
    assert result.code == 0, result.err
    lines = replies(result)
    assert lines[0] == "220 client.test ESMTP mailstrom"
    ehlo = [line for line in lines if line.startswith("250-") or line.startswith("250 ")][:6]
    assert ehlo[0].startswith("250-client.test")
    assert {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= {
        line[4:] for line in ehlo
    }
    assert any(line[4:].startswith("SIZE ") for line in ehlo)
    assert codes(result) == ["220", "250", "250", "250", "250", "354", "250", "221"]
    queued_line = lines[-2]
    assert queued_line.startswith("250 2.0.0 Ok: queued as ")
    [message] = cli.ok("queue", "--json").json()
    assert queued_line.endswith(message["id"])
    assert message["envelope_from"] == "app@example.test"
    assert [r["address"] for r in message["recipients"]] == [
        "bob@example.test",
        "carol@example.test",
    ]
    shown = cli.ok("show", "--raw", message["id"]).out
    assert "Subject: hi" in shown
    assert "Hello" in shown


def test_two_messages_in_one_session_bare_lf_and_dot_stuffing(cli: CLI) -> None:
    # Bare LF throughout, as a person types the session: a client whose DATA ends with
    # CRLF ends its data only at CRLF "." CRLF.
    one = transaction(b"a@example.test", [b"x@example.test"], b"Subject: one\n\n..leading dot\n")
    two = transaction(b"b@example.test", [b"y@example.test"], b"Subject: two\n\nsecond\n")
    script = (b"HELO client\n" + one + b"RSET\nNOOP\n" + two + b"QUIT\n").replace(b"\r\n", b"\n")
    result = session(cli, script, "-oi", "-f", "ignored@example.test")
    assert result.code == 0, result.err
    queued = ["250", "250", "354", "250"]  # MAIL, RCPT, DATA, the end of data
    assert codes(result) == ["220", "250", *queued, "250", "250", *queued, "221"]
    messages = cli.ok("queue", "--json").json()
    by_sender = {m["envelope_from"]: m for m in messages}
    assert set(by_sender) == {"a@example.test", "b@example.test"}
    raw = cli.ok("show", "--raw", by_sender["a@example.test"]["id"]).out
    assert "\n.leading dot" in raw.replace("\r\n", "\n")
    assert "..leading" not in raw


def test_bad_sequence_and_unknown_commands(cli: CLI) -> None:
    script = (
        b"MAIL FROM:<a@example.test>\r\n"  # before EHLO
        b"EHLO c\r\n"
        b"DATA\r\n"  # before MAIL
        b"MAIL FROM:<a@example.test>\r\n"
        b"DATA\r\n"  # before RCPT
        b"RCPT TO:bob\r\n"  # no angle brackets
        b"MAIL FROM:<b@example.test>\r\n"  # nested MAIL
        b"VRFY bob\r\n"
        b"TURN\r\n"
        b"QUIT\r\n"
    )
    result = session(cli, script)
    assert result.code == 0, result.err
    assert codes(result) == [
        "220",
        "503",
        "250",
        "503",
        "250",
        "503",
        "501",
        "503",
        "252",
        "502",
        "221",
    ]
    lines = replies(result)
    assert lines[-2].startswith("502 5.5.1")
    assert cli.queue_ids() == []


def test_an_overlong_command_line_is_refused_and_the_session_goes_on(cli: CLI) -> None:
    script = b"EHLO c\r\nNOOP " + b"x" * 600 + b"\r\nNOOP\r\nQUIT\r\n"
    result = session(cli, script)
    assert codes(result)[-3:] == ["500", "250", "221"]
    assert replies(result)[-3].startswith("500 5.5.2")


def test_eof_inside_data_queues_nothing(cli: CLI) -> None:
    script = b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    result = session(cli, script + b"Subject: cut\r\n\r\nhalf a mess")
    assert codes(result) == ["220", "250", "250", "250", "354"]
    assert cli.queue_ids() == []
    # Was: exit 0, the client that lost its message told it succeeded.
    assert result.code == 76, result.err
    assert "DATA" in result.err


def run_script(script: bytes) -> tuple[int, list[bytes]]:
    """(exit code, messages queued) of a session fed ``script`` then the end of input."""
    from mailstrom.cli.sendmail_smtp import LineSource, Session

    queued: list[bytes] = []

    def queue(data: bytes, sender: str, recipients: list[str], arrival: SMTPArrival) -> str:
        queued.append(data)
        return f"id{len(queued)}"

    read, write = os.pipe()

    def feed() -> None:
        # From a thread: a script larger than the pipe's buffer is read while written.
        with contextlib.suppress(BrokenPipeError), open(write, "wb") as pipe:
            pipe.write(script)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        source = LineSource(read, timeout=60.0)
        out = BytesIO()
        session = Session(source=source, out=out, helo_name="h.test", max_size=10_000, queue=queue)
        return session.run(), queued
    finally:
        os.close(read)  # a writer still writing gets EPIPE and ends
        writer.join()


def test_the_end_of_input_with_a_message_unfinished_exits_non_zero() -> None:
    """Input that ends without QUIT while a message is under way (in DATA, after MAIL or
    RCPT, or inside a command line) lost that message: 76 (EX_PROTOCOL), never 0. Input
    that ends between transactions lost nothing: the messages queued keep exit 0."""
    one = transaction(b"a@example.test", [b"b@example.test"], MESSAGE)
    lost = [
        b"EHLO c\r\n" + one[: one.index(b"DATA")] + b"DATA\r\nSubject: cut\r\n",
        b"EHLO c\r\n" + one[: one.index(b"DATA")],
        b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n",
        b"EHLO c\r\n" + one + b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@exa",
        b"EHLO c\r\n" + one + b"NOOP " + b"x" * 600,  # inside an overlong line
    ]
    for script in lost:
        assert run_script(script)[0] == 76, script
    assert run_script(b"EHLO c\r\n" + one) == (0, [MESSAGE])
    assert run_script(b"EHLO c\r\n" + one + b"QUIT\r\n") == (0, [MESSAGE])


def test_a_final_quit_without_its_line_end_ends_as_quit() -> None:
    """Input whose last line is QUIT (any case) without its CRLF, every message queued,
    ends as QUIT does: exit 0. It exited 76 and said "not queued" of messages that were,
    and a caller retrying on 76 queued them twice. Any other cut line still exits 76."""
    one = transaction(b"a@example.test", [b"b@example.test"], MESSAGE)
    for quit in (b"QUIT", b"quit", b"Quit\r"):
        assert run_script(b"EHLO c\r\n" + one + quit) == (0, [MESSAGE]), quit
    for cut in (b"QUI", b"QUIT x", b"NOOP", b"MAIL FROM:<a@example.test>\r\nQUIT"):
        assert run_script(b"EHLO c\r\n" + one + cut)[0] == 76, cut


def test_a_refused_message_gets_a_5xx_and_the_exit_code_says_so(cli: CLI) -> None:
    script = b"EHLO c\r\n" + transaction(
        b"a@example.test", [b"b@example.test"], b"Subject: bad\r\n\x00\r\n\r\nx\r\n"
    )
    result = session(cli, script + b"QUIT\r\n")
    assert codes(result)[-2:][0] == "554"
    assert replies(result)[-2].startswith("554 5.6.0 ")
    assert result.code == 65
    assert cli.queue_ids() == []


def test_size_and_recipient_bounds(cli: CLI) -> None:
    cli.env["MAILSTROM_MAX_MESSAGE_SIZE"] = "2000"
    big = b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n"
    script = (
        b"EHLO c\r\nMAIL FROM:<a@example.test> SIZE=5000\r\n"
        + transaction(b"a@example.test", [b"b@example.test"], big * 40)
        + b"QUIT\r\n"
    )
    result = session(cli, script)
    assert codes(result) == ["220", "250", "552", "250", "250", "354", "552", "221"]
    assert result.code == 65  # as sendmail exits for a message over the limit
    assert cli.queue_ids() == []

    rcpts = b"".join(b"RCPT TO:<r%d@example.test>\r\n" % n for n in range(1001))
    script = b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n" + rcpts + b"QUIT\r\n"
    result = session(cli, script)
    assert codes(result)[-3:] == ["250", "452", "221"]
    assert replies(result)[-2].startswith("452 4.5.3 ")


def test_recipients_past_max_recipients_get_452_and_go_in_the_next_transaction(
    cli: CLI,
) -> None:
    """With ``max_recipients`` below the session's own bound, each RCPT past it got 250,
    and the message was then refused whole at the end of DATA (554, a permanent failure
    for every recipient, those within the limit too). Past the setting, RCPT is 452
    (RFC 5321 §4.5.3.1.10): the client sends the rest in another transaction."""
    cli.env["MAILSTROM_MAX_RECIPIENTS"] = "2"
    first = [b"r1@example.test", b"r2@example.test", b"r3@example.test"]
    script = (
        b"EHLO c\r\n"
        + transaction(b"a@example.test", first, MESSAGE)
        + transaction(b"a@example.test", first[2:], MESSAGE)
        + b"QUIT\r\n"
    )
    result = session(cli, script)
    assert codes(result) == [
        *["220", "250", "250", "250", "250", "452", "354", "250"],
        *["250", "250", "354", "250", "221"],
    ], result.out
    assert result.code == 0, result.err
    queued = cli.ok("queue", "--json").json()
    assert sorted(r["address"] for m in queued for r in m["recipients"]) == [
        "r1@example.test",
        "r2@example.test",
        "r3@example.test",
    ]


def test_a_size_in_digits_other_than_ascii_is_refused_not_a_crash(cli: CLI) -> None:
    """RFC 1870's size-value is ASCII digits. "²" passed str.isdigit(), and int() raised
    ValueError out of the session: no reply, exit 70 (an internal error); Arabic-Indic
    digits were read as a number. Both are refused as SIZE=abc is; the session goes on."""
    script = "EHLO c\r\nMAIL FROM:<a@example.test> SIZE=²\r\n"
    script += "MAIL FROM:<a@example.test> SIZE=\u0661\u0660\u0660\r\n"
    script += "MAIL FROM:<a@example.test> SIZE=100\r\nQUIT\r\n"
    result = session(cli, script.encode())
    assert result.code == 0, result.err
    assert codes(result) == ["220", "250", "555", "555", "250", "221"]


def test_too_many_errors_end_the_session(cli: CLI) -> None:
    result = session(cli, b"EHLO c\r\n" + b"BOGUS\r\n" * 30)
    assert codes(result)[-1] == "421"
    assert len(codes(result)) < 30


def test_a_session_ended_by_the_server_exits_non_zero(cli: CLI) -> None:
    """A wrapper reading only the exit code learns that the session was cut off: 76
    (EX_PROTOCOL) for too many errors, too many commands that do nothing, or an endless
    line, though no message was refused."""
    scripts = [
        b"EHLO c\r\n" + b"BOGUS\r\n" * 30,
        b"EHLO c\r\n" + b"NOOP\r\n" * 200,
        b"EHLO c\r\nNOOP " + b"x" * 200_000 + b"\r\n",
    ]
    for script in scripts:
        result = session(cli, script)
        assert codes(result)[-1] == "421"
        assert result.code == 76, result.err


def test_a_queued_message_forgives_the_errors_and_junk_before_it(cli: CLI) -> None:
    """Symfony's transport keeps one ``sendmail -bs`` for up to 100 messages, pinging it
    with NOOP when idle and sending RSET after a refusal. The error and junk-command
    counts ran over the whole session, so its 20th refused recipient (or 100th NOOP or
    RSET) across all its messages ended it with 421 and failed the next good message.
    Postfix's smtpd forgives both once a message is received, and so does this."""
    good = transaction(b"app@example.test", [b"bob@example.test"], MESSAGE)
    refused = b"MAIL FROM:<app@example.test>\r\nRCPT TO:<a b>\r\nRSET\r\n"
    for between in (refused * 15, b"NOOP\r\n" * 60):
        script = b"EHLO c\r\n" + between + good + between + good + b"QUIT\r\n"
        result = session(cli, script)
        assert "421" not in codes(result), result.out[-300:]
        assert codes(result).count("354") == 2
        assert result.code == 0, result.err
    assert len(cli.queue_ids()) == 4


def test_smtplib_sends_through_a_socket_pair(cli: CLI) -> None:
    """The stdlib's SMTP client, waiting for each reply as Symfony's does, talks to the
    session over a socket pair that is the subprocess's standard input and output."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailstrom", "sendmail", "-bs", "-i"],
        cwd=cli.cwd,
        env=cli.env,
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    try:
        client = smtplib.SMTP(timeout=60)
        client.sock = ours
        assert client.getreply() == (220, b"client.test ESMTP mailstrom")
        message = EmailMessage()
        message["From"] = "app@example.test"
        message["To"] = "bob@example.test"
        message["Subject"] = "via smtplib"
        message.set_content("line one\n.\n..two\n")
        client.ehlo("app.example.test")
        assert client.has_extn("pipelining") and client.has_extn("smtputf8")
        assert client.send_message(message) == {}
        client.quit()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        ours.close()
    assert proc.returncode == 0, err
    [queued] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in queued["recipients"]] == ["bob@example.test"]
    body = cli.ok("show", "--raw", queued["id"]).out.replace("\r\n", "\n")
    assert "line one\n.\n..two\n" in body


def test_a_client_that_resets_the_socket_is_a_client_gone(cli: CLI) -> None:
    """A client on a socket that closes it with replies unread resets it: the next read
    was a ConnectionResetError, reported as an internal error (70, "a bug in
    mailstrom"). It is the end of input, as on a pipe: nothing lost between
    transactions (0), a message under way lost (76)."""
    for script, expected, code in [
        (b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n", b"250 2.1.0", 76),
        (b"EHLO c\r\n", b"250 ENHANCED", 0),
    ]:
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailstrom", "sendmail", "-bs"],
            cwd=cli.cwd,
            env=cli.env,
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            ours.settimeout(60)
            ours.sendall(script)
            # Every reply there, none read: closing now resets the connection.
            while expected not in ours.recv(65536, socket.MSG_PEEK):
                pass
            ours.close()
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            ours.close()
        assert proc.returncode == code, err
        assert b"internal error" not in err


def test_an_output_that_cannot_be_written_is_exit_73_not_a_bug(cli: CLI) -> None:
    """Standard output open for reading only (or a full disk under ``> file``): the
    write of the greeting raised EBADF, reported as an internal error (70, "a bug in
    mailstrom"); it is 73, as any command's standard output that cannot be written."""
    with open(os.devnull, "rb") as read_only:
        proc = subprocess.run(
            [sys.executable, "-m", "mailstrom", "sendmail", "-bs"],
            cwd=cli.cwd,
            env=cli.env,
            input=b"EHLO c\r\n" + transaction(b"a@example.test", [b"b@example.test"], MESSAGE),
            stdout=read_only,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 73, err
    assert "cannot write standard output" in err and "internal error" not in err
    assert cli.queue_ids() == []


def test_a_silent_client_times_out_with_421() -> None:
    from mailstrom.cli.sendmail_smtp import LineSource, Session

    read, write = os.pipe()
    try:
        out = BytesIO()
        session = Session(
            source=LineSource(read, timeout=0.0),
            out=out,
            helo_name="h.test",
            max_size=1000,
            queue=lambda data, sender, recipients, arrival: "never",
        )
        assert session.run() == 75  # EX_TEMPFAIL: the client may try again
    finally:
        os.close(read)
        os.close(write)
    assert out.getvalue() == (
        b"220 h.test ESMTP mailstrom\r\n421 4.4.2 h.test Error: timeout exceeded\r\n"
    )


def stalled_session(script: bytes) -> tuple[int, bytes]:
    """(exit code, replies written) of a session fed ``script`` whose replies go to a
    pipe of two pages that no one reads, with writes bounded at 0.2 s."""
    from mailstrom.cli.sendmail_smtp import LineSource, ReplySink, Session

    read, write = os.pipe()
    out_read, out_write = os.pipe()
    fcntl.fcntl(out_write, fcntl.F_SETPIPE_SZ, 8192)
    try:
        os.write(write, script)  # smaller than the input pipe's buffer
        os.close(write)
        session = Session(
            source=LineSource(read, timeout=60.0),
            out=ReplySink(out_write, timeout=0.2),
            helo_name="h.test",
            max_size=10_000,
            queue=lambda data, sender, recipients, arrival: "never",
        )
        code = session.run()
        os.set_blocking(out_read, False)
        return code, os.read(out_read, 65536)
    finally:
        for fd in (read, out_read, out_write):
            os.close(fd)


def test_a_client_that_reads_no_reply_ends_the_session() -> None:
    """A client that stops reading (its pipe full of replies) held the session for ever:
    writes were unbounded. Each now has the read's bound; the session ends as for a client
    gone: 76 with a message under way, else the code so far."""
    rcpts = b"".join(b"RCPT TO:<r%d@example.test>\r\n" % n for n in range(900))
    code, written = stalled_session(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n" + rcpts)
    assert code == 76
    assert 4096 <= len(written) < 900 * 14  # stalled among the RCPT replies
    code, written = stalled_session(b"EHLO c\r\n" + b"VRFY x\r\n" * 99)
    assert code == 0
    assert written.endswith(b"\r\n")


def test_a_store_path_through_a_file_is_451_and_exit_78(cli: CLI) -> None:
    """The client is told to try again later (451: the mail stays with it until an
    operator mends the path), and the exit code says what is wrong: the store's path runs
    through a file, which waiting never mends (EX_CONFIG, as every command says it)."""
    (cli.cwd / "afile").write_text("")
    cli.env["MAILSTROM_STORE"] = "sqlite:///afile/queue.db"
    script = b"EHLO c\r\n" + transaction(b"a@example.test", [b"b@example.test"], MESSAGE)
    result = session(cli, script + b"QUIT\r\n")
    assert codes(result)[-2:] == ["451", "221"]
    assert replies(result)[-2].startswith("451 4.3.0 ")
    assert result.code == 78
    assert "afile" in result.err


def test_a_bare_name_without_a_usable_origin_is_451_saying_what_to_set(cli: CLI) -> None:
    """With no sendmail.origin and helo_name a special-use name (``host.local``, a host's
    default), MAIL FROM:<root> and RCPT TO:<root> were refused as bad syntax (501, 553)
    with the validator's reason: the client's fault, naming no setting. It is the
    configuration's (451, as for any), and the log says what to set."""
    cli.env["MAILSTROM_HELO_NAME"] = "host.local"
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""
    script = b"EHLO c\r\nMAIL FROM:<root>\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<root>\r\n"
    script += b"RCPT TO:<b@example.test>\r\nDATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"
    result = session(cli, script)
    assert codes(result) == ["220", "250", "451", "250", "451", "250", "354", "250", "221"]
    assert result.err.count("set sendmail.origin (MAILSTROM_SENDMAIL_ORIGIN)") == 2
    assert len(cli.queue_ids()) == 1
    # A local failure, as a 451 at the end of DATA is: the exit code names the
    # configuration (78) for a caller that reads only that, where it exited 0.
    assert result.code == 78, result.err


def test_a_local_failure_at_rcpt_sets_the_exit_code_a_refused_address_does_not(
    cli: CLI,
) -> None:
    """An aliases file that cannot be used (too large) is a 451 at RCPT and exit 78;
    a recipient the client wrote badly is its own 501, and the exit code stays 0."""
    (cli.cwd / "aliases").write_bytes(b"# x\n" * 400_000)
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = str(cli.cwd / "aliases")
    script = b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<ops>\r\nRSET\r\nQUIT\r\n"
    result = session(cli, script)
    assert codes(result) == ["220", "250", "250", "451", "250", "221"]
    assert result.code == 78, result.err
    assert "sendmail.aliases" in result.err
    script = b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<bad address@>\r\nQUIT\r\n"
    del cli.env["MAILSTROM_SENDMAIL_ALIASES"]
    result = session(cli, script)
    assert codes(result) == ["220", "250", "250", "501", "221"]
    assert result.code == 0, result.err


def test_the_last_b_mode_wins(cli: CLI) -> None:
    """As Postfix's sendmail reads them: ``-bs -bm`` queues the message on standard
    input, ``-bm -bs`` speaks SMTP, ``-bs -bp`` lists the queue."""
    queued = cli("sendmail", "-bs", "-bm", "bob@example.test", stdin=MESSAGE)
    assert queued.code == 0, queued.err
    assert queued.out == ""
    [first] = cli.queue_ids()
    queued = cli("sendmail", "-bp", "-bm", "bob@example.test", stdin=MESSAGE)
    assert queued.code == 0, queued.err
    assert queued.out == ""
    assert len(cli.queue_ids()) == 2
    result = session(cli, b"QUIT\r\n", "-bm", "-bs")
    assert codes(result) == ["220", "221"]
    listing = cli("sendmail", "-bs", "-bp")
    assert listing.code == 0, listing.err
    assert first in listing.out


def test_an_endless_command_line_ends_the_session(cli: CLI) -> None:
    """Octets of an overlong line are thrown away only up to a bound, not for as long as
    the client streams them: then 421, and nothing after it is read."""
    script = b"EHLO c\r\nNOOP " + b"x" * 200_000 + b"\r\nNOOP\r\nQUIT\r\n"
    result = session(cli, script)
    assert codes(result) == ["220", "250", "421"]
    assert replies(result)[-1].startswith("421 4.7.0 client.test ")


def test_a_quoted_pair_in_a_path_is_part_of_its_quoted_string(cli: CLI) -> None:
    """RFC 5321 §4.1.2: a quoted string may hold a quoted pair (``\\"``, ``\\\\``). The
    path's end was looked for by toggling at every DQUOTE, so ``"a\\"b"@...`` seemed to
    end inside its quotes: 501 5.5.4 "Syntax", for an address sendmail's arguments and
    ``send --to`` take."""
    quoted = [b'"a\\"b"@example.test', b'"a\\\\"@example.test']
    script = b"EHLO c\r\n" + transaction(b'"s\\"x"@example.test', quoted, MESSAGE)
    result = session(cli, script + b"QUIT\r\n")
    assert result.code == 0, result.out
    assert codes(result) == ["220", "250", "250", "250", "250", "354", "250", "221"]
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == '"s\\"x"@example.test'
    addresses = [r["address"] for r in queued["recipients"]]
    assert addresses == ['"a\\"b"@example.test', '"a\\\\"@example.test']


def test_a_bad_recipient_or_sender_is_refused_at_its_command(cli: CLI) -> None:
    """Each address is validated when it is given, as the queueing path validates it: a
    bad RCPT gets its own 501 5.1.3 and the others still get the message; a bad MAIL
    sender 501 5.1.7."""
    script = (
        b"EHLO c\r\n"
        b"MAIL FROM:<bad sender@>\r\n"
        b"MAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\n"
        b"RCPT TO:<bad address@>\r\n"
        b"RCPT TO:<carol@example.test>\r\n"
        b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"
    )
    result = session(cli, script)
    assert result.code == 0, result.err
    assert codes(result) == ["220", "250", "501", "250", "250", "501", "250", "354", "250", "221"]
    lines = [line for line in replies(result) if line[3:4] != "-"]
    assert lines[2].startswith("501 5.1.7 ")
    assert lines[5].startswith("501 5.1.3 ")
    [message] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in message["recipients"]] == [
        "bob@example.test",
        "carol@example.test",
    ]


def test_an_alias_going_nowhere_usable_is_550_or_553_not_a_syntax_error(cli: CLI) -> None:
    """``RCPT TO:<ops>`` is well written; that the aliases file maps ops to a bad address
    (which plain ``sendmail ops`` refuses as a bad address, 65) or to programs only is no
    syntax error of the client's (501): 553 5.1.3 and 550 5.1.1, RFC 5321's mailbox
    refusals. A program named in RCPT itself is no address: 501, not 250 and then a
    refused DATA."""
    local_names(cli, "ops: bad address@\nprog: |/usr/bin/notify, /var/log/mail\n")
    plain = cli("sendmail", "ops", stdin=MESSAGE)
    assert plain.code == 65, plain.err
    script = (
        b"EHLO c\r\n"
        b"MAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<ops>\r\n"
        b"RCPT TO:<prog>\r\n"
        b"RCPT TO:<|/usr/bin/notify>\r\n"
        b"RCPT TO:<bob@example.test>\r\n"
        b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"
    )
    result = session(cli, script)
    assert result.code == 0, result.err
    lines = [line for line in replies(result) if line[3:4] != "-"]
    assert [line[:3] for line in lines] == [
        "220", "250", "250", "553", "550", "501", "250", "354", "250", "221"
    ]  # fmt: skip
    assert lines[3].startswith("553 5.1.3 ") and "ops" in lines[3]
    assert "bad address@" in lines[3]
    assert lines[4].startswith("550 5.1.1 ") and "prog" in lines[4]
    assert lines[5].startswith("501 5.1.3 ")
    [message] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in message["recipients"]] == ["bob@example.test"]


def test_a_dot_inside_a_long_line_of_a_too_large_message_does_not_end_data() -> None:
    """A message over the limit is read on to its end in pieces; a piece that happened to
    start a long line's tail with ``.`` CRLF was taken for the end of DATA, and the rest of
    the message was read as commands: a MAIL, RCPT and DATA inside the body were obeyed
    and their message queued (SMTP smuggling through the session)."""
    header = b"Subject: big\r\n\r\n"
    # The first read of the line stops one octet past the limit (10,000 octets); the rest
    # is read 64 KiB at a time, so that this line's final ".\r\n" arrives as a piece.
    cut = 10_000 - len(header) + 1
    line = b"y" * (cut + 65536) + b".\r\n"
    injected = transaction(b"evil@example.test", [b"victim@example.test"], b"Subject: x\r\n\r\n")
    script = (
        b"EHLO c\r\n"
        + transaction(b"a@example.test", [b"b@example.test"], header + line + injected)
        + b"QUIT\r\n"
    )
    code, queued = run_script(script)
    assert queued == []
    assert code == 65


def test_a_message_of_many_short_lines_takes_about_its_size_in_memory(tmp_path: Path) -> None:
    """DATA was kept as a list of its lines, each an object of its own: some 40 octets
    for one of "a\r\n", so that 35 MB of them (within the size limit) took 1.5 GB."""
    from mailstrom.cli.sendmail_smtp import LineSource, Session

    message = MESSAGE + b"a\r\n" * 300_000
    script = tmp_path / "script"
    script.write_bytes(
        b"EHLO c\r\n" + transaction(b"a@example.test", [b"b@example.test"], message) + b"QUIT\r\n"
    )
    queued: list[bytes] = []

    def queue(data: bytes, sender: str, recipients: list[str], arrival: SMTPArrival) -> str:
        queued.append(data)
        return "id1"

    with script.open("rb") as stream:
        session = Session(
            source=LineSource(stream.fileno(), timeout=60.0),
            out=BytesIO(),
            helo_name="h.test",
            max_size=2 * len(message),
            queue=queue,
        )
        tracemalloc.start()
        try:
            code = session.run()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (code, queued) == (0, [message])
    assert peak < 3 * len(message)


def test_an_address_that_is_no_utf8_is_refused_not_mangled(cli: CLI) -> None:
    """An ISO-8859-1 ``ü`` in MAIL or RCPT was decoded with U+FFFD in its place and
    taken: the message was queued from and to ``b\ufffdb@example.test``, an address no one
    gave, which fails at delivery or reaches a mailbox of that name. RFC 6531 addresses
    are UTF-8; these get 501, as the plain ``sendmail`` path refuses them (65)."""
    script = (
        b"EHLO c\r\n"
        b"MAIL FROM:<j\xfcrgen@example.test>\r\n"
        b"MAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<b\xfcb@example.test>\r\n"
        b"RCPT TO:<carol@example.test>\r\n"
        b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"
    )
    result = session(cli, script)
    assert codes(result) == ["220", "250", "501", "250", "501", "250", "354", "250", "221"]
    lines = [line for line in replies(result) if line[3:4] != "-"]
    assert lines[2].startswith("501 5.1.7 ")
    assert lines[4].startswith("501 5.1.3 ")
    [message] = cli.ok("queue", "--json").json()
    assert message["envelope_from"] == "a@example.test"
    assert [r["address"] for r in message["recipients"]] == ["carol@example.test"]


def test_one_rcpt_names_one_recipient(cli: CLI) -> None:
    """RCPT takes one forward-path (RFC 5321 §4.1.1.3). A comma-separated list in it was
    read as the command-line arguments are and queued as several recipients for one
    "250 2.1.5 Ok": the 1,000-RCPT bound (452, after which a client sends the rest in
    another transaction) counted commands, not recipients. It is a syntax error now."""
    script = (
        b"EHLO c\r\n"
        b"MAIL FROM:<a@example.test>\r\n"
        b"RCPT TO:<b@example.test,c@example.test>\r\n"
        b"RCPT TO:<d@example.test>\r\n"
        b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n"
    )
    result = session(cli, script)
    assert codes(result) == ["220", "250", "250", "501", "250", "354", "250", "221"]
    lines = [line for line in replies(result) if line[3:4] != "-"]
    assert lines[3].startswith("501 5.1.3 ")
    [message] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in message["recipients"]] == ["d@example.test"]


def test_an_empty_message_is_queued_as_postfix_queues_it(cli: CLI) -> None:
    """DATA ended at once (or after blank lines only) was refused with 554 and the
    wording of the stdin path ("no message on standard input"), no SMTP reply a client
    can make sense of. Postfix's ``sendmail -bs`` (smtpd, then cleanup adding the From
    header) queues such a message: so does this session, the From of MAIL added."""
    script = (
        b"EHLO c\r\n"
        + transaction(b"a@example.test", [b"b@example.test"], b"")
        + transaction(b"a@example.test", [b"c@example.test"], b"\r\n")
        + b"QUIT\r\n"
    )
    result = session(cli, script)
    assert result.code == 0, result.err
    assert codes(result) == ["220", "250", *["250", "250", "354", "250"] * 2, "221"]
    assert "standard input" not in result.out
    messages = cli.ok("queue", "--json").json()
    assert len(messages) == 2
    for message in messages:
        raw = cli.ok("show", "--raw", message["id"]).out
        assert "From: a@example.test" in raw


def test_t_outside_delivery_mode_and_recipients_of_bp_are_usage_errors(cli: CLI) -> None:
    """``-t`` with ``-bs`` or ``-bp``, and recipient arguments with ``-bp``, were ignored
    in silence: the caller believed its recipients were used. Postfix's sendmail refuses
    them ("-t can be used only in delivery mode", "display queue mode requires no
    recipient"), exit 64; so does this one, before any session or listing."""
    for argv in (["-bs", "-t"], ["-tbs"], ["-t", "-bp"], ["-bp", "bob@example.test"]):
        result = cli("sendmail", *argv, stdin=b"EHLO c\r\nQUIT\r\n")
        assert result.code == 64, (argv, result.out, result.err)
        assert result.out == ""
        assert result.err.startswith("mailstrom: "), result.err
    laravel = session(cli, b"QUIT\r\n", "-i")
    assert codes(laravel) == ["220", "221"]


def test_a_unicode_address_needs_smtputf8_on_mail(cli: CLI) -> None:
    """A non-ASCII address in MAIL or RCPT of a transaction whose MAIL did not say
    SMTPUTF8 was taken; RFC 6531 §3.4 has the server refuse it, and Postfix's smtpd says
    ``553 5.6.7 Must declare SMTPUTF8 to send unicode address``. With SMTPUTF8 on MAIL
    the same addresses are queued."""
    script = (
        (
            "EHLO c\r\n"
            "MAIL FROM:<jürgen@example.test>\r\n"
            "MAIL FROM:<a@example.test>\r\n"
            "RCPT TO:<bøb@example.test>\r\n"
            "RCPT TO:<carol@example.test>\r\n"
            "DATA\r\n"
        ).encode()
        + MESSAGE
        + b".\r\n"
    )
    script += (
        (
            "MAIL FROM:<jürgen@example.test> SMTPUTF8\r\nRCPT TO:<bøb@example.test>\r\nDATA\r\n"
        ).encode()
        + MESSAGE
        + b".\r\nQUIT\r\n"
    )
    result = session(cli, script)
    assert codes(result) == [
        "220", "250", "553", "250", "553", "250", "354", "250", "250", "250", "354", "250", "221"
    ]  # fmt: skip
    lines = [line for line in replies(result) if line[3:4] != "-"]
    assert lines[2].startswith("553 5.6.7 ") and "SMTPUTF8" in lines[2]
    assert lines[4].startswith("553 5.6.7 ")
    messages = cli.ok("queue", "--json").json()
    by_sender = {m["envelope_from"]: m for m in messages}
    assert [r["address"] for r in by_sender["a@example.test"]["recipients"]] == [
        "carol@example.test"
    ]
    assert [r["address"] for r in by_sender["jürgen@example.test"]["recipients"]] == [
        "bøb@example.test"
    ]


def test_a_dot_line_after_a_bare_lf_does_not_end_data_of_a_crlf_client() -> None:
    """A client speaking CRLF (every SMTP library: Symfony's stuffs a dot only after
    CRLF) sent a body holding ``\\n.\\n``, text a web form can put there: that bare-LF dot
    line ended DATA, and what followed it was read as commands, so a MAIL, RCPT and DATA
    inside the body were obeyed and their message queued (SMTP smuggling, as
    CVE-2023-51764). Such a client's data ends at CRLF "." CRLF only; the text is kept."""
    injected = b"MAIL FROM:<evil@example.test>\nRCPT TO:<victim@example.test>\nDATA\n"
    injected += b"Subject: forged\n\nx\r\n"
    for dot in (b"\n.\n", b"\n.\r\n", b"\r\n.\n"):
        body = b"Subject: hi\r\n\r\ntext" + dot + injected
        stuffed = body.replace(b"\r\n.", b"\r\n..")  # as Symfony's client stuffs it
        script = b"EHLO c\r\n" + transaction(b"a@example.test", [b"b@example.test"], stuffed)
        code, queued = run_script(script + b"QUIT\r\n")
        assert queued == [body], dot
        assert code == 0, dot


def test_a_client_speaking_bare_lf_still_ends_data_with_a_dot_line() -> None:
    """A person typing the session in a terminal sends bare LF throughout (its DATA
    command included): its "." line ends the data, and its dots are unstuffed."""
    script = b"EHLO c\nMAIL FROM:<a@example.test>\nRCPT TO:<b@example.test>\nDATA\n"
    script += b"Subject: typed\n\n..x\n.\nQUIT\n"
    assert run_script(script) == (0, [b"Subject: typed\n\n.x\n"])


def test_recipients_past_the_limit_are_refused_without_ending_the_session(cli: CLI) -> None:
    """RFC 5321 §4.5.3.1.10: a client given 452 for too many recipients sends the rest in
    another transaction. Each such 452 counted as an error, so the 20th ended the session
    with 421, and the 1,000 recipients accepted lost their message (the stdlib's client
    raised with nothing sent). Up to MAX_OVERSHOOT more are refused with 452, as Postfix's
    smtpd_recipient_overshoot_limit allows, without counting as errors."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailstrom", "sendmail", "-bs"],
        cwd=cli.cwd,
        env=cli.env,
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    recipients = [f"r{n}@example.test" for n in range(1100)]
    try:
        client = smtplib.SMTP(timeout=60)
        client.sock = ours
        assert client.getreply()[0] == 220
        client.ehlo("app.example.test")
        refused = client.sendmail("app@example.test", recipients, MESSAGE)
        assert sorted(refused) == sorted(recipients[1000:])
        assert {reply[0] for reply in refused.values()} == {452}
        client.quit()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        ours.close()
    assert proc.returncode == 0, err
    [queued] = cli.ok("queue", "--json").json()
    assert len(queued["recipients"]) == 1000


def test_recipients_past_the_overshoot_count_as_errors() -> None:
    """The 452s past the limit are bounded: beyond MAX_OVERSHOOT of them they count as
    errors, and the session ends with 421 as for any client that gets nowhere."""
    from mailstrom.cli.sendmail_smtp import (
        MAX_ERRORS,
        MAX_OVERSHOOT,
        MAX_RECIPIENTS,
        LineSource,
        Session,
    )

    count = MAX_RECIPIENTS + MAX_OVERSHOOT + 2 * MAX_ERRORS
    rcpts = b"".join(b"RCPT TO:<r%d@example.test>\r\n" % n for n in range(count))
    script = b"EHLO c\r\nMAIL FROM:<a@example.test>\r\n" + rcpts

    read, write = os.pipe()
    writer = threading.Thread(target=lambda: _feed(write, script))
    writer.start()
    try:
        out = BytesIO()
        session = Session(
            source=LineSource(read, timeout=60.0),
            out=out,
            helo_name="h.test",
            max_size=10_000,
            queue=lambda data, sender, recipients, arrival: "id",
        )
        assert session.run() == 76
    finally:
        os.close(read)
        writer.join()
    lines = out.getvalue().split(b"\r\n")[:-1]
    assert lines[-1].startswith(b"421 ")
    assert sum(line.startswith(b"452 ") for line in lines) == MAX_OVERSHOOT + MAX_ERRORS


def _feed(fd: int, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError), open(fd, "wb") as pipe:
        pipe.write(data)


def received_fields(raw: str) -> tuple[list[str], EmailMessage]:
    """The Received fields of the stored message ``raw`` as the stdlib reads them, which
    must find no defect in any, and the message."""
    from email import policy
    from email.parser import BytesParser

    data = raw.encode("utf-8")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    fields = message.get_all("Received") or []
    for value in fields:
        assert not value.defects, (value, value.defects)
    return [" ".join(str(value).split()) for value in fields], message


def test_each_message_gets_one_received_field_on_top(cli: CLI) -> None:
    """RFC 5321 §4.4: a server receiving a message MUST insert a Received field at the
    beginning of its content; -bs inserted none, so nobody could tell where or when the
    mail came in."""
    one = transaction(b"a@example.test", [b"bob@example.test"], MESSAGE)
    two = transaction(b"b@example.test", [b"bob@example.test", b"carol@example.test"], MESSAGE)
    three = (
        b"MAIL FROM:<c@example.test> SMTPUTF8\r\n"
        + transaction(b"", [b"bob@example.test"], MESSAGE).partition(b"\r\n")[2]
    )
    script = b"EHLO app.example.test\r\n" + one + two + three + b"HELO [192.0.2.1]\r\n"
    script += transaction(b"d@example.test", [b"bob@example.test"], MESSAGE) + b"QUIT\r\n"
    result = session(cli, script)
    assert result.code == 0, result.err
    by_sender = {m["envelope_from"]: m["id"] for m in cli.ok("queue", "--json").json()}
    expected = {
        "a@example.test": "from app.example.test by client.test (mailstrom) with ESMTP "
        "for <bob@example.test>;",
        # Two recipients: neither is named (one may be a Bcc of the other).
        "b@example.test": "from app.example.test by client.test (mailstrom) with ESMTP;",
        "c@example.test": "from app.example.test by client.test (mailstrom) with UTF8SMTP "
        "for <bob@example.test>;",
        "d@example.test": "from [192.0.2.1] by client.test (mailstrom) with SMTP "
        "for <bob@example.test>;",
    }
    for sender, start in expected.items():
        raw = cli.ok("show", "--raw", by_sender[sender]).out
        assert raw.startswith("Received: from "), raw[:200]
        [received], message = received_fields(raw)
        assert received.startswith(start), received
        date = received.rpartition(";")[2].strip()
        assert email.utils.parsedate_to_datetime(date).tzinfo is not None
        assert message["Subject"] == "hi"


def test_a_hostile_helo_name_cannot_break_the_received_field(cli: CLI) -> None:
    hostile = [
        b"a" * 500,
        b"x)(y\\ z",
        b"=?utf-8?q?=E2=80=AE?= evil",
        b"host\rBcc: victim@example.test",
        "h\u00f6st.example".encode(),
        b"\xff\xfe",
        b"two words",
    ]
    script = b""
    for name in hostile:
        script += b"EHLO " + name + b"\r\n"
        script += transaction(b"s@example.test", [b"bob@example.test"], MESSAGE)
    result = session(cli, script + b"QUIT\r\n")
    assert result.code == 0, result.err
    ids = [m["id"] for m in cli.ok("queue", "--json").json()]
    assert len(ids) == len(hostile)
    for queue_id in ids:
        raw = cli.ok("show", "--raw", queue_id).out
        [received], message = received_fields(raw)
        assert received.startswith("from "), received
        assert "by client.test (mailstrom) with ESMTP for <bob@example.test>;" in received
        assert message["Bcc"] is None
        assert len(received) < 400
        assert received.isascii() and "=?" not in received


def test_a_message_with_the_most_header_fields_is_refused_not_grown(cli: CLI) -> None:
    """A message arriving with as many fields as a header section may hold (most of
    them Received, a long path or a loop) is refused: the Received field added is
    counted, never put on past the bound."""
    from mailstrom.message.bounds import MAX_HEADER_FIELDS

    hops = b"".join(
        b"Received: from h%d.example.test by h%d.example.test; Mon, 7 Dec 2026 00:00:00 +0000\r\n"
        % (i, i + 1)
        for i in range(MAX_HEADER_FIELDS - 5)
    )
    whole = b"Date: Mon, 7 Dec 2026 00:00:00 +0000\r\nMessage-ID: <x@example.test>\r\n" + MESSAGE
    script = b"EHLO c\r\n" + transaction(b"a@example.test", [b"bob@example.test"], hops + whole)
    result = session(cli, script + b"QUIT\r\n")
    assert codes(result)[-2] == "554", result.out
    assert "1001 fields" in replies(result)[-2]
    assert cli.queue_ids() == []


def test_the_received_field_leaves_the_dkim_signature_whole(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.env["MAILSTROM_CONFIG"] = str(dkim_config(cli))
    publish(mail_env)
    message = MESSAGE.replace(b"app@example.test", b"app@client.test")
    script = b"EHLO app.client.test\r\n"
    script += transaction(b"app@client.test", [b"bob@example.test"], message) + b"QUIT\r\n"
    result = session(cli, script)
    assert result.code == 0, result.err
    cli.ok("worker", "--once", "--no-live")
    [delivered] = mail_env.mx.messages
    content = delivered.content
    head = content.partition(b"\r\n\r\n")[0]
    assert head.count(b"\r\nReceived: from app.client.test\r\n\tby client.test") == 1, head
    assert_all_pass(content, mail_env.dns)
    signed = [tags["h"].lower().split(":") for tags in signature_tags(content)]
    assert len(signed) == 2 and all("received" not in names for names in signed), signed
