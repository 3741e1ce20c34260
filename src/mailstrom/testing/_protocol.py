"""The SMTP side of a receiving server: aiosmtpd's protocol and handler, applying a
:class:`~mailstrom.testing.smtp.ReceivingServer`'s rules on each connection (stalls,
drops, scripted replies, broken TLS) and recording what arrived in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, AnyStr, cast

from mailstrom.testing._conversation import Conversation
from mailstrom.testing._extra import missing_extra
from mailstrom.testing._receiving import ReceivedMessage, ReceivingServer

try:
    from aiosmtpd.smtp import SMTP, Envelope, LoginPassword, Session, TLSSetupException
except ImportError as exc:
    raise missing_extra(exc) from exc


async def _forever() -> None:
    """Stall: wait until the connection is lost (which cancels the handler)."""
    await asyncio.Event().wait()


class _Handler:
    """aiosmtpd hooks applying the server's rules and recording messages."""

    def __init__(self, fixture: ReceivingServer) -> None:
        self.fixture = fixture

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        fixture = self.fixture
        if fixture.ehlo_reply is not None:
            return [fixture.ehlo_reply]
        session.host_name = hostname
        # Without ``auth``, aiosmtpd still offered AUTH over TLS (and refused every login).
        lines = [
            r
            for r in responses
            if (fixture.eightbitmime or r != "250-8BITMIME")
            and (fixture.auth is not None or not r.startswith("250-AUTH"))
        ]
        extra = []
        if fixture.pipelining:
            extra.append("250-PIPELINING")
        if fixture.enhancedstatuscodes:
            extra.append("250-ENHANCEDSTATUSCODES")
        if fixture.dsn:
            extra.append("250-DSN")
        if fixture.requiretls and _over_tls(server):
            extra.append("250-REQUIRETLS")  # RFC 8689 §2: only over TLS
        return lines[:1] + extra + lines[1:]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.fixture.take(self.fixture.mail_reply, key="mail") or "250 2.1.0 OK"
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.lower() in self.fixture.stall_rcpts:
            await _forever()
        limit = self.fixture.rcpt_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            reply = "452 4.5.3 Too many recipients"
        else:
            reply = self.fixture.rcpt_rule(address) or "250 2.1.5 OK"
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        self.fixture._note_rcpt(address, reply)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fixture = self.fixture
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
        drop = fixture.drop_on == "dot" or any(
            r.lower() in fixture.drop_after_dot_rcpts for r in envelope.rcpt_tos
        )
        silent = drop or fixture.stall_on == "dot"
        reply = None
        if not silent:
            reply = fixture.take(fixture.data_reply, key="data") or "250 2.0.0 OK queued"
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            tls=ssl_object is not None,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            helo=session.host_name,
            auth_login=login.decode() if login is not None else None,
            peer=(str(peer[0]), int(peer[1])),
            reply=reply,
        )
        fixture.record(message, accepted=reply is not None and reply.startswith("2"))
        if reply is None:
            if drop and transport is not None:
                transport.close()
            await _forever()
        assert reply is not None
        if fixture.data_delay > 0:
            await asyncio.sleep(fixture.data_delay)  # the scripted slow peer
        return reply

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay = self.fixture.quit_delay
        if delay > 0:
            await asyncio.sleep(delay)  # the scripted slow peer, not a wait of the test's
        return "221 Bye"  # aiosmtpd's own reply


_DSN_PARAMS = frozenset({"RET", "ENVID", "NOTIFY", "ORCPT"})
_mail_log = logging.getLogger("mail.log")
"""aiosmtpd's logger, which the server's own lines join."""


