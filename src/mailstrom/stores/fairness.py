"""Fair leases: no destination's backlog holds back the mail of the others.

A lease took the oldest due recipients whatever their destination, so the backlog of a
slow destination, which can use only ``max_per_destination`` connections, filled the
worker's leases while its other connections were idle, and mail to every other
destination queued after the backlog waited for most of it. Postfix serves its active
queue's destinations round-robin for this reason.

A fair lease (``Store.lease``'s ``busy`` and ``per_destination``) leases nothing at a
busy destination (one with work enough waiting in the worker) and at most
``per_destination`` recipients of one destination. It reads what a plain lease reads (the
lane's ``limit`` earliest due) and keeps what passes; when that read was full and left
room, it seeks the earliest due of other destinations in the lane, one seek each in an
index led by (lane, domain), up to :data:`DESTINATIONS` of them, taking turns from where
the last lease of the store object stopped. A deep backlog is never walked past.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

DESTINATIONS = 32
"""Destinations a fair lease looks at past its first read, per lane at most."""


@dataclass(frozen=True, slots=True)
class Fairness:
    """A fair lease's arguments, for a store's walk."""

    busy: frozenset[str]
    share: int
    turns: dict[str, str]


def fairness(
    turns: dict[str, str], busy: Collection[str], per_destination: int | None, limit: int
) -> Fairness | None:
    """The fairness of a lease of ``limit`` with these arguments; None (a plain lease)
    when they ask for none. ``turns``: where each lane's round of destinations stopped
    (a store object's, by lane), updated by the lease."""
    if not busy and (per_destination is None or per_destination >= limit):
        return None
    share = limit if per_destination is None else max(1, per_destination)
    return Fairness(frozenset(busy), share, turns)
