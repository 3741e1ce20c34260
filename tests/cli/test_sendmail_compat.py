"""The sendmail personality reads what Sendmail and Postfix read: the null sender of
``-f ''``, header fields written the obsolete way (``Bcc : x``), and messages without a
header section or without the empty line that ends it."""

from __future__ import annotations

import getpass

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
