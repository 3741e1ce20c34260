"""DSN requests from the command line: ``send --notify/--ret/--envid`` and sendmail's
``-N``, ``-R`` and ``-V``."""

from __future__ import annotations

from collections.abc import Callable

from tests.cli.conftest import CLI, MailEnv
from tests.fixtures.smtp_server import ReceivingServer

RAW = b"From: App <app@client.test>\nTo: bob@example.test\nSubject: hi\n\nbody\n"


def dsn_receiver(env: MailEnv, smtp_server: Callable[..., ReceivingServer]) -> ReceivingServer:
    mx = smtp_server(dsn=True)
    env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
    return mx


def test_sendmail_flags(mail_env: MailEnv, smtp_server: Callable[..., ReceivingServer]) -> None:
    cli = mail_env.cli
    mx = dsn_receiver(mail_env, smtp_server)
    cli.ok(
        "sendmail",
        "-N",
        "failure,delay",
        "-R",
        "hdrs",
        "-V",
        "order-42",
        "bob@example.test",
        stdin=RAW,
    )
    cli.ok("worker", "--once", "--no-live")
    assert mx.dsn_params == [
        ("MAIL", "app@client.test", ("RET=HDRS", "ENVID=order-42")),
        ("RCPT", "bob@example.test", ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;bob@example.test")),
    ]


def test_send_options(mail_env: MailEnv, smtp_server: Callable[..., ReceivingServer]) -> None:
    cli = mail_env.cli
    mx = dsn_receiver(mail_env, smtp_server)
    mid = cli.ok(
        "send",
        "--from",
        "app@client.test",
        "--to",
        "bob@example.test",
        "--text",
        "x",
        "--notify",
        "never",
    ).out.strip()
    cli.ok("worker", "--once", "--no-live")
    assert mx.dsn_params == [
        ("MAIL", "app@client.test", (f"ENVID={mid}",)),
        ("RCPT", "bob@example.test", ("NOTIFY=NEVER", "ORCPT=rfc822;bob@example.test")),
    ]


def test_bad_values_are_refused(cli: CLI) -> None:
    bad = cli("sendmail", "-N", "always", "bob@example.test", stdin=RAW)
    assert bad.code == 64
    assert "-N/-R/-V" in bad.err
    assert cli("sendmail", "-R", "body", "bob@example.test", stdin=RAW).code == 64
    sent = cli(
        "send",
        "--from",
        "a@client.test",
        "--to",
        "b@example.test",
        "--text",
        "x",
        "--notify",
        "never,failure",
    )
    assert sent.code == 65
    assert "NEVER cannot be combined" in sent.err
    assert cli.queue_ids() == []


def test_sendmail_mail_is_bounced_to_its_sender(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.rcpt_replies["nobody@example.test"] = "550 5.1.1 No such user"
    raw = b"From: App <app@other.test>\nTo: nobody@example.test\nSubject: hi\n\nbody\n"
    cli.ok("sendmail", "-f", "app@other.test", "nobody@example.test", stdin=raw)
    cli.ok("worker", "--once", "--no-live")
    [notice] = mx.messages
    assert (notice.mail_from, notice.rcpt_tos) == ("<>", ("app@other.test",))
    assert b"Status: 5.1.1" in notice.content
    # `mailstrom send` is the library's path: no notice unless asked.
    cli.ok("send", "--from", "app@other.test", "--to", "nobody@example.test", "--text", "x")
    cli.ok("worker", "--once", "--no-live")
    assert len(mx.messages) == 1
