"""Contract: a message's DSN request (RFC 3461) is stored and handed out with its work."""

from __future__ import annotations

from dataclasses import replace

from mailstrom.message.dsn import DSN, Notify, Return
from mailstrom.stores import Store

from .support import NOW, lease_all, message


def test_the_dsn_request_comes_back_with_the_lease(store: Store) -> None:
    dsn = DSN(notify=(Notify.FAILURE, Notify.DELAY), ret=Return.HEADERS, envid="order;42=x")
    asked = store.enqueue(replace(message("a@example.org"), dsn=dsn), now=NOW)
    plain = store.enqueue_many([message("b@example.net")], now=NOW)[0]
    items = {item.message_id: item for item in lease_all(store).items}
    assert items[asked].dsn == dsn
    assert items[plain].dsn is None


def test_a_lease_says_when_the_attempt_before_it_was(store: Store) -> None:
    from datetime import timedelta

    from mailstrom.status import RecipientState

    from .support import results_for

    store.enqueue(message("a@example.org"), now=NOW)
    [first] = lease_all(store).items
    assert first.recipients[0].last_attempt_at is None
    later = NOW + timedelta(minutes=5)
    store.record(
        results_for(
            lease_all(store, now=NOW + timedelta(hours=1)),
            RecipientState.DEFERRED,
            at=later,
            next_attempt_at=later,
        )
    )
    [again] = lease_all(store, now=NOW + timedelta(hours=2)).items
    assert again.recipients[0].last_attempt_at == later
