"""Reading back a row of a side table that may not be what mailstrom wrote.

The queue's own rows are checked where they are leased (:mod:`~mailstrom.stores.row_checks`)
and a bad one fails its recipients. A side table's row (a suppression entry, a
destination's pause, a rate bucket, a host remembered with broken TLS, a cached MTA-STS
policy, a TLS session counter, an outbox event) has no recipient to fail: changed by
hand, restored from another version's dump or hit by bit rot, it must neither stop the
worker (one bad row read inside every lease, or every second) nor fail an operator's whole
list. Each reader makes the safe decision for its table instead, and says so:

- a suppression entry still suppresses: a time that cannot be read is unknown (an
  expiry: the entry does not expire), and so is a source no version here knows;
- a destination's pause is over (the next throttle writes a good row over it);
- a rate bucket is full (one burst, its capacity; the next take writes it anew);
- a host remembered with broken TLS is forgotten (TLS is tried with it again);
- a cached MTA-STS policy is not cached (it is fetched again and written over);
- a TLS session counter is left out of the report;
- an outbox event is skipped: marked sent so that the events after it still flow.

The warning naming the row is logged once per process for each row and reason: some of
these rows are read every second by every worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from mailstrom.arguments import row_after, row_limit, shown
from mailstrom.errors import UnreadableRow
from mailstrom.policy.throttle import BucketState
from mailstrom.status import DeliveryEvent, DestinationThrottle
from mailstrom.stores.row_checks import MAX_ATTEMPTS

log = logging.getLogger(__name__)

PAUSE_OVER = "the pause is over"
EVENT_SKIPPED = "skipped, marked sent"
"""What becomes of an outbox event that cannot be read when a sender leases it."""
EVENT_LEFT_OUT = "left out"

_MAX_SAID = 1024
"""Rows remembered as warned about; past this the memory starts over (a warning again)."""
_said: set[tuple[str, str, str]] = set()


def unreadable_side_row(table: str, key: object, reason: object, outcome: str) -> None:
    """Warn that the row of ``table`` named ``key`` cannot be read (``reason``) and what
    is done instead (``outcome``), unless this process has said so already."""
    said = (table, str(key)[:200], str(reason)[:200])
    if said in _said:
        return
    if len(_said) >= _MAX_SAID:
        _said.clear()
    _said.add(said)
    log.warning("%s row %s unreadable (%s): %s", table, said[1], said[2], outcome)


def forget_warnings() -> None:
    """Warn again about rows already warned about (for tests)."""
    _said.clear()


# Each store reads its own row shape into these; a time it cannot read is None (SQLite:
# sqlite_schema.shown_time; PostgreSQL: rows.ReadableTimes).


def pause_of(
    destination: str, until: datetime | None, strikes: object, reply: str, since: datetime | None
) -> DestinationThrottle | None:
    """The pause of a ``destination_throttles`` row; None (the pause is over) for one that
    cannot be read. Over rather than a wait of some length: a pause spares the receiver,
    which throttles again if it must, and that throttle writes a good row over this one
    (an unreadable end would otherwise never be forgotten)."""
    if until is None or since is None:
        why = "until" if until is None else "since"
        unreadable_side_row("destination_throttles", destination, f"{why} is no time", PAUSE_OVER)
        return None
    # The next throttle adds one, and the stores keep a 32-bit integer.
    if type(strikes) is not int or not 1 <= strikes <= MAX_ATTEMPTS:
        why = f"strikes is {shown(strikes)}, not a count from 1 to {MAX_ATTEMPTS}"
        unreadable_side_row("destination_throttles", destination, why, PAUSE_OVER)
        return None
    return DestinationThrottle(
        destination=destination, until=until, strikes=strikes, reply=reply, since=since
    )


def bucket_state(key: str, tokens: object, at: datetime | None) -> BucketState | None:
    """The state of a ``shaping_buckets`` row; None (a full bucket: one burst, its
    capacity, and the take writes the row anew) for one that cannot be read."""
    if at is None:
        why = "at is no time"
    elif not isinstance(tokens, float | int) or not math.isfinite(tokens):
        why = f"tokens is {shown(tokens)}, not a number"
    else:
        return BucketState(tokens=float(tokens), at=at)
    unreadable_side_row("shaping_buckets", key, why, "the bucket is full")
    return None


def broken_until(host: str, until: datetime | None) -> datetime | None:
    """When the memory of ``host``'s broken TLS (a ``tls_broken`` row) ends; None for an
    end that cannot be read: the store forgets it, and TLS is tried with the host again
    (as with a host never noted, which a failed handshake notes anew)."""
    if until is None:
        unreadable_side_row("tls_broken", host, "until is no time", "forgotten")
    return until


def readable_events(
    found: Iterable[Sequence[Any]], decode: Callable[[Sequence[Any]], DeliveryEvent], outcome: str
) -> tuple[list[DeliveryEvent], list[int]]:
    """The events of the outbox rows ``found`` (their id first) that ``decode`` reads, in
    id order, and the ids of those it cannot (UnreadableRow: a time that is no time, a
    state no version here knows), said with ``outcome``."""
    events: list[DeliveryEvent] = []
    unreadable: list[int] = []
    for row in found:
        try:
            events.append(decode(row))
        except UnreadableRow as exc:
            unreadable_side_row("events", row[0], exc, outcome)
            unreadable.append(row[0])
    events.sort(key=lambda e: e.id)
    return events, unreadable


def read_events_past_unreadable(
    fetch: Callable[[int, int], Sequence[Sequence[Any]]],
    decode: Callable[[Sequence[Any]], DeliveryEvent],
    *,
    after: int,
    limit: int,
) -> list[DeliveryEvent]:
    """Up to ``limit`` readable events above ``after``, ``fetch(after, n)`` giving the next
    ``n`` rows in id order. Unreadable rows are left out *and made up for*: a page that
    held only such rows would otherwise come back empty, and a reader paging with the
    last id it got would take it for the end of the outbox. Each round moves past every
    row it read, so the loop ends (at the end of the table at the latest)."""
    limit = row_limit(limit)
    # Ids are 1 to a bigint's largest: an ``after`` past either end asks the same as that
    # end, which SQLite could not bind (StoreRefusedData, where the others answered).
    after = row_after(after)
    events: list[DeliveryEvent] = []
    while len(events) < limit:
        wanted = limit - len(events)
        found = fetch(after, wanted)
        readable, _ = readable_events(found, decode, EVENT_LEFT_OUT)
        events += readable
        if len(found) < wanted:
            break
        after = max(int(row[0]) for row in found)
    return events
