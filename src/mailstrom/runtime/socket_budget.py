"""A bound on sockets open at once: a count, its limit, and who waits for a slot, in turn.

A socket holds its slot from the moment its connection starts to open until it is closed:
while opening, in use, idle (kept for reuse) and closing (QUIT sent, its reply and the
close not yet in). The opener takes a slot before it connects and gives it back when the
close is done (:mod:`mailstrom.runtime.opener` says who takes which budgets); this module
only counts. A slot given back while others wait goes straight to the first of them, so
a steady stream of new connections cannot starve one that waits.

>>> budget = SocketBudget(1)
>>> budget.try_take(), budget.try_take()
(True, False)
>>> budget.give_back(); budget.used
0
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable


class SocketBudget:
    """At most ``limit`` sockets at once (private, mutable: the opener's business)."""

    __slots__ = ("_waiters", "closing", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        """Slots held: sockets opening, in use, idle or closing."""
        self.closing = 0
        """Of those, sockets closing: each gives its slot back soon, without help."""
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def short(self) -> int:
        """Waiters no closing socket will serve: each needs an idle socket closed (or one
        in use given back) before it gets a slot."""
        return len(self._waiters) - self.closing

    def try_take(self) -> bool:
        """Take a slot if one is free. (None is free while someone waits: a slot given
        back goes to the first waiter. A cancelled wait may linger in the line a moment;
        it holds no slot back.)"""
        if self.used < self.limit:
            self.used += 1
            return True
        return False

    async def take(self, on_wait: Callable[[], None]) -> None:
        """Take a slot, waiting in turn when none is free; ``on_wait`` is called once the
        caller is in line (to make room: close an idle socket)."""
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        on_wait()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # handed a slot just as the wait was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def give_back(self) -> None:
        """Free a slot: the first waiter gets it, else it is free."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled wait leaves its future done
                waiter.set_result(None)
                return
        self.used -= 1
