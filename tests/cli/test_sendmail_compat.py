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
