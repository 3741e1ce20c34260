"""The three stores, driven in lockstep by generated operations, must agree.

A Hypothesis state machine runs the same operations (enqueue alone and in batches, with
lanes, send times and idempotency keys; lease with lanes and holders; record,
record-and-lease, extend, release, release a holder; retry, cancel, hold and purge, one
message or several; late failures; suspensions, throttles, postponements and rate tokens;
suppressions; leasing, acknowledging and pruning the event outbox; MX hosts with broken
TLS, MTA-STS policies and TLS session counters; the clock moving on) against the memory
store, SQLite and PostgreSQL, through one store object or a second one on the same
storage. After every step it compares what each one answered and what each one now says:
every message's status, history and data, the stats, the next due time, queries and
counts, the newest messages, the queue's shape, pauses and suspensions, the suppression
list, the event outbox, the TLS state, and the dashboard's read model (its overview, every
page of several views, the destinations). The stores share the contract but no code, so
a difference is a bug in one of them: an application that moves from SQLite to
PostgreSQL must see the same queue.

Beside the agreement, the model checks what the contract promises whatever the store: no
recipient is lost or invented, a recipient is never leased twice while its lease holds, a
result recorded under a lease that no longer holds is ignored, and a message is purged
only when all its recipients are final.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailstrom.errors import UnknownMessage
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.mtasts import CachedPolicy, Mode, Policy
from mailstrom.policy.throttle import TokenBucket
from mailstrom.readmodel import open_read_model
from mailstrom.readmodel.base import (
    MessageSummary,
    QueueQuery,
    QueueView,
    ReadModel,
    Search,
    SortOrder,
)
from mailstrom.status import AttemptOutcome, MessageStatus, RecipientState
from mailstrom.stores import Lease, MemoryStore, RecipientResult, Store, open_store
from mailstrom.stores.base import QueueFilter
from mailstrom.suppression import Suppression, SuppressionSource, lookup_targets
from mailstrom.tlsrpt import PolicyType, TLSSessions

from .support import NOW, attempt, results_for

USERS = ("ann", "bob", "cy")
DOMAINS = ("example.org", "example.net", "bücher.example")
ADDRESSES = tuple(f"{u}@{d}" for d in DOMAINS for u in USERS)
LANES = ("high", "normal")
HOLDERS = (None, "0123abcd", "fedc9876")
MAX_BYTES = st.sampled_from((None, None, 1, 60, 150))
"""A lease's budget of message data: none, one message alone, or a few."""
STEPS = (
    timedelta(microseconds=1),
    timedelta(milliseconds=1),
    timedelta(seconds=1),
    timedelta(minutes=1),
    timedelta(minutes=6),
    timedelta(hours=2),
)
MX_HOSTS = ("mx1.example.org", "mx2.example.org", "mx.xn--bcher-kva.example")
POLICY_DOMAINS = ("example.org", "example.net", "xn--bcher-kva.example")
"""Where the TLS state rules point: MX hosts and MTA-STS policy domains, as A-labels."""
OUTCOMES = (RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED)
PENDING = {RecipientState.QUEUED, RecipientState.DEFERRED}
FINAL = {RecipientState.DELIVERED, RecipientState.FAILED}
MESSAGE = {
    "recipients": st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=4, unique=True),
    "hold": st.booleans(),
    "lane": st.sampled_from((None, *LANES)),
    "send_in": st.sampled_from((None, timedelta(minutes=2))),
    "key": st.sampled_from((None, "k1", "k2")),
}
"""What :meth:`StoresAgree.enqueue` takes."""
MESSAGES = st.fixed_dictionaries(MESSAGE)
EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "60"))
DASHBOARD_EVERY = 3
"""Steps between two comparisons of the read models."""
PG_KEPT = ("schema_version", "verp_key")
"""PostgreSQL tables kept between examples: the rest are emptied."""


@dataclass
class Opened:
    """How to open each store afresh for one example."""

    pg_url: str
    sqlite_dir: Path
    counter: Iterator[int]

    def stores(self) -> tuple[dict[str, Store], dict[str, Store]]:
        """Fresh stores, and a second store object on each durable one's storage (as a
        second worker or process has)."""
        _empty_postgres(self.pg_url)
        sqlite_url = f"sqlite:///{self.sqlite_dir / f'queue-{next(self.counter)}.db'}"
        first = {
            "memory": MemoryStore(),
            "sqlite": open_store(sqlite_url),
            "postgres": open_store(self.pg_url),
        }
        return first, {"sqlite": open_store(sqlite_url), "postgres": open_store(self.pg_url)}


def _empty_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
            if name not in PG_KEPT
        ]
        if tables:
            conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


