"""Bounce messages: the worker reports final failures to the envelope sender with an
RFC 3464 notice when the message or the configuration asks for it, never for the null
sender, and the notice reads back with mailstrom's own DSN parser."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstrom import DSN, Email, Notify, RecipientState, Return
from mailstrom.bounces import parse_report, verp_address
from mailstrom.client import Mailstrom
from mailstrom.errors import StoreError, StoreLocked, StoreRefusedData
from mailstrom.message import prepare
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore, SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results, loopback_config

NO_SUCH_USER = "550 5.1.1 No such user"


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def mx(smtp_server: Any, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    dns_server.a("mx.test", server.host)
    for domain in ("example.org", "sender.test"):
        dns_server.mx(domain, [(10, "mx.test")])
    server.rcpt_replies["nobody@example.org"] = NO_SUCH_USER
    return server


Make = Callable[..., Mailstrom]


@pytest.fixture
def mailstrom(dns_server: LoopbackDNS, mx: Any, results: Results) -> Iterator[Make]:
    started: list[Mailstrom] = []

    def make(**config: Any) -> Mailstrom:
        ms = Mailstrom(
            loopback_config(dns_server, mx.port, **config), store=MemoryStore(), on_result=results
        )
        ms.start()
        started.append(ms)
        return ms

    yield make
    for ms in started:
        ms.stop(timeout=5)


def hello(*to: str, **kw: Any) -> Email:
    return Email(
        from_="App <app@sender.test>", to=list(to), subject="Quarterly", text="Hello", **kw
    )


def test_a_final_failure_is_reported_to_the_sender(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    ms = mailstrom(bounce_notices=True, helo_name="mx.client.test")
    mid = ms.send_email(hello("nobody@example.org", "ann@example.org"))
    results.wait_count(3)  # nobody failed, ann delivered, the notice delivered
    by_address = {r.address: r.state for r in results.all}
    assert by_address == {
        "nobody@example.org": RecipientState.FAILED,
        "ann@example.org": RecipientState.DELIVERED,
        "app@sender.test": RecipientState.DELIVERED,
    }
    notice = next(m for m in mx.wait_for_messages(2) if m.rcpt_tos == ("app@sender.test",))
    assert notice.mail_from == "<>"  # the null sender: a bounce is never bounced
    assert b"Auto-Submitted: auto-replied" in notice.content
    report = parse_report(notice.content)
    assert report is not None
    assert report.reporting_mta == "mx.client.test"
    assert report.original_message_id == ms.query_status(mid).header_message_id
    assert report.envelope_id is None  # the message asked for no DSN
    [r] = report.recipients
    assert (r.final_recipient, r.action, r.status) == ("nobody@example.org", "failed", "5.1.1")
    assert r.diagnostic == NO_SUCH_USER and r.diagnostic_code == 550
    assert r.remote_mta == "mx.test"
    assert b"Subject: Quarterly" in notice.content and b"Hello" not in notice.content


def test_a_notice_that_cannot_be_made_stops_no_delivery(
    mailstrom: Make,
    mx: Any,
    results: Results,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever goes wrong while a notice is made (the returned message is hostile
    input), the results are recorded already: the error is logged and the worker goes
    on. It ended the worker before."""
    from mailstrom.runtime import notices

    def broken(*args: Any, **kwargs: Any) -> list[Any]:
        raise RuntimeError("a bug in the notice renderer")

    monkeypatch.setattr(notices, "notices_owed", broken)
    ms = mailstrom(bounce_notices=True)
    ms.send_email(hello("nobody@example.org"))
    ms.send_email(hello("ann@example.org"))
    results.wait_count(2)
    assert {r.address: r.state for r in results.all} == {
        "nobody@example.org": RecipientState.FAILED,
        "ann@example.org": RecipientState.DELIVERED,
    }
    for _ in range(500):  # made after the record that on_result heard of
        if "bounce messages could not be made" in caplog.text:
            break
        time.sleep(0.01)
    assert "bounce messages could not be made" in caplog.text
    assert ms.worker_status.running


def test_off_by_default_in_the_library(mailstrom: Make, mx: Any, results: Results) -> None:
    ms = mailstrom()
    ms.send_email(hello("nobody@example.org"))
    results.wait_count(1)
    ms.stop(timeout=5)
    assert len(ms.query_recent()) == 1


def test_the_message_dsn_request_decides(mailstrom: Make, mx: Any, results: Results) -> None:
    ms = mailstrom()  # notices off, but the message asks, with RET=FULL
    ms.send_email(hello("nobody@example.org", dsn=DSN(notify=(Notify.FAILURE,), ret=Return.FULL)))
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    assert b"Content-Type: message/rfc822" in notice.content and b"Hello" in notice.content
    report = parse_report(notice.content)
    assert report is not None and report.recipients[0].original_recipient == "nobody@example.org"


