"""The command's TLS policy features: ``send --require-tls`` and ``check`` with DANE."""

from __future__ import annotations

from typing import Any

from tests.cli.conftest import MailEnv


def test_send_require_tls_fails_with_5_7_30_without_requiretls(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    result = cli(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x",
        "--require-tls", "--wait", "--json",
    )  # fmt: skip
    assert result.code == 69, result.err
    [bob] = result.json()["recipients"]
    assert bob["state"] == "failed" and bob["reply"]["enhanced"] == "5.7.30"
    assert mail_env.mx.messages == []


def test_send_require_tls_is_honoured_by_a_server_offering_it(
    mail_env: MailEnv, smtp_server: Any
) -> None:
    mx = smtp_server(requiretls=True)
    mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
    result = mail_env.cli(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x",
        "--require-tls", "--wait", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    [received] = mx.wait_for_messages(1)
    assert "REQUIRETLS" in received.mail_options and received.tls
    [bob] = result.json()["recipients"]
    assert bob["history"][-1]["tls_policy"] == "verify"
