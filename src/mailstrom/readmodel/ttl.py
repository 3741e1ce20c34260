"""A small time-limited cache: counting a million rows is not free, and the dashboard may
show numbers a few seconds old."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_ENTRIES = 256
"""Entries kept at most; the oldest go first (keys come from request parameters)."""


class TTLCache(Generic[T]):
    """Values computed by a function, kept for ``ttl`` seconds. ``ttl`` 0 keeps nothing.

    >>> cache: TTLCache[int] = TTLCache(5.0)
    >>> cache.get("answer", lambda: 42)
    42
    """

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[float, T]] = {}
        self._cleared = 0
        """clear() calls so far: a value computed across one is not kept."""

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value for ``key``, or ``compute()`` (outside the lock) kept, unless
        :meth:`clear` was called while it ran: it may have read what was there before."""
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found[0] > now:
                return found[1]
            cleared = self._cleared
        value = compute()
        if self._ttl > 0:
            with self._lock:
                if cleared != self._cleared:
                    return value
                if len(self._entries) >= MAX_ENTRIES:
                    oldest = min(self._entries, key=lambda k: self._entries[k][0])
                    del self._entries[oldest]
                self._entries[key] = (now + self._ttl, value)
        return value

    def clear(self) -> None:
        """Forget everything (after an action changed the queue)."""
        with self._lock:
            self._entries.clear()
            self._cleared += 1
