"""One SMTP client connection: asyncio streams driving a sans-IO :class:`ClientSession`.

:meth:`SMTPConnection.open` connects, reads the greeting, says EHLO (HELO when EHLO is
refused), negotiates STARTTLS per :class:`StartTLS` and authenticates if asked.
:meth:`SMTPConnection.send` runs one mail transaction — pipelined in one write when the
server offers PIPELINING — and reports every reply in a :class:`TransactionResult`. Every
wait is bounded by the matching RFC 5321 §4.5.3.2 timeout from
:class:`~mailstrom.config.Timeouts`.

Failures raise the delivery errors of :mod:`mailstrom.errors`: ``SMTPConnectError`` when the
peer cannot be reached or goes away, ``SMTPTimeout`` when it stops answering,
``SMTPProtocolError`` when it talks nonsense, ``TemporaryFailure``/``PermanentFailure`` for a
refused greeting or HELO, ``TLSRequiredError``, and this module's :class:`TLSHandshakeError`
and :class:`TLSVerifyError`.

>>> async def deliver(timeouts):  # doctest: +SKIP
...     conn = await SMTPConnection.open(host="mx.example.org", ip="192.0.2.1", port=25,
...                                      helo_name="mail.example.com", timeouts=timeouts,
...                                      starttls=StartTLS.OPPORTUNISTIC)
...     try:
...         return await conn.send(envelope_from="a@example.com", recipients=["b@example.org"],
...                                data=b"Subject: hi\\r\\n\\r\\nhello\\r\\n",
...                                smtputf8=False, eightbit=False)
...     finally:
...         await conn.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mailstrom.config import Timeouts
from mailstrom.errors import (
    DeliveryError,
    PermanentFailure,
    SMTPConnectError,
    SMTPTimeout,
    TemporaryFailure,
    TLSRequiredError,
)
from mailstrom.smtp import ClientSession, Command, Reply, encode_path
from mailstrom.status import SMTPReply

_READ_SIZE = 64 * 1024
_QUIT_TIMEOUT = 5.0
"""Longest wait for the reply to QUIT: politeness must not hold up a worker."""
_CLOSE_TIMEOUT = 2.0


class StartTLS(StrEnum):
    """What to do about STARTTLS (RFC 3207) on this connection."""

    NEVER = "never"
    """Stay in plaintext even when STARTTLS is offered."""
    OPPORTUNISTIC = "opportunistic"
    """Use TLS when offered; the certificate is not verified (RFC 7435)."""
    REQUIRED = "required"
    """TLS or nothing (:class:`TLSRequiredError`); the certificate is not verified."""
    VERIFY = "verify"
    """TLS with a certificate valid for ``host``, checked against ``tls_context``."""


class TLSHandshakeError(TemporaryFailure):
    """STARTTLS was accepted but the TLS handshake failed or timed out.

    Under :attr:`StartTLS.OPPORTUNISTIC` the caller may retry the same host in plaintext on
    a new connection, as MTAs do.
    """


class TLSVerifyError(TLSHandshakeError):
    """The peer's certificate is not valid for the host name: never fall back to plaintext."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionResult:
    """Every reply of one mail transaction, as far as it went.

    ``final`` is None when the content was never sent, or when the connection was lost or
    timed out after the final dot and before its reply: then ``uncertain`` is True, as the
    server may have accepted the message (RFC 5321 §4.5.3.2.6; RFC 1047).
    """

    mail: SMTPReply | None
    rcpt: tuple[tuple[str, SMTPReply], ...]
    """Per recipient, in the order sent."""
    data: SMTPReply | None
    """The reply to DATA (354 to go ahead), or None if DATA was not sent."""
    final: SMTPReply | None
    uncertain: bool = False

    @property
    def accepted(self) -> tuple[str, ...]:
        """Recipients whose RCPT got a 2xx reply."""
        return tuple(address for address, reply in self.rcpt if 200 <= reply.code < 300)


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    # Opportunistic TLS protects against passive eavesdropping only; MX certificates are
    # commonly self-signed or for another name (RFC 7672 §1.3), so nothing is checked.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def _default_verify_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _tls_context(mode: StartTLS, verify_with: ssl.SSLContext | None) -> ssl.SSLContext:
    if mode is StartTLS.VERIFY:
        return verify_with or _default_verify_context()
    return _unverified_context()


