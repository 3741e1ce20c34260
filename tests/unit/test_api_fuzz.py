"""Fuzzing the facades' public calls: whatever junk an application passes (wrong types,
NaN and infinities, huge and negative numbers, naive datetimes and years 1 and 9999,
huge and negative timedeltas, huge strings, NUL, CR/LF, lone surrogates, non-ASCII
digits, SQL LIKE wildcards, empty strings, unknown ids, objects whose ``__str__``
raises), each call either works or raises one of :data:`TYPED` where the value enters,
and a call that raised changed nothing in the store. ``send_emails`` with one bad message
in a batch queues none of it.

Every call runs on the memory store and on SQLite, with ``worker=None``. The queue holds
a queued, a held and a failed message, a suppression and a suspension, so that junk that
happens to name them finds something to change.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples each test runs (100 by default), for
a longer run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/unit/test_api_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom import AsyncMailstrom, Config, Email, Mailstrom
from mailstrom.errors import (
    InvalidArgument,
    InvalidMessage,
    InvalidSuppression,
    MailstromError,
    UnknownMessage,
)
from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import QueueFilter, Store

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

TYPED: tuple[type[MailstromError], ...] = (
    InvalidArgument,
    InvalidMessage,
    InvalidSuppression,
    UnknownMessage,
)
"""What a call may raise for bad input: a bad argument (limits, ages, times, timeouts,
filters, domains), a bad message or queue attribute (``InvalidMessageType`` for what is
no message at all), a bad suppression entry, an id that names no (single) message.
Never a store's error (``StoreRefusedData`` meant junk reached the database)."""