class StoresAgree(RuleBasedStateMachine):
    def __init__(self, opened: Opened) -> None:
        super().__init__()
        self.opened = opened
        self.stores: dict[str, Store] = {}
        self.seconds: dict[str, Store] = {}
        """A second store object on each durable store's storage."""
        self.on_second = False
        self.read_models: dict[str, ReadModel] = {}
        """The dashboard's read model of each store."""
        """Whether the calls go to the second objects now."""
        self.now = NOW
        self.ids: list[dict[str, str]] = []
        """Message index → each store's id for it."""
        self.index: dict[str, dict[str, int]] = {}
        """Store → its message id → message index."""
        self.purged: set[int] = set()
        self.held: set[int] = set()
        """The messages held now (:meth:`Store.set_held`), whose leased recipients
        ``extend`` does not count."""
        self.last_seen: dict[int, MessageStatus] = {}
        """Each message's status at the last check, as every store agreed."""
        self.leases: list[dict[str, Lease]] = []
        self.holders: list[str | None] = []
        self.recipients: dict[int, tuple[str, ...]] = {}
        self.dashboard_looks = 0
        self.owner: dict[tuple[int, str], tuple[int, datetime]] = {}
        """(message index, address) → the lease that holds it and until when: the model of
        who may record a result."""

    @initialize(messages=st.lists(MESSAGES, min_size=1, max_size=6))
    def open_stores(self, messages: list[dict[str, Any]]) -> None:
        """Fresh stores, with some mail in them: the operations mostly find work."""
        self.stores, self.seconds = self.opened.stores()
        self.read_models = {
            name: open_read_model(store, cache_seconds=0) for name, store in self.stores.items()
        }
        self.index = {name: {} for name in self.stores}
        # Writing the outbox is each store object's choice (its worker's configuration):
        # both objects here write it, as two workers configured alike do.
        for store in [*self.stores.values(), *self.seconds.values()]:
            store.enable_events()
        for message in messages:
            self.enqueue(**message)

    def teardown(self) -> None:
        for model in self.read_models.values():
            model.close()
        for store in [*self.stores.values(), *self.seconds.values()]:
            store.close()

    # --- helpers --------------------------------------------------------------------------

    def each(self, call: Callable[[Store], Any]) -> Any:
        """``call`` on every store: the same answer (or the same error type) from each,
        returned once (an error is raised as the memory store raised it)."""
        answers: dict[str, tuple[str, Any]] = {}
        for name, first in self.stores.items():
            store = self.seconds.get(name, first) if self.on_second else first
            try:
                answers[name] = ("ok", call(store))
            except Exception as exc:  # compared across the stores below
                answers[name] = ("error", exc)
        kinds = {
            name: (kind, type(v).__name__ if kind == "error" else None)
            for name, (kind, v) in answers.items()
        }
        assert len(set(kinds.values())) == 1, f"stores disagree: {answers}"
        kind, value = answers["memory"]
        if kind == "error":
            raise value
        return {name: v for name, (_, v) in answers.items()}

    def agree(self, per_store: dict[str, Any], what: str) -> Any:
        first = per_store["memory"]
        for name, value in per_store.items():
            assert value == first, f"{what}: {name} says {value!r}, memory says {first!r}"
        return first

    def lease_view(self, name: str, lease: Lease | None) -> Any:
        if lease is None:
            return None
        assert not lease.failed, lease.failed
        if lease.suppressions is not None:
            # Looked up in the lease's own transaction: what a lookup would find now.
            targets = lookup_targets(r.address for item in lease.items for r in item.recipients)
            store = self.stores[name]
            assert lease.suppressions == store.suppressions_for(targets, now=self.now), name
        return (
            lease.expires_at,
            tuple(
                (
                    self.index[name][item.message_id],
                    item.domain,
                    item.priority,
                    tuple(
                        (r.address, r.attempts, r.first_attempt_at, r.created_at, r.last_attempt_at)
                        for r in item.recipients
                    ),
                )
                for item in lease.items
            ),
        )

    def status_view(self, status: MessageStatus, index: int) -> MessageStatus:
        return replace(status, id=str(index))

    def live(self) -> list[int]:
        return [i for i in range(len(self.ids)) if i not in self.purged]

    # --- operations -----------------------------------------------------------------------

    def prepared(
        self,
        recipients: list[str],
        lane: str | None,
        send_in: timedelta | None,
        key: str | None,
    ) -> PreparedMessage:
        attributes = QueueAttributes(
            priority=lane,
            send_at=None if send_in is None else self.now + send_in,
            idempotency_key=key,
            idempotency_until=None if key is None else self.now + timedelta(hours=1),
            tags=("t",) if lane == "high" else (),
        )
        return PreparedMessage(
            # Sizes differ with the recipients (24 to 66 octets), for the leases' max_bytes.
            data=b"Subject: Hi\r\n\r\nHello." + b"." * (7 * len(recipients)) + b"\r\n",
            envelope_from="sender@example.com",
            recipients=tuple(recipients),
            header_message_id="<m@example.com>",
            subject="Hi",
            attributes=attributes,
        )

    def queued(
        self, per_store: dict[str, list[str]], recipients: list[tuple[str, ...]], held: bool
    ) -> None:
        """Note the ids each store gave the same messages, in order: a new message gets
        the next index, an id already known (an idempotency key's) must be known to all."""
        for n, addresses in enumerate(recipients):
            known = [self.index[name].get(ids[n]) for name, ids in per_store.items()]
            assert len(set(known)) == 1, f"an idempotency key answered differently: {known}"
            if known[0] is not None:
                continue  # the first message's id, as the key asks
            for name, ids in per_store.items():
                self.index[name][ids[n]] = len(self.ids)
            self.recipients[len(self.ids)] = addresses
            if held:
                self.held.add(len(self.ids))
            self.ids.append({name: ids[n] for name, ids in per_store.items()})
            # Stored once and never changed: compared once.
            self.agree(
                self.each(lambda s, n=n: s.message_data(per_store[self.name_of(s)][n])),
                f"message {len(self.ids) - 1}'s data",
            )
            self.agree(
                {m: model.message_data(per_store[m][n]) for m, model in self.read_models.items()},
                f"message {len(self.ids) - 1}'s data in the read model",
            )

    @rule(**MESSAGE)
    def enqueue(
        self,
        recipients: list[str],
        hold: bool,
        lane: str | None,
        send_in: timedelta | None,
        key: str | None,
    ) -> None:
        prepared = self.prepared(recipients, lane, send_in, key)
        ids = self.each(lambda s: s.enqueue(prepared, now=self.now, hold=hold))
        self.queued({n: [mid] for n, mid in ids.items()}, [tuple(recipients)], hold)

    @rule(messages=st.lists(MESSAGES, min_size=1, max_size=4))
    def enqueue_many(self, messages: list[dict[str, Any]]) -> None:
        batch = [
            self.prepared(m["recipients"], m["lane"], m["send_in"], m["key"]) for m in messages
        ]
        ids = self.each(lambda s: s.enqueue_many(batch, now=self.now))
        self.queued(ids, [tuple(m["recipients"]) for m in messages], False)

    @rule(step=st.sampled_from(STEPS))
    def tick(self, step: timedelta) -> None:
        self.now += step

    @rule(
        limit=st.integers(1, 6),
        lease_minutes=st.sampled_from((1, 5)),
        lanes=st.sampled_from((None, (("high", 2), ("normal", 3)), (("normal", 1),))),
        holder=st.sampled_from(HOLDERS),
        max_bytes=MAX_BYTES,
    )
    def lease(
        self,
        limit: int,
        lease_minutes: int,
        lanes: tuple[tuple[str, int], ...] | None,
        holder: str | None,
        max_bytes: int | None,
    ) -> None:
        leases = self.each(
            lambda s: s.lease(
                now=self.now,
                limit=limit,
                lease_for=timedelta(minutes=lease_minutes),
                lanes=lanes,
                holder=holder,
                max_bytes=max_bytes,
            )
        )
        self.took(leases, holder)

    def took(self, leases: dict[str, Lease | None], holder: str | None) -> None:
        self.agree({n: self.lease_view(n, lease) for n, lease in leases.items()}, "lease")
        lease = leases["memory"]
        if lease is None:
            return
        n = len(self.leases)
        for key in self.keys(lease):
            if key in self.owner:
                other, until = self.owner[key]
                assert until <= self.now, f"{key} leased again while lease {other} holds it"
            self.owner[key] = (n, lease.expires_at)
        self.leases.append({name: lease for name, lease in leases.items() if lease is not None})
        self.holders.append(holder)

    def keys(self, lease: Lease) -> list[tuple[int, str]]:
        return [
            (self.index["memory"][item.message_id], r.address)
            for item in lease.items
            for r in item.recipients
        ]

    def owned_by(self, n: int) -> list[tuple[int, str]]:
        return [key for key, (owner, _) in self.owner.items() if owner == n]

    def results(
        self, n: int, picks: list[bool], state: RecipientState, retry_in: timedelta
    ) -> dict[str, list[RecipientResult]]:
        """Each store's results of ``state`` for the recipients of lease ``n`` that
        ``picks`` chooses (cycled over its addresses, the same in every store)."""
        leases = self.leases[n]
        addresses = [r.address for item in leases["memory"].items for r in item.recipients]
        chosen = {a for a, pick in zip(addresses, itertools.cycle(picks), strict=False) if pick}
        later = self.now + retry_in if state is RecipientState.DEFERRED else None
        # A failure carries its notice text (the worker's, for the mark "notice owed"), and
        # so do the deferrals (a delay warning) and deliveries ("relayed") of every other
        # lease: a deferral without one leaves the mark of one before it.
        marks = state is RecipientState.FAILED or n % 2 == 0
        return {
            name: [
                replace(r, notice=f"{state} notice {n} for {r.address}") if marks else r
                for r in results_for(lease, state, at=self.now, next_attempt_at=later, only=chosen)
            ]
            for name, lease in leases.items()
        }

    def recorded_view(self, name: str, recorded: list[RecipientResult]) -> Any:
        return [(self.index[name][r.message_id], r.address, r.state) for r in recorded]

    @precondition(lambda self: self.leases)
    @rule(
        which=st.integers(0, 50),
        picks=st.lists(st.booleans(), min_size=1, max_size=4),
        state=st.sampled_from(OUTCOMES),
        retry_in=st.sampled_from((timedelta(0), timedelta(minutes=3))),
    )
    def record(
        self, which: int, picks: list[bool], state: RecipientState, retry_in: timedelta
    ) -> None:
        n = which % len(self.leases)
        results = self.results(n, picks, state, retry_in)
        recorded = self.each(lambda s: s.record(results[self.name_of(s)]))
        self.agree({name: self.recorded_view(name, r) for name, r in recorded.items()}, "record")
        self.ended(n, recorded["memory"])

    def ended(self, n: int, recorded: list[RecipientResult]) -> None:
        """Results recorded under lease ``n``: only those it held, and they are its no more."""
        for result in recorded:
            key = (self.index["memory"][result.message_id], result.address)
            assert self.owner.get(key, (None,))[0] == n, (
                f"{key} recorded under lease {n}, held by {self.owner.get(key)}"
            )
            del self.owner[key]

    @precondition(lambda self: self.leases)
    @rule(
        which=st.integers(0, 50),
        picks=st.lists(st.booleans(), min_size=1, max_size=4),
        state=st.sampled_from(OUTCOMES),
        limit=st.integers(0, 4),
        holder=st.sampled_from(HOLDERS),
        max_bytes=MAX_BYTES,
    )
    def record_and_lease(
        self,
        which: int,
        picks: list[bool],
        state: RecipientState,
        limit: int,
        holder: str | None,
        max_bytes: int | None,
    ) -> None:
        n = which % len(self.leases)
        results = self.results(n, picks, state, timedelta(minutes=1))
        answers = self.each(
            lambda s: s.record_and_lease(
                results[self.name_of(s)],
                now=self.now,
                limit=limit,
                lease_for=timedelta(minutes=5),
                holder=holder,
                max_bytes=max_bytes,
            )
        )
        self.agree(
            {n: self.recorded_view(n, recorded) for n, (recorded, _) in answers.items()},
            "record_and_lease recorded",
        )
        self.ended(n, answers["memory"][0])
        self.took({n: lease for n, (_, lease) in answers.items()}, holder)

    @precondition(lambda self: self.leases)
    @rule(which=st.integers(0, 50), minutes=st.sampled_from((1, 10)))
    def extend(self, which: int, minutes: int) -> None:
        n = which % len(self.leases)
        until = self.now + timedelta(minutes=minutes)
        held = self.agree(
            self.each(lambda s: s.extend(self.leases[n][self.name_of(s)], until=until)), "extend"
        )
        owned = self.owned_by(n)
        # Those of messages held since are moved too, but not counted: the worker gives
        # them back when it has not started them.
        counted = [key for key in owned if key[0] not in self.held]
        assert held == len(counted), f"extend: {held} still held, the model says {counted}"
        for key in owned:
            self.owner[key] = (n, until)

    @precondition(lambda self: self.leases)
    @rule(which=st.integers(0, 50))
    def release(self, which: int) -> None:
        n = which % len(self.leases)
        self.each(lambda s: s.release(self.leases[n][self.name_of(s)]))
        for key in self.owned_by(n):
            del self.owner[key]

    @rule(holder=st.sampled_from(HOLDERS[1:]))
    def release_holder(self, holder: str) -> None:
        given = self.agree(self.each(lambda s: s.release_holder(holder)), "release_holder")
        theirs = [key for key, (n, _) in self.owner.items() if self.holders[n] == holder]
        assert given == len(theirs), f"release_holder: {given} given back, the model says {theirs}"
        for key in theirs:
            del self.owner[key]

    @precondition(lambda self: self.ids)
    @rule(which=st.integers(0, 50), action=st.sampled_from(("retry", "cancel", "hold", "unhold")))
    def operate(self, which: int, action: str) -> None:
        index = which % len(self.ids)
        ids = self.ids[index]

        def call(s: Store) -> Any:
            mid = ids[self.name_of(s)]
            if action == "retry":
                return s.retry(mid, now=self.now)
            if action == "cancel":
                return s.cancel(mid, now=self.now)
            return s.set_held(mid, action == "hold")

        try:
            self.agree(self.each(call), action)
        except UnknownMessage:
            assert index in self.purged, f"{action}: message {index} unknown, not purged"
            return
        if action == "cancel":
            for address in self.recipients[index]:
                self.owner.pop((index, address), None)
        self.note_held([index], action)

    @precondition(lambda self: self.ids)
    @rule(
        picks=st.lists(st.integers(0, 50), min_size=1, max_size=4),
        action=st.sampled_from(
            ("retry", "cancel", "hold", "unhold", "purge", "purge delivered", "purge failed")
        ),
        ago=st.sampled_from((None, timedelta(0), timedelta(minutes=5))),
    )
    def operate_many(self, picks: list[int], action: str, ago: timedelta | None) -> None:
        chosen = [p % len(self.ids) for p in picks]

        def call(s: Store) -> int:
            ids = [self.ids[i][self.name_of(s)] for i in chosen]
            if action == "retry":
                return s.retry_many(ids, now=self.now)
            if action == "cancel":
                return s.cancel_many(ids, now=self.now)
            if action.startswith("purge"):
                state = RecipientState(action[6:]) if action != "purge" else None
                before = None if ago is None else self.now - ago
                return s.purge_many(ids, finished_before=before, state=state)
            return s.hold_many(ids, action == "hold")

        self.agree(self.each(call), f"{action}_many")
        self.note_held(chosen, action)
        if action == "cancel":
            for i in chosen:
                for address in self.recipients[i]:
                    self.owner.pop((i, address), None)
        if action.startswith("purge"):
            self.note_purged(chosen)

    @precondition(lambda self: self.ids)
    @rule(which=st.integers(0, 50), who=st.integers(0, 3))
    def fail_late(self, which: int, who: int) -> None:
        index = which % len(self.ids)
        addresses = self.recipients[index]
        address = addresses[who % len(addresses)]
        bounced = attempt(AttemptOutcome.PERMANENT, at=self.now, code=550)
        try:
            self.agree(
                self.each(
                    lambda s: s.fail_late(self.ids[index][self.name_of(s)], address, bounced)
                ),
                "fail_late",
            )
        except UnknownMessage:
            assert index in self.purged

    @rule(
        entries=st.lists(st.sampled_from(ADDRESSES + DOMAINS), min_size=1, max_size=3),
        expires_in=st.sampled_from((None, timedelta(minutes=3))),
        add=st.booleans(),
    )
    def suppress(self, entries: list[str], expires_in: timedelta | None, add: bool) -> None:
        targets = entries  # (a rule may not take an argument named "targets")
        if not add:
            self.agree(self.each(lambda s: s.unsuppress(targets)), "unsuppress")
            return
        rows = [
            Suppression(
                target=target,
                source=SuppressionSource.MANUAL,
                reply=f"entry {n}",
                created_at=self.now,
                expires_at=None if expires_in is None else self.now + expires_in,
            )
            for n, target in enumerate(targets)
        ]
        self.agree(self.each(lambda s: s.suppress(rows)), "suppress")

    @rule(
        destination=st.sampled_from((*DOMAINS, "mx.example.org")),
        which=st.integers(0, 50),
        first=st.sampled_from((timedelta(minutes=1), timedelta(minutes=4))),
    )
    def throttle(self, destination: str, which: int, first: timedelta) -> None:
        """A destination's throttling reply; the recipients it deferred are a lease's."""

        def pairs(s: Store) -> list[tuple[str, str]]:
            if not self.leases:
                return []
            lease = self.leases[which % len(self.leases)][self.name_of(s)]
            return [(i.message_id, r.address) for i in lease.items for r in i.recipients]

        self.agree(
            self.each(
                lambda s: s.throttle(
                    destination,
                    now=self.now,
                    reply="421 4.7.0 slow down",
                    first=first,
                    maximum=timedelta(minutes=10),
                    recipients=pairs(s),
                )
            ),
            "throttle",
        )

    @precondition(lambda self: self.leases)
    @rule(
        which=st.integers(0, 50),
        minutes=st.sampled_from((1, 30)),
        destination=st.sampled_from((None, *DOMAINS)),
    )
    def postpone(self, which: int, minutes: int, destination: str | None) -> None:
        n = which % len(self.leases)
        until = self.now + timedelta(minutes=minutes)
        given = self.agree(
            self.each(
                lambda s: s.postpone(
                    self.leases[n][self.name_of(s)].items, until=until, destination=destination
                )
            ),
            "postpone",
        )
        owned = self.owned_by(n)
        assert given == len(owned), f"postpone: {given} given back, the model says {owned}"
        for key in owned:
            del self.owner[key]

    @rule(
        rates=st.lists(st.sampled_from((0.5, 2.0, 10.0)), min_size=1, max_size=2),
        want=st.integers(1, 12),
    )
    def take_tokens(self, rates: list[float], want: int) -> None:
        buckets = [TokenBucket.per_second(f"b{n}", rate) for n, rate in enumerate(rates)]
        self.agree(
            self.each(lambda s: s.take_tokens(buckets, want=want, now=self.now)), "take_tokens"
        )

    @rule(
        limit=st.integers(1, 5),
        seconds=st.sampled_from((1, 60)),
        then=st.sampled_from(("ack", "release", "keep")),
    )
    def lease_events(self, limit: int, seconds: int, then: str) -> None:
        batches = self.each(
            lambda s: s.lease_events(
                now=self.now, limit=limit, lease_for=timedelta(seconds=seconds)
            )
        )
        self.agree(
            {
                n: None
                if batch is None
                else (
                    batch.expires_at,
                    [
                        replace(e, id=0, message_id=str(self.index[n][e.message_id]))
                        for e in batch.events
                    ],
                )
                for n, batch in batches.items()
            },
            "lease_events",
        )
        if batches["memory"] is None or then == "keep":
            return
        if then == "ack":
            self.agree(
                self.each(lambda s: s.ack_events(batches[self.name_of(s)], now=self.now)),
                "ack_events",
            )
        else:
            self.each(lambda s: s.release_events(batches[self.name_of(s)]))

    @rule(ago=st.sampled_from((timedelta(0), timedelta(minutes=5))))
    def prune_events(self, ago: timedelta) -> None:
        self.agree(self.each(lambda s: s.prune_events(sent_before=self.now - ago)), "prune_events")

    @rule()
    def retry_deferred(self) -> None:
        self.agree(self.each(lambda s: s.retry_deferred(now=self.now)), "retry_deferred")

    @rule(domain=st.sampled_from(DOMAINS), minutes=st.sampled_from((None, 3)), on=st.booleans())
    def suspend(self, domain: str, minutes: int | None, on: bool) -> None:
        if on:
            until = None if minutes is None else self.now + timedelta(minutes=minutes)
            self.each(lambda s: s.suspend(domain, now=self.now, until=until))
        else:
            self.agree(self.each(lambda s: s.resume(domain, now=self.now)), "resume")

    @rule(
        ago=st.sampled_from((timedelta(0), timedelta(minutes=5))),
        state=st.sampled_from((None, RecipientState.DELIVERED, RecipientState.FAILED)),
    )
    def purge(self, ago: timedelta, state: RecipientState | None) -> None:
        if state is None:
            purged = self.each(lambda s: s.purge(finished_before=self.now - ago))
        else:
            purged = self.each(lambda s: s.purge_state(finished_before=self.now - ago, state=state))
        self.agree(purged, "purge")
        self.note_purged(self.live())

    def note_held(self, chosen: list[int], action: str) -> None:
        """Which messages are held after ``action`` on ``chosen``."""
        if action == "hold":
            self.held.update(chosen)
        elif action == "unhold":
            self.held.difference_update(chosen)

    def note_purged(self, candidates: list[int]) -> None:
        """Which of ``candidates`` are gone now: the same in every store, and only those
        whose recipients were all final (per the last status every store agreed on)."""
        for i in dict.fromkeys(candidates):
            if i in self.purged:
                continue
            exists = self.each(lambda s, i=i: self._exists(s, self.ids[i][self.name_of(s)]))
            if not self.agree(exists, f"message {i} after purge"):
                assert all(r.state in FINAL for r in self.last_seen[i].recipients)
                self.purged.add(i)

    @staticmethod
    def _exists(store: Store, mid: str) -> bool:
        try:
            store.status(mid)
        except UnknownMessage:
            return False
        return True

    def name_of(self, store: Store) -> str:
        for stores in (self.stores, self.seconds):
            for name, s in stores.items():
                if s is store:
                    return name
        raise AssertionError(store)

    @rule(
        host=st.sampled_from(MX_HOSTS),
        minutes=st.sampled_from((1, 30)),
        reason=st.sampled_from(("handshake failed", "x" * 600)),
    )
    def note_tls_broken(self, host: str, minutes: int, reason: str) -> None:
        until = self.now + timedelta(minutes=minutes)
        self.each(lambda s: s.note_tls_broken(host, until=until, reason=reason, now=self.now))

    @rule(
        domain=st.sampled_from(POLICY_DOMAINS),
        policy_id=st.sampled_from(("20300101", "20300102")),
        mode=st.sampled_from(tuple(Mode)),
        max_age=st.sampled_from((0, 86400)),
    )
    def save_mta_sts_policy(self, domain: str, policy_id: str, mode: Mode, max_age: int) -> None:
        mx = () if mode is Mode.NONE else ("mx1.example.org", "*.example.net")
        text = f"version: STSv1\nmode: {mode.value}" + "".join(f"\nmx: {m}" for m in mx)
        policy = Policy(mode=mode, mx=mx, max_age=max_age, text=text)
        cached = CachedPolicy.of(domain, policy_id, policy, self.now)
        self.each(lambda s: s.save_mta_sts_policy(cached))

    @rule(
        kinds=st.lists(
            st.sampled_from(("", "certificate-expired", "starttls-not-supported")),
            min_size=1,
            max_size=3,
        ),
        yesterday=st.booleans(),
        count=st.integers(1, 3),
    )
    def add_tls_sessions(self, kinds: list[str], yesterday: bool, count: int) -> None:
        day = self.now.date() - timedelta(days=1 if yesterday else 0)
        sessions = [
            TLSSessions(
                day=day,
                policy_domain="example.org",
                policy_type=PolicyType.STS,
                policy_string="version: STSv1\nmode: enforce",
                result_type=kind,
                receiving_mx="mx1.example.org" if kind else "",
                count=count,
            )
            for kind in kinds
        ]
        self.each(lambda s: s.add_tls_sessions(sessions))

    @rule(days=st.integers(0, 1))
    def prune_tls_sessions(self, days: int) -> None:
        before = self.now.date() - timedelta(days=days)
        self.agree(self.each(lambda s: s.prune_tls_sessions(before=before)), "prune_tls_sessions")

    @rule()
    def look_at_tls_state(self) -> None:
        """A rule, not an invariant: only the TLS rules and the clock change this state,
        and comparing it after every step cost more than the rest of the machine."""
        self.agree(self.each(lambda s: s.tls_broken(now=self.now)), "tls_broken")
        for domain in POLICY_DOMAINS:
            self.agree(self.each(lambda s, d=domain: s.mta_sts_policy(d)), f"policy of {domain}")
        for back in (0, 1, 2):
            day = self.now.date() - timedelta(days=back)
            self.agree(
                {
                    n: sorted(got, key=TLSSessions.key)
                    for n, got in self.each(lambda s, d=day: s.tls_sessions(d)).items()
                },
                f"TLS sessions of {day}",
            )

    @rule(limit=st.integers(1, 3), clear=st.booleans())
    def notices_owed(self, limit: int, clear: bool) -> None:
        """The marks "notice owed" of the messages done for this pass, cleared (as the
        worker does when it queues their notice) or not."""
        owed = self.each(lambda s: s.owed_notices(limit=limit))
        self.agree(
            {
                n: [(self.index[n][o.message_id], o.address, o.notice) for o in got]
                for n, got in owed.items()
            },
            "owed_notices",
        )
        if clear:
            self.each(lambda s: s.queue_notices(owed[self.name_of(s)], {}, now=self.now))

    @rule(second=st.booleans())
    def switch(self, second: bool) -> None:
        """Go on through the other store objects: what one wrote, the other must see."""
        self.on_second = second

    # --- what every store must agree on after each step -----------------------------------

    @invariant()
    def same_messages(self) -> None:
        if not self.stores:
            return
        for i in self.live():
            statuses = self.each(lambda s, i=i: s.status(self.ids[i][self.name_of(s)]))
            status = self.agree(
                {n: self.status_view(st_, i) for n, st_ in statuses.items()}, f"message {i}"
            )
            addresses = [r.address for r in status.recipients]
            assert addresses == list(self.recipients[i]), "a recipient was lost or invented"
            self.last_seen[i] = status

    @invariant()
    def same_queue(self) -> None:
        if not self.stores:
            return
        self.agree(self.each(lambda s: s.stats()), "stats")
        self.agree(self.each(lambda s: s.next_due(now=self.now)), "next_due")
        for where in (
            QueueFilter(states=frozenset(PENDING)),
            QueueFilter(state=RecipientState.FAILED, limit=3),
            QueueFilter(domain="example.net", held=True),
            QueueFilter(tag="t"),
            QueueFilter(older_than=timedelta(minutes=5), limit=4),
        ):
            found = self.each(lambda s, w=where: s.query(now=self.now, where=w))
            self.agree(
                {n: [self.index[n][m.id] for m in listed] for n, listed in found.items()},
                f"query {where}",
            )
            self.agree(
                self.each(lambda s, w=where: s.count(now=self.now, where=w, cap=5)),
                f"count {where}",
            )
        recent = self.each(lambda s: s.recent(limit=5))
        self.agree({n: [self.index[n][m.id] for m in got] for n, got in recent.items()}, "recent")
        by_header = self.each(lambda s: s.message_ids_for_header("<m@example.com>", limit=4))
        self.agree(
            {n: [self.index[n][mid] for mid in got] for n, got in by_header.items()},
            "message_ids_for_header",
        )
        targets = [*ADDRESSES, *DOMAINS]
        self.agree(self.each(lambda s: s.suppressions_for(targets, now=self.now)), "suppressions")
        self.agree(self.each(lambda s: s.list_suppressions(limit=50)), "suppression list")
        self.agree(self.each(lambda s: s.throttles(now=self.now)), "throttles")
        self.agree(self.each(lambda s: s.suspensions(now=self.now)), "suspensions")
        edges = (timedelta(minutes=1), timedelta(hours=1))
        self.agree(self.each(lambda s: s.shape(now=self.now, edges=edges)), "shape")
        events = self.each(lambda s: s.read_events(after=0, limit=1000))
        self.agree(
            {
                n: [replace(e, id=0, message_id=str(self.index[n][e.message_id])) for e in listed]
                for n, listed in events.items()
            },
            "events",
        )

    @invariant()
    def same_dashboard(self) -> None:
        """The dashboard's read models: the overview, every page of a few views in both
        orders (cursors followed per store: their numbers are each store's own), and the
        destinations. After every third step only: they read what the stores' own
        invariants compared already, and paging them all after every step took half the
        machine's time (a difference stays until looked at)."""
        self.dashboard_looks += 1
        if not self.read_models or self.dashboard_looks % DASHBOARD_EVERY:
            return
        overviews = {
            name: model.overview(now=self.now, top=5) for name, model in self.read_models.items()
        }
        self.agree(
            {
                n: replace(
                    o,
                    oldest_pending=None
                    if o.oldest_pending is None
                    else replace(o.oldest_pending, id=str(self.index[n][o.oldest_pending.id])),
                )
                for n, o in overviews.items()
            },
            "overview",
        )
        for query in (
            QueueQuery(view=QueueView.PENDING, order=SortOrder.NEWEST),
            QueueQuery(view=QueueView.ALL, order=SortOrder.OLDEST),
            QueueQuery(view=QueueView.FAILED, order=SortOrder.NEWEST),
            QueueQuery(view=QueueView.HELD, order=SortOrder.OLDEST),
            QueueQuery(view=QueueView.ALL, search=Search.parse("ann@example.org")),
            QueueQuery(
                view=QueueView.PENDING, order=SortOrder.OLDEST, search=Search.parse("example.net")
            ),
            QueueQuery(view=QueueView.DEFERRED, domain="Example.ORG"),
            QueueQuery(view=QueueView.ALL, older_than=timedelta(minutes=5), order=SortOrder.OLDEST),
        ):
            listed = {
                name: self.all_pages(name, model, replace(query, limit=4))
                for name, model in self.read_models.items()
            }
            self.agree(listed, f"queue pages {query}")
        self.agree(
            {n: m.destinations(now=self.now) for n, m in self.read_models.items()},
            "destinations",
        )
        self.agree(
            {n: m.suspensions(now=self.now) for n, m in self.read_models.items()},
            "read model suspensions",
        )

    def all_pages(self, name: str, model: ReadModel, query: QueueQuery) -> list[MessageSummary]:
        found: list[MessageSummary] = []
        for _ in range(100):
            page = model.queue_page(query, now=self.now)
            for m in page.messages:
                # Each summary is its message's whole status summarised.
                assert m == MessageSummary.of(self.stores[name].status(m.id)), name
                found.append(replace(m, id=str(self.index[name][m.id])))
            if page.next is None:
                return found
            query = replace(query, after=page.next)
        raise AssertionError(f"{name}: more than 100 pages")


# Passing takes ~30 s; a failure is shrunk to its shortest steps, which can take minutes.
@pytest.mark.timeout(900)
def test_memory_sqlite_and_postgres_agree(postgres_url: str, tmp_path: Path) -> None:
    opened = Opened(pg_url=postgres_url, sqlite_dir=tmp_path, counter=itertools.count())
    run_state_machine_as_test(
        lambda: StoresAgree(opened),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
