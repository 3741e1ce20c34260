"""End to end through the command: send/sendmail → worker → status, against loopback servers."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import signal
import socket
import time
from collections.abc import Callable

import pytest

from tests.cli.conftest import CLI, MailEnv, ended
from tests.fixtures.smtp_server import ReceivingServer


def send(cli: CLI, *extra: str, to: str = "bob@example.test") -> str:
    result = cli.ok(
        "send", "--from", "App <app@client.test>", "--to", to, "--subject", "Hello", *extra
    )
    [message_id] = result.out.split()
    return message_id


def test_send_then_worker_once_then_status_delivered(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    message_id = send(cli, "--text", "Hi Bob")
    assert cli.ok("status", "--json", message_id).json()["state"] == "queued"

    worker = cli.ok("worker", "--once", "--no-live", "--log-format", "json")

    [received] = mx.messages
    assert received.rcpt_tos == ("bob@example.test",)
    assert received.mail_from == "app@client.test"
    assert b"Subject: Hello" in received.content
    assert received.tls
    # One structured line per attempt.
    attempts = [json.loads(line) for line in worker.err_lines if '"attempt"' in line]
    assert [(a["rcpt"], a["state"], a["host"]) for a in attempts] == [
        ("bob@example.test", "delivered", "mx.test")
    ]
    status = cli.ok("status", "--json", message_id).json()
    # As Postfix's from=, size= and delay=: the sender, the stored octets, and the seconds
    # from queueing to this attempt.
    [attempt] = attempts
    assert attempt["from"] == "app@client.test"
    assert attempt["size"] == status["size"] > 0
    assert 0 < attempt["delay"] < 60
    assert status["state"] == "delivered"
    [rcpt] = status["recipients"]
    assert (rcpt["reason_class"], rcpt["advice"]) == (None, None)
    assert (rcpt["state"], rcpt["mx_host"], rcpt["ip"], rcpt["tls"]) == (
        "delivered",
        "mx.test",
        "127.0.0.1",
        True,
    )
    assert rcpt["reply"]["code"] == 250
    table = cli.ok("status", "--history", message_id).out
    assert "delivered" in table
    assert "Attempts for bob@example.test" in table


def test_status_and_worker_log_say_why_a_recipient_failed(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["bob@example.test"] = (
        "550 5.7.26 This mail is unauthenticated: Gmail wants SPF or DKIM. a1si2 - gsmtp"
    )
    help_url = "https://support.google.com/mail/answer/81126"
    message_id = send(cli, "--text", "Hi Bob")
    worker = cli.ok("worker", "--once", "--no-live", "--log-format", "json")

    [logged] = [json.loads(line) for line in worker.err_lines if '"attempt"' in line]
    assert (logged["state"], logged["reason_class"], logged["help"]) == (
        "failed",
        "authentication",
        help_url,
    )
    status = cli.ok("status", "--json", message_id).json()
    [rcpt] = status["recipients"]
    assert rcpt["state"] == "failed"
    assert rcpt["reason_class"] == "authentication"
    assert rcpt["advice"]["provider"] == "Google"
    assert rcpt["advice"]["help"] == help_url
    [attempt] = rcpt["history"]
    assert attempt["reason_class"] == "authentication"
    assert attempt["advice"]["help"] == help_url

    text = cli.ok("status", "--history", message_id).out
    assert "CLASS" in text
    assert "bob@example.test: authentication (Google): " in text
    assert f"  Help: {help_url}" in text
    assert "  What to do: " in text


def test_worker_text_log_is_key_value(mail_env: MailEnv) -> None:
    send(mail_env.cli, "--text", "x")
    worker = mail_env.cli.ok("worker", "--once", "--no-live")
    [line] = [ln for ln in worker.err_lines if "event=attempt" in ln]
    assert "rcpt=bob@example.test" in line
    assert "state=delivered" in line
    assert "host=mx.test" in line


def test_sendmail_t_strips_bcc_and_delivers_to_it(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    message = (
        b"From: Cron Daemon <cron@client.test>\n"
        b"To: bob@example.test\n"
        b"Bcc: Hidden <hidden@example.test>\n"
        b"Subject: nightly\n"
        b"\n"
        b"all good\n"
    )
    result = cli("sendmail", "-t", "-i", "-oem", "-odb", stdin=message)
    assert (result.code, result.out, result.err) == (0, "", "")
    cli.ok("worker", "--once", "--no-live")

    [received] = mx.messages
    assert sorted(received.rcpt_tos) == ["bob@example.test", "hidden@example.test"]
    assert b"hidden" not in received.content.lower()
    assert b"Bcc" not in received.content
    assert received.mail_from == "cron@client.test"


def test_sendmail_arguments_sender_full_name_and_dot(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    message = b"Subject: report\n\nline one\n.\nafter the dot\n"
    cli.ok(
        "sendmail",
        "-f",
        "bounces@client.test",
        "-F",
        "Report Bot",
        "bob@example.test",
        stdin=message,
    )
    cli.ok("worker", "--once", "--no-live")

    [received] = mx.messages
    assert received.mail_from == "bounces@client.test"
    assert received.rcpt_tos == ("bob@example.test",)
    assert b"From: Report Bot <bounces@client.test>" in received.content
    assert b"line one" in received.content
    assert b"after the dot" not in received.content  # without -i a lone dot ends input


def test_sendmail_i_keeps_lone_dot(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    message = b"From: a@client.test\nSubject: dots\n\nbefore\n.\nafter\n"
    cli.ok("sendmail", "-oi", "bob@example.test", stdin=message)
    cli.ok("worker", "--once", "--no-live")
    [received] = mx.messages
    assert b"before\r\n.\r\nafter" in received.content


def test_send_wait_exit_codes(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["gone@example.test"] = "550 5.1.1 No such user"
    mx.rcpt_replies["later@example.test"] = "451 4.7.1 Try again later"

    ok = cli("send", "--from", "a@client.test", "--to", "bob@example.test", "--text", "x", "--wait")
    assert ok.code == 0, ok.err
    assert "delivered" in ok.out

    failed = cli("send", "--from", "a@client.test", "--to", "gone@example.test", "--wait", "--json")
    assert failed.code == 69
    status = failed.json()
    assert status["recipients"][0]["state"] == "failed"
    assert status["recipients"][0]["reply"]["code"] == 550
    # The same document as `mailstrom status --json`, advice included.
    assert status == cli("status", "--json", status["id"]).json()
    assert status["recipients"][0]["advice"]["meaning"]

    # Deferred with the next retry minutes away: --wait gives up at the timeout.
    pending = cli(
        "send", "--from", "a@client.test", "--to", "later@example.test", "--wait", "--timeout", "3"
    )
    assert pending.code == 75
    assert "deferred" in pending.out
    assert "451" in pending.out


def test_send_wait_whose_output_reader_is_gone_still_says_what_happened(
    mail_env: MailEnv,
) -> None:
    """``send --wait`` prints the id before it waits. With standard output a pipe whose
    reader had gone, that BrokenPipeError ended it as a listing read by ``head``: exit 0,
    "delivered", with nothing delivered or tried. The output is lost; the exit code is
    the delivery's (69: refused)."""
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["gone@example.test"] = "550 5.1.1 No such user"
    argv = ["send", "--from", "a@client.test", "--to", "gone@example.test", "--text", "x"]
    argv += ["--wait", "--timeout", "60"]
    proc = cli.gone_reader(*argv, stream="stdout", timeout=90)
    assert proc.returncode == 69, proc.stderr.decode()
    [message] = cli.ok("queue", "--json", "--state", "any").json()
    assert message["recipients"][0]["state"] == "failed"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_send_wait_json_interrupted_prints_the_queued_message(
    mail_env: MailEnv, sig: signal.Signals
) -> None:
    """``send --wait --json`` stopped while it waited (Ctrl-C; SIGTERM from a supervisor or
    timeout(1)) printed nothing: the message was queued, and its id, printed only with
    the outcome, was lost (SIGTERM killed the process outright). It now prints what is
    known, the document of ``status --json``, and exits 130; the mail stays queued."""
    cli = mail_env.cli
    with socket.socket() as silent:  # an MX that takes the connection and never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        cli.env["MAILSTROM_SMTP_PORT"] = str(silent.getsockname()[1])
        proc = cli.popen(
            "send", "--from", "a@client.test", "--to", "bob@example.test", "--text", "x",
            "--wait", "--json", "--timeout", "600",
        )  # fmt: skip
        try:
            connection, _ = silent.accept()  # the worker is delivering: the wait is on
            with connection:
                proc.send_signal(sig)
                out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err, err.decode()
    status = json.loads(out)
    assert cli.queue_ids() == [status["id"]]
    [bob] = status["recipients"]
    assert bob["address"] == "bob@example.test"
    assert bob["state"] in ("queued", "deferred")  # not final: a worker delivers it later
    assert cli.ok("status", "--json", status["id"]).json()["state"] in ("queued", "deferred")


