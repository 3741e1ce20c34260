"""Contract: recording outcomes updates state, counts and history exactly."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from mailstrom.errors import InvalidArgument, StoreRefusedData
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores import RecipientResult, Store
from mailstrom.stores.base import MAX_HISTORY, MAX_REPLY_TEXT

from .support import (
    LEASE_FOR,
    NOW,
    SECOND,
    attempt,
    lease_all,
    leased_addresses,
    message,
    results_for,
)


def test_record_delivered_round_trips_the_attempt_exactly(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    at = NOW + 3 * SECOND
    done = attempt(AttemptOutcome.DELIVERED, at=at, uncertain=True)
    result = RecipientResult(
        message_id=mid,
        address="a@example.org",
        state=RecipientState.DELIVERED,
        attempt=done,
        lease_token=lease.token,
    )
    assert len(store.record([result])) == 1

    st = store.status(mid)
    assert st.state is RecipientState.DELIVERED
    assert st.is_final
    (r,) = st.recipients
    assert r.state is RecipientState.DELIVERED
    assert r.attempts == 1
    assert r.reply == done.reply
    assert r.error is None
    assert r.mx_host == "mx1.example.org"
    assert r.ip == "127.0.0.7"
    assert r.tls is True
    assert r.uncertain is True
    assert r.first_attempt_at == at
    assert r.last_attempt_at == at
    assert r.next_attempt_at is None
    assert r.history == (done,)
    assert r.history[0].duration == 0.123456789
    assert r.history[0].reply is not None
    assert r.history[0].reply.text == "line one\nline two"


def test_deferred_then_delivered_keeps_history_in_order(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    retry_at = NOW + 60 * SECOND
    first = lease_all(store)
    assert (
        len(store.record(results_for(first, RecipientState.DEFERRED, next_attempt_at=retry_at)))
        == 2
    )

    st = store.status(mid)
    assert st.state is RecipientState.DEFERRED
    for r in st.recipients:
        assert r.state is RecipientState.DEFERRED
        assert r.attempts == 1
        assert r.next_attempt_at == retry_at
        assert r.reply is not None
        assert r.reply.code == 451
        assert r.reason.startswith("451 4.0.0")

    second = lease_all(store, now=retry_at)
    later = retry_at + SECOND
    store.record(results_for(second, RecipientState.DELIVERED, at=later, only=["a@example.org"]))
    st = store.status(mid)
    # One still deferred → the message is still deferred.
    assert st.state is RecipientState.DEFERRED
    a = st.recipient("a@example.org")
    assert a.state is RecipientState.DELIVERED
    assert a.attempts == 2
    assert a.first_attempt_at == NOW
    assert a.last_attempt_at == later
    assert [h.outcome for h in a.history] == [AttemptOutcome.TEMPORARY, AttemptOutcome.DELIVERED]
    assert [h.at for h in a.history] == [NOW, later]
    assert a.reply is not None
    assert a.reply.code == 250


def test_failed_with_local_error_and_no_reply(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    failed = attempt(AttemptOutcome.PERMANENT, code=None, error="null MX: domain accepts no mail")
    store.record(
        [
            RecipientResult(
                message_id=mid,
                address="a@example.org",
                state=RecipientState.FAILED,
                attempt=failed,
                lease_token=lease.token,
            )
        ],
    )
    (r,) = store.status(mid).recipients
    assert r.state is RecipientState.FAILED
    assert r.reply is None
    assert r.error == "null MX: domain accepts no mail"
    assert r.reason == "null MX: domain accepts no mail"
    assert r.history == (failed,)


def test_reason_class_round_trips_per_attempt_and_for_the_recipient(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    retry_at = NOW + 60 * SECOND
    limited = attempt(AttemptOutcome.TEMPORARY, code=421, reason_class=ReasonClass.RATE_LIMITED)
    tls = attempt(
        AttemptOutcome.TEMPORARY,
        at=retry_at,
        code=None,
        error="TLS handshake with mx1.example.org failed",
        reason_class=ReasonClass.TLS,
    )
    delivered = attempt(AttemptOutcome.DELIVERED, at=retry_at + SECOND)

    def record(lease_now: datetime, address: str, done: Attempt, state: RecipientState) -> None:
        lease = lease_all(store, now=lease_now)
        [leased] = [r for item in lease.items for r in item.recipients if r.address == address]
        result = RecipientResult(
            message_id=mid,
            address=address,
            state=state,
            attempt=done,
            lease_token=lease.token,
            next_attempt_at=retry_at if state is RecipientState.DEFERRED else None,
            ref=leased.ref,
        )
        assert store.record([result]) == [result]
        store.release(lease)

    record(NOW, "a@example.org", limited, RecipientState.DEFERRED)
    st = store.status(mid)
    a = st.recipient("a@example.org")
    assert a.reason_class is ReasonClass.RATE_LIMITED
    assert a.history == (limited,)
    assert st.recipient("b@example.org").reason_class is None  # not attempted yet

    record(retry_at, "a@example.org", tls, RecipientState.DEFERRED)
    a = store.status(mid).recipient("a@example.org")
    assert a.reason_class is ReasonClass.TLS  # the latest attempt's
    assert [h.reason_class for h in a.history] == [ReasonClass.RATE_LIMITED, ReasonClass.TLS]

    record(retry_at + SECOND, "a@example.org", delivered, RecipientState.DELIVERED)
    a = store.status(mid).recipient("a@example.org")
    assert a.reason_class is None  # delivered: nothing to explain
    assert a.history == (limited, tls, delivered)
    # The listing (no history) carries the recipient's class too.
    [listed] = [m for m in store.recent() if m.id == mid]
    assert listed.recipient("b@example.org").reason_class is None
    assert listed.recipient("a@example.org").reason_class is None


def test_reason_class_of_every_kind_is_stored(store: Store) -> None:
    classes = list(ReasonClass)
    addresses = [f"{c.value}@example.org" for c in classes]
    mid = store.enqueue(message(*addresses), now=NOW)
    lease = lease_all(store)
    results = [
        RecipientResult(
            message_id=mid,
            address=f"{c.value}@example.org",
            state=RecipientState.FAILED,
            attempt=attempt(AttemptOutcome.PERMANENT, code=550, reason_class=c),
            lease_token=lease.token,
        )
        for c in classes
    ]
    assert len(store.record(results)) == len(classes)
    st = store.status(mid)
    for c in classes:
        r = st.recipient(f"{c.value}@example.org")
        assert r.reason_class is c
        assert [h.reason_class for h in r.history] == [c]


def test_message_state_is_derived_from_recipients(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    assert store.status(mid).state is RecipientState.QUEUED
    store.record(results_for(lease, RecipientState.FAILED, only=["b@example.org"]))
    assert store.status(mid).state is RecipientState.FAILED


def test_record_ignores_recipients_outside_the_lease(store: Store) -> None:
    leased = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    other = store.enqueue(message("b@example.org"), now=NOW)
    stray = RecipientResult(
        message_id=other,
        address="b@example.org",
        state=RecipientState.DELIVERED,
        attempt=attempt(),
        lease_token=lease.token,
    )
    assert len(store.record([*results_for(lease, RecipientState.DELIVERED), stray])) == 1
    assert store.status(leased).state is RecipientState.DELIVERED
    assert store.status(other).state is RecipientState.QUEUED
    assert len(store.record([])) == 0


def test_one_call_records_the_results_of_several_leases(store: Store) -> None:
    """The worker records everything that finished, whatever lease it came from, in one
    transaction; each result counts only under its own lease."""
    one = store.enqueue(message("a@example.org"), now=NOW)
    first = lease_all(store)
    two = store.enqueue(message("b@example.org"), now=NOW)
    second = lease_all(store)
    results = [
        *results_for(first, RecipientState.DELIVERED),
        *results_for(second, RecipientState.FAILED),
    ]
    crossed = [replace(results[0], lease_token=second.token)]
    assert store.record(crossed) == []
    assert store.record(results) == results
    assert store.status(one).state is RecipientState.DELIVERED
    assert store.status(two).state is RecipientState.FAILED


@pytest.mark.parametrize("stale_first", [True, False], ids=["stale first", "current first"])
def test_a_stale_result_beside_the_current_one_does_not_hide_it(
    store: Store, stale_first: bool
) -> None:
    """One call holds a result of a lease since taken over and the result of the lease
    that holds the recipient now: the current one is recorded, in whatever order; the
    stale one is not, nor a repeat of the current one."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    old = lease_all(store)
    later = NOW + LEASE_FOR + SECOND
    new = lease_all(store, now=later)  # the first lease expired: taken over
    assert new.token != old.token
    stale = results_for(old, RecipientState.FAILED, at=later)
    current = results_for(new, RecipientState.DELIVERED, at=later)
    batch = [*stale, *current, *current] if stale_first else [*current, *stale, *current]
    assert store.record(batch) == current
    recipient = store.status(mid).recipients[0]
    assert recipient.state is RecipientState.DELIVERED
    assert recipient.attempts == 1 and len(recipient.history) == 1