def _failure(reply: SMTPReply, *, host: str, what: str) -> DeliveryError:
    """A Temporary/PermanentFailure carrying ``reply``, by its class (5xx permanent)."""
    cls = PermanentFailure if reply.code >= 500 else TemporaryFailure
    return cls(
        f"{host} refused {what}: {reply}", code=reply.code, enhanced=reply.enhanced, host=host
    )


class SMTPConnection:
    """An open SMTP connection, ready for transactions; make one with :meth:`open`."""

    def __init__(
        self,
        *,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: ClientSession,
        host: str,
        ip: str,
        port: int,
        timeouts: Timeouts,
    ) -> None:
        self.host = host
        """The MX host name (for TLS verification and records)."""
        self.ip = ip
        self.port = port
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.messages_sent = 0
        """Transactions attempted on this connection (for the per-connection cap)."""
        self._reader = reader
        self._writer = writer
        self._session = session
        self._timeouts = timeouts
        self._healthy = True
        self._closed = False

    @property
    def extensions(self) -> Mapping[str, str]:
        """The EHLO keywords of the server (after STARTTLS, those sent over TLS)."""
        return self._session.extensions

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate as ``ssl.SSLSocket.getpeercert()`` gives it — filled in
        only when it was verified (StartTLS.VERIFY); None without TLS (for ``check``)."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.getpeercert()

    @property
    def usable(self) -> bool:
        """False once a transfer failed, the server said 421, or the connection closed."""
        return self._healthy and not self._closed and self._session.can_send(Command.RSET)

    # --- opening -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        *,
        host: str,
        ip: str,
        port: int,
        helo_name: str,
        timeouts: Timeouts,
        starttls: StartTLS,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        source_address: str | None = None,
        auth: tuple[str, str] | None = None,
    ) -> SMTPConnection:
        """Connect to ``ip``:``port`` and get ready to send mail to ``host``.

        ``implicit_tls`` (RFC 8314, port 465) wraps the connection in TLS from the start,
        verified against ``host`` unless ``starttls`` is OPPORTUNISTIC or REQUIRED; STARTTLS
        is then not attempted. ``auth`` is (username, password) for AUTH PLAIN or LOGIN.
        """
        session = ClientSession(helo_name=helo_name)
        context: ssl.SSLContext | None = None
        if implicit_tls:
            unverified = starttls in (StartTLS.OPPORTUNISTIC, StartTLS.REQUIRED)
            context = _tls_context(
                StartTLS.OPPORTUNISTIC if unverified else StartTLS.VERIFY, tls_context
            )
        reader, writer = await _connect(
            host=host,
            ip=ip,
            port=port,
            context=context,
            source_address=source_address,
            seconds=timeouts.connect,
        )
        conn = cls(
            reader=reader,
            writer=writer,
            session=session,
            host=host,
            ip=ip,
            port=port,
            timeouts=timeouts,
        )
        try:
            if context is not None:
                conn._record_tls()
            await conn._greet()
            if not implicit_tls and starttls is not StartTLS.NEVER:
                await conn._starttls(starttls, tls_context)
            if auth is not None:
                await conn._authenticate(*auth)
        except DeliveryError:
            await conn.close()  # politely: QUIT if the session still allows it
            raise
        except BaseException:
            conn._healthy = False  # cancelled or a bug: just drop the connection
            await conn.close()
            raise
        return conn

    async def _greet(self) -> None:
        greeting = await self._reply(self._timeouts.greeting, "the greeting")
        if not greeting.ok:
            raise _failure(greeting.reply, host=self.host, what="the connection")
        await self._hello()

    async def _hello(self) -> None:
        ehlo = await self._command(self._session.ehlo(), self._timeouts.command, "EHLO")
        if ehlo.ok:
            return
        if ehlo.reply.code >= 500 and not ehlo.closing:
            # RFC 5321 §3.2: a server that does not know EHLO gets HELO.
            helo = await self._command(self._session.helo(), self._timeouts.command, "HELO")
            if helo.ok:
                return
            raise _failure(helo.reply, host=self.host, what="HELO")
        raise _failure(ehlo.reply, host=self.host, what="EHLO")

    async def _starttls(self, mode: StartTLS, verify_with: ssl.SSLContext | None) -> None:
        if "STARTTLS" not in self._session.extensions:
            if mode is StartTLS.OPPORTUNISTIC:
                return
            raise TLSRequiredError(f"{self.host} does not offer STARTTLS", host=self.host)
        reply = await self._command(self._session.starttls(), self._timeouts.command, "STARTTLS")
        if not reply.ok:
            if reply.closing:
                raise _failure(reply.reply, host=self.host, what="STARTTLS")
            if mode is StartTLS.OPPORTUNISTIC:
                return
            raise TLSRequiredError(
                f"{self.host} refused STARTTLS: {reply.reply}",
                code=reply.reply.code,
                enhanced=reply.reply.enhanced,
                host=self.host,
            )
        context = _tls_context(mode, verify_with)
        timeout = self._timeouts.command
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(
                    context, server_hostname=self.host, ssl_handshake_timeout=timeout
                )
        except ssl.SSLCertVerificationError as exc:
            self._healthy = False
            raise TLSVerifyError(
                f"certificate of {self.host} not accepted: {exc.verify_message or exc}",
                host=self.host,
            ) from exc
        except TimeoutError as exc:
            self._healthy = False
            raise TLSHandshakeError(
                f"TLS handshake with {self.host} timed out after {timeout:g}s", host=self.host
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            self._healthy = False
            raise TLSHandshakeError(
                f"TLS handshake with {self.host} failed: {exc}", host=self.host
            ) from exc
        self._record_tls()
        self._session.tls_established()
        await self._hello()

    def _record_tls(self) -> None:
        ssl_object = self._writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.tls_cipher = cipher[0] if cipher else None

    async def _authenticate(self, username: str, password: str) -> None:
        session = self._session
        mechanisms = session.auth_mechanisms
        responses: list[bytes] = []
        if "PLAIN" in mechanisms:
            first = session.auth_plain(username, password)
        elif "LOGIN" in mechanisms:
            first = session.auth_login()
            responses = [username.encode(), password.encode()]
        else:
            raise TemporaryFailure(
                f"{self.host} offers no AUTH mechanism we support (PLAIN, LOGIN); "
                f"offered: {session.extensions.get('AUTH', 'none')}",
                host=self.host,
            )
        reply = await self._command(first, self._timeouts.command, "AUTH")
        while reply.reply.code == 334:
            answer = responses.pop(0) if responses else None  # None cancels the exchange
            reply = await self._command(
                session.auth_response(answer), self._timeouts.command, "AUTH"
            )
        if not 200 <= reply.reply.code < 300:
            # Temporary even for 535, as Postfix's smtp_sasl_auth_soft_bounce: wrong
            # credentials are a configuration error to fix, not a reason to bounce mail.
            raise TemporaryFailure(
                f"{self.host} refused authentication: {reply.reply}",
                code=reply.reply.code,
                enhanced=reply.reply.enhanced,
                host=self.host,
            )

    # --- sending -----------------------------------------------------------------------

    async def send(
        self,
        *,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        eightbit: bool,
    ) -> TransactionResult:
        """Send one message to ``recipients`` in one transaction and report every reply.

        ``data`` is the message with CRLF line endings, not dot-stuffed. Before anything is
        sent: a message larger than the server's SIZE raises ``PermanentFailure`` (552
        5.3.4), one needing SMTPUTF8 the server lacks raises ``PermanentFailure`` (553
        5.6.7, RFC 6531 §3.4), and ``eightbit`` without 8BITMIME raises ``ValueError`` (the
        caller must downgrade to 7 bit first). A rejected MAIL or RCPT is returned, not
        raised. Losing the connection or timing out before the final dot raises
        ``SMTPConnectError``/``SMTPTimeout`` (nothing was delivered); after the final dot
        it returns ``uncertain=True``. If the server answers 354 to DATA although no
        recipient was accepted, the connection is closed rather than an empty message sent.
        """
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        if not self.usable:
            raise SMTPConnectError(f"connection to {self.host} is not usable", host=self.host)
        session = self._session
        if eightbit and "8BITMIME" not in session.extensions:
            raise ValueError(f"{self.host} lacks 8BITMIME: downgrade the message to 7 bit")
        limit = session.max_size
        if limit is not None and len(data) > limit:
            raise PermanentFailure(
                f"message size {len(data)} exceeds the limit of {limit} octets of {self.host}",
                code=552,
                enhanced="5.3.4",
                host=self.host,
            )
        for address in (envelope_from, *recipients):
            encode_path(address, smtputf8)  # ValueError now rather than mid-transaction
        if smtputf8 and "SMTPUTF8" not in session.extensions:
            raise PermanentFailure(
                f"message needs SMTPUTF8, which {self.host} does not support",
                code=553,
                enhanced="5.6.7",
                host=self.host,
            )
        reset = self.messages_sent > 0
        self.messages_sent += 1
        try:
            if session.pipelining:
                return await self._send_pipelined(
                    envelope_from, recipients, data, smtputf8, eightbit, reset
                )
            return await self._send_stepwise(
                envelope_from, recipients, data, smtputf8, eightbit, reset
            )
        except BaseException:
            self._healthy = False
            raise

    async def _send_pipelined(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        eightbit: bool,
        reset: bool,
    ) -> TransactionResult:
        command = self._timeouts.command
        batch = self._session.envelope(
            sender, recipients, size=len(data), eightbit=eightbit, smtputf8=smtputf8, reset=reset
        )
        await self._write(batch, command, "MAIL")
        if reset:
            rset = await self._reply(command, "RSET")
            if rset.closing:
                raise _failure(rset.reply, host=self.host, what="RSET")
        mail = await self._reply(command, "MAIL")
        if mail.closing:
            return TransactionResult(mail=mail.reply, rcpt=(), data=None, final=None)
        rcpt = await self._rcpt_replies(recipients)
        data_reply = await self._reply(self._timeouts.data_init, "DATA")
        return await self._after_data(mail.reply, rcpt, data_reply, data)

    async def _send_stepwise(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        eightbit: bool,
        reset: bool,
    ) -> TransactionResult:
        session = self._session
        command = self._timeouts.command
        if reset:
            rset = await self._command(session.rset(), command, "RSET")
            if rset.closing:
                raise _failure(rset.reply, host=self.host, what="RSET")
        mail = await self._command(
            session.mail(sender, size=len(data), eightbit=eightbit, smtputf8=smtputf8),
            command,
            "MAIL",
        )
        if not mail.ok:
            return TransactionResult(mail=mail.reply, rcpt=(), data=None, final=None)
        rcpt: list[tuple[str, SMTPReply]] = []
        for address in recipients:
            reply = await self._command(session.rcpt(address, smtputf8=smtputf8), command, "RCPT")
            if reply.closing:
                raise _failure(reply.reply, host=self.host, what=f"RCPT TO:<{address}>")
            rcpt.append((address, reply.reply))
        if not any(200 <= r.code < 300 for _, r in rcpt):
            return TransactionResult(mail=mail.reply, rcpt=tuple(rcpt), data=None, final=None)
        data_reply = await self._command(session.data(), self._timeouts.data_init, "DATA")
        return await self._after_data(mail.reply, tuple(rcpt), data_reply, data)

    async def _rcpt_replies(self, recipients: Sequence[str]) -> tuple[tuple[str, SMTPReply], ...]:
        rcpt: list[tuple[str, SMTPReply]] = []
        for address in recipients:
            reply = await self._reply(self._timeouts.command, "RCPT")
            if reply.closing:
                # The replies for the remaining recipients will never come.
                raise _failure(reply.reply, host=self.host, what=f"RCPT TO:<{address}>")
            rcpt.append((address, reply.reply))
        return tuple(rcpt)

    async def _after_data(
        self,
        mail: SMTPReply,
        rcpt: tuple[tuple[str, SMTPReply], ...],
        data_reply: Reply,
        data: bytes,
    ) -> TransactionResult:
        accepted = 200 <= mail.code < 300 and any(200 <= r.code < 300 for _, r in rcpt)
        if data_reply.reply.code != 354:
            return TransactionResult(mail=mail, rcpt=rcpt, data=data_reply.reply, final=None)
        if not accepted:
            # The server wants content for a transaction without recipients (pipelined
            # DATA after every RCPT failed): sending even an empty body could deliver
            # something, so drop the connection instead.
            self._healthy = False
            await self.close()
            return TransactionResult(mail=mail, rcpt=rcpt, data=data_reply.reply, final=None)
        # Body and final dot in one write; failing here means the dot never left.
        await self._write(self._session.body(data), self._timeouts.data_block, "the message")
        try:
            final = await self._reply(self._timeouts.data_end, "the end of data")
        except DeliveryError:
            # The dot was sent; whether the server took the message is unknown.
            self._healthy = False
            return TransactionResult(
                mail=mail, rcpt=rcpt, data=data_reply.reply, final=None, uncertain=True
            )
        return TransactionResult(mail=mail, rcpt=rcpt, data=data_reply.reply, final=final.reply)

    # --- I/O ---------------------------------------------------------------------------

    async def _command(self, line: bytes, seconds: float, what: str) -> Reply:
        await self._write(line, seconds, what)
        return await self._reply(seconds, what)

    async def _write(self, data: bytes, seconds: float, what: str) -> None:
        async with self._guard(seconds, f"sending {what}", f"take {what}"):
            self._writer.write(data)
            await self._writer.drain()

    async def _reply(self, seconds: float, what: str) -> Reply:
        session = self._session
        event = session.next_event()
        if isinstance(event, Reply):
            return event
        async with self._guard(seconds, f"waiting for {what}", f"reply to {what}"):
            while True:
                received = await self._reader.read(_READ_SIZE)
                if not received:
                    raise SMTPConnectError(
                        f"{self.host} closed the connection before replying to {what}",
                        host=self.host,
                    )
                session.receive_data(received)
                event = session.next_event()
                if isinstance(event, Reply):
                    return event

    @contextlib.asynccontextmanager
    async def _guard(self, seconds: float, doing: str, expected: str) -> AsyncIterator[None]:
        """Bound one step by ``seconds`` and turn what can go wrong into our errors; any
        failure leaves the connection unusable."""
        try:
            async with asyncio.timeout(seconds):
                yield
        except DeliveryError as exc:
            # Our own SMTPConnectError (an OSError) or the peer's SMTPProtocolError.
            self._healthy = False
            exc.host = exc.host or self.host
            raise
        except TimeoutError:
            self._healthy = False
            raise SMTPTimeout(
                f"{self.host} did not {expected} within {seconds:g}s", host=self.host
            ) from None
        except OSError as exc:
            self._healthy = False
            raise SMTPConnectError(
                f"connection to {self.host} lost {doing}: {exc}", host=self.host
            ) from exc

    # --- closing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Say QUIT if the connection is healthy (briefly), then close it. Never raises."""
        if self._closed:
            return
        self._closed = True
        writer = self._writer
        polite = self._healthy and self._session.can_send(Command.QUIT)
        try:
            if polite:
                timeout = min(self._timeouts.command, _QUIT_TIMEOUT)
                with contextlib.suppress(DeliveryError):
                    await self._command(self._session.quit(), timeout, "QUIT")
            if self._healthy:
                writer.close()
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await writer.wait_closed()
                return
        except Exception:  # noqa: S110 - closing must not fail the caller
            pass
        except BaseException:  # cancelled: still release the socket
            writer.transport.abort()
            raise
        # A broken connection (or one that would not close): drop it at once.
        with contextlib.suppress(Exception):
            writer.transport.abort()
            await asyncio.sleep(0)  # let the transport release its socket


async def _connect(
    *,
    host: str,
    ip: str,
    port: int,
    context: ssl.SSLContext | None,
    source_address: str | None,
    seconds: float,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(seconds):
            return await asyncio.open_connection(
                ip,
                port,
                ssl=context,
                server_hostname=host if context is not None else None,
                ssl_handshake_timeout=seconds if context is not None else None,
                local_addr=(source_address, 0) if source_address else None,
            )
    except ssl.SSLCertVerificationError as exc:
        raise TLSVerifyError(
            f"certificate of {host} not accepted: {exc.verify_message or exc}", host=host
        ) from exc
    except ssl.SSLError as exc:
        raise TLSHandshakeError(f"TLS handshake with {host} failed: {exc}", host=host) from exc
    except TimeoutError:
        raise SMTPTimeout(
            f"connecting to {ip} port {port} timed out after {seconds:g}s", host=host
        ) from None
    except OSError as exc:
        raise SMTPConnectError(
            f"cannot connect to {ip} port {port}: {exc.strerror or exc}", host=host
        ) from exc
