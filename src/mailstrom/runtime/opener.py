"""Opening SMTP connections as the configuration says, and keeping idle ones for reuse.

The TLS mode of each connection is what :class:`~mailstrom.tls.decide.TLSDecider` decided
for its destination and MX host (:class:`~mailstrom.tls.requirement.TLSRequirement`); under
the opportunistic mode a failed TLS handshake is retried on a fresh connection in
plaintext, as MTAs do, and the host is remembered as broken (``on_tls_broken``) so that
the next attempts go straight to plaintext; a certificate that fails verification never
falls back. Opening a connection costs a TCP handshake, the greeting, EHLO, usually
STARTTLS and a second EHLO, so idle connections are kept for ``connection_idle`` seconds,
keyed by host, address, port and TLS mode (as Postfix's connection cache keys by address):
another destination sharing the MX host with the same requirement reuses them too. Under
DANE the TLSA records join the key, and with a DANE-TA(2) record the names the certificate
was checked against: the host's own, or those and the recipient domain when only that one
matched (see :meth:`Opener.key`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailstrom.config import Config, RelayTLS
from mailstrom.runtime.connection import (
    SMTPConnection,
    StartTLS,
    TLSHandshakeError,
    TLSVerifyError,
)
from mailstrom.tls.requirement import TLSARecord, TLSMode, TLSRequirement

STARTTLS_FOR_MODE = {
    TLSMode.NONE: StartTLS.NEVER,
    TLSMode.OPPORTUNISTIC: StartTLS.OPPORTUNISTIC,
    TLSMode.REQUIRED: StartTLS.REQUIRED,
    TLSMode.VERIFY: StartTLS.VERIFY,
    TLSMode.DANE: StartTLS.DANE,
}


@dataclass(frozen=True, slots=True)
class ConnectionKey:
    host: str
    ip: str
    port: int
    tls_mode: str
    tlsa: tuple[TLSARecord, ...] = ()
    dane_names: tuple[str, ...] = ()
    """The DANE-TA(2) reference names the certificate was accepted for; empty when no
    name was checked (see :meth:`Opener.key`)."""


def _names_checked(tlsa: tuple[TLSARecord, ...]) -> bool:
    """Whether a certificate matching ``tlsa`` may have been accepted for its names: a
    usable DANE-TA(2) record is among them."""
    return any(record.usage == 2 and record.usable for record in tlsa)


class Opener:
    """Opens connections for the worker and keeps the idle ones."""

    def __init__(
        self, config: Config, *, on_tls_broken: Callable[[str, str], None] | None = None
    ) -> None:
        """``on_tls_broken(host, reason)`` is told of each host whose TLS handshake failed
        under the opportunistic mode (before the plaintext retry)."""
        self._config = config
        relay = config.relay
        self.port = relay.port if relay else config.smtp_port
        self._implicit = relay is not None and relay.tls is RelayTLS.IMPLICIT
        self._on_tls_broken = on_tls_broken
        self._idle: dict[ConnectionKey, list[tuple[float, SMTPConnection]]] = {}
        self._idle_count = 0
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def idle_count(self) -> int:
        """Connections kept open for reuse."""
        return self._idle_count

    def key(
        self, host: str, ip: str, requirement: TLSRequirement, *, via_next_hop: bool = False
    ) -> ConnectionKey:
        """The idle-cache key of a connection to ``ip`` for ``host`` under ``requirement``
        (a DANE connection is only reused under the same TLSA records, and, with a
        DANE-TA(2) record among them, the same reference names). ``via_next_hop``: the
        certificate was accepted only for naming the recipient domain
        (``SMTPConnection.dane_via_next_hop``)."""
        # A DANE-TA certificate is accepted for the names it carries (RFC 7672 §3.2.2).
        # The host's own names depend on the host alone, so a connection accepted through
        # them serves every domain this host receives for; one accepted only because its
        # certificate names example.org proves nothing for example.net's mail, so that
        # domain joins its key. DANE-EE checks no name: no names in the key.
        names: tuple[str, ...] = ()
        if _names_checked(requirement.tlsa):
            names = requirement.dane_names or (host,)
            if via_next_hop:
                names = (*names, *requirement.dane_next_hops)
        return ConnectionKey(
            host=host,
            ip=ip,
            port=self.port,
            tls_mode=requirement.mode,
            tlsa=requirement.tlsa,
            dane_names=names,
        )

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

    async def open(self, host: str, ip: str, requirement: TLSRequirement) -> SMTPConnection:
        """A new connection to ``ip`` for ``host`` (see the module docstring for TLS)."""
        mode = StartTLS.NEVER if self._implicit else STARTTLS_FOR_MODE[requirement.mode]
        try:
            return await self._open(
                host,
                ip,
                mode,
                requirement.tlsa,
                requirement.dane_names,
                requirement.dane_next_hops,
            )
        except TLSVerifyError:
            raise
        except TLSHandshakeError as exc:
            if mode is not StartTLS.OPPORTUNISTIC:
                raise
            if self._on_tls_broken is not None:
                self._on_tls_broken(host, exc.text)
            # A broken TLS stack on the peer must not stop mail: the same host again, in
            # plaintext, on a fresh connection.
            conn = await self._open(host, ip, StartTLS.NEVER, ())
            conn.tls_fallback = exc
            return conn

    async def _open(
        self,
        host: str,
        ip: str,
        starttls: StartTLS,
        tlsa: tuple[TLSARecord, ...],
        dane_names: tuple[str, ...] = (),
        dane_next_hops: tuple[str, ...] = (),
    ) -> SMTPConnection:
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
            tlsa=tlsa,
            dane_names=dane_names,
            dane_next_hops=dane_next_hops,
            implicit_tls=self._implicit,
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
