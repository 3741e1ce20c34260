"""A message a program DKIM-signed before piping it to ``mailstrom sendmail`` reaches the
server as signed: each one here is signed with dkimpy, queued by the command, delivered
to an aiosmtpd receiver by the worker and verified there with the key from loopback DNS."""

from __future__ import annotations

import dkim as dkimpy
import pytest

from mailstrom.dkim import DKIMConfig
from tests.cli.conftest import MailEnv
from tests.support.dkim import RSA, key, publish, verify_dkimpy

SIGNER = key("client.test", "app", RSA)
SIGNED_FIELDS = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version"]

HEAD = (
    b"Date: Mon, 07 Dec 2026 20:00:00 +0000\n"
    b"Message-ID: <1@client.test>\n"
    b"From: App <app@client.test>\n"
    b"To: bob@example.test\n"
)
LONG_SUBJECT = b"Subject: " + b" ".join(b"word%02d" % i for i in range(30)) + b"\n"
MESSAGES = {
    "plain": HEAD + b"Subject: hi\n\nbody\n",
    "crlf": (HEAD + b"Subject: hi\n\nbody\n").replace(b"\n", b"\r\n"),
    "long subject": HEAD + LONG_SUBJECT + b"\nbody\n",
    "folded subject": HEAD + b"Subject: aaa\n\tbbb   ccc\n\nbody\n",
    "encoded subject": HEAD + b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and then more\n\nbody\n",
    "header over 998": HEAD + b"Subject: x\nX-Long: " + b"abcdefghi " * 120 + b"\n\nbody\n",
    "dot lines": HEAD + b"Subject: x\n\nbefore\n.\n..\n.x\nafter\n",
    "trailing space": HEAD + b"Subject: x  \n\nbody  \n\n\n",
    "no last line end": HEAD + b"Subject: x\n\nbody",
    "8-bit body": HEAD + b"Subject: x\nMIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b"Gr\xc3\xbc\xc3\x9fe\n",
    "utf-8 subject": HEAD + b"Subject: Gr\xc3\xbc\xc3\x9fe\n\nbody\n",
}


def signed(message: bytes, canonicalization: bytes = b"relaxed") -> bytes:
    newline = b"\r\n" if b"\r\n" in message else b"\n"
    signature = dkimpy.sign(
        message,
        SIGNER.selector.encode(),
        SIGNER.domain.encode(),
        SIGNER.private_key,
        include_headers=SIGNED_FIELDS,
        canonicalize=(canonicalization, b"simple"),
        linesep=newline,
    )
    return signature + message


def delivered(mail_env: MailEnv, message: bytes, *args: str) -> bytes:
    [content] = delivered_all(mail_env, message, *args)
    return content


def delivered_all(mail_env: MailEnv, message: bytes, *args: str) -> list[bytes]:
    publish(mail_env.dns, DKIMConfig(keys=(SIGNER,)))
    mail_env.cli.ok("sendmail", *args, stdin=message)
    mail_env.cli.ok("worker", "--once", "--no-live")
    return [received.content for received in mail_env.mx.messages]


@pytest.mark.parametrize("name", list(MESSAGES))
def test_signed_message_verifies_at_the_receiver(mail_env: MailEnv, name: str) -> None:
    content = delivered(mail_env, signed(MESSAGES[name]), "-i", "bob@example.test")
    assert [v.result for v in verify_dkimpy(content, mail_env.dns)] == ["pass"]


@pytest.mark.parametrize("name", ["plain", "long subject", "folded subject", "trailing space"])
def test_simple_header_canonicalization_verifies_too(mail_env: MailEnv, name: str) -> None:
    """c=simple/simple: a header field refolded, or white space changed, would fail."""
    content = delivered(mail_env, signed(MESSAGES[name], b"simple"), "-i", "bob@example.test")
    assert [v.result for v in verify_dkimpy(content, mail_env.dns)] == ["pass"]


def test_mbox_from_line_before_the_signature_is_dropped(mail_env: MailEnv) -> None:
    message = b"From app@client.test Mon Dec  7 20:00:00 2026\n" + signed(MESSAGES["plain"])
    content = delivered(mail_env, message, "-i", "bob@example.test")
    assert b"From app@" not in content
    assert [v.result for v in verify_dkimpy(content, mail_env.dns)] == ["pass"]


def test_t_removes_an_unsigned_bcc_and_the_signature_holds(mail_env: MailEnv) -> None:
    message = HEAD + b"Bcc: hidden@other.test\nSubject: x\n\nbody\n"
    contents = delivered_all(mail_env, signed(message), "-t", "-i")
    rcpt_tos = sorted(r for received in mail_env.mx.messages for r in received.rcpt_tos)
    assert rcpt_tos == ["bob@example.test", "hidden@other.test"]
    for content in contents:
        assert b"hidden" not in content
        assert [v.result for v in verify_dkimpy(content, mail_env.dns)] == ["pass"]
