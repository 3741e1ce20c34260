"""The reason class the worker gives each result (runtime/outcomes.py): from the reply that
decided it, or from the error when there was none; never for an accepted delivery, and
never changing the outcome."""

from __future__ import annotations

import errno
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.config import Config
from mailstrom.errors import (
    DeliveryError,
    LocalResourceShortage,
    PermanentFailure,
    SMTPConnectError,
    SMTPProtocolError,
    SMTPTimeout,
    TemporaryFailure,
    TLSRequiredError,
)
from mailstrom.policy.reasons import advice_for
from mailstrom.policy.retry import RetryPolicy
from mailstrom.runtime.connection import TLSHandshakeError, TLSVerifyError
from mailstrom.runtime.outcomes import (
    Outcomes,
    Where,
    error_reason,
    over_recipient_limit,
    recipients_taken,
)
from mailstrom.runtime.transactions import TransactionResult
from mailstrom.status import AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores.base import LeasedRecipient, WorkItem

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
OK = SMTPReply(code=250, enhanced="2.0.0", text="OK")
GO = SMTPReply(code=354, text="go ahead")


def reply(line: str) -> SMTPReply:
    code, enhanced, text = line.split(" ", 2)
    return SMTPReply(code=int(code), enhanced=enhanced, text=text)


def item(*addresses: str) -> WorkItem:
    return WorkItem(
        message_id="m1",
        lease_token="t1",
        domain="example.org",
        envelope_from="app@example.com",
        recipients=tuple(
            LeasedRecipient(address=a, attempts=0, first_attempt_at=None, created_at=NOW)
            for a in addresses
        ),
        data=b"Subject: x\r\n\r\nx\r\n",
        smtputf8=False,
        eightbit=False,
    )


@pytest.fixture
def outcomes() -> Outcomes:
    return Outcomes(Config(helo_name="client.test"), clock=lambda: NOW, rng=random.Random(1))


def test_per_recipient_replies_each_get_their_class(outcomes: Outcomes) -> None:
    work = item("ok@example.org", "grey@example.org", "gone@example.org")
    result = TransactionResult(
        mail=OK,
        rcpt=(
            ("ok@example.org", OK),
            ("grey@example.org", reply("451 4.7.1 Greylisted, come back later")),
            ("gone@example.org", reply("550 5.1.1 No such user")),
        ),
        data=GO,
        final=OK,
    )
    got = {
        r.address: r
        for r in outcomes.from_transaction(work, result, time.monotonic(), Where(host="mx"))
    }
    assert got["ok@example.org"].attempt.reason_class is None
    assert got["ok@example.org"].state is RecipientState.DELIVERED
    assert got["grey@example.org"].attempt.reason_class is ReasonClass.GREYLISTED
    assert got["grey@example.org"].state is RecipientState.DEFERRED
    assert got["gone@example.org"].attempt.reason_class is ReasonClass.MAILBOX
    assert got["gone@example.org"].state is RecipientState.FAILED


def test_a_refused_mail_command_or_content_classifies_every_recipient(
    outcomes: Outcomes,
) -> None:
    work = item("a@example.org", "b@example.org")
    refused = reply("421 4.7.0 [TSS04] Messages from 192.0.2.1 deferred for now")
    mail = TransactionResult(mail=refused, rcpt=(), data=None, final=None)
    results = outcomes.from_transaction(work, mail, time.monotonic(), Where())
    assert [r.attempt.reason_class for r in results] == [ReasonClass.RATE_LIMITED] * 2
    content = TransactionResult(
        mail=OK,
        rcpt=(("a@example.org", OK), ("b@example.org", OK)),
        data=GO,
        final=reply("550 5.7.26 Unauthenticated mail refused - gsmtp"),
    )
    results = outcomes.from_transaction(work, content, time.monotonic(), Where())
    assert [r.attempt.reason_class for r in results] == [ReasonClass.AUTHENTICATION] * 2
    assert [r.attempt.outcome for r in results] == [AttemptOutcome.PERMANENT] * 2


