"""Opening SMTP connections as the configuration says, and keeping idle ones for reuse.

The TLS mode follows the policy (or the relay's settings); under the opportunistic policy a
failed TLS handshake is retried on a fresh connection in plaintext, as MTAs do, while a
certificate that fails verification never falls back. Opening a connection costs a TCP
handshake, the greeting, EHLO, usually STARTTLS and a second EHLO, so idle connections are
kept for ``connection_idle`` seconds, keyed by host, address, port and TLS mode (as
Postfix's connection cache keys by address): another destination sharing the MX host
reuses them too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mailstrom.config import Config, RelayTLS, TLSPolicy
from mailstrom.runtime.connection import (
    SMTPConnection,
    StartTLS,
    TLSHandshakeError,
    TLSVerifyError,
)

_STARTTLS_FOR_POLICY = {
    TLSPolicy.OPPORTUNISTIC: StartTLS.OPPORTUNISTIC,
    TLSPolicy.REQUIRED: StartTLS.REQUIRED,
    TLSPolicy.VERIFY: StartTLS.VERIFY,
}


@dataclass(frozen=True, slots=True)
class ConnectionKey:
    host: str
    ip: str
    port: int
    tls_mode: str


class Opener:
    """Opens connections for the worker and keeps the idle ones."""

    def __init__(self, config: Config) -> None:
        self._config = config
        relay = config.relay
        self.port = relay.port if relay else config.smtp_port
        if relay is not None:
            self.mode = {
                RelayTLS.NONE: StartTLS.NEVER,
                RelayTLS.STARTTLS: StartTLS.VERIFY if relay.verify else StartTLS.REQUIRED,
                RelayTLS.IMPLICIT: StartTLS.NEVER,
            }[relay.tls]
        else:
            self.mode = _STARTTLS_FOR_POLICY[config.tls]
        self._idle: dict[ConnectionKey, list[tuple[float, SMTPConnection]]] = {}
        self._idle_count = 0
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def idle_count(self) -> int:
        """Connections kept open for reuse."""
        return self._idle_count

    def key(self, host: str, ip: str) -> ConnectionKey:
        return ConnectionKey(host=host, ip=ip, port=self.port, tls_mode=self.mode)

    def idle(self, key: ConnectionKey) -> SMTPConnection | None:
        """A fresh idle connection for ``key``, taken out of the cache, or None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            since, conn = idle.pop()
            self._idle_count -= 1
            if conn.usable and now - since < self._config.connection_idle:
                return conn
            self.close_later(conn)
        return None

    async def open(self, host: str, ip: str) -> SMTPConnection:
        """A new connection to ``ip`` for ``host`` (see the module docstring for TLS)."""
        mode = self.mode
        try:
            return await self._open(host, ip, mode)
        except TLSVerifyError:
            raise
        except TLSHandshakeError:
            if mode is not StartTLS.OPPORTUNISTIC:
                raise
            # A broken TLS stack on the peer must not stop mail: the same host again, in
            # plaintext, on a fresh connection.
            return await self._open(host, ip, StartTLS.NEVER)

    async def _open(self, host: str, ip: str, starttls: StartTLS) -> SMTPConnection:
        config = self._config
        relay = config.relay
        return await SMTPConnection.open(
            host=host,
            ip=ip,
            port=self.port,
            helo_name=config.helo_name,
            timeouts=config.timeouts,
            starttls=starttls,
            tls_context=config.tls_context,
            implicit_tls=relay is not None and relay.tls is RelayTLS.IMPLICIT,
            source_address=config.source_address,
            auth=(relay.username, relay.password or "")
            if relay is not None and relay.username
            else None,
        )

    def release(self, key: ConnectionKey, conn: SMTPConnection) -> None:
        """Keep ``conn`` for reuse if it can serve more, else close it."""
        config = self._config
        if (
            not conn.usable
            or conn.busy
            or conn.messages_sent >= config.max_messages_per_connection
            or self._idle_count >= config.max_connections
        ):
            self.close_later(conn)
            return
        self._idle.setdefault(key, []).append((time.monotonic(), conn))
        self._idle_count += 1

    def prune(self) -> None:
        """Close connections idle for longer than ``connection_idle``."""
        now = time.monotonic()
        limit = self._config.connection_idle
        for key, idle in list(self._idle.items()):
            fresh = [(t, c) for t, c in idle if now - t < limit and c.usable]
            for t, c in idle:
                if now - t >= limit or not c.usable:
                    self.close_later(c)
            self._idle_count -= len(idle) - len(fresh)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]

    def close_later(self, conn: SMTPConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection and wait for all closes to finish."""
        for idle in self._idle.values():
            for _, conn in idle:
                self.close_later(conn)
        self._idle.clear()
        self._idle_count = 0
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
