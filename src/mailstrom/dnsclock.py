"""dnspython's lookups kept on a monotonic deadline, whatever the wall clock does.

dnspython measures a lookup's lifetime on the wall clock (``time.time()``) and offers no
other. Stepped forward (NTP, an operator) while a lookup waits, or back by more than a
second, its next query (the TCP one after a truncated answer, the next server's, a retry)
finds the lifetime spent and the lookup fails at once with ``LifetimeTimeout``: a
temporary failure for DNS that answers. The doctor's lookups and the router's both ask
again, in what is left of their deadline on the monotonic clock, when dnspython says so
early; a real timeout leaves nothing, and is raised as before.

A leaf module (it imports nothing of mailstrom), for synchronous and asyncio code alike:

>>> now = [100.0]
>>> deadline = Deadline(102.0, clock=lambda: now[0])
>>> deadline.ask_again()  # dnspython gave up at once: 2 s are left
2.0
>>> now[0] = 102.0
>>> deadline.ask_again() is None  # it gave up when the time was spent
True
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOCK_RETRIES = 2
"""Times a lookup is asked again because the wall clock was stepped under it."""
LEAST_LIFETIME = 0.05
"""Seconds left worth asking again in: what the wall and monotonic clocks may drift
apart in a lookup's lifetime (NTP slews by at most 500 ppm) is far less."""


class Deadline:
    """When one lookup must be done by, on ``clock`` (monotonic), and how often it may be
    asked again after dnspython's ``LifetimeTimeout`` (:data:`CLOCK_RETRIES` times)."""

    __slots__ = ("at", "clock", "retries")

    def __init__(self, at: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.at = at
        self.clock = clock
        self.retries = CLOCK_RETRIES

    @classmethod
    def after(cls, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock=clock)

    def ask_again(self) -> float | None:
        """Called when dnspython raised ``LifetimeTimeout``: the lifetime to ask again
        with (what is left), or None when the time is spent (a real timeout: raise it)
        or the lookup was asked again :data:`CLOCK_RETRIES` times already."""
        left = self.at - self.clock()
        if self.retries <= 0 or left < LEAST_LIFETIME:
            return None
        self.retries -= 1
        return left