def test_the_class_never_changes_the_outcome(outcomes: Outcomes) -> None:
    # 552 to RCPT stays temporary (RFC 5321 §4.5.3.1.10) whatever its class says.
    work = item("a@example.org")
    result = TransactionResult(
        mail=OK,
        rcpt=(("a@example.org", reply("552 5.2.2 Mailbox full")),),
        data=None,
        final=None,
    )
    [r] = outcomes.from_transaction(work, result, time.monotonic(), Where())
    assert r.attempt.outcome is AttemptOutcome.TEMPORARY
    assert r.attempt.reason_class is ReasonClass.MAILBOX


def test_an_uncertain_attempt_is_a_connection_failure(outcomes: Outcomes) -> None:
    work = item("a@example.org")
    result = TransactionResult(
        mail=OK, rcpt=(("a@example.org", OK),), data=GO, final=None, uncertain=True
    )
    [r] = outcomes.from_transaction(work, result, time.monotonic(), Where())
    assert r.attempt.uncertain
    assert r.attempt.reason_class is ReasonClass.CONNECTION


def test_an_uncertain_attempt_says_the_reply_timed_out(outcomes: Outcomes) -> None:
    """A server that kept the final dot's reply past ``timeouts.data_end`` did not drop
    the connection: the attempt says it timed out (and how long was waited), where it
    said "connection lost" as for a peer that hung up."""
    work = item("a@example.org")
    cause = SMTPTimeout("mx.example.org did not reply to the end of data within 600s")
    result = TransactionResult(
        mail=OK,
        rcpt=(("a@example.org", OK),),
        data=GO,
        final=None,
        uncertain=True,
        cause=cause,
    )
    [r] = outcomes.from_transaction(work, result, time.monotonic(), Where())
    assert r.attempt.uncertain
    assert r.attempt.reason_class is ReasonClass.CONNECTION
    assert r.attempt.error is not None
    assert "connection lost" not in r.attempt.error
    assert "did not reply to the end of data within 600s" in r.attempt.error
    assert r.attempt.error.endswith("delivery uncertain")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TLSHandshakeError("handshake failed"), ReasonClass.TLS),
        (TLSVerifyError("certificate not accepted"), ReasonClass.TLS),
        (TLSRequiredError("mx does not offer STARTTLS"), ReasonClass.TLS),
        (
            TLSRequiredError("mx refused STARTTLS", code=454, enhanced="4.7.0"),
            ReasonClass.TLS,
        ),
        (SMTPTimeout("connecting timed out"), ReasonClass.CONNECTION),
        (SMTPConnectError("cannot connect: Connection refused"), ReasonClass.CONNECTION),
        (SMTPProtocolError("malformed reply line"), ReasonClass.PROTOCOL),
        (TemporaryFailure("DNS lookup timed out", enhanced="4.4.3"), ReasonClass.DNS),
        (PermanentFailure("domain does not exist (NXDOMAIN)", enhanced="5.1.2"), ReasonClass.DNS),
        (
            PermanentFailure("accepts no mail (null MX)", code=556, enhanced="5.1.10"),
            ReasonClass.ROUTING,
        ),
        (TemporaryFailure("no MX host has an address", enhanced="4.4.4"), ReasonClass.ROUTING),
        (
            PermanentFailure("message size exceeds the limit", code=552, enhanced="5.3.4"),
            ReasonClass.CONTENT,
        ),
        (
            TemporaryFailure("mx refused authentication: 535 5.7.8 No", code=535, enhanced="5.7.8"),
            ReasonClass.AUTHENTICATION,
        ),
        (TemporaryFailure("internal error: KeyError: 'x'"), ReasonClass.OTHER),
    ],
)
def test_failures_without_a_transaction(
    outcomes: Outcomes, error: DeliveryError, expected: ReasonClass
) -> None:
    [r] = outcomes.from_error(item("a@example.org"), error, time.monotonic(), Where())
    assert r.attempt.reason_class is expected
    assert error_reason(error, r.attempt.reply) is expected


