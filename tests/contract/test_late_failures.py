"""Contract: a recipient failed after the fact (a late bounce), finding messages by
their Message-ID header, and the key VERP tokens are made with."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailstrom.errors import InvalidArgument, UnknownMessage
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import LEASE_FOR, NOW, lease_all, message, results_for

LATER = NOW + timedelta(hours=2)


def late(error: str = "bounced after acceptance, reported by mx: 5.1.1 unknown user") -> Attempt:
    return Attempt(
        at=LATER,
        outcome=AttemptOutcome.PERMANENT,
        mx_host="mx.receiver.test",
        error=error,
        reason_class=ReasonClass.MAILBOX,
    )


def test_a_delivered_recipient_fails_late(store: Store) -> None:
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))

    assert store.fail_late(mid, "a@example.org", late())
    status = store.status(mid)
    a = status.recipient("a@example.org")
    assert a.state is RecipientState.FAILED
    assert a.reason == late().error
    assert a.reason_class is ReasonClass.MAILBOX
    assert a.attempts == 1  # a late bounce is no delivery attempt of ours
    assert [h.outcome for h in a.history] == [AttemptOutcome.DELIVERED, AttemptOutcome.PERMANENT]
    assert a.history[-1] == late()
    assert a.last_attempt_at == LATER and a.next_attempt_at is None
    assert status.recipient("b@example.org").state is RecipientState.DELIVERED
    assert status.state is RecipientState.FAILED
    # Failed already: nothing changes.
    assert not store.fail_late(mid, "a@example.org", late("again"))
    assert store.status(mid).recipient("a@example.org").reason == late().error


def test_a_late_failure_at_a_naive_time_is_refused_and_one_elsewhere_shown_in_utc(
    store: Store,
) -> None:
    """Was: the memory store kept the late attempt's time as given: a naive one, which
    the SQL stores refuse, made every later purge compare it with an aware time
    (TypeError), and one in another zone was shown back in that zone."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    with pytest.raises(InvalidArgument):
        store.fail_late(mid, "a@example.org", replace(late(), at=LATER.replace(tzinfo=None)))
    assert store.status(mid).state is RecipientState.DELIVERED
    east = timezone(timedelta(hours=5))
    assert store.fail_late(mid, "a@example.org", replace(late(), at=LATER.astimezone(east)))
    a = store.status(mid).recipient("a@example.org")
    for when in (a.last_attempt_at, a.finished_at, a.history[-1].at):
        assert when == LATER and when.utcoffset() == timedelta(0), when
    assert store.purge(finished_before=LATER + LEASE_FOR) == 1


@pytest.mark.parametrize(
    "when",
    [datetime(9500, 1, 1, tzinfo=UTC), datetime(1899, 12, 31, tzinfo=UTC)],
    ids=["far", "long-ago"],
)
def test_a_late_failure_at_a_time_no_store_reads_back_is_refused_alike(
    store: Store, when: datetime
) -> None:
    """Was: a late attempt past year 9000 (or before 1900) was refused by the memory
    store (InvalidArgument), kept by PostgreSQL, and written by SQLite into a history
    row it could not read again: the message's status raised UnreadableRow from then on.
    Every store refuses it, changing nothing, as it refuses such a time in a result."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    with pytest.raises(InvalidArgument, match=r"^attempt\.at: "):
        store.fail_late(mid, "a@example.org", replace(late(), at=when))
    a = store.status(mid).recipient("a@example.org")
    assert a.state is RecipientState.DELIVERED and len(a.history) == 1
    with pytest.raises(InvalidArgument, match=r"^attempt\.at: "):
        store.fail_late(mid, "nobody@example.org", replace(late(), at=when))


def test_the_late_attempt_joins_the_history_as_given(store: Store) -> None:
    """The history keeps the late attempt as it came, as it keeps a recorded one: SQLite
    dropped its TLS policy, PostgreSQL that and whether it was uncertain, where the
    memory store kept both."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    given = replace(
        late(),
        duration=1.5,
        ip="192.0.2.7",
        port=25,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_128_GCM_SHA256",
        tls_policy="mta-sts",
        uncertain=True,
    )
    assert store.fail_late(mid, "a@example.org", given)
    assert store.status(mid).recipient("a@example.org").history[-1] == given