def test_reply_text_kept_is_bounded(store: Store) -> None:
    """Hardening #7: a reply of a megabyte is stored cut to 2,048 octets, error too."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    huge = "é" * (512 * 1024)
    long_attempt = replace(
        attempt(AttemptOutcome.TEMPORARY, code=451),
        reply=SMTPReply(code=451, enhanced="4.0.0", text=huge),
        error="x" * 100_000,
    )
    [result] = results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW)
    store.record([replace(result, attempt=long_attempt)])
    (r,) = store.status(mid).recipients
    assert r.reply is not None
    assert len(r.reply.text.encode()) <= MAX_REPLY_TEXT
    assert r.reply.text == huge[: MAX_REPLY_TEXT // 2]
    assert r.error is not None and len(r.error) == MAX_REPLY_TEXT
    [kept] = r.history
    assert kept.reply == r.reply


def test_a_nul_in_a_reply_or_an_error_is_recorded(store: Store) -> None:
    """PostgreSQL refuses NUL in text, and no UTF-8 driver encodes a lone surrogate (the
    worker died of the UnicodeEncodeError): a result carrying either (in a reply built by
    hand, or in an error's text) is recorded all the same, each as U+FFFD, in every
    store, so one result can never hold its worker up."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    odd = replace(
        attempt(AttemptOutcome.TEMPORARY, code=451),
        reply=SMTPReply(code=451, enhanced="4.0.0", text="try \x00later"),
        error="peer said \x00 of host \udcff",  # a surrogate no driver can encode
    )
    [result] = results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW)
    assert store.record([replace(result, attempt=odd)]) == [replace(result, attempt=odd)]
    (r,) = store.status(mid).recipients
    assert r.reply is not None and r.reply.text == "try \ufffdlater"
    assert r.error == "peer said \ufffd of host \ufffd"
    assert r.history[0].reply == r.reply