def test_a_local_resource_shortage_is_told_as_this_hosts_not_the_receivers(
    outcomes: Outcomes,
) -> None:
    """4.3.0 without a reply was classed by its subject (X.3: "mail system status") as
    ``system``, "the receiving system has trouble of its own": no receiving system was
    asked; the shortage is this host's, and so is what to do about it."""
    shortage = LocalResourceShortage(
        "connecting to 192.0.2.1", OSError(errno.EMFILE, "Too many open files"), host="mx"
    )
    [r] = outcomes.from_error(item("a@example.org"), shortage, time.monotonic(), Where())
    assert r.attempt.reason_class is not ReasonClass.SYSTEM
    assert r.attempt.reason_class is ReasonClass("local")
    advice = advice_for(r.attempt)
    assert advice is not None
    assert "this host" in advice.meaning and "receiving" not in advice.meaning
    assert "ulimit -n" in advice.action


def _tried(attempts: int, *, queued: datetime = NOW) -> WorkItem:
    """An item of one recipient ``attempts`` attempts into its retries."""
    work = item("a@example.org")
    (r,) = work.recipients
    return replace(work, recipients=(replace(r, attempts=attempts, created_at=queued),))


SHORT_RETRIES = RetryPolicy(
    min_delay=timedelta(minutes=1), max_delay=timedelta(hours=1), jitter=0.0, max_attempts=3
)


def test_a_local_resource_shortage_spends_no_attempt_and_comes_back_soon() -> None:
    """Counted, a host out of file descriptors spent its recipients' ``max_attempts`` on
    its own trouble (this one, at 2 of 3, failed for good), and each deferral grew the
    destination's backoff. No server was asked: no attempt, due again after
    ``min_delay``; a real failure at that point still ends it."""
    config = Config(helo_name="client.test", retry=SHORT_RETRIES)
    outcomes = Outcomes(config, clock=lambda: NOW, rng=random.Random(1))
    shortage = LocalResourceShortage(
        "connecting to 192.0.2.1", OSError(errno.EMFILE, "Too many open files"), host="mx"
    )
    [r] = outcomes.from_error(_tried(2), shortage, time.monotonic(), Where(host="mx"))
    assert (r.state, r.attempted) == (RecipientState.DEFERRED, False)
    assert r.next_attempt_at == NOW + timedelta(minutes=1)
    assert r.attempt.error is not None and r.attempt.error.startswith("local resource")
    [deep] = outcomes.from_error(_tried(1), shortage, time.monotonic(), Where())
    assert deep.next_attempt_at == NOW + timedelta(minutes=1)  # not the 2nd retry's 2 min
    refused = SMTPConnectError("cannot connect: Connection refused")
    [real] = outcomes.from_error(_tried(2), refused, time.monotonic(), Where())
    assert (real.state, real.attempted) == (RecipientState.FAILED, True)


def test_a_local_resource_shortage_still_ends_at_max_age() -> None:
    """``retry.max_age`` is what ends a recipient this host could never try."""
    policy = replace(SHORT_RETRIES, max_age=timedelta(hours=2), max_attempts=None)
    outcomes = Outcomes(
        Config(helo_name="client.test", retry=policy), clock=lambda: NOW, rng=random.Random(1)
    )
    shortage = LocalResourceShortage("DNS lookup of a.example MX", OSError(errno.ENOBUFS, "x"))
    old = _tried(0, queued=NOW - timedelta(hours=2))
    [r] = outcomes.from_error(old, shortage, time.monotonic(), Where())
    assert (r.state, r.attempted) == (RecipientState.FAILED, False)
    assert r.attempt.reason_class is ReasonClass.LOCAL
    near = _tried(0, queued=NOW - timedelta(hours=2) + timedelta(seconds=90))
    [r] = outcomes.from_error(near, shortage, time.monotonic(), Where())
    assert r.state is RecipientState.DEFERRED
    assert r.next_attempt_at == NOW + timedelta(minutes=1)


def _rcpts(*replies: SMTPReply) -> TransactionResult:
    return TransactionResult(
        mail=OK,
        rcpt=tuple((f"u{i}@example.org", r) for i, r in enumerate(replies)),
        data=None,
        final=None,
    )


