"""``mailstrom bounce`` through the real command, with real Postfix and Exim DSNs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailstrom.bounces import recipient_token, verp_address
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import RecipientResult, SQLiteStore
from tests.cli.conftest import CLI, MailEnv

SAMPLES = Path(__file__).parents[1] / "samples" / "bounces"
PLACEHOLDER = b"0190f3a2c4e1b7d08a4f2c6e9b1d3f57-5d41402abc"
VERP = "bounces+{token}@sender.test"
RAW = (
    b"From: App <app@sender.test>\r\nTo: nosuchuser@receiver.test\r\nSubject: sample 3\r\n"
    b"Message-ID: <sample-3@sender.test>\r\nDate: Mon, 30 Nov 2026 16:00:00 +0000\r\n\r\n"
    b"Hello.\r\n"
)


def deliver(env: MailEnv, *send: str, stdin: bytes | None = None) -> str:
    env.dns.mx("receiver.test", [(10, "mx.test")])
    message_id = env.cli.ok("send", *send, stdin=stdin).out.strip()
    env.cli.ok("worker", "--once", "--no-live")
    assert env.cli.ok("status", "--json", message_id).json()["state"] == "delivered"
    return message_id


def verp_key(env: MailEnv) -> bytes:
    """The key the commands make VERP tokens with (kept in their store)."""
    store = SQLiteStore(env.workdir / "queue.db")
    try:
        return store.verp_key()
    finally:
        store.close()


def recipient(cli: CLI, message_id: str) -> dict[str, object]:
    [r] = cli.ok("status", "--json", message_id).json()["recipients"]
    assert isinstance(r, dict)
    return r


def test_an_exim_bounce_found_by_message_id(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    mid = deliver(
        mail_env,
        *("--file", "-", "--from", "app@sender.test", "--to", "nosuchuser@receiver.test"),
        stdin=RAW,
    )
    result = cli.ok("bounce", "--json", stdin=(SAMPLES / "exim-dsn.eml").read_bytes())
    assert result.json() == {
        "kind": "dsn",
        "outcomes": [
            {
                "action": "failed",
                "message_id": mid,
                "address": "nosuchuser@receiver.test",
                "status": "5.0.0",
                "reason": "bounced after acceptance, reported by mx.receiver.test: 5.0.0",
                "suppressed": "nosuchuser@receiver.test",
            }
        ],
    }
    assert recipient(cli, mid)["state"] == "failed"
    [entry] = cli.ok("suppress", "list", "--json").json()
    assert (entry["target"], entry["source"]) == ("nosuchuser@receiver.test", "async_bounce")


def test_suppress_for_ends_an_async_bounce_entry_not_a_complaint(mail_env: MailEnv) -> None:
    """``suppress_for`` covers hard bounces whether the worker saw the refusal or a DSN
    reported it later; a complaint is the recipient's word and keeps no end."""
    cli = mail_env.cli
    cli.env["MAILSTROM_SUPPRESS_FOR"] = "180d"
    deliver(
        mail_env,
        *("--file", "-", "--from", "app@sender.test", "--to", "nosuchuser@receiver.test"),
        stdin=RAW,
    )
    cli.ok("bounce", stdin=(SAMPLES / "exim-dsn.eml").read_bytes())
    mail_env.dns.mx("mailbox.test", [(10, "mx.test")])
    mid = deliver(mail_env, *("--from", VERP, "--to", "carol@mailbox.test", "--text", "x"))
    token = recipient_token(mid, "carol@mailbox.test", key=verp_key(mail_env)).encode()
    cli.ok("bounce", stdin=(SAMPLES / "arf-complaint.eml").read_bytes().replace(PLACEHOLDER, token))
    entries = {e["target"]: e for e in cli.ok("suppress", "list", "--json").json()}
    bounced, complained = entries["nosuchuser@receiver.test"], entries["carol@mailbox.test"]
    created = datetime.fromisoformat(bounced["created_at"])
    assert datetime.fromisoformat(bounced["expires_at"]) - created == timedelta(days=180)
    assert complained["expires_at"] is None