def test_unknown_recipients_and_messages(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    assert not store.fail_late(mid, "nobody@example.org", late())
    with pytest.raises(UnknownMessage):
        store.fail_late("0" * 32, "a@example.org", late())


def test_only_a_delivered_recipient_fails_late(store: Store) -> None:
    # A bounce after acceptance cannot concern mail no server has accepted: a queued
    # recipient, one in delivery (leased) or one deferred stays as it is.
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    assert not store.fail_late(mid, "a@example.org", late())
    lease = lease_all(store)
    assert not store.fail_late(mid, "a@example.org", late())
    store.record(
        results_for(lease, RecipientState.DEFERRED, next_attempt_at=LATER, only=["a@example.org"])
    )
    assert not store.fail_late(mid, "a@example.org", late())
    a = store.status(mid).recipient("a@example.org")
    assert (a.state, a.attempts, len(a.history)) == (RecipientState.DEFERRED, 1, 1)
    assert a.error != late().error
    # The lease still holds b, and records it as usual.
    assert len(store.record(results_for(lease, RecipientState.DELIVERED, only=["b@example.org"])))
    assert store.status(mid).recipient("b@example.org").state is RecipientState.DELIVERED
    assert store.lease(now=LATER, limit=10, lease_for=LEASE_FOR) is not None


def test_the_status_says_which_recipients_are_leased(store: Store) -> None:
    """A leased recipient may have been accepted by a server already, its result not yet
    recorded: a bounce about it is early, not about mail nobody accepted. Was: the status
    showed it as queued or deferred like any other, and ``mailstrom bounce`` reported such
    a bounce as unmatched (exit 66, so the MTA returned it), losing the late failure."""
    mid = store.enqueue(message("a@example.org", "b@example.org"), now=NOW)
    assert [r.leased for r in store.status(mid).recipients] == [False, False]
    lease = lease_all(store)
    assert [r.leased for r in store.status(mid).recipients] == [True, True]
    [listed] = store.query(now=NOW)
    assert [r.leased for r in listed.recipients] == [True, True]
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@example.org"]))
    assert [r.leased for r in store.status(mid).recipients] == [False, True]
    store.release(lease)
    assert [r.leased for r in store.status(mid).recipients] == [False, False]


def test_a_late_failure_is_an_event_when_events_are_on(store: Store) -> None:
    store.enable_events()
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    store.fail_late(mid, "a@example.org", late())
    events = store.read_events()
    assert [(e.state, e.error) for e in events] == [
        (RecipientState.DELIVERED, None),
        (RecipientState.FAILED, late().error),
    ]
    assert events[-1].at == LATER


def test_the_history_stays_bounded(store: Store) -> None:
    mid = store.enqueue(message("a@example.org"), now=NOW)
    for i in range(60):
        lease = lease_all(store, now=NOW + timedelta(minutes=i))
        store.record(
            results_for(
                lease, RecipientState.DEFERRED, next_attempt_at=NOW + timedelta(minutes=i + 1)
            )
        )
    lease = lease_all(store, now=NOW + timedelta(minutes=60))
    store.record(results_for(lease, RecipientState.DELIVERED))
    assert store.fail_late(mid, "a@example.org", late())
    history = store.status(mid).recipient("a@example.org").history
    assert len(history) == 50
    assert history[-1] == late()


def test_messages_by_header_message_id(store: Store) -> None:
    first = store.enqueue(message("a@example.org"), now=NOW)
    second = store.enqueue(message("b@example.org"), now=NOW + timedelta(seconds=1))
    other = replace(message("c@example.org"), header_message_id="<other@example.com>")
    store.enqueue(other, now=NOW)
    assert store.message_ids_for_header("<m1@example.com>") == [second, first]
    assert store.message_ids_for_header("<m1@example.com>", limit=1) == [second]
    assert store.message_ids_for_header("<none@example.com>") == []


def test_a_message_id_of_many_folded_lines_is_kept_and_found(store: Store) -> None:
    """A quoted id-left may be folded over many lines (RFC 5322 §3.6.4, obs-id-left):
    PostgreSQL's B-tree index could not hold such a Message-ID, and its message could
    not be queued."""
    quoted = " ".join(f"{n:04d}{os.urandom(24).hex()}" for n in range(80))  # 4 KB, random
    header_id = f'<"{quoted}"@example.com>'
    mid = store.enqueue(replace(message("a@example.org"), header_message_id=header_id), now=NOW)
    assert store.status(mid).header_message_id == header_id
    assert store.message_ids_for_header(header_id) == [mid]
    assert store.message_ids_for_header(header_id[:-2] + "x>") == []


def test_the_verp_key_is_made_once_and_shared(store_backend: Backend) -> None:
    first = store_backend.open()
    key = first.verp_key()
    assert len(key) == 32 and key != bytes(32)
    assert first.verp_key() == key
    # Every store object on the same storage (another process's, after a restart) uses
    # the same key: tokens made by a worker are checked by `mailstrom bounce`.
    assert store_backend.open().verp_key() == key
