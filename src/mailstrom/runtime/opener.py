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

Every socket counts against ``max_connections`` from the moment it starts to open until
it is closed — opening, in use, idle and closing (QUIT sent, its reply or the close not
yet in) alike — and, when a shaping rule limits the destination's connections, against
the rule's ``max_connections`` too (a :class:`~mailstrom.runtime.socket_budget.SocketBudget`
each). Providers count what is open, so the bound holds at every moment:

* a connection opens only once it has a slot of each budget (the rule's first, then the
  worker's: waiting for the worker's slot while holding the rule's blocks no other
  destination); those waiting get slots in turn, as closes give them back;
* a slot waited for is made by closing idle connections, oldest first — ones holding a
  slot of that budget, and only as many as the closes already under way will not
  serve. Otherwise work could wait behind sockets nobody uses until they expire;
* reusing an idle connection needs no slot (it has one), so a connection is kept idle
  only under the same budgets it was counted against: a rule's connection serves that
  rule's destinations alone (:attr:`ConnectionKey.budget`).

This costs nothing per message: the counts change when a connection opens or closes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailstrom.config import Config, RelayTLS
from mailstrom.errors import DeliveryError
from mailstrom.runtime.connection import (
    SMTPConnection,
    StartTLS,
    TLSHandshakeError,
    TLSVerifyError,
)
from mailstrom.runtime.socket_budget import SocketBudget
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
    budget: SocketBudget | None = None
    """The shaping rule's budget the connection counts against besides the worker's (None:
    the worker's alone). Part of the key so that a reused connection is still counted
    where it was opened."""


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
        self.sockets = SocketBudget(config.max_connections)
        """Every socket this opener holds open, against ``max_connections``."""
        self._charges: dict[SMTPConnection, tuple[SocketBudget, ...]] = {}
        """The budgets each open connection holds a slot of, until it is closed."""
        self._idle: dict[ConnectionKey, list[tuple[float, SMTPConnection]]] = {}
        self._idle_keys: dict[SMTPConnection, ConnectionKey] = {}
        """The idle connections again, oldest first: the first to close to make room."""
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def idle_count(self) -> int:
        """Connections kept open for reuse."""
        return len(self._idle_keys)

    def key(
        self,
        host: str,
        ip: str,
        requirement: TLSRequirement,
        *,
        via_next_hop: bool = False,
        budget: SocketBudget | None = None,
    ) -> ConnectionKey:
        """The idle-cache key of a connection to ``ip`` for ``host`` under ``requirement``
        (a DANE connection is only reused under the same TLSA records, and, with a
        DANE-TA(2) record among them, the same reference names). ``via_next_hop``: the
        certificate was accepted only for naming the recipient domain
        (``SMTPConnection.dane_via_next_hop``). ``budget``: the shaping rule's, if any,
        that the connection is opened under (:meth:`open`)."""
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
            budget=budget,
        )

    def idle(self, key: ConnectionKey) -> SMTPConnection | None:
        """A fresh idle connection for ``key``, taken out of the cache, or None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            since, conn = idle.pop()
            if not idle:
                del self._idle[key]  # else a key of every host ever reused stays behind
            del self._idle_keys[conn]
            if conn.usable and now - since < self._config.connection_idle:
                return conn
            self.close_later(conn)
        return None

    async def open(
        self,
        host: str,
        ip: str,
        requirement: TLSRequirement,
        budget: SocketBudget | None = None,
    ) -> SMTPConnection:
        """A new connection to ``ip`` for ``host``, once a slot of ``budget`` (a shaping
        rule's) and of :attr:`sockets` is free (see the module docstring for TLS and for
        the slots)."""
        budgets = (self.sockets,) if budget is None else (budget, self.sockets)
        await self._take(budgets)
        try:
            conn = await self._connect(host, ip, requirement)
        except BaseException:
            # A connection that failed to open was closed before the error came here.
            for taken in budgets:
                taken.give_back()
            raise
        self._charges[conn] = budgets
        return conn

    async def _take(self, budgets: tuple[SocketBudget, ...]) -> None:
        taken: list[SocketBudget] = []
        try:
            for budget in budgets:
                await budget.take(functools.partial(self._make_room, budget))
                taken.append(budget)
        except BaseException:
            for budget in taken:
                budget.give_back()
            raise

    def _make_room(self, budget: SocketBudget) -> None:
        """Close idle connections holding a slot of ``budget``, oldest first, while some
        waiter of it would get no slot from the closes already under way."""
        while budget.short > 0:
            oldest = next(
                (conn for conn in self._idle_keys if budget in self._charges.get(conn, ())),
                None,
            )
            if oldest is None:
                return  # the slots are in use: given back when their sessions are done
            self._forget_idle(oldest)
            self.close_later(oldest)

    def _forget_idle(self, conn: SMTPConnection) -> None:
        key = self._idle_keys.pop(conn)
        idle = self._idle[key]
        idle[:] = [(since, kept) for since, kept in idle if kept is not conn]
        if not idle:
            del self._idle[key]

    async def _connect(self, host: str, ip: str, requirement: TLSRequirement) -> SMTPConnection:
        # With implicit TLS the mode says only whether the certificate is verified.
        mode = STARTTLS_FOR_MODE[requirement.mode]
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
            try:
                conn = await self._open(host, ip, StartTLS.NEVER, ())
            except DeliveryError as lost:
                # The session is still the one whose handshake failed (TLS reports count
                # it): this failure alone said nothing of TLS, and it went uncounted.
                lost.tls_fallback = exc
                raise
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
            plaintext_auth=relay is not None and relay.allow_plaintext_auth,
        )

    def release(self, key: ConnectionKey, conn: SMTPConnection) -> None:
        """Keep ``conn`` for reuse if it can serve more, else close it. Kept, it makes
        room at once if someone waits for a slot it holds (the oldest idle goes)."""
        if (
            not conn.usable
            or conn.busy
            or conn.messages_sent >= self._config.max_messages_per_connection
        ):
            self.close_later(conn)
            return
        self._idle.setdefault(key, []).append((time.monotonic(), conn))
        self._idle_keys[conn] = key
        for budget in self._charges.get(conn, ()):
            self._make_room(budget)

    def prune(self) -> None:
        """Close connections idle for longer than ``connection_idle``."""
        now = time.monotonic()
        limit = self._config.connection_idle
        stale = [
            conn
            for idle in self._idle.values()
            for since, conn in idle
            if now - since >= limit or not conn.usable
        ]
        for conn in stale:
            self._forget_idle(conn)
            self.close_later(conn)

    def close_later(self, conn: SMTPConnection) -> None:
        """Close ``conn`` (not idle) in a task; its slots are given back once it is
        closed, not before."""
        budgets = self._charges.pop(conn, ())
        for budget in budgets:
            budget.closing += 1
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(functools.partial(self._closed, budgets))

    def _closed(self, budgets: tuple[SocketBudget, ...], task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        for budget in budgets:
            budget.closing -= 1
            budget.give_back()

    def abandon(self, conn: SMTPConnection) -> None:
        """Drop ``conn`` (not idle) at once, without QUIT (its session was cancelled);
        its slots are free."""
        conn.abandon()
        for budget in self._charges.pop(conn, ()):
            budget.give_back()

    async def close(self) -> None:
        """QUIT every idle connection and wait for all closes to finish."""
        idle = list(self._idle_keys)
        self._idle.clear()
        self._idle_keys.clear()
        for conn in idle:
            self.close_later(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