def _over_tls(server: SMTP) -> bool:
    """Whether the connection is over TLS: after STARTTLS, or from the first byte
    (``implicit_tls``), where aiosmtpd's own mark of TLS, set by STARTTLS alone, is unset."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _SMTP(SMTP):
    """aiosmtpd's server plus what it lacks: stalls, drops, a custom greeting, broken TLS."""

    def __init__(self, handler: _Handler, *, fixture: ReceivingServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._fixture = fixture
        self._greeted = False
        self._counted_in: int | None = None
        self._conversation: Conversation | None = None
        """What the server keeps of this connection for a failed wait's message."""
        self._mails = 0  # MAIL commands this connection has given
        self._on_lost: Callable[[_SMTP], None] | None = None
        """Called once the connection is closed (the controller forgets it)."""
        self._smtp_methods = {
            name: self._wrap(name, method) for name, method in self._smtp_methods.items()
        }

    def _wrap(self, name: str, method: Callable[[str], Any]) -> Callable[[str], Any]:
        async def wrapped(arg: str) -> None:
            fixture = self._fixture
            fixture.commands.append(name)
            if self._conversation is not None:
                self._conversation.said(name, arg)
            if self._reader._buffer:  # type: ignore[attr-defined]
                fixture.pipelined += 1
            if fixture.drop_on == name.lower():
                if self.transport is not None:
                    self.transport.close()
                await _forever()
            if fixture.stall_on == name.lower():
                await _forever()
            await method(arg)

        return wrapped

    async def handle_exception(self, error: Exception) -> str:
        # A client breaking off the TLS handshake (what many tests do on purpose) made
        # aiosmtpd log an ERROR and a traceback: the client's doing, told in one line.
        if isinstance(error, TLSSetupException) and self.session is not None:
            why = error.__cause__ or error
            _mail_log.info("%r TLS handshake failed: %r", self.session.peer, why)
            return "421 4.7.0 TLS handshake failed"  # not sent: aiosmtpd hangs up
        return await super().handle_exception(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the switch to TLS after STARTTLS
            fixture = self._fixture
            fixture.connections += 1
            fixture.connected_at.append(time.time())
            fixture.open_connections += 1
            fixture.peak_connections = max(fixture.peak_connections, fixture.open_connections)
            self._counted_in = fixture.generation
            self._conversation = Conversation(
                fixture.connections, transport.get_extra_info("peername")
            )
            with fixture._condition:  # a failed wait reads them on another thread
                fixture._conversations.append(self._conversation)
        elif self._conversation is not None:
            self._conversation.tls = True  # the handshake after STARTTLS is done
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conversation is not None:
            self._conversation.lost(exc)
        if self._on_lost is not None:
            self._on_lost(self)  # before the count: a test sees 0 open once it is forgotten
        # Only connections counted since the last reset (not the start-up probe's).
        if self._counted_in == self._fixture.generation:
            self._counted_in = None
            self._fixture.open_connections -= 1
        super().connection_lost(exc)

    async def push(self, status: AnyStr) -> None:
        fixture = self._fixture
        if not self._greeted:
            self._greeted = True
            if fixture.drop_on == "greeting" and self.transport is not None:
                self.transport.close()
                await _forever()
            if fixture.stall_on == "greeting":
                await _forever()
            if fixture.greeting is not None:
                self._answered(fixture.greeting)
                await super().push(fixture.greeting.replace("\n", "\r\n").replace("\r\r", "\r"))
                if not fixture.greeting.startswith("2") and self.transport is not None:
                    self.transport.close()
                return
        self._answered(status)
        await super().push(status)

    def _answered(self, status: str | bytes) -> None:
        # Every line: a scripted reply may have several ("220-...\n220 ..."), and with its
        # first alone noted, the next reply was taken for the rest of it, and left out.
        if self._conversation is not None:
            text = status if isinstance(status, str) else status.decode("utf-8", "replace")
            for line in text.rstrip("\r\n").split("\n"):
                self._conversation.answered(line.rstrip("\r"))

    async def smtp_MAIL(self, arg: str) -> None:
        fixture = self._fixture
        limit = fixture.messages_per_connection
        if limit is not None and self._mails >= limit:
            if fixture.over_limit_reply is not None:
                await self.push(fixture.over_limit_reply)
            if self.transport is not None:
                self.transport.close()
            await _forever()
        self._mails += 1
        # REQUIRETLS is a parameter aiosmtpd does not know: take it off and note it.
        requiretls = False
        if self._fixture.requiretls and _over_tls(self) and arg:
            words = arg.split(" ")
            kept = [w for w in words if w.upper() != "REQUIRETLS"]
            requiretls = len(kept) != len(words)
            arg = " ".join(kept)
        await super().smtp_MAIL(self._take_dsn("MAIL", arg))
        envelope = self.envelope
        if requiretls and envelope is not None and envelope.mail_from is not None:
            envelope.mail_options.append("REQUIRETLS")

    async def smtp_RCPT(self, arg: str) -> None:
        await super().smtp_RCPT(self._take_dsn("RCPT", arg))

    async def smtp_AUTH(self, arg: str) -> None:
        if self._fixture.auth is None:  # a server without AUTH, as it advertises none
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    def _take_dsn(self, command: str, arg: str) -> str:
        """With ``dsn=True``, record the RFC 3461 parameters of ``arg`` and hand aiosmtpd
        the rest (it refuses parameters it does not know with 555)."""
        if not self._fixture.dsn or not arg:
            return arg
        path, *params = arg.split(" ")
        dsn = tuple(p for p in params if p.partition("=")[0].upper() in _DSN_PARAMS)
        if dsn:
            address = path.partition(":")[2].strip("<>")
            self._fixture.dsn_params.append((command, address, dsn))
        return " ".join([path, *(p for p in params if p not in dsn)])

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self._fixture.starttls_reply
        if reply is not None:
            await self.push(reply)
            if reply.startswith("421") and self.transport is not None:
                self.transport.close()
            return
        if not self._fixture.tls_broken:
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 2.0.0 Ready to start TLS")
        # Answer the ClientHello with bytes that are no TLS record, then hang up: the
        # client's handshake fails as it would against a broken TLS stack.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader.read(1), 5.0)
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).write(b"220 this is not TLS\r\n" * 8)
            self.transport.close()