@pytest.mark.parametrize(
    ("refusal", "split"),
    [
        (SMTPReply(code=452, enhanced="4.5.3", text="Too many recipients"), True),
        (SMTPReply(code=452, text="Too many recipients"), True),  # no enhanced code
        (SMTPReply(code=552, enhanced="5.5.3", text="Too many recipients"), True),  # older
        # RFC 5321 §4.5.3.1.10: RFC 821 listed 552 for it, and a server without enhanced
        # codes says no more; a 552 to RCPT is then read as 452.
        (SMTPReply(code=552, text="Too many recipients"), True),
        (SMTPReply(code=452, enhanced="4.2.2", text="Mailbox full"), False),
        (SMTPReply(code=452, enhanced="4.3.1", text="Out of memory"), False),
        (SMTPReply(code=450, enhanced="4.1.5", text="Try later"), False),
    ],
)
def test_only_a_refusal_for_the_recipient_limit_goes_in_a_later_transaction(
    refusal: SMTPReply, split: bool
) -> None:
    over = over_recipient_limit(_rcpts(OK, refusal, refusal))
    assert over == ({"u1@example.org", "u2@example.org"} if split else set())


def test_a_limit_refusal_with_nothing_accepted_is_an_ordinary_refusal() -> None:
    limit = SMTPReply(code=452, enhanced="4.5.3", text="Too many recipients")
    assert over_recipient_limit(_rcpts(limit, limit)) == set()
    assert over_recipient_limit(_rcpts(limit)) == set()


def test_the_limit_a_server_showed_is_what_it_took_before_refusing_the_rest() -> None:
    limit = SMTPReply(code=452, enhanced="4.5.3", text="Too many recipients")
    unknown = SMTPReply(code=550, enhanced="5.1.1", text="No such user")
    bare = SMTPReply(code=552, text="Mailbox full")
    assert recipients_taken(_rcpts(OK, unknown, OK, limit, limit)) == 2
    assert recipients_taken(_rcpts(OK, limit)) == 1
    # A bare 552 (a full mailbox, say) with an acceptance after it is no limit: the
    # recipient goes in a later transaction, but later ones are not cut to one.
    assert recipients_taken(_rcpts(OK, bare, OK)) is None
    assert recipients_taken(_rcpts(limit, OK)) is None
    assert recipients_taken(_rcpts(OK, OK)) is None


def test_a_bare_452_or_552_last_shows_no_recipient_limit() -> None:
    # Both are also a full disk or mailbox (RFC 5321 §4.2.3): the refused recipient goes
    # in a later transaction, but only "too many recipients" (X.5.3) caps later ones.
    storage = SMTPReply(code=452, text="Insufficient system storage")
    full = SMTPReply(code=552, text="Mailbox full")
    limit = SMTPReply(code=452, enhanced="4.5.3", text="Too many recipients")
    assert over_recipient_limit(_rcpts(OK, storage)) == {"u1@example.org"}
    assert recipients_taken(_rcpts(OK, storage)) is None
    assert recipients_taken(_rcpts(OK, OK, full, full)) is None
    assert recipients_taken(_rcpts(OK, storage, OK, limit)) == 2


@pytest.mark.parametrize(
    ("notify", "offered", "uncertain", "owed"),
    [
        (("SUCCESS",), False, False, True),  # the server cannot be asked: ours to report
        (("SUCCESS", "FAILURE"), False, False, True),
        (("SUCCESS",), True, False, False),  # NOTIFY went with RCPT: the server reports
        (("FAILURE",), False, False, False),  # no report of a delivery asked for
        ((), False, False, False),  # left to the server: failures only (RFC 3461 §4.1)
        (("SUCCESS",), False, True, False),  # no reply to the dot: nothing known to report
    ],
)
def test_a_delivery_owes_a_relayed_notice_only_for_success_to_a_server_without_dsn(
    outcomes: Outcomes, notify: tuple[str, ...], offered: bool, uncertain: bool, owed: bool
) -> None:
    from dataclasses import replace

    from mailstrom.message.dsn import DSN

    work = replace(item("ann@example.org", "bob@example.org"), dsn=DSN(notify=notify))
    result = TransactionResult(
        mail=OK,
        rcpt=(
            ("ann@example.org", OK),
            ("bob@example.org", reply("550 5.1.1 No such user")),
        ),
        data=GO,
        final=None if uncertain else OK,
        uncertain=uncertain,
    )
    where = Where(host="mx", dsn=offered)
    got = {r.address: r for r in outcomes.from_transaction(work, result, time.monotonic(), where)}
    assert got["ann@example.org"].relayed is owed
    assert got["bob@example.org"].relayed is False  # refused: its failure is reported
