"""dnspython's lookups kept on a monotonic deadline, whatever the wall clock does.

dnspython measures a lookup's lifetime on the wall clock (``time.time()``) and offers no
other. Stepped forward (NTP, an operator) while a lookup waits, or back by more than a
second, its next query (the TCP one after a truncated answer, the next server's, a retry)
finds the lifetime spent and the lookup fails at once with ``LifetimeTimeout``: a
temporary failure for DNS that answers. The doctor's lookups, the router's, and every
lookup of a resolver :func:`~mailstrom.routing.make_resolver` makes (:class:`SteadyResolver`:
DANE's TLSA lookups, MTA-STS's, the command line's checks) ask again, in what is left of
their deadline on the monotonic clock, when dnspython says so early; a real timeout
leaves nothing, and is raised as before.

A leaf module (it imports nothing of mailstrom but the leaf
:mod:`~mailstrom.dnsanswer`), for synchronous and asyncio code alike. Its resolver also
takes an answer truncated over TCP too for no answer (:func:`~mailstrom.dnsanswer.whole`):

>>> now = [100.0]
>>> deadline = Deadline(102.0, clock=lambda: now[0])
>>> deadline.ask_again()  # dnspython gave up at once: 2 s are left
2.0
>>> now[0] = 102.0
>>> deadline.ask_again() is None  # it gave up when the time was spent
True
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import dns.asyncresolver
import dns.resolver

from mailstrom.dnsanswer import whole

T = TypeVar("T")

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


async def resolve_steadily(
    ask: Callable[[float], Awaitable[T]], lifetime: float, deadline: Deadline
) -> T:
    """``ask(lifetime)`` (a dnspython lookup given that lifetime), asked again in what is
    left of ``deadline`` when it raises ``LifetimeTimeout`` early (:meth:`Deadline.ask_again`)."""
    while True:
        try:
            return await ask(lifetime)
        except dns.resolver.LifetimeTimeout:
            left = deadline.ask_again()
            if left is None:
                raise
            lifetime = left


_LIFETIME_AT = 7
"""Where ``lifetime`` stands among the arguments of dnspython's ``Resolver.resolve``."""


class SteadyResolver(dns.asyncresolver.Resolver):
    """dnspython's async resolver, each lookup's lifetime kept on the monotonic clock
    (:func:`resolve_steadily`): DANE's TLSA lookups failed by a wall clock step made a
    host unusable and deferred its mail, MTA-STS's made a policy unknown. A lookup ends
    when its lifetime is spent (``LifetimeTimeout``), not at dnspython's next look at it."""

    async def resolve(self, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        ask = super().resolve
        if len(args) > _LIFETIME_AT:  # the lifetime given by position: as dnspython takes it
            return whole(await ask(*args, **kwargs))
        given = kwargs.pop("lifetime", None)
        lifetime = float(self.lifetime if given is None else given)
        # dnspython looks at the lifetime only between its rounds of queries, after a
        # back-off of up to 2 s: the lookup would end that much past it.
        timeout = asyncio.timeout(lifetime)
        try:
            async with timeout:
                answer = await resolve_steadily(
                    lambda left: ask(*args, **{**kwargs, "lifetime": left}),
                    lifetime,
                    Deadline.after(lifetime),
                )
        except TimeoutError as exc:
            if not timeout.expired():
                raise
            # What dnspython raises when the lifetime is spent, which callers expect.
            spent = dns.resolver.LifetimeTimeout(timeout=lifetime, errors=[])  # type: ignore[no-untyped-call]
            raise spent from exc
        # Truncated over TCP too: some of the records at most, never the whole set.
        return whole(answer)
