"""Addresses that recently failed to set up an SMTP session, tried after the others.

RFC 5321 §5.1 has a client try a domain's MX hosts in preference order, moving on when one
cannot be reached. Without memory every new session pays for a dead first host again: a
host that drops connection attempts costs the connect timeout (30 s), one that accepts
and never greets the greeting timeout (300 s), before the backup host gets the mail. Exim
keeps a retry time per host for this reason. Here an address whose connection could not be
made, or that gave no greeting or no answer to EHLO in time, is remembered for
``Config.remember_unreachable``; while remembered it goes after every other address of
the route, not out of it: when all the others fail too it is still tried, and a session
it sets up clears it. Replies are not failures to reach a host: a ``421`` greeting says
something about load, not reachability, and follows the usual rules.

The memory is per worker and bounded (the newest :data:`LIMIT` addresses).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

LIMIT = 4096
"""Addresses remembered at most; the oldest note is dropped first."""

T = TypeVar("T")


class UnreachableAddresses:
    """IP addresses that could not be reached lately, until when (monotonic clock)."""

    def __init__(
        self,
        remember_for: float,
        *,
        limit: int = LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remember_for = remember_for
        self._limit = limit
        self._clock = clock
        self._until: dict[str, float] = {}  # oldest note first

    def __bool__(self) -> bool:
        return bool(self._until)

    def note(self, ip: str) -> None:
        """No SMTP session could be set up with ``ip`` just now."""
        if self.remember_for <= 0:
            return
        self._until.pop(ip, None)  # re-inserted as the newest
        self._until[ip] = self._clock() + self.remember_for
        if len(self._until) > self._limit:
            del self._until[next(iter(self._until))]

    def clear(self, ip: str) -> None:
        """A session with ``ip`` was set up: it is reachable again."""
        if self._until:
            self._until.pop(ip, None)

    def down(self, ip: str) -> bool:
        """Whether ``ip`` failed lately (within ``remember_for``)."""
        until = self._until.get(ip)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[ip]
            return False
        return True

    def demote(self, targets: list[tuple[T, str]], start: int = 0) -> None:
        """Move the ``(host, ip)`` targets from ``start`` on whose address is down behind
        the others, each group keeping its order (MX preference)."""
        if not self._until:
            return
        rest = targets[start:]
        down = [self.down(ip) for _, ip in rest]
        if any(down) and not all(down):
            up = [target for target, gone in zip(rest, down, strict=True) if not gone]
            targets[start:] = up + [t for t, gone in zip(rest, down, strict=True) if gone]
