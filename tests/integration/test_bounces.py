"""Late bounces end to end: VERP envelope senders on the wire, then real Postfix and Exim
DSNs and an ARF complaint applied to the store, and the next message making no
connection."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Email, RecipientState, SuppressionSource
from mailstrom.bounces import apply_report, parse_report, recipient_token, verp_address
from mailstrom.bounces.apply import BounceAction, BounceOutcome
from mailstrom.client import Mailstrom
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import FakeClock, Results, loopback_config

SAMPLES = Path(__file__).parents[1] / "samples" / "bounces"
PLACEHOLDER = b"0190f3a2c4e1b7d08a4f2c6e9b1d3f57-5d41402abc"
VERP = "bounces+{token}@sender.test"


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mx(smtp_server: Any, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    dns_server.a("mx.test", server.host)
    for domain in ("receiver.test", "mailbox.test", "example.org"):
        dns_server.mx(domain, [(10, "mx.test")])
    return server


@pytest.fixture
def ms(
    dns_server: LoopbackDNS, mx: Any, results: Results, clock: FakeClock, tmp_path: Path
) -> Iterator[Mailstrom]:
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(
        loopback_config(dns_server, mx.port), store=store, clock=clock, on_result=results
    ) as mailstrom:
        yield mailstrom
    store.close()  # a store passed in is the caller's to close


def hello(*to: str, message_id: str | None = None) -> Email:
    return Email(
        from_="App <app@sender.test>",
        to=list(to),
        subject="Hi",
        text="Hello",
        message_id=message_id,
    )


def report_for(ms: Mailstrom, name: str, message_id: str, address: str) -> bytes:
    """A sample report with its placeholder token made this recipient's."""
    token = recipient_token(message_id, address, key=ms.store.verp_key()).encode()
    return (SAMPLES / name).read_bytes().replace(PLACEHOLDER, token)


Apply = Callable[..., list[BounceOutcome]]


def apply(ms: Mailstrom, data: bytes, clock: FakeClock, **kw: Any) -> list[BounceOutcome]:
    report = parse_report(data)
    assert report is not None
    return apply_report(ms.store, report, now=clock(), **kw)


def test_verp_gives_each_recipient_its_own_transaction(
    ms: Mailstrom, mx: Any, results: Results
) -> None:
    mid = ms.send_email(hello("ann@example.org", "bob@example.org"), envelope_from=VERP)
    results.wait_count(2)
    received = mx.wait_for_messages(2)
    by_rcpt = {tuple(m.rcpt_tos): m.mail_from for m in received}
    assert by_rcpt == {
        ("ann@example.org",): verp_address(VERP, mid, "ann@example.org", key=ms.store.verp_key()),
        ("bob@example.org",): verp_address(VERP, mid, "bob@example.org", key=ms.store.verp_key()),
    }
    assert mx.commands.count("MAIL") == 2
    assert ms.query_status(mid).envelope_from == VERP
    assert [r.state for r in ms.query_status(mid).recipients] == [RecipientState.DELIVERED] * 2