def test_send_wait_started_with_sighup_ignored_leaves_it_ignored(mail_env: MailEnv) -> None:
    """Under ``nohup`` (SIGHUP ignored) the session's end must not stop ``send --wait``,
    as it does not stop ``mailstrom worker``: the wait took SIGHUP for a stop all the same,
    gave the message back and exited 130. It now waits on, and the message is delivered."""
    cli = mail_env.cli
    with socket.socket() as mx:  # an MX the test answers by hand, once SIGHUP was sent
        mx.bind(("127.0.0.1", 0))
        mx.listen()
        mx.settimeout(60)
        cli.env["MAILSTROM_SMTP_PORT"] = str(mx.getsockname()[1])
        ignored = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited through exec
        try:
            proc = cli.popen(
                "send", "--from", "a@client.test", "--to", "bob@example.test", "--text", "x",
                "--wait", "--json", "--timeout", "600",
            )  # fmt: skip
        finally:
            signal.signal(signal.SIGHUP, ignored)
        try:
            connection, _ = mx.accept()  # the worker is delivering: the wait is on
            # (A wait stopped by the signal hangs up: the exit code tells.)
            with connection, connection.makefile("rb") as lines, contextlib.suppress(OSError):
                proc.send_signal(signal.SIGHUP)
                connection.sendall(b"220 mx.test ESMTP\r\n")
                while line := lines.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        connection.sendall(b"250-mx.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        connection.sendall(b"354 go on\r\n")
                        while lines.readline() not in (b".\r\n", b""):
                            pass
                        connection.sendall(b"250 2.0.0 queued\r\n")
                    elif verb == b"QUIT":
                        connection.sendall(b"221 bye\r\n")
                        break
                    else:
                        connection.sendall(b"250 ok\r\n")
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err.decode()
    [bob] = json.loads(out)["recipients"]
    assert bob["state"] == "delivered"


def test_send_wait_returns_once_the_next_retry_is_past_the_timeout(mail_env: MailEnv) -> None:
    """Issue 14: the outcome is known when the retry falls after the timeout; --wait must
    not sit out its two minutes."""
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["later@example.test"] = "451 4.7.1 Try again later"
    started = time.monotonic()
    pending = cli(
        "send", "--from", "a@client.test", "--to", "later@example.test", "--text", "x",
        "--wait", "--timeout", "120",
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert pending.code == 75, pending.err
    [line] = [ln for ln in pending.out.splitlines() if "deferred until" in ln]
    assert re.fullmatch(
        r"later@example\.test: deferred until \d{4}-\d\d-\d\d \d\d:\d\d UTC"
        r" \(451 4\.7\.1 Try again later\)",
        line,
    )


def test_send_wait_returns_at_once_for_a_message_scheduled_past_the_timeout(
    mail_env: MailEnv,
) -> None:
    """No worker tries a message before its --at time: waiting an hour for one due in
    2099 changes nothing, so --wait returns what is known now (it sat out the whole
    timeout; the call below gives up after 60 s)."""
    cli = mail_env.cli
    pending = cli(
        "send", "--from", "a@client.test", "--to", "bob@example.test", "--text", "x",
        "--at", "2099-01-01T00:00Z", "--wait", "--timeout", "3600", "--json",
    )  # fmt: skip
    assert pending.code == 75, pending.err
    [recipient] = pending.json()["recipients"]
    assert (recipient["state"], recipient["attempts"]) == ("queued", 0)
    assert mail_env.mx.connections == 0


def test_send_attachment_html_and_header(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    (mail_env.workdir / "report.csv").write_text("a,b\n1,2\n")
    (mail_env.workdir / "body.html").write_text("<p>Hi</p>")
    send(
        cli,
        "--text",
        "plain",
        "--html-file",
        "body.html",
        "--attach",
        "report.csv",
        "--header",
        "X-Campaign: spring",
        "--cc",
        "carol@other.test",
    )
    cli.ok("worker", "--once", "--no-live")
    received = sorted(mx.messages, key=lambda m: m.rcpt_tos)
    assert [m.rcpt_tos for m in received] == [("bob@example.test",), ("carol@other.test",)]
    content = received[0].content
    assert b"X-Campaign: spring" in content
    assert b"text/csv" in content
    assert b'filename="report.csv"' in content
    assert b"text/html" in content


def test_send_raw_file_with_explicit_envelope(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    raw = b"From: a@client.test\r\nTo: someone@example.test\r\nSubject: raw\r\n\r\nbody\r\n"
    result = cli.ok("send", "--file", "-", "--to", "bob@example.test", stdin=raw)
    assert len(result.out.strip()) == 32
    cli.ok("worker", "--once", "--no-live")
    [received] = mx.messages
    assert received.rcpt_tos == ("bob@example.test",)
    assert b"To: someone@example.test" in received.content


def test_send_raw_file_envelope_options_take_address_lists(cli: CLI) -> None:
    # --to "a, b" is two recipients when the message is built from options, as for
    # sendmail's arguments; with --file the same value was refused, exit 65 ("envelope_to
    # must be exactly one address"), and a script's $RECIPIENTS worked for one mode only.
    raw = b"From: a@client.test\r\nTo: someone@example.test\r\nSubject: raw\r\n\r\nbody\r\n"
    result = cli.ok(
        "send",
        "--file",
        "-",
        "--to",
        'bob@example.test, "Doe, Carol" <carol@example.test>',
        "--cc",
        "Team: dan@example.test, erin@example.test;",
        "--bcc",
        "fay@example.test,",
        stdin=raw,
    )
    status = cli.ok("status", "--json", result.out.strip()).json()
    assert [r["address"] for r in status["recipients"]] == [
        "bob@example.test",
        "carol@example.test",
        "dan@example.test",
        "erin@example.test",
        "fay@example.test",
    ]


def test_worker_stops_gracefully_on_sigterm(mail_env: MailEnv) -> None:
    proc = mail_env.cli.popen("worker", "--no-live")
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline().decode()  # written once the worker is set up
        assert "worker started" in first
    finally:
        code, err = ended(proc)
    assert code == 0
    assert "worker stopped" in err


def test_sighup_stops_the_worker_as_sigterm_does(mail_env: MailEnv) -> None:
    """A closed terminal or ssh session (SIGHUP) killed the worker outright, mid-delivery:
    leases kept, last log lines lost. It drains and stops instead."""
    cli, mx = mail_env.cli, mail_env.mx
    send(cli, "--text", "Hi", to="bob@example.test")
    proc = cli.popen("worker", "--no-live")
    try:
        mx.wait_for_messages(1, timeout=30)
    finally:
        code, err = ended(proc, signal.SIGHUP)
    assert code == 0, err
    assert "stopping" in err
    assert "worker stopped" in err


def test_sigterm_leaves_every_attempt_line_written(mail_env: MailEnv) -> None:
    """The worker holds INFO lines up to 0.1 s (cli/logbuffer.py); stopped by SIGTERM
    right after its deliveries, it has still written every one of them."""
    cli, mx = mail_env.cli, mail_env.mx
    rcpts = [f"user{i}@example.test" for i in range(5)]
    for rcpt in rcpts:
        send(cli, "--text", "Hi", to=rcpt)
    proc = cli.popen("worker", "--no-live", "--log-format", "json")
    try:
        mx.wait_for_messages(len(rcpts), timeout=30)
    finally:
        code, err = ended(proc)
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    delivered = sorted(line["rcpt"] for line in lines if line["event"] == "attempt")
    assert delivered == rcpts
    events = [line["event"] for line in lines]
    assert "stopping" in events  # SIGTERM came while it ran (deliveries may still finish)
    assert events[-1] == "worker stopped"
    assert next(line for line in lines if line["event"] == "worker stopped")["delivered"] == 5


def test_sendmail_latin1_from_name_reaches_a_server_without_smtputf8(
    mail_env: MailEnv, smtp_server: Callable[..., ReceivingServer]
) -> None:
    """A PHP site kept in ISO-8859-1 writes ``From: Jörg Müller <shop@...>`` and declares
    the charset; sendmail reads the header section in it and wrote the Subject as encoded
    words (so that no SMTPUTF8 is needed), but the From name as raw UTF-8: the message
    then needed SMTPUTF8, and every server without it refused it for good (553 5.6.7),
    where Postfix delivers it. Address fields' names are encoded words too now."""
    cli = mail_env.cli
    mx = smtp_server(smtputf8=False)
    cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
    message = (
        "From: Jörg Müller <shop@client.test>\n"
        "To: Bob Bäcker <bob@example.test>\n"
        "Subject: Bestätigung\n"
        "Content-Type: text/plain; charset=ISO-8859-1\n"
        "\n"
        "Vielen Dank\n"
    ).encode("latin-1")
    cli.ok("sendmail", "-t", "-i", stdin=message)
    cli.ok("worker", "--once", "--no-live")

    [received] = mx.messages
    assert received.content.partition(b"\r\n\r\n")[0].isascii()
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert str(parsed["From"]) == "Jörg Müller <shop@client.test>"
    assert str(parsed["To"]) == "Bob Bäcker <bob@example.test>"
    assert str(parsed["Subject"]) == "Bestätigung"