def test_a_success_report_asked_of_a_server_without_dsn_is_a_relayed_notice(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    """RFC 3461 §5.2.2: NOTIFY=SUCCESS cannot be passed on to a server that does not
    offer DSN (aiosmtpd does not), so the MTA that relays it there owes the sender a
    "relayed" notice (RFC 3464 §2.3.3) for each recipient that asked. Was: nothing, and
    the sender, who asked to hear of the delivery, heard nothing."""
    ms = mailstrom(helo_name="mx.client.test")
    dsn = DSN(notify=(Notify.SUCCESS, Notify.FAILURE), ret=Return.FULL)
    mid = ms.send_email(hello("ann@example.org", "bob@example.org", dsn=dsn))
    ms.send_email(hello("cal@example.org", dsn=DSN(notify=(Notify.FAILURE,))))  # no report
    results.wait_count(4)  # ann, bob and cal delivered, and the notice
    assert {r.address: r.state for r in results.all} == {
        "ann@example.org": RecipientState.DELIVERED,
        "bob@example.org": RecipientState.DELIVERED,
        "cal@example.org": RecipientState.DELIVERED,
        "app@sender.test": RecipientState.DELIVERED,
    }
    [notice] = [m for m in mx.wait_for_messages(3) if m.rcpt_tos == ("app@sender.test",)]
    assert notice.mail_from == "<>"
    assert b"Subject: Successful Mail Relay Report" in notice.content
    report = parse_report(notice.content)
    assert report is not None
    assert report.reporting_mta == "mx.client.test"
    assert report.original_message_id == ms.query_status(mid).header_message_id
    rows = sorted((r.final_recipient, r.action, r.status) for r in report.recipients)
    assert rows == [
        ("ann@example.org", "relayed", "2.0.0"),
        ("bob@example.org", "relayed", "2.0.0"),
    ]
    for r in report.recipients:
        assert r.remote_mta == "mx.test"
        assert (r.diagnostic_type, r.diagnostic) == ("smtp", "250 2.0.0 OK queued")
    # Headers only: RET asks for the message in a failure's notice (RFC 3461 §4.3).
    assert b"Subject: Quarterly" in notice.content and b"Hello" not in notice.content
    assert b"text/rfc822-headers" in notice.content


def test_a_success_report_is_left_to_a_server_that_offers_dsn(
    smtp_server: Any, dns_server: LoopbackDNS, results: Results
) -> None:
    """A server that offers DSN takes NOTIFY=SUCCESS with the recipient and reports the
    delivery itself: no notice of mailstrom's (it would be a second one)."""
    mx = smtp_server(dsn=True)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.mx("sender.test", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    config = loopback_config(dns_server, mx.port)
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        ms.send_email(hello("ann@example.org", dsn=DSN(notify=(Notify.SUCCESS,))))
        results.wait_count(1)
        ms.stop(timeout=5)
        assert len(ms.query_recent()) == 1  # no notice queued
    assert [m.rcpt_tos for m in mx.messages] == [("ann@example.org",)]
    assert any(b"NOTIFY=SUCCESS" in " ".join(p).encode() for _, _, p in mx.dsn_params)


def test_a_message_too_big_to_return_whole_gets_a_notice_with_its_headers(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    """RET=FULL of a message just within the 1,000-part bound: returned whole, the notice
    would pass it (its own parts come on top), and no notice at all was sent."""
    from mailstrom import Attachment

    files = [Attachment(filename=f"f{i}.txt", content=b"x") for i in range(996)]
    ms = mailstrom()
    dsn = DSN(notify=(Notify.FAILURE,), ret=Return.FULL)
    ms.send_email(hello("nobody@example.org", dsn=dsn, attachments=files))
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    assert b"Content-Type: text/rfc822-headers" in notice.content
    assert b"Subject: Quarterly" in notice.content and b"f995.txt" not in notice.content


def test_never_when_notify_never_or_for_the_null_sender(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    ms = mailstrom(bounce_notices=True)
    ms.send_email(hello("nobody@example.org", dsn=DSN(notify=(Notify.NEVER,))))
    ms.send_email(hello("nobody@example.org"), envelope_from="")
    results.wait_count(2)
    ms.stop(timeout=5)
    assert len(ms.query_recent()) == 2
    assert mx.messages == []


def test_a_verp_sender_gets_the_notice_at_its_own_address(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    ms = mailstrom(bounce_notices=True)
    template = "bounces+{token}@sender.test"
    mid = ms.send_email(hello("nobody@example.org"), envelope_from=template)
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    assert notice.rcpt_tos == (
        verp_address(template, mid, "nobody@example.org", key=ms.store.verp_key()),
    )


class _RefusingVERP(dict[str, Any]):
    """``rcpt_replies`` that refuse every VERP address (``bounces+...@``) as unknown: a
    sender whose own server was never set up to take its bounces."""

    def get(self, key: str, default: Any = None) -> Any:
        return NO_SUCH_USER if key.startswith("bounces+") else super().get(key, default)


def test_a_refused_notice_to_a_verp_address_suppresses_no_throwaway_address(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    """Was: the notice's refusal (550 5.1.1 from the sender's own server) put the VERP
    address it went to on the suppression list, with no end without ``suppress_for``:
    an address made for one message and recipient, never mailed again, one more entry
    on the list for every failure. Only the recipient that failed is suppressed."""
    mx.rcpt_replies = _RefusingVERP(mx.rcpt_replies)
    ms = mailstrom(bounce_notices=True)
    template = "bounces+{token}@sender.test"
    mid = ms.send_email(hello("nobody@example.org"), envelope_from=template)
    results.wait_count(2)  # nobody refused, then the notice about it refused
    address = verp_address(template, mid, "nobody@example.org", key=ms.store.verp_key())
    assert {r.address: r.state for r in results.all} == {
        "nobody@example.org": RecipientState.FAILED,
        address: RecipientState.FAILED,
    }
    assert [e.target for e in ms.store.list_suppressions()] == ["nobody@example.org"]


def test_a_suppressed_recipient_is_reported_too(mailstrom: Make, mx: Any, results: Results) -> None:
    ms = mailstrom(bounce_notices=True)
    ms.suppress("gone@example.org", "550 5.1.1 earlier")
    ms.send_email(hello("gone@example.org"))
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    report = parse_report(notice.content)
    assert report is not None
    [r] = report.recipients
    assert r.status == "5.0.0" and (r.diagnostic or "").startswith("suppressed since ")


def test_one_delay_warning_once_retries_pass_the_threshold(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    from datetime import timedelta

    from tests.support.delivery import FakeClock

    clock = FakeClock()
    mx.rcpt_replies["busy@example.org"] = "451 4.2.1 Mailbox busy"
    config = loopback_config(
        dns_server, mx.port, bounce_notices=True, delay_warning=timedelta(hours=1)
    )
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        mid = ms.send_email(hello("busy@example.org"))
        results.wait_count(1)  # deferred at once: no warning yet
        clock.advance(timedelta(hours=2))
        ms.wake()
        results.wait_count(3)  # deferred past the hour, and the warning delivered
        [warning] = mx.wait_for_messages(1)
        report = parse_report(warning.content)
        assert report is not None
        [r] = report.recipients
        assert (r.final_recipient, r.action, r.status) == ("busy@example.org", "delayed", "4.2.1")
        assert b"Subject: Delayed Mail (still being retried)" in warning.content
        assert b"Will-Retry-Until: " in warning.content
        clock.advance(timedelta(hours=2))
        ms.wake()
        results.wait_count(4)  # deferred again: no second warning
    assert [m.id for m in ms.query_recent()][-1] == mid
    assert len(ms.query_recent()) == 2 and len(mx.messages) == 1


def test_the_notice_names_the_original_recipient_and_envelope_id_decoded(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    # xtext is how the SMTP parameters carry them (no+2Bbody@...); a DSN holds the values
    # themselves (RFC 3461 §4.2 and §4.4, RFC 3464 §2.2.1 and §2.3.1).
    mx.rcpt_replies["no+body@example.org"] = NO_SUCH_USER
    ms = mailstrom()
    dsn = DSN(notify=(Notify.FAILURE,), envid="order+42=x")
    ms.send_email(hello("no+body@example.org", dsn=dsn))
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    assert b"Original-Recipient: rfc822;no+body@example.org\r\n" in notice.content
    assert b"Original-Envelope-Id: order+42=x\r\n" in notice.content
    report = parse_report(notice.content)
    assert report is not None and report.envelope_id == "order+42=x"
    assert report.recipients[0].original_recipient == "no+body@example.org"


def test_a_delay_warning_promises_retries_only_until_the_message_expires(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """Was: Will-Retry-Until (and "until ... at the latest") said the retry policy's
    max_age, five days on, of a message that expires in three hours and is given up on
    then."""
    from datetime import timedelta
    from email.utils import format_datetime

    from tests.support.delivery import FakeClock

    clock = FakeClock()
    mx.rcpt_replies["busy@example.org"] = "451 4.2.1 Mailbox busy"
    config = loopback_config(
        dns_server, mx.port, bounce_notices=True, delay_warning=timedelta(hours=1)
    )
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        mid = ms.send_email(hello("busy@example.org"), max_age=timedelta(hours=3))
        expires_at = ms.query_status(mid).expires_at
        assert expires_at is not None
        results.wait_count(1)
        clock.advance(timedelta(hours=2))
        ms.wake()
        results.wait_count(3)  # deferred past the hour, and the warning delivered
        [warning] = mx.wait_for_messages(1)
    until = format_datetime(expires_at).encode()
    assert b"\r\nWill-Retry-Until: " + until + b"\r\n" in warning.content
    assert b"until " + until + b" at the latest." in warning.content


def test_a_delay_warning_promises_retries_only_until_the_last_attempt_allowed(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """Was: Will-Retry-Until said the retry policy's max_age, five days on, though
    ``retry.max_attempts = 3`` gives up at the third attempt, minutes after the warning."""
    from datetime import timedelta
    from email.utils import format_datetime

    from mailstrom.policy.retry import RetryPolicy
    from tests.support.delivery import FakeClock

    clock = FakeClock()
    mx.rcpt_replies["busy@example.org"] = "451 4.2.1 Mailbox busy"
    retry = RetryPolicy(min_delay=timedelta(minutes=5), jitter=0.0, max_attempts=3)
    config = loopback_config(
        dns_server, mx.port, bounce_notices=True, delay_warning=timedelta(hours=1), retry=retry
    )
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        mid = ms.send_email(hello("busy@example.org"))
        results.wait_count(1)
        clock.advance(timedelta(hours=2))
        ms.wake()
        results.wait_count(3)  # the second attempt deferred past the hour, and the warning
        [warning] = mx.wait_for_messages(1)
        [busy] = ms.query_status(mid).recipients
    # The third attempt, ten minutes on, is the last: it fails the recipient if deferred.
    assert busy.attempts == 2 and busy.next_attempt_at == clock() + timedelta(minutes=10)
    until = format_datetime(busy.next_attempt_at).encode()
    assert b"\r\nWill-Retry-Until: " + until + b"\r\n" in warning.content


def test_a_message_past_its_expiry_is_reported_as_delivery_time_expired(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """Was: Status 5.0.0, a permanent failure without detail, which bounce processors
    read as a hard bounce (Exim writes it for an unknown user): a one-time code that
    expired behind a greylisting server could get its recipient suppressed by the
    sender. RFC 3463's X.4.7 is "delivery time expired", as when the retries run out."""
    from datetime import timedelta

    from tests.support.delivery import FakeClock

    clock = FakeClock()
    mx.rcpt_replies["slow@example.org"] = "451 4.7.1 Greylisted, try again later"
    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        ms.send_email(hello("slow@example.org"), max_age=timedelta(minutes=10))
        results.wait_count(1)  # greylisted: deferred
        clock.advance(timedelta(hours=1))
        ms.wake()
        results.wait_count(3)  # failed as expired, and the notice delivered
        [notice] = mx.wait_for_messages(1)
    report = parse_report(notice.content)
    assert report is not None
    [r] = report.recipients
    assert (r.final_recipient, r.action, r.status) == ("slow@example.org", "failed", "4.4.7")
    assert r.diagnostic == "expired"


def test_a_refusal_of_mailstroms_own_is_no_smtp_diagnostic(
    mailstrom: Make, mx: Any, results: Results, dns_server: LoopbackDNS
) -> None:
    """Was: ``Diagnostic-Code: smtp; 556 5.1.10 ... (null MX)``, though no SMTP server
    said it: the worker decided it from DNS (as it decides SIZE, SMTPUTF8 and REQUIRETLS
    refusals with a code). RFC 3464 §2.3.6: the type names the kind of diagnostic; an
    ``smtp`` one is a server's reply, and readers take its code as one."""
    dns_server.null_mx("nomail.test")
    ms = mailstrom(bounce_notices=True)
    ms.send_email(hello("eve@nomail.test"))
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    assert b"\r\nDiagnostic-Code: X-Mailstrom; 556 5.1.10 domain nomail.test" in notice.content
    assert b"Remote-MTA" not in notice.content
    report = parse_report(notice.content)
    assert report is not None
    [r] = report.recipients
    assert (r.status, r.diagnostic_type, r.diagnostic_code) == ("5.1.10", "x-mailstrom", None)


def test_the_arrival_date_of_a_scheduled_message_is_when_it_was_queued(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """Was: the message's send_at, a day after it arrived. RFC 3464 §2.2.5: the
    Arrival-Date is when the message arrived at the reporting MTA."""
    from datetime import timedelta
    from email.utils import format_datetime

    from tests.support.delivery import FakeClock

    clock = FakeClock()
    queued = clock()
    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        ms.send_email(hello("nobody@example.org"), send_at=queued + timedelta(days=1))
        clock.advance(timedelta(days=1, minutes=1))
        ms.wake()
        results.wait_count(2)  # nobody failed, the notice delivered
        [notice] = mx.wait_for_messages(1)
    assert b"\r\nArrival-Date: " + format_datetime(queued).encode() + b"\r\n" in notice.content


def test_a_recipient_never_tried_has_no_last_attempt_date(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    """Was: ``Last-Attempt-Date`` the time of the notice, for a recipient refused from the
    suppression list without any attempt. RFC 3464 §2.3.7: the field is the date of the
    last attempt to deliver; with none it is left out (it is optional)."""
    ms = mailstrom(bounce_notices=True)
    ms.suppress("gone@example.org", "550 5.1.1 earlier")
    ms.send_email(hello("gone@example.org"))
    results.wait_count(2)
    [notice] = mx.wait_for_messages(1)
    assert b"Final-Recipient: rfc822; gone@example.org\r\n" in notice.content
    assert b"Last-Attempt-Date" not in notice.content


def test_the_last_attempt_date_of_an_expired_recipient_is_its_last_attempt(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """Was: the time the worker found the message expired, when no attempt was made (no
    connection is made past the expiry); the last attempt was the greylisted one."""
    from datetime import timedelta
    from email.utils import format_datetime

    from tests.support.delivery import FakeClock

    clock = FakeClock()
    tried = clock()
    mx.rcpt_replies["slow@example.org"] = "451 4.7.1 Greylisted, try again later"
    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        ms.send_email(hello("slow@example.org"), max_age=timedelta(minutes=10))
        results.wait_count(1)  # greylisted: deferred
        clock.advance(timedelta(hours=1))
        ms.wake()
        results.wait_count(3)  # failed as expired, and the notice delivered
        [notice] = mx.wait_for_messages(1)
    assert b"\r\nLast-Attempt-Date: " + format_datetime(tried).encode() + b"\r\n" in notice.content


def test_a_notice_the_store_could_not_take_is_queued_at_the_next_write(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """The store failed for a moment just as the notices were queued (a lock held past
    busy_timeout, a full disk that had room for the results only): the notices were
    logged and dropped, and the sender never heard that the mail failed. Their marks stay
    in the store, and the worker looks for them again soon."""

    class NoticesFailOnce(MemoryStore):
        failed = False

        def queue_notices(self, owed: Any, notices: Any, *, now: Any) -> list[str]:
            if not self.failed:
                self.failed = True
                raise StoreLocked("database is locked (another process holds its write lock)")
            return super().queue_notices(owed, notices, now=now)

    store = NoticesFailOnce()
    ms = Mailstrom(
        loopback_config(dns_server, mx.port, bounce_notices=True, poll_interval=0.2),
        store=store,
        on_result=results,
    )
    with ms:
        ms.send_email(hello("nobody@example.org"))
        results.wait_count(2)  # nobody failed, then the notice delivered
    assert store.failed
    by_address = {r.address: r.state for r in results.all}
    assert by_address == {
        "nobody@example.org": RecipientState.FAILED,
        "app@sender.test": RecipientState.DELIVERED,
    }


async def test_a_notice_left_unqueued_is_queued_by_the_next_worker(
    dns_server: LoopbackDNS, mx: Any, tmp_path: Path
) -> None:
    """The store failed just as a notice was queued, and the worker was stopped before
    it could try again: the notice waited in the worker's memory and the stop dropped it
    (the sender never heard that the mail failed). Its mark stays in the store with the
    failure's record, the stop tries once more, and a worker started later queues it."""

    class NoticesFail(SQLiteStore):
        failing = True
        tried = 0
        queued = 0

        def queue_notices(self, owed: Any, notices: Any, *, now: Any) -> list[str]:
            self.tried += 1
            if self.failing:
                raise StoreLocked("database is locked (another process holds its lock)")
            ids = super().queue_notices(owed, notices, now=now)
            self.queued += len(ids)
            return ids

    path = tmp_path / "q.db"
    store = NoticesFail(path)
    try:
        store.enqueue(
            prepare(hello("nobody@example.org"), envelope_from="app@sender.test"),
            now=datetime.now(UTC),
        )
        worker = Worker(loopback_config(dns_server, mx.port, bounce_notices=True), store)
        run = asyncio.create_task(worker.run())
        for _ in range(500):
            if store.tried:
                break
            await asyncio.sleep(0.02)
        assert store.tried
        worker.request_stop(drain_timeout=5)
        await asyncio.wait_for(run, 30)
        assert store.queued == 0
        [owed] = store.owed_notices()
        assert owed.address == "nobody@example.org"
    finally:
        store.close()
    again = NoticesFail(path)
    again.failing = False
    try:
        worker = Worker(loopback_config(dns_server, mx.port, bounce_notices=True), again)
        run = asyncio.create_task(worker.run())
        # Until the notice went, not merely was queued: a stop gives back what is not on
        # the wire yet (it would wait for the next worker).
        for _ in range(500):
            if again.queued and mx.messages:
                break
            await asyncio.sleep(0.02)
        worker.request_stop(drain_timeout=5)
        await asyncio.wait_for(run, 30)
        assert again.queued == 1
        assert again.owed_notices() == []
    finally:
        again.close()
    [notice] = mx.wait_for_messages(1)
    report = parse_report(notice.content)
    assert report is not None and [r.final_recipient for r in report.recipients] == [
        "nobody@example.org"
    ]


def test_a_notice_the_store_refuses_for_good_does_not_hold_the_others(
    dns_server: LoopbackDNS, mx: Any, results: Results, caplog: pytest.LogCaptureFixture
) -> None:
    """Notices a store failure left unqueued are asked for again with the next ones: one
    holding a value the store cannot take (StoreRefusedData: asking again cannot help)
    made the store refuse every later batch too, and no notice went out again."""

    class RefusesOneNotice(MemoryStore):
        refused = 0

        def queue_notices(self, owed: Any, notices: Any, *, now: Any) -> list[str]:
            if any(b"Subject: poison" in m.data for ms in notices.values() for m in ms):
                self.refused += 1
                raise StoreRefusedData("a value the store cannot hold")
            return super().queue_notices(owed, notices, now=now)

    store = RefusesOneNotice()
    config = loopback_config(dns_server, mx.port, bounce_notices=True, poll_interval=0.2)
    with (
        caplog.at_level(logging.ERROR, logger="mailstrom"),
        Mailstrom(config, store=store, on_result=results) as ms,
    ):
        ms.send_email(
            Email(from_="app@sender.test", to=["nobody@example.org"], subject="poison", text="x")
        )
        results.wait_count(1)
        ms.send_email(
            Email(from_="app@sender.test", to=["nobody@example.org"], subject="fine", text="x")
        )
        results.wait_count(3)  # two failures, and the notice of the second
    states = sorted((r.address, r.state.value) for r in results.all)
    assert states == [
        ("app@sender.test", "delivered"),
        ("nobody@example.org", "failed"),
        ("nobody@example.org", "failed"),
    ]
    assert any("bounce message to app@sender.test dropped" in r.message for r in caplog.records)


def test_a_notice_under_dkim_required_comes_from_a_domain_a_key_signs(
    mailstrom: Make, mx: Any, results: Results, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: the notice was from MAILER-DAEMON at the host's name, which no key of the
    application's aligns with (a hosting provider's name): with ``dkim.required`` it was
    refused (NoDKIMKey), logged and dropped, for every failure. Of the names it may be
    from, one a key signs is taken first."""
    from mailstrom.dkim import DKIMConfig
    from tests.support.dkim import ED25519, key

    dkim = DKIMConfig(keys=(key("sender.test", "ed", ED25519),), required=True)
    ms = mailstrom(bounce_notices=True, helo_name="mta.hosting.test", dkim=dkim)
    ms.send_email(hello("nobody@example.org"))
    results.wait_count(2)  # nobody failed, the notice delivered
    assert "no bounce message" not in caplog.text
    [notice] = mx.wait_for_messages(1)
    assert b"\r\nFrom: Mail Delivery System <MAILER-DAEMON@sender.test>\r\n" in notice.content
    assert notice.content.startswith(b"DKIM-Signature: ") and b"d=sender.test;" in notice.content
    report = parse_report(notice.content)
    assert report is not None and report.reporting_mta == "mta.hosting.test"


class CountingWrites(MemoryStore):
    """Counts its writes that record a failure."""

    writes = 0

    def record(self, results: Any) -> Any:
        if any(r.state is RecipientState.FAILED for r in results):
            self.writes += 1
        return super().record(results)


def test_one_notice_for_a_message_failing_in_two_domains(
    dns_server: LoopbackDNS, mx: Any, results: Results
) -> None:
    """A message whose recipients fail in two destination domains (two transactions,
    recorded in two writes) got a notice per write: its sender got two bounces for one
    message. The failures are marked in the store with their record, and one notice
    per message is queued from the marks once no recipient of it is still on its way,
    as Postfix bounces once per queue file."""
    dns_server.mx("example.net", [(10, "mx.test")])
    mx.rcpt_replies["gone@example.net"] = NO_SUCH_USER
    mx.data_delay = 0.5  # example.net's results come after example.org's are written
    store = CountingWrites()
    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    with Mailstrom(config, store=store, on_result=results) as ms:
        ms.send_email(hello("nobody@example.org", "gone@example.net", "ann@example.net"))
        results.wait_count(4)  # two failed, ann delivered, one notice delivered
        notice = next(m for m in mx.wait_for_messages(2) if m.rcpt_tos == ("app@sender.test",))
        assert store.writes == 2
        report = parse_report(notice.content)
        assert report is not None
        assert sorted(r.final_recipient for r in report.recipients) == [
            "gone@example.net",
            "nobody@example.org",
        ]
        assert len(ms.query_recent()) == 2  # the message, and one notice


async def test_a_notice_whose_postgres_call_a_stop_cut_off_is_queued_later(
    dns_server: LoopbackDNS, mx: Any, postgres_url: str
) -> None:
    """The worker was stopped at once while the notice's write ran in its thread: the
    stop left that call behind, and the store's close ended it with an error nobody
    heard. The notice vanished without a log line. Its mark, written with the failure's
    record, was rolled back with it: a worker started later queues the notice."""
    from mailstrom.stores.postgres import PostgresStore

    class CutOff(PostgresStore):
        cutting = True
        entered = threading.Event()
        release = threading.Event()

        def _insert(self, conn: Any, messages: Any, ids: Any, *, now: Any, held: bool) -> None:
            if self.cutting and any(m.envelope_from == "" for m in messages):
                self.entered.set()
                self.release.wait(30)
                self.cutting = False
                raise StoreError("PostgreSQL store is closed")
            super()._insert(conn, messages, ids, now=now, held=held)

    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    store = CutOff(postgres_url)
    try:
        store.enqueue(
            prepare(hello("nobody@example.org"), envelope_from="app@sender.test"),
            now=datetime.now(UTC),
        )
        worker = Worker(config, store)
        run = asyncio.create_task(worker.run())
        assert await asyncio.to_thread(store.entered.wait, 30)
        # A stop, then a second signal's stop at once: the call in its thread is left
        # behind, and the store's close cuts it off.
        run.cancel()
        await asyncio.sleep(0.2)
        run.cancel()
        await asyncio.sleep(0.2)
        store.release.set()
        await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 30)
    finally:
        store.close()
    with PostgresStore(postgres_url) as again:
        worker = Worker(config, again)
        run = asyncio.create_task(worker.run())
        try:
            [notice] = await asyncio.to_thread(mx.wait_for_messages, 1)
        finally:
            worker.request_stop(drain_timeout=5)
            await asyncio.wait_for(run, 30)
        report = parse_report(notice.content)
        assert report is not None
        assert [r.final_recipient for r in report.recipients] == ["nobody@example.org"]
        assert [m.envelope_from for m in again.recent()].count("") == 1


VERP_CLEANUP = 15
"""The SQLite migration that drops what older mailstroms put on the suppression list."""


def test_a_verp_entry_an_older_mailstrom_made_suppresses_no_later_notice(
    dns_server: LoopbackDNS, mx: Any, results: Results, tmp_path: Path
) -> None:
    """Older mailstroms put a VERP address on the suppression list when a notice to it
    was refused (or a report came about one), with no end. A recipient's delay warning
    and its failure notice go to the same VERP address, so such an entry, kept after the
    upgrade, failed the failure notice as "suppressed" unsent. The upgrade drops those
    entries (an operator's own stays)."""
    import sqlite3
    from contextlib import closing
    from datetime import timedelta

    from mailstrom.stores.sqlite_schema import _statements, migrations, to_us
    from tests.support.delivery import FakeClock

    clock = FakeClock()
    db = tmp_path / "queue.db"
    mx.rcpt_replies["busy@example.org"] = "451 4.2.1 Mailbox busy"
    config = loopback_config(
        dns_server, mx.port, bounce_notices=True, delay_warning=timedelta(hours=1)
    )
    template = "bounces+{token}@sender.test"
    with Mailstrom(config, store=SQLiteStore(db), clock=clock, on_result=results) as ms:
        mid = ms.send_email(hello("busy@example.org"), envelope_from=template)
        results.wait_count(1)
        clock.advance(timedelta(hours=2))
        ms.wake()
        results.wait_count(3)  # deferred past the hour, and the warning delivered
        [warning] = mx.wait_for_messages(1)
        address = verp_address(template, mid, "busy@example.org", key=ms.store.verp_key())
    assert warning.rcpt_tos == (address,)
    # What an older mailstrom left had its server refused that warning: the VERP address
    # suppressed for good; an operator's entry for another VERP address and a bounce's
    # for an address whose local part only looks hex-ish stay.
    kept_manual = address.replace("bounces+", "hand+")
    kept_plain = "cafe-0190f3a2c4e1b7d08a4f2c6e9b1d3f57@sender.test"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO suppressions (target, source, reply, created_at) VALUES (?, ?, ?, ?)",
            [
                (address.lower(), "hard_bounce", NO_SUCH_USER, to_us(clock())),
                (kept_manual.lower(), "manual", "", to_us(clock())),
                (kept_plain, "hard_bounce", NO_SUCH_USER, to_us(clock())),
            ],
        )
        # The upgrade's cleanup, as opening an older database runs it (the contract test
        # test_verp_suppression_upgrade opens one): run here by itself, since winding the
        # schema version back would run again later migrations that are not repeatable.
        [script] = [script for number, script in migrations() if number == VERP_CLEANUP]
        for statement in _statements(script):
            conn.execute(statement)
    mx.rcpt_replies["busy@example.org"] = "550 5.2.1 Mailbox disabled"
    clock.advance(timedelta(hours=3))
    with Mailstrom(config, store=SQLiteStore(db), clock=clock, on_result=results) as ms:
        ms.wake()
        results.wait_count(5)  # busy failed for good, and the notice about it
        states = {r.address: (r.state, r.attempt.reason) for r in results.all[3:]}
        assert states[address][0] is RecipientState.DELIVERED, states[address]
        targets = {e.target for e in ms.store.list_suppressions()}
    assert targets == {"busy@example.org", kept_manual.lower(), kept_plain}
    assert len(mx.wait_for_messages(2)) == 2


class _Held(bytes):
    """Message data as a store hands it out, counting the copies alive at once."""

    alive = 0
    most = 0

    def __new__(cls, data: bytes) -> _Held:
        held = super().__new__(cls, data)
        _Held.alive += 1
        _Held.most = max(_Held.most, _Held.alive)
        return held

    def __del__(self) -> None:
        _Held.alive -= 1


async def test_notices_owed_by_many_messages_hold_one_message_at_a_time(
    dns_server: LoopbackDNS, mx: Any, tmp_path: Path
) -> None:
    """A look for notices owed finds up to MAX_OWED_MESSAGES (100) messages, each up to
    ``max_message_size`` (35 MiB): it read every one of them whole before making any
    notice, 3.5 GB held at once past ``max_leased_bytes``, though a notice keeps at most
    MAX_RETURNED octets of its message. Each message is read, its notice made and its
    data let go before the next is read."""
    from email import message_from_bytes, policy

    class Owing(SQLiteStore):
        failing = True
        queued = 0

        def queue_notices(self, owed: Any, notices: Any, *, now: Any) -> list[str]:
            if self.failing:
                raise StoreLocked("database is locked (another process holds its lock)")
            ids = super().queue_notices(owed, notices, now=now)
            self.queued += len(ids)
            return ids

        def message_data(self, message_id: str) -> bytes:
            data = super().message_data(message_id)
            return data if self.failing else _Held(data)

    path = tmp_path / "q.db"
    config = loopback_config(dns_server, mx.port, bounce_notices=True)
    store = Owing(path)
    try:
        for _ in range(3):
            message = prepare(hello("nobody@example.org"), envelope_from="app@sender.test")
            store.enqueue(message, now=datetime.now(UTC))
        worker = Worker(config, store)
        run = asyncio.create_task(worker.run())
        for _ in range(500):  # each failure marked "notice owed", no notice queued
            if len({o.message_id for o in store.owed_notices()}) == 3:
                break
            await asyncio.sleep(0.02)
        worker.request_stop(drain_timeout=5)
        await asyncio.wait_for(run, 30)
        assert len({o.message_id for o in store.owed_notices()}) == 3
    finally:
        store.close()
    again = Owing(path)
    again.failing = False
    try:
        worker = Worker(config, again)
        run = asyncio.create_task(worker.run())
        try:
            notices = await asyncio.to_thread(mx.wait_for_messages, 3)
        finally:
            worker.request_stop(drain_timeout=5)
            await asyncio.wait_for(run, 30)
        assert again.queued == 3 and again.owed_notices() == []
    finally:
        again.close()
    assert _Held.most == 1
    for notice in notices:
        assert notice.mail_from == "<>" and notice.rcpt_tos == ("app@sender.test",)
        parsed = message_from_bytes(notice.content, policy=policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        _, status, returned = parsed.iter_parts()
        per_message, per_recipient = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; client.test"
        assert per_recipient["Final-Recipient"] == "rfc822; nobody@example.org"
        assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
        assert per_recipient["Diagnostic-Code"] == f"smtp; {NO_SUCH_USER}"
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"Hello" not in notice.content


def test_a_notice_about_many_recipients_is_not_held_to_the_message_size_limit(
    mailstrom: Make, mx: Any, results: Results
) -> None:
    """The notice's report grows with each recipient it names (a line of the readable part
    and a block of the delivery report, each holding the server's reply): one about 300
    recipients of a 64 KiB-limit queue, refused with a 500-character reply each, was
    about 450 KB, refused by prepare() as past the message size limit, and no notice was
    sent at all."""
    reply = "550 5.1.1 " + "mailbox unknown; " * 29
    addresses = [f"user{i}@example.org" for i in range(300)]
    for address in addresses:
        mx.rcpt_replies[address] = reply
    ms = mailstrom(bounce_notices=True, max_message_size=64 * 1024)
    ms.send_email(hello(*addresses))
    results.wait_count(301)  # 300 failures, then the notice delivered
    [notice] = mx.wait_for_messages(1)
    assert notice.rcpt_tos == ("app@sender.test",)
    report = parse_report(notice.content)
    assert report is not None and len(report.recipients) == 300
    assert len(notice.content) > 64 * 1024 * 4 // 3 + 64 * 1024  # past the old bound