def test_every_detail_of_an_attempt_is_recorded_as_storable(store: Store) -> None:
    """The other texts of an attempt (MX host, IP address, TLS version, cipher, policy)
    and its numbers get the same care as the reply: NUL and lone surrogates become
    U+FFFD, a duration that is no finite number becomes 0 and a port that is no port is
    dropped. Before, PostgreSQL refused the NUL for good and SQLite the NaN (as a NULL)."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    odd = replace(
        attempt(AttemptOutcome.DELIVERED),
        mx_host="mx\x00.example.org",
        ip="127.0.0.1\udcff",
        tls_version="TLS\x00",
        tls_cipher="\udcff",
        tls_policy="none\x00",
        duration=float("nan"),
        port=2**40,
    )
    [result] = results_for(lease, RecipientState.DELIVERED)
    assert len(store.record([replace(result, attempt=odd)])) == 1
    [kept] = store.status(mid).recipients[0].history
    assert kept.mx_host == "mx\ufffd.example.org"
    assert kept.ip == "127.0.0.1\ufffd"
    assert kept.tls_version == "TLS\ufffd"
    assert kept.tls_cipher == "\ufffd"
    assert kept.tls_policy == "none\ufffd"
    assert kept.duration == 0.0
    assert kept.port is None


def test_a_value_the_store_refuses_changes_nothing(store: Store) -> None:
    """A value no column holds (a reply code past 64 bits) is refused with
    StoreRefusedData, a StoreError the worker answers by recording the result bare, and
    the refused write leaves the lease and the recipient as they were. The memory store
    holds any value."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    [result] = results_for(lease, RecipientState.DELIVERED)
    odd = replace(result.attempt, reply=SMTPReply(code=2**70, text="ok"))
    try:
        store.record([replace(result, attempt=odd)])
    except StoreRefusedData:
        assert store.status(mid).recipients[0].state is RecipientState.QUEUED
        assert store.record([result]) == [result]  # the lease still holds
    assert store.status(mid).recipients[0].state is RecipientState.DELIVERED


