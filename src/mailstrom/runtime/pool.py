"""Reuse SMTP connections per (MX host, address, port, TLS mode) and bound concurrency.

Opening a connection costs a TCP handshake, the greeting, EHLO, usually STARTTLS and a second
EHLO: several round trips and a TLS handshake. Reusing it for further messages to the same
host (with RSET between transactions) is what makes high throughput possible, as in Postfix's
connection cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mailstrom.runtime.connection import SMTPConnection


@dataclass(frozen=True, slots=True)
class PoolKey:
    host: str
    ip: str
    port: int
    tls_mode: str


@dataclass(slots=True)
class _Slot:
    semaphore: asyncio.Semaphore
    users: int = 0


class ConnectionPool:
    """Idle connections kept for reuse, and per-destination and global session limits."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_destination: int,
        max_messages_per_connection: int,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._global = asyncio.Semaphore(max_connections)
        self._per_destination: dict[str, _Slot] = {}
        self._max_per_destination = max_per_destination
        self._max_messages = max_messages_per_connection
        self._idle_seconds = idle_seconds
        self._max_idle = max_connections
        self._clock = clock
        self._idle: dict[PoolKey, list[tuple[float, SMTPConnection]]] = {}
        self._idle_count = 0
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def slot(self, destination: str) -> AsyncIterator[None]:
        """Hold one session slot for ``destination`` (and one of the global ones)."""
        entry = self._per_destination.get(destination)
        if entry is None:
            entry = self._per_destination[destination] = _Slot(
                asyncio.Semaphore(self._max_per_destination)
            )
        entry.users += 1
        try:
            async with entry.semaphore, self._global:
                yield
        finally:
            # Forget idle destinations: a worker sees many domains over its life.
            entry.users -= 1
            if entry.users == 0:
                del self._per_destination[destination]

    async def acquire(
        self, key: PoolKey, opener: Callable[[], Awaitable[SMTPConnection]]
    ) -> SMTPConnection:
        """An idle connection for ``key`` if one is still fresh, else a new one."""
        idle = self._idle.get(key)
        now = self._clock()
        while idle:
            since, conn = idle.pop()
            self._idle_count -= 1
            if conn.usable and now - since < self._idle_seconds:
                return conn
            self._close_later(conn)
        return await opener()

    def release(self, key: PoolKey, conn: SMTPConnection) -> None:
        """Give a connection back after a transaction; keep it only if it can serve more."""
        if (
            not conn.usable
            or conn.messages_sent >= self._max_messages
            or self._idle_count >= self._max_idle
        ):
            self._close_later(conn)
            return
        self._idle.setdefault(key, []).append((self._clock(), conn))
        self._idle_count += 1

    def discard(self, conn: SMTPConnection) -> None:
        self._close_later(conn)

    def prune(self) -> None:
        """Close connections idle for longer than the idle limit."""
        now = self._clock()
        for key, idle in list(self._idle.items()):
            fresh = [(t, c) for t, c in idle if now - t < self._idle_seconds and c.usable]
            for t, c in idle:
                if (t, c) not in fresh:
                    self._close_later(c)
            self._idle_count -= len(idle) - len(fresh)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]

    def _close_later(self, conn: SMTPConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection and wait for all closes to finish."""
        for idle in self._idle.values():
            for _, conn in idle:
                self._close_later(conn)
        self._idle.clear()
        self._idle_count = 0
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