class StrRaises:
    """An object whose ``__str__`` raises (its repr is the default one)."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of junk")


# --- junk --------------------------------------------------------------------------------

FRAGMENTS = [
    "\x00",
    "\r\n",
    "\n",
    "\r",
    "\ud800",
    "\udfff",
    "%",
    "_",
    "٣",
    "\uff10",
    "@",
    ".",
    " ",
    "é",
]
texts = st.one_of(
    st.sampled_from(["", " ", "%", "_", "%%", "0_", "example.org", "bob@example.org", "0" * 32]),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=8).map("".join),
    st.builds(
        lambda c, n: c * n,
        st.sampled_from(["a", "%", "0", "\ud800", "é"]),
        st.sampled_from([64, 65, 253, 254, 255, 256, 320, 321, 999, 2049, 100_000]),
    ),
)
zones = st.sampled_from([None, UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=23))])
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**80, -(2**80), 10**400]),
    st.floats(),
    st.booleans(),
)
junk = st.one_of(
    st.none(),
    texts,
    numbers,
    st.binary(max_size=10),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=zones),
    st.sampled_from([datetime.min, datetime.max, datetime.max.replace(tzinfo=UTC)]),
    st.timedeltas(),
    st.sampled_from([timedelta.max, timedelta.min, -timedelta(seconds=1)]),
    st.lists(texts, max_size=3),
    st.builds(StrRaises),
    st.just(object()),
    st.sampled_from(list(RecipientState)),
    st.dictionaries(texts, texts, max_size=2),
)


# --- the queue ---------------------------------------------------------------------------

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def email(to: str = "bob@example.org") -> Email:
    return Email(from_="app@example.com", to=[to], subject="Hi", text="Hello")


class Queue:
    """A facade over a store holding a queued, a held and a failed message, a suppression
    and a suspension; its clock stands still."""

    def __init__(self, store: Store) -> None:
        self.ms = Mailstrom(
            Config(helo_name="mail.example.com"), store=store, worker=None, clock=lambda: NOW
        )
        self.queued = self.ms.send_email(email())
        self.held = self.ms.send_email(email("carol@example.net"))
        self.ms.hold(self.held)
        self.failed = self.ms.send_email(email("dave@example.com"))
        self.ms.cancel(self.failed)
        self.ms.suppress("eve@example.org", "550 no such user")
        self.ms.suspend("example.net", for_=timedelta(hours=1))

    def snapshot(self) -> object:
        """Everything a call could change: messages (with history), counts,
        suppressions and suspensions."""
        store = self.ms.store
        ids = [m.id for m in store.recent(1000)]
        return (
            [store.status(mid) for mid in ids],
            store.stats(),
            store.list_suppressions(limit=1000),
            store.suspensions(now=NOW),
        )


@pytest.fixture(params=["memory", "sqlite"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    store: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "q.db")
    yield Queue(store)
    store.close()


# --- the calls ---------------------------------------------------------------------------

Call = Callable[[Queue, Any], object]

CALLS: dict[str, Call] = {
    "send_email(message)": lambda q, j: q.ms.send_email(j),
    "send_email(envelope_from)": lambda q, j: q.ms.send_email(email(), envelope_from=j),
    "send_email(envelope_to)": lambda q, j: q.ms.send_email(email(), envelope_to=j),
    "send_email(tags)": lambda q, j: q.ms.send_email(email(), tags=j),
    "send_email(metadata)": lambda q, j: q.ms.send_email(email(), metadata=j),
    "send_email(priority)": lambda q, j: q.ms.send_email(email(), priority=j),
    "send_email(send_at)": lambda q, j: q.ms.send_email(email(), send_at=j),
    "send_email(expires_at)": lambda q, j: q.ms.send_email(email(), expires_at=j),
    "send_email(max_age)": lambda q, j: q.ms.send_email(email(), max_age=j),
    "send_email(idempotency_key)": lambda q, j: q.ms.send_email(email(), idempotency_key=j),
    "send_email(dsn)": lambda q, j: q.ms.send_email(email(), dsn=j),
    "send_emails(batch)": lambda q, j: q.ms.send_emails(j),
    "query_status": lambda q, j: q.ms.query_status(j),
    "query_recent": lambda q, j: q.ms.query_recent(j),
    "query(where)": lambda q, j: q.ms.query(j),
    "retry": lambda q, j: q.ms.retry(j),
    "cancel": lambda q, j: q.ms.cancel(j),
    "hold": lambda q, j: q.ms.hold(j),
    "release": lambda q, j: q.ms.release(j),
    "retry_many": lambda q, j: q.ms.retry_many(j),
    "cancel_many": lambda q, j: q.ms.cancel_many(j),
    "purge(older_than)": lambda q, j: q.ms.purge(j),
    "purge(state)": lambda q, j: q.ms.purge(timedelta(days=1), state=j),
    "purge(messages)": lambda q, j: q.ms.purge(timedelta(0), messages=j),
    "resolve_id": lambda q, j: q.ms.resolve_id(j),
    "count(where)": lambda q, j: q.ms.count(j),
    "count(cap)": lambda q, j: q.ms.count(cap=j),
    "message_data": lambda q, j: q.ms.message_data(j),
    "suspend(domain)": lambda q, j: q.ms.suspend(j),
    "suspend(for_)": lambda q, j: q.ms.suspend("example.org", for_=j),
    "suspend(until)": lambda q, j: q.ms.suspend("example.org", until=j),
    "resume": lambda q, j: q.ms.resume(j),
    "wait(id)": lambda q, j: q.ms.wait(j, 0),
    # The held message is settled: a wait for it returns at once whatever the timeout.
    "wait(timeout)": lambda q, j: q.ms.wait(q.held, j),
    "suppress(target)": lambda q, j: q.ms.suppress(j),
    "suppress(reply)": lambda q, j: q.ms.suppress("bob@example.org", j),
    "suppress(source)": lambda q, j: q.ms.suppress("bob@example.org", source=j),
    "suppress(expires_at)": lambda q, j: q.ms.suppress("bob@example.org", expires_at=j),
    "unsuppress": lambda q, j: q.ms.unsuppress(j),
    "suppressed": lambda q, j: q.ms.suppressed(j),
    "suppressions(after)": lambda q, j: q.ms.suppressions(after=j),
    "suppressions(limit)": lambda q, j: q.ms.suppressions(limit=j),
}

FILTER_FIELDS = ["state", "states", "domain", "older_than", "held", "limit", "tag"]


def check(queue: Queue, call: Callable[[], object]) -> None:
    """``call`` works, or raises one of TYPED and leaves the store as it was."""
    before = queue.snapshot()
    raised: MailstromError | None = None
    try:
        call()
    except TYPED as exc:
        raised = exc
    if raised is None:
        event("worked")
        return
    event(type(raised).__name__)
    assert queue.snapshot() == before, f"{type(raised).__name__} after a change: {raised}"
    assert len(str(raised)) < 600, "an error quotes its input at length"


@FUZZ
@given(name=st.sampled_from(sorted(CALLS)), value=junk)
def test_every_call_takes_junk_with_a_typed_error_and_no_change(
    queue: Queue, name: str, value: object
) -> None:
    event(name)
    check(queue, lambda: CALLS[name](queue, value))


@FUZZ
@given(field=st.sampled_from(FILTER_FIELDS), value=junk, use=st.sampled_from(["query", "hold"]))
def test_a_queue_filter_of_junk_is_refused_or_works(
    queue: Queue, field: str, value: object, use: str
) -> None:
    def call() -> object:
        where = QueueFilter(**{field: value})
        return queue.ms.query(where) if use == "query" else queue.ms.hold(where)

    check(queue, call)


@FUZZ
@given(
    good=st.integers(min_value=0, max_value=3),
    bad=junk | st.builds(lambda a: Email(from_="app@example.com", to=[a], text="x"), texts),
    at=st.integers(min_value=0, max_value=3),
)
def test_one_bad_message_in_a_batch_queues_none(
    queue: Queue, good: int, bad: object, at: int
) -> None:
    batch: list[Any] = [email(f"u{n}@example.org") for n in range(good)]
    batch.insert(min(at, good), bad)
    check(queue, lambda: queue.ms.send_emails(batch))


ASYNC_CALLS: dict[str, Callable[[AsyncMailstrom, Queue, Any], Any]] = {
    "send_email(send_at)": lambda a, q, j: a.send_email(email(), send_at=j),
    "send_emails": lambda a, q, j: a.send_emails([email(), j]),
    "query_recent": lambda a, q, j: a.query_recent(j),
    "query": lambda a, q, j: a.query(j),
    "count(cap)": lambda a, q, j: a.count(cap=j),
    "hold": lambda a, q, j: a.hold(j),
    "purge(state)": lambda a, q, j: a.purge(timedelta(days=1), state=j),
    "suspend(until)": lambda a, q, j: a.suspend("example.org", until=j),
    "wait(timeout)": lambda a, q, j: a.wait(q.held, j),
    "suppress": lambda a, q, j: a.suppress(j),
    "suppressions(after)": lambda a, q, j: a.suppressions(after=j),
}


@FUZZ
@given(name=st.sampled_from(sorted(ASYNC_CALLS)), value=junk)
def test_the_async_facade_takes_junk_alike(queue: Queue, name: str, value: object) -> None:
    aio = AsyncMailstrom(
        Config(helo_name="mail.example.com"), store=queue.ms.store, worker=None, clock=lambda: NOW
    )

    async def call() -> object:
        return await ASYNC_CALLS[name](aio, queue, value)

    check(queue, lambda: asyncio.run(call()))