def test_history_kept_per_recipient_is_bounded(store: Store) -> None:
    """Hardening #7: the history keeps the newest attempts, the count keeps counting."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    total = MAX_HISTORY + 7
    for n in range(total):
        lease = lease_all(store, now=NOW + n * SECOND)
        store.record(
            results_for(
                lease,
                RecipientState.DEFERRED,
                at=NOW + n * SECOND,
                next_attempt_at=NOW + (n + 1) * SECOND,
            )
        )
    (r,) = store.status(mid).recipients
    assert r.attempts == total
    assert len(r.history) == MAX_HISTORY
    assert r.history[-1].at == NOW + (total - 1) * SECOND
    assert r.history[0].at == NOW + (total - MAX_HISTORY) * SECOND


def test_a_result_with_a_naive_time_is_refused_and_records_nothing(store: Store) -> None:
    """Was: the memory store kept a result's naive time (its attempt's or its next
    attempt's) as given, where the SQL stores refuse it: the next lease compared it with
    an aware ``now`` and raised TypeError, so that store leased nothing ever again."""
    store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    lease = lease_all(store)
    later = NOW + 60 * SECOND
    good = results_for(lease, RecipientState.DEFERRED, next_attempt_at=later)
    naive_next = replace(good[1], next_attempt_at=later.replace(tzinfo=None))
    naive_at = replace(good[1], attempt=replace(good[1].attempt, at=NOW.replace(tzinfo=None)))
    for bad in (naive_next, naive_at):
        with pytest.raises(InvalidArgument):
            store.record([good[0], bad])
    assert store.record(good) == good  # nothing was recorded, both are still leased
    relet = store.lease(now=later, limit=10, lease_for=LEASE_FOR)
    assert sorted(leased_addresses(relet)) == ["a@example.org", "b@example.org"]


def test_a_result_in_another_zone_is_shown_in_utc(store: Store) -> None:
    """Every time a store shows is in UTC: the memory store showed a result's times in
    the zone they were given in, where the SQL stores show them in UTC."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    lease = lease_all(store)
    east = timezone(timedelta(hours=5))
    (result,) = results_for(
        lease, RecipientState.DEFERRED, at=NOW.astimezone(east), next_attempt_at=NOW + 60 * SECOND
    )
    result = replace(result, next_attempt_at=(NOW + 60 * SECOND).astimezone(east))
    assert store.record([result]) == [result]
    (r,) = store.status(mid).recipients
    for when in (r.next_attempt_at, r.last_attempt_at, r.first_attempt_at, r.history[0].at):
        assert when is not None and when.utcoffset() == timedelta(0), when
    assert r.next_attempt_at == NOW + 60 * SECOND and r.history[0].at == NOW
