"""Contract: watch callbacks fire when work may have become due, until unsubscribed."""

from __future__ import annotations

import threading

import pytest

from mailstrom.errors import StoreError
from mailstrom.status import RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import NOW, lease_all, message, results_for

WAIT = 10.0
"""Seconds to wait for a callback (PostgreSQL delivers it from a listener thread)."""


class Counter:
    """A callback that counts calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.calls += 1
            self._cond.notify_all()

    def wait_for(self, calls: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.calls >= calls, timeout=WAIT)


def test_watch_fires_on_enqueue_and_retry_and_stops_after_unsubscribe(store: Store) -> None:
    watched, witness = Counter(), Counter()
    stop = store.watch(watched)
    stop_witness = store.watch(witness)
    try:
        mid = store.enqueue(message("a@example.org"), now=NOW)
        assert watched.wait_for(1)
        lease = lease_all(store)
        store.record(results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW))
        seen = watched.calls
        store.retry(mid, now=NOW)
        assert watched.wait_for(seen + 1)

        stop()
        stop()  # idempotent
        seen = watched.calls
        before = witness.calls
        store.enqueue(message("b@example.org"), now=NOW)
        # The witness proves the notification went out; the stopped callback missed it.
        assert witness.wait_for(before + 1)
        assert watched.calls == seen
    finally:
        stop_witness()


def test_watch_cancels_fires_when_leased_mail_is_cancelled_by_any_store_object(
    store_backend: Backend,
) -> None:
    """A worker learnt that mail it had leased was cancelled only at its next heartbeat
    (every third of ``lease_for``), and sent it meanwhile if it had not started yet: the
    store now tells ``watch_cancels`` callbacks, also those of another store object
    (another process: SQLite's wake-up sockets, PostgreSQL's NOTIFY)."""
    here = store_backend.open()
    other = store_backend.open() if store_backend.durable else here
    told = Counter()
    stop = here.watch_cancels(told)
    try:
        idle = here.enqueue(message("a@example.org"), now=NOW)
        assert other.cancel(idle, now=NOW) == 1  # not leased: no worker to tell
        first = here.enqueue(message("b@example.org"), now=NOW)
        second = here.enqueue(message("c@example.org"), now=NOW)
        assert lease_all(here) is not None
        assert other.cancel(first, now=NOW) == 1
        assert told.wait_for(1)
        assert other.cancel_many([second], now=NOW) == 1
        assert told.wait_for(2)
    finally:
        stop()
    assert told.calls == 2


def test_watch_cancels_fires_when_leased_mail_is_held_by_any_store_object(
    store_backend: Backend,
) -> None:
    """Holding mail a worker has leased tells it as a cancel does, so that it gives back
    what it has not started: it was told nothing, and sent held mail."""
    here = store_backend.open()
    other = store_backend.open() if store_backend.durable else here
    told = Counter()
    stop = here.watch_cancels(told)
    try:
        idle = here.enqueue(message("a@example.org"), now=NOW)
        assert other.hold_many([idle], True) == 1  # not leased: no worker to tell
        first = here.enqueue(message("b@example.org"), now=NOW)
        second = here.enqueue(message("c@example.org"), now=NOW)
        assert lease_all(here) is not None
        other.set_held(first, True)
        assert told.wait_for(1)
        assert other.hold_many([second], True) == 1
        assert told.wait_for(2)
        assert other.hold_many([second], False) == 1  # a release is no cancel
        other.set_held(first, False)
    finally:
        stop()
    assert told.calls == 2


def test_watch_cancels_fires_when_a_destination_of_leased_mail_is_suspended(
    store_backend: Backend,
) -> None:
    """Suspending a destination a worker has leased mail of tells it as a cancel does,
    also through another store object (another process), so that it gives back what it
    has not started: it was told nothing, and sent to the suspended destination until
    its next heartbeat."""
    here = store_backend.open()
    other = store_backend.open() if store_backend.durable else here
    told = Counter()
    stop = here.watch_cancels(told)
    try:
        here.enqueue(message("a@example.org"), now=NOW)
        assert lease_all(here) is not None
        other.suspend("example.org", now=NOW)
        assert told.wait_for(1)
    finally:
        stop()


def test_close_stops_every_watcher_and_refuses_new_ones(store_backend: Backend) -> None:
    """``close()`` releases the store's threads: the SQLite store left every wake-up
    listener of ``watch`` and ``watch_cancels`` running (its thread, its bound socket),
    calling the closed store's callbacks on every other process's enqueue and cancel,
    and ``watch`` after ``close`` started another; PostgreSQL stops them, and refuses."""
    store_backend.require_durable()
    here, other, third = (store_backend.open() for _ in range(3))
    told, witness = Counter(), Counter()
    here.watch(told)
    here.watch_cancels(told)
    stop_witness = third.watch(witness)
    try:
        here.close()
        with pytest.raises(StoreError):
            here.watch(told)
        with pytest.raises(StoreError):
            here.watch_cancels(told)
        mid = other.enqueue(message("a@example.org"), now=NOW)
        assert lease_all(other) is not None
        assert other.cancel(mid, now=NOW) == 1
        # The witness proves the wake-ups went out; the closed store's callbacks missed them.
        assert witness.wait_for(1)
    finally:
        stop_witness()
    assert told.calls == 0
