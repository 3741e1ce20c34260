"""What the memory store keeps until a time (suppression entries, MTA-STS policies),
found by that time: deleting what has ended reads the ended, not everything kept."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


class Ends(Generic[T]):
    """A heap of (end, key) over the values a dict ``kept`` holds that end (``end_of`` a
    value; None: it does not). An entry whose end is no longer its key's value's (the
    value was replaced or removed) is stale: passed over when it comes to the top, and
    all of them dropped when the heap is made again, once it holds more than twice the
    values kept plus ``slack``; the adds since have paid for that. Call under the dict's
    lock, with the dict."""

    def __init__(self, end_of: Callable[[T], datetime | None], slack: int) -> None:
        self._end_of = end_of
        self._slack = slack
        self._heap: list[tuple[datetime, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def added(self, key: str, value: T, kept: Mapping[str, T]) -> None:
        """Note ``value``, just kept under ``key`` in ``kept``."""
        end = self._end_of(value)
        if end is not None:
            heapq.heappush(self._heap, (end, key))
        if len(self._heap) > 2 * len(kept) + self._slack:
            self._heap = [(end, k) for k, v in kept.items() if (end := self._end_of(v)) is not None]
            heapq.heapify(self._heap)

    def delete_ended(self, kept: MutableMapping[str, T], cutoff: datetime, limit: int) -> int:
        """Delete from ``kept`` up to ``limit`` values ended at or before ``cutoff``,
        soonest first; how many."""
        heap = self._heap
        deleted = 0
        while heap and deleted < limit and heap[0][0] <= cutoff:
            end, key = heapq.heappop(heap)
            current = kept.get(key)
            if current is not None and self._end_of(current) == end:
                del kept[key]
                deleted += 1
        return deleted
