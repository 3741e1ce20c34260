"""Work a session never sent, because it broke on a transaction ahead of it, is not charged
with that transaction's failure: it goes back to the queue untried, due at once, and its
own attempt decides it (runtime/dispatch.py's ``_give_up``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.message import prepare
from mailstrom.stores import MemoryStore
from mailstrom.testing import FakeMX
from tests.support.delivery import Results

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED


def queued(store: MemoryStore, *addresses: str) -> dict[str, str]:
    """One message to each of ``addresses``, enqueued before any worker runs (so that one
    lease takes them all, in this order); message id by address."""
    now = datetime.now(UTC)
    return {
        address: store.enqueue(
            prepare(Email(from_="App <app@shop.test>", to=[address], subject="Hi", text="Hello")),
            now=now,
        )
        for address in addresses
    }


def test_a_stall_at_rcpt_does_not_defer_the_transactions_queued_behind_it(
    fake_mx: FakeMX,
) -> None:
    # The envelope of slow@ goes out, the server never answers its RCPT; those of nobody@
    # and flaky@ wait behind it on the connection, never written. All three were deferred
    # with "did not reply to RCPT", an attempt counted for each.
    fake_mx.stall("slow@d.test")
    fake_mx.reject("nobody@d.test", "550 5.1.1 No such user here")
    fake_mx.drop_after_dot("flaky@d.test")
    store = MemoryStore()
    ids = queued(store, "slow@d.test", "nobody@d.test", "flaky@d.test")
    results = Results()
    with Mailstrom(fake_mx.config, store=store, on_result=results) as ms:
        results.wait_final(set(ids))
        status = {a: ms.query_status(mid).recipient(a) for a, mid in ids.items()}
    slow, nobody, flaky = (status[a] for a in ids)
    assert slow.state is DEFERRED
    assert "did not reply to RCPT" in (slow.reason or "")
    # Not tried with slow@, they went again at once, and their own replies decided them.
    assert nobody.state is FAILED
    assert nobody.reply is not None and nobody.reply.code == 550
    assert flaky.state is DEFERRED and flaky.uncertain
    assert [s.attempts for s in (slow, nobody, flaky)] == [1, 1, 1]
    assert [tuple(m.envelope_to) for m in fake_mx.received] == [("flaky@d.test",)]


def test_nor_the_work_queued_for_the_session_behind_them(fake_mx: FakeMX) -> None:
    # One session (max_per_destination=1) holds three transactions; the other two messages
    # wait in the destination's queue, never submitted: they were deferred with the stall
    # too, as every address had been tried.
    fake_mx.stall("slow@d.test")
    others = [f"r{n}@d.test" for n in range(4)]
    store = MemoryStore()
    ids = queued(store, "slow@d.test", *others)
    results = Results()
    config = replace(fake_mx.config, max_per_destination=1)
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_final(set(ids))
        states = {a: ms.query_status(mid).recipient(a) for a, mid in ids.items()}
    assert states["slow@d.test"].state is DEFERRED
    assert {a: (states[a].state, states[a].attempts) for a in others} == dict.fromkeys(
        others, (DELIVERED, 1)
    )