def test_a_postfix_bounce_found_by_the_verp_recipient(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    mid = deliver(
        mail_env,
        *("--from", VERP, "--to", "nosuchuser@receiver.test", "--text", "x"),
    )
    [received] = mail_env.mx.messages
    address = verp_address(VERP, mid, "nosuchuser@receiver.test", key=verp_key(mail_env))
    assert received.mail_from == address
    # The report quotes another token; the MTA's $RECIPIENT names the right one.
    data = (SAMPLES / "postfix-dsn-full.eml").read_bytes()
    cli.env["RECIPIENT"] = address
    out = cli.ok("bounce", stdin=data).out
    assert out.startswith(f"{mid} nosuchuser@receiver.test: failed, suppressed (bounced after")
    assert recipient(cli, mid)["state"] == "failed"


def test_a_complaint(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    mail_env.dns.mx("mailbox.test", [(10, "mx.test")])
    mid = deliver(mail_env, *("--from", VERP, "--to", "carol@mailbox.test", "--text", "x"))
    token = recipient_token(mid, "carol@mailbox.test", key=verp_key(mail_env)).encode()
    data = (SAMPLES / "arf-complaint.eml").read_bytes().replace(PLACEHOLDER, token)
    [outcome] = cli.ok("bounce", "--json", stdin=data).json()["outcomes"]
    assert (outcome["action"], outcome["suppressed"]) == ("complaint", "carol@mailbox.test")
    assert recipient(cli, mid)["state"] == "delivered"


def dsn(message_id: str, address: str) -> bytes:
    """A DSN that names ``message_id`` by its ENVID and ``address`` failed (5.1.1)."""
    return (
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.receiver.test\r\nOriginal-Envelope-Id: {message_id}\r\n\r\n"
        f"Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\r\n--b--\r\n"
    ).encode()


def test_a_bounce_about_a_recipient_in_delivery_is_tried_again_later(cli: CLI) -> None:
    """A receiving system may bounce between accepting the message and the worker
    recording that it did (a fast local bounce, a worker slow to write). Was: the
    recipient, leased and still "queued", was reported unmatched with exit 66, which the
    MTA piping the bounce takes as permanent: the bounce was returned, the late failure
    never recorded and the address never suppressed. Exit 75 has the MTA try again."""
    mid = cli.ok("send", "--from", "app@sender.test", "--to", "bob@receiver.test", "--text", "x")
    mid = mid.out.strip()
    store = SQLiteStore(cli.cwd / "queue.db")
    try:
        # What a worker does: lease, and (the server having accepted) record later.
        now = datetime.now(UTC)
        lease = store.lease(now=now, limit=10, lease_for=timedelta(minutes=5))
        assert lease is not None
        assert recipient(cli, mid)["leased"] is True
        early = cli("bounce", "--json", stdin=dsn(mid, "bob@receiver.test"))
        assert early.code == 75, early.err
        [outcome] = early.json()["outcomes"]
        assert (outcome["action"], outcome["message_id"], outcome["suppressed"]) == (
            "in_flight",
            mid,
            None,
        )
        assert "in delivery" in outcome["reason"]
        assert cli.ok("suppress", "list", "--json").json() == []
        [item] = lease.items
        store.record(
            [
                RecipientResult(
                    message_id=mid,
                    address=r.address,
                    state=RecipientState.DELIVERED,
                    lease_token=item.lease_token,
                    ref=r.ref,
                    attempt=Attempt(
                        at=now,
                        outcome=AttemptOutcome.DELIVERED,
                        mx_host="mx.receiver.test",
                        reply=SMTPReply(code=250, text="ok"),
                    ),
                )
                for r in item.recipients
            ]
        )
    finally:
        store.close()
    assert recipient(cli, mid)["leased"] is False
    # The MTA's retry: now applied.
    [again] = cli.ok("bounce", "--json", stdin=dsn(mid, "bob@receiver.test")).json()["outcomes"]
    assert (again["action"], again["suppressed"]) == ("failed", "bob@receiver.test")
    assert recipient(cli, mid)["state"] == "failed"


def test_a_bounce_about_mail_no_worker_has_taken_stays_unmatched(cli: CLI) -> None:
    mid = cli.ok("send", "--from", "app@sender.test", "--to", "bob@receiver.test", "--text", "x")
    mid = mid.out.strip()
    result = cli("bounce", "--json", stdin=dsn(mid, "bob@receiver.test"))
    assert result.code == 66
    [outcome] = result.json()["outcomes"]
    assert outcome["action"] == "unmatched"
    assert "no server has accepted this recipient (it is queued)" in outcome["reason"]


def test_what_is_no_report_is_ignored_and_errors_are_typed(cli: CLI) -> None:
    ignored = cli("bounce", stdin=b"Subject: Out of office\r\n\r\nAway.\r\n")
    assert ignored.code == 0
    assert ignored.err_lines == [
        "mailstrom: ignored: not a delivery status notification or feedback report"
    ]
    broken = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsorry\r\n--b--\r\n"
    )
    bad = cli("bounce", stdin=broken)
    assert bad.code == 65
    assert "without a message/delivery-status part" in bad.err
    unmatched = cli("bounce", stdin=(SAMPLES / "postfix-dsn-headers.eml").read_bytes())
    assert unmatched.code == 66
    assert "unmatched" in unmatched.out
    # Larger than --max-size: the rest is read and dropped, the head still parsed.
    big = (SAMPLES / "postfix-dsn-full.eml").read_bytes() + b"x" * 3_000_000
    assert cli("bounce", "--max-size", "2000", stdin=big).code == 66


@pytest.mark.parametrize("size", ["1000000000000", str(2**63 - 1)])
def test_a_max_size_past_memory_reads_what_comes(cli: CLI, size: str) -> None:
    """--max-size is a bound, not an amount to set aside: standard input was read with
    one read(max_size), which allocates that much first (MemoryError, or OverflowError at
    the largest count the option takes: "internal error", exit 70, for a 30-octet
    auto-reply)."""
    ignored = cli("bounce", "--max-size", size, stdin=b"Subject: Away\r\n\r\nAway.\r\n")
    assert (ignored.code, ignored.err_lines) == (
        0,
        ["mailstrom: ignored: not a delivery status notification or feedback report"],
    )


def test_escape_sequences_in_a_report_reach_neither_the_terminal_nor_the_store(
    mail_env: MailEnv,
) -> None:
    cli = mail_env.cli
    mid = deliver(
        mail_env, *("--from", "app@sender.test", "--to", "bob@receiver.test", "--text", "x")
    )
    evil = "\x1b]0;owned\x1b\\\x1b[2J\x1b[31mRED"
    data = (
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx{evil}.receiver.test\r\nOriginal-Envelope-Id: {mid}\r\n\r\n"
        "Final-Recipient: rfc822; bob@receiver.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 {evil} no such user\r\n\r\n--b--\r\n"
    ).encode()
    out = cli.ok("bounce", stdin=data).out
    assert out.startswith(f"{mid} bob@receiver.test: failed, suppressed")
    shown = "\ufffd]0;owned\ufffd\\\ufffd[2J\ufffd[31mRED"
    assert f"mx{shown}.receiver.test: 5.1.1 550 5.1.1 {shown} no such user" in out
    assert "\x1b" not in out
    assert "\x1b" not in cli.ok("status", mid).out
    assert recipient(cli, mid)["error"] == (
        f"bounced after acceptance, reported by mx{shown}.receiver.test:"
        f" 5.1.1 550 5.1.1 {shown} no such user"
    )
    [entry] = cli.ok("suppress", "list", "--json").json()
    assert "\x1b" not in entry["reply"]


def test_a_report_nested_thousands_deep_is_invalid_not_an_internal_error(cli: CLI) -> None:
    data = b'Content-Type: multipart/report; report-type=delivery-status; boundary="b0"\r\n\r\n'
    data += b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(20_000)
    )
    result = cli("bounce", stdin=data)
    assert result.code == 65
    assert result.err_lines == [
        "mailstrom: MIME parts nested more than 102 levels deep (multipart and message levels)"
    ]


def test_a_report_with_an_overlong_content_type_is_invalid(cli: CLI) -> None:
    """One field the standard library would spend minutes on (its parameters are read in
    quadratic time): refused by its length, at once, though the report is otherwise one
    (without the bound it reads, and is unmatched: exit 66)."""
    field = b"Content-Type: multipart/report; report-type=delivery-status;"
    data = (SAMPLES / "postfix-dsn-headers.eml").read_bytes()
    assert field in data
    result = cli("bounce", stdin=data.replace(field, field + b" a=b;" * 1200))
    assert result.code == 65
    assert result.err_lines == ["mailstrom: a Content-Type field of 6113 characters; at most 4096"]