def test_a_postfix_bounce_by_verp_token_fails_and_suppresses(
    ms: Mailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    [outcome] = apply(
        ms, report_for(ms, "postfix-dsn-full.eml", mid, "nosuchuser@receiver.test"), clock
    )
    assert outcome.action is BounceAction.FAILED
    assert (outcome.message_id, outcome.address, outcome.status) == (
        mid,
        "nosuchuser@receiver.test",
        "5.1.1",
    )
    r = ms.query_status(mid).recipient("nosuchuser@receiver.test")
    assert r.state is RecipientState.FAILED
    assert r.reason == (
        'bounced after acceptance, reported by mx.receiver.test: 5.1.1 unknown user: "nosuchuser"'
    )
    entry = ms.suppressed("nosuchuser@receiver.test")
    assert entry is not None and entry.source is SuppressionSource.ASYNC_BOUNCE
    assert entry.message_id == mid

    connections = mx.connections
    again = ms.send_email(hello("nosuchuser@receiver.test"))
    results.wait_count(2)
    assert ms.query_status(again).recipients[0].reason.startswith("suppressed since ")
    assert mx.connections == connections


def test_a_postfix_bounce_by_message_id_and_original_recipient(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    # The sample's token and ENVID name no message here: the Message-ID and ORCPT do.
    mid = ms.send_email(
        hello(
            "NoSuchUser@receiver.test", "other@receiver.test", message_id="<sample-1@sender.test>"
        )
    )
    results.wait_count(2)
    data = (SAMPLES / "postfix-dsn-headers.eml").read_bytes()
    [outcome] = apply(ms, data, clock)
    assert (outcome.action, outcome.message_id, outcome.address) == (
        BounceAction.FAILED,
        mid,
        "NoSuchUser@receiver.test",
    )
    status = ms.query_status(mid)
    assert status.recipient("NoSuchUser@receiver.test").state is RecipientState.FAILED
    assert status.recipient("other@receiver.test").state is RecipientState.DELIVERED
    # Applying it again changes nothing more.
    assert apply(ms, data, clock)[0].action is BounceAction.ALREADY_FAILED


def test_an_exim_bounce_without_detail_still_suppresses(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    [outcome] = apply(ms, report_for(ms, "exim-dsn.eml", mid, "nosuchuser@receiver.test"), clock)
    assert outcome.action is BounceAction.FAILED and outcome.status == "5.0.0"
    assert outcome.suppressed is not None


def test_a_qmail_bounce_fails_and_suppresses(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "qmail-bounce.eml", mid, "nosuchuser@receiver.test")
    [outcome] = apply(ms, data, clock)
    assert (outcome.action, outcome.message_id, outcome.status) == (
        BounceAction.FAILED,
        mid,
        "5.1.1",
    )
    assert outcome.suppressed is not None
    assert ms.query_status(mid).recipient("nosuchuser@receiver.test").reason == (
        "bounced after acceptance, reported by mx.receiver.test: "
        "5.1.1 Sorry, no mailbox here by that name. (#5.1.1)"
    )


def test_a_complaint_suppresses_and_keeps_the_delivery(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    mid = ms.send_email(hello("carol@mailbox.test", "dave@mailbox.test"), envelope_from=VERP)
    results.wait_count(2)
    [outcome] = apply(ms, report_for(ms, "arf-complaint.eml", mid, "carol@mailbox.test"), clock)
    assert (outcome.action, outcome.address) == (BounceAction.COMPLAINT, "carol@mailbox.test")
    assert ms.query_status(mid).recipient("carol@mailbox.test").state is RecipientState.DELIVERED
    entry = ms.suppressed("carol@mailbox.test")
    assert entry is not None and entry.source is SuppressionSource.COMPLAINT
    assert entry.reply == "abuse complaint reported by fbl.mailbox.test"
    assert ms.suppressed("dave@mailbox.test") is None


def test_a_delay_notice_and_an_unknown_message_change_nothing(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    delayed = report_for(ms, "postfix-dsn-full.eml", mid, "nosuchuser@receiver.test").replace(
        b"Action: failed\r\nStatus: 5.1.1", b"Action: delayed\r\nStatus: 4.4.1"
    )
    assert [o.action for o in apply(ms, delayed, clock)] == [BounceAction.IGNORED]
    assert ms.query_status(mid).state is RecipientState.DELIVERED
    stranger = (SAMPLES / "exim-dsn.eml").read_bytes()
    assert [o.action for o in apply(ms, stranger, clock)] == [BounceAction.UNMATCHED]
    assert ms.suppressions() == []


def test_the_envelope_recipient_can_carry_the_token(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    mid = ms.send_email(hello("nosuchuser@receiver.test"))
    results.wait_count(1)
    # A report that quotes no token: the MTA tells which address it was delivered to.
    data = (SAMPLES / "exim-dsn.eml").read_bytes().replace(PLACEHOLDER, b"x")
    [outcome] = apply(
        ms,
        data,
        clock,
        envelope_recipient=verp_address(
            VERP, mid, "nosuchuser@receiver.test", key=ms.store.verp_key()
        ),
    )
    assert (outcome.action, outcome.message_id) == (BounceAction.FAILED, mid)


def test_a_bounce_about_mail_no_server_accepted_is_not_applied(
    ms: Mailstrom, clock: FakeClock
) -> None:
    # Queued for tomorrow: nothing handed to any server yet, so nothing can have bounced.
    mid = ms.send_email(
        hello("nosuchuser@receiver.test", message_id="<sample-3@sender.test>"),
        send_at=clock() + timedelta(days=1),
    )
    [outcome] = apply(ms, (SAMPLES / "exim-dsn.eml").read_bytes(), clock)
    assert (outcome.action, outcome.message_id, outcome.address) == (
        BounceAction.UNMATCHED,
        mid,
        "nosuchuser@receiver.test",
    )
    assert outcome.reason == (
        "not applied: no server has accepted this recipient (it is queued), "
        "so the report cannot be about a delivery"
    )
    r = ms.query_status(mid).recipient("nosuchuser@receiver.test")
    assert (r.state, r.attempts, r.history) == (RecipientState.QUEUED, 0, ())
    assert ms.suppressions() == []
    # Nor can a complaint, even one with the recipient's VERP token.
    later = ms.send_email(
        hello("carol@mailbox.test"), envelope_from=VERP, send_at=clock() + timedelta(days=1)
    )
    [outcome] = apply(ms, report_for(ms, "arf-complaint.eml", later, "carol@mailbox.test"), clock)
    assert (outcome.action, outcome.message_id) == (BounceAction.UNMATCHED, later)
    assert outcome.reason.startswith("not applied: no server has accepted this recipient")
    assert ms.suppressions() == []


def test_a_bounce_by_message_id_is_about_the_copy_a_server_accepted(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    """Messages may share a Message-ID (one resent, RFC 5322 §3.6.6, or sent again by the
    application). The newest with the recipient was taken: a copy still queued, so the
    bounce about the copy delivered before was left unmatched and nothing suppressed."""
    delivered = ms.send_email(
        hello("nosuchuser@receiver.test", message_id="<sample-3@sender.test>")
    )
    results.wait_count(1)
    queued = ms.send_email(
        hello("nosuchuser@receiver.test", message_id="<sample-3@sender.test>"),
        send_at=clock() + timedelta(days=1),
    )
    [outcome] = apply(ms, (SAMPLES / "exim-dsn.eml").read_bytes(), clock)
    assert (outcome.action, outcome.message_id) == (BounceAction.FAILED, delivered)
    assert outcome.suppressed is not None
    assert ms.query_status(delivered).state is RecipientState.FAILED
    assert ms.query_status(queued).state is RecipientState.QUEUED


def forged_dsn(message_id_header: str, *victims: str, token: str = "") -> bytes:
    """A DSN anyone who saw a message could write: its Message-ID header and, in Cc, the
    address of a co-recipient; ``token`` as the envelope sender it claims to return."""
    blocks = "".join(
        f"Final-Recipient: rfc822; {v}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n" for v in victims
    )
    return (
        f"To: bounces+{token}@sender.test\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; forger.test\r\n"
        f"\r\n{blocks}--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {message_id_header}\r\n\r\n--b--\r\n"
    ).encode()


def test_a_recipient_cannot_forge_a_bounce_about_a_co_recipient_of_verp_mail(
    ms: Mailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    email = Email(
        from_="App <app@sender.test>",
        to=["bob@example.org"],
        cc=["carol@example.org"],
        subject="News",
        text="Hello",
        message_id="<news-1@sender.test>",
    )
    mid = ms.send_email(email, envelope_from=VERP)
    results.wait_count(2)
    bobs = next(m for m in mx.wait_for_messages(2) if m.rcpt_tos == ("bob@example.org",))
    bob_token = bobs.mail_from.partition("+")[2].partition("@")[0]
    # What Bob can try: the Message-ID and Carol's address; a token from the unkeyed
    # digest of her address; his own token, with Carol named beside him.
    unkeyed = f"{mid}-{hashlib.blake2s(b'carol@example.org', digest_size=5).hexdigest()}"
    for forged in (
        forged_dsn("<news-1@sender.test>", "carol@example.org"),
        forged_dsn(f"<{mid}@sender.test>", "carol@example.org", token=unkeyed),
        forged_dsn("<news-1@sender.test>", "bob@example.org", "carol@example.org", token=bob_token),
    ):
        outcomes = {o.address: o for o in apply(ms, forged, clock)}
        assert outcomes["carol@example.org"].action is BounceAction.UNMATCHED
    assert outcomes["carol@example.org"].reason == (
        "no queued message and recipient match this report"
        " (a message sent with VERP matches only by its recipient's token)"
    )
    assert ms.query_status(mid).recipient("carol@example.org").state is RecipientState.DELIVERED
    assert ms.suppressed("carol@example.org") is None
    # Bob's own token speaks for Bob (his bounce is his to forge).
    assert outcomes["bob@example.org"].action is BounceAction.FAILED


def test_a_dsn_naming_the_recipient_by_its_u_label_domain_matches(
    ms: Mailstrom, dns_server: LoopbackDNS, results: Results, clock: FakeClock
) -> None:
    """An SMTPUTF8 server names the recipient as it knows it (RFC 6533 ``utf-8``
    address); the recipient is stored with its domain's A-label."""
    dns_server.mx("xn--bcher-kva.example", [(10, "mx.test")])
    mid = ms.send_email(hello("bob@bücher.example", message_id="<idn-1@sender.test>"))
    results.wait_count(1)
    data = (
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/global-delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.test\r\n\r\nFinal-Recipient: utf-8; Bob@Bücher.example\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "Message-ID: <idn-1@sender.test>\r\n\r\n--b--\r\n"
    ).encode()
    [outcome] = apply(ms, data, clock)
    assert (outcome.action, outcome.message_id, outcome.address) == (
        BounceAction.FAILED,
        mid,
        "bob@xn--bcher-kva.example",
    )
    assert outcome.suppressed is not None
    assert outcome.suppressed.target == "bob@xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("feedback_type", "suppresses"),
    [
        ("fraud", True),
        ("virus", True),
        ("not-spam", False),  # RFC 6430: the user says it is not spam
        ("auth-failure", False),  # RFC 6591: an SPF/DKIM result, nothing the user did
        ("other", False),
    ],
)
def test_only_a_feedback_report_that_complains_suppresses(
    ms: Mailstrom, results: Results, clock: FakeClock, feedback_type: str, suppresses: bool
) -> None:
    mid = ms.send_email(hello("carol@mailbox.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "arf-complaint.eml", mid, "carol@mailbox.test").replace(
        b"Feedback-Type: abuse", b"Feedback-Type: " + feedback_type.encode()
    )
    [outcome] = apply(ms, data, clock)
    assert outcome.message_id == mid
    assert ms.query_status(mid).recipient("carol@mailbox.test").state is RecipientState.DELIVERED
    if suppresses:
        assert outcome.action is BounceAction.COMPLAINT
        assert ms.suppressed("carol@mailbox.test") is not None
    else:
        assert outcome.action is BounceAction.IGNORED
        assert outcome.reason == (
            f"feedback type {feedback_type} reported by fbl.mailbox.test: not a complaint"
        )
        assert ms.suppressions() == []


def test_an_exim_bounce_relaying_a_full_mailbox_does_not_suppress(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    """Exim's Status is 5.0.0 for every failure; the relayed reply says what it was."""
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "exim-dsn.eml", mid, "nosuchuser@receiver.test").replace(
        b"Status: 5.0.0\r\n", b"Status: 5.0.0\r\nDiagnostic-Code: smtp; 552 5.2.2 Mailbox full\r\n"
    )
    [outcome] = apply(ms, data, clock)
    assert (outcome.action, outcome.status) == (BounceAction.FAILED, "5.0.0")
    assert outcome.suppressed is None
    assert ms.suppressions() == []


def test_an_exim_bounce_from_a_host_that_never_answered_does_not_suppress(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    """Exim's 5.0.0 without a Diagnostic-Code is an unrouteable address (no Remote-MTA)
    or a remote host it reached and gave up on without a reply of its own: retries timed
    out, the connection kept failing. Only the first says the address is gone. Both
    suppressed it, so a receiver down for a few days had its addresses suppressed."""
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "exim-dsn.eml", mid, "nosuchuser@receiver.test").replace(
        b"Status: 5.0.0\r\n", b"Status: 5.0.0\r\nRemote-MTA: dns; mx.receiver.test\r\n"
    )
    [outcome] = apply(ms, data, clock)
    assert (outcome.action, outcome.status) == (BounceAction.FAILED, "5.0.0")
    assert outcome.suppressed is None
    assert ms.suppressions() == []


def test_an_exim_bounce_is_classed_by_the_relayed_reply(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    """The reason class of a 5.0.0 comes from the relayed reply's own enhanced code: a
    DMARC refusal (5.7.26) is an authentication failure, not a mailbox one."""
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "exim-dsn.eml", mid, "nosuchuser@receiver.test").replace(
        b"Status: 5.0.0\r\n",
        b"Status: 5.0.0\r\nDiagnostic-Code: smtp; 550 5.7.26 unauthenticated mail\r\n",
    )
    [outcome] = apply(ms, data, clock)
    assert outcome.action is BounceAction.FAILED
    [recipient] = ms.query_status(mid).recipients
    assert recipient.reason_class == "authentication"


@pytest.mark.parametrize(
    ("diagnostic", "suppresses"),
    [("550 5.1.1 <nosuchuser@receiver.test>: no such user", True), ("552 5.2.2 full", False)],
)
def test_a_bounce_without_status_is_judged_by_the_relayed_reply(
    ms: Mailstrom, results: Results, clock: FakeClock, diagnostic: str, suppresses: bool
) -> None:
    """RFC 3464 requires Status, but some MTAs leave it out and give only the server's
    reply: its enhanced code says what the failure was. A 5.1.1 so reported suppressed
    nothing."""
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "postfix-dsn-full.eml", mid, "nosuchuser@receiver.test").replace(
        b'Status: 5.1.1\r\nDiagnostic-Code: X-Postfix; unknown user: "nosuchuser"',
        f"Diagnostic-Code: smtp; {diagnostic}".encode(),
    )
    assert b"Status:" not in data
    [outcome] = apply(ms, data, clock)
    assert outcome.action is BounceAction.FAILED
    assert outcome.status == diagnostic.split()[1]
    assert (outcome.suppressed is not None) is suppresses


@pytest.mark.parametrize(
    ("diagnostic", "suppresses"),
    [
        ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", True),
        ("550 5.4.1 No answer from host", False),
    ],
)
def test_a_relayed_exchange_online_refusal_of_an_unknown_address_suppresses(
    ms: Mailstrom, results: Results, clock: FakeClock, diagnostic: str, suppresses: bool
) -> None:
    """A relay that took the mail reports Exchange Online's directory-based edge blocking
    with Status 5.4.1: the address does not exist, as the reply at delivery says."""
    mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(1)
    data = report_for(ms, "postfix-dsn-full.eml", mid, "nosuchuser@receiver.test").replace(
        b'Status: 5.1.1\r\nDiagnostic-Code: X-Postfix; unknown user: "nosuchuser"',
        f"Status: 5.4.1\r\nDiagnostic-Code: smtp; {diagnostic}".encode(),
    )
    assert diagnostic.encode() in data
    [outcome] = apply(ms, data, clock)
    assert outcome.action is BounceAction.FAILED
    assert (outcome.suppressed is not None) is suppresses


def test_a_late_bounce_does_not_shorten_a_suppression_in_force(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    """A complaint suppresses with no end; a bounce for an earlier message that comes
    after it (suppress_for set) must not turn that into an entry that expires."""
    first = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    second = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
    results.wait_count(2)
    complaint = report_for(ms, "arf-complaint.eml", first, "nosuchuser@receiver.test")
    assert [o.action for o in apply(ms, complaint, clock)] == [BounceAction.COMPLAINT]
    bounce = report_for(ms, "postfix-dsn-full.eml", second, "nosuchuser@receiver.test")
    [outcome] = apply(ms, bounce, clock, suppress_for=timedelta(days=30))
    assert (outcome.action, outcome.message_id) == (BounceAction.FAILED, second)
    entry = ms.suppressed("nosuchuser@receiver.test")
    assert entry is not None
    assert (entry.source, entry.expires_at, entry.message_id) == (
        SuppressionSource.COMPLAINT,
        None,
        first,
    )
    assert outcome.suppressed == entry
    # One that lasts longer than the automatic entry in force does replace it (an
    # operator's would stay: test_suppressions in the contract suite).
    ms.unsuppress("nosuchuser@receiver.test")
    week = clock() + timedelta(days=7)
    ms.suppress(
        "nosuchuser@receiver.test", "a week", source=SuppressionSource.COMPLAINT, expires_at=week
    )
    [again] = apply(ms, bounce, clock, suppress_for=timedelta(days=30))
    assert again.action is BounceAction.ALREADY_FAILED
    entry = ms.suppressed("nosuchuser@receiver.test")
    assert entry is not None and entry.source is SuppressionSource.ASYNC_BOUNCE
    assert entry.expires_at == clock() + timedelta(days=30)


def test_our_own_notice_of_a_local_failure_suppresses_nothing(
    dns_server: LoopbackDNS, mx: Any, results: Results, clock: FakeClock, tmp_path: Path
) -> None:
    """A VERP sender gets the worker's notices at the recipient's own address, which is
    delivered to `mailstrom bounce`. A failure of the worker's own (here: a suppression
    for a week) is reported as Status 5.0.0 with an X-Mailstrom diagnostic; read as
    Exim's 5.0.0 without detail it suppressed the address for good."""
    dns_server.mx("sender.test", [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "n.db")
    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    with Mailstrom(config, store=store, clock=clock, on_result=results) as ms:
        ms.suppress("carol@mailbox.test", "a week off", expires_at=clock() + timedelta(days=7))
        mid = ms.send_email(hello("carol@mailbox.test"), envelope_from=VERP)
        results.wait_count(2)  # carol failed (suppressed), the notice delivered
        [notice] = mx.wait_for_messages(1)
        assert notice.rcpt_tos[0].startswith("bounces+")
        [outcome] = apply(ms, notice.content, clock)
        assert (outcome.action, outcome.message_id) == (BounceAction.ALREADY_FAILED, mid)
        assert outcome.suppressed is None
        entry = ms.suppressed("carol@mailbox.test")
        assert entry is not None and entry.source is SuppressionSource.MANUAL
        assert entry.expires_at == clock() + timedelta(days=7)
    store.close()


def test_our_own_notice_of_a_refusal_keeps_the_entry_the_refusal_made(
    dns_server: LoopbackDNS, mx: Any, results: Results, clock: FakeClock, tmp_path: Path
) -> None:
    """The worker's notice of a server's refusal (550 5.1.1 at RCPT) reaches `mailstrom
    bounce` at the VERP address. The worker had suppressed the address for that refusal;
    with suppress_for set, the report's entry (a little later, so lasting a little longer)
    replaced it: an "async_bounce" that said "bounced after acceptance", of mail no server
    ever accepted. The same holds for a report applied twice: the entry a message's
    failure made stays as it was."""
    dns_server.mx("sender.test", [(10, "mx.test")])
    mx.rcpt_replies["nosuchuser@receiver.test"] = "550 5.1.1 No such user"
    store = SQLiteStore(tmp_path / "n.db")
    config = loopback_config(
        dns_server, mx.port, bounce_notices=True, suppress_for=timedelta(days=30)
    )
    with Mailstrom(config, store=store, clock=clock, on_result=results) as ms:
        mid = ms.send_email(hello("nosuchuser@receiver.test"), envelope_from=VERP)
        results.wait_count(2)  # the refusal, and the notice delivered
        before = ms.suppressed("nosuchuser@receiver.test")
        assert before is not None and before.source is SuppressionSource.HARD_BOUNCE
        [notice] = mx.wait_for_messages(1)
        clock.advance(timedelta(minutes=5))  # the notice takes its time to come back
        [outcome] = apply(ms, notice.content, clock, suppress_for=timedelta(days=30))
        assert (outcome.action, outcome.message_id) == (BounceAction.ALREADY_FAILED, mid)
        assert ms.suppressed("nosuchuser@receiver.test") == before
    store.close()


@pytest.mark.parametrize("redacted", [b"<xxxxxxxxxx@mailbox.test>", b"redacted"])
def test_a_redacted_complaint_about_a_one_recipient_message_matches_it(
    ms: Mailstrom, results: Results, clock: FakeClock, redacted: bytes
) -> None:
    """RFC 6590: a feedback loop may redact the recipient's local part (Original-Rcpt-To
    and the returned To alike). A complaint that named no recipient matched the one
    recipient of the message its Message-ID named; one naming a redacted address
    matched nothing and was left unmatched, so the complainer got the next mailing."""
    mid = ms.send_email(hello("carol@mailbox.test", message_id="<sample-4@sender.test>"))
    results.wait_count(1)
    data = (SAMPLES / "arf-complaint.eml").read_bytes().replace(b"<carol@mailbox.test>", redacted)
    data = data.replace(b"To: carol@mailbox.test", b"To: " + redacted)
    [outcome] = apply(ms, data, clock)
    assert (outcome.action, outcome.message_id, outcome.address) == (
        BounceAction.COMPLAINT,
        mid,
        "carol@mailbox.test",
    )
    assert ms.suppressed("carol@mailbox.test") is not None


def test_a_redacted_complaint_names_no_recipient_of_another_domain(
    ms: Mailstrom, results: Results, clock: FakeClock
) -> None:
    """A redacted address still names its domain (RFC 6590 §3 redacts the local part):
    a report about someone at another domain is not about this message's recipient."""
    ms.send_email(hello("carol@mailbox.test", message_id="<sample-4@sender.test>"))
    results.wait_count(1)
    data = (SAMPLES / "arf-complaint.eml").read_bytes()
    data = data.replace(b"<carol@mailbox.test>", b"<xxxxxxxxxx@elsewhere.test>")
    [outcome] = apply(ms, data, clock)
    assert outcome.action is BounceAction.UNMATCHED
    assert ms.suppressed("carol@mailbox.test") is None


def test_our_own_delay_warning_to_a_verp_sender_changes_nothing(
    dns_server: LoopbackDNS, mx: Any, results: Results, clock: FakeClock, tmp_path: Path
) -> None:
    """The worker's delay warning about a recipient it still retries goes to that
    recipient's VERP address, which is delivered to `mailstrom bounce`. The recipient is
    deferred (no server has accepted it), and the report was taken for a bounce of mail no
    server accepted: unmatched, exit 66, and the MTA returned the warning to the
    postmaster. An ``Action: delayed`` says nothing final whatever the recipient's state."""
    dns_server.mx("sender.test", [(10, "mx.test")])
    mx.rcpt_replies["busy@receiver.test"] = "451 4.2.1 Mailbox busy"
    store = SQLiteStore(tmp_path / "n.db")
    config = loopback_config(
        dns_server, mx.port, bounce_notices=True, delay_warning=timedelta(hours=1)
    )
    with Mailstrom(config, store=store, clock=clock, on_result=results) as ms:
        mid = ms.send_email(hello("busy@receiver.test"), envelope_from=VERP)
        results.wait_count(1)  # deferred at once: no warning yet
        clock.advance(timedelta(hours=2))
        ms.wake()
        results.wait_count(3)  # deferred past the hour, and the warning delivered
        [warning] = mx.wait_for_messages(1)
        assert warning.rcpt_tos[0].startswith("bounces+")
        [outcome] = apply(ms, warning.content, clock, envelope_recipient=warning.rcpt_tos[0])
        assert (outcome.action, outcome.message_id, outcome.address) == (
            BounceAction.IGNORED,
            mid,
            "busy@receiver.test",
        )
        assert outcome.reason == "action delayed: nothing final to record"
        assert ms.query_status(mid).recipient("busy@receiver.test").state is (
            RecipientState.DEFERRED
        )
        assert ms.suppressions() == []
    store.close()
