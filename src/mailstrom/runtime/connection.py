"""One SMTP client connection: an :class:`asyncio.Protocol` driving a sans-IO session.

:meth:`SMTPConnection.open` connects, reads the greeting, says EHLO (HELO when EHLO is
refused), negotiates STARTTLS per :class:`StartTLS` and authenticates if asked. Then mail
transactions are handed over with :meth:`SMTPConnection.submit` (or awaited one at a time
with :meth:`SMTPConnection.send`; the transaction machine is in
:mod:`mailstrom.runtime.transactions`). Everything after the handshake runs in the
protocol's callbacks, without a task, stream or context manager per command:

* with PIPELINING (RFC 2920) a transaction's MAIL, every RCPT and DATA go out in one
  write, and the next submitted transaction's envelope rides in the same write as this
  one's content and final dot (§3.1 lets the content open a group), so a stream of messages
  costs one round trip each;
* without PIPELINING each command waits for the reply to the one before;
* one deadline per connection enforces the RFC 5321 §4.5.3.2 timeout of whatever reply is
  due (:class:`~mailstrom.config.Timeouts`): each reply must be complete within its own
  timeout, so the deadline moves when a reply is complete, never for part of one.

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
import errno
import functools
import math
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, cast

from mailstrom.config import Timeouts
from mailstrom.domains import literal_address
from mailstrom.errors import (
    DeliveryError,
    LocalResourceShortage,
    SMTPConnectError,
    SMTPProtocolError,
    SMTPTimeout,
    TemporaryFailure,
    TLSRequiredError,
    local_shortage,
)
from mailstrom.runtime.transactions import (
    Handler,
    TransactionsMixin,
    cut_short,
    failure,
    not_written,
)
from mailstrom.runtime.transactions import TransactionResult as TransactionResult
from mailstrom.smtp import ClientSession, Command, Reply
from mailstrom.smtp.session import State
from mailstrom.status import SMTPReply
from mailstrom.tls.danematch import DaneMismatch, match_chain
from mailstrom.tls.requirement import TLSARecord
from mailstrom.tls.trust import verifying_context

_ENCODING_DER = 2
"""``_ssl.ENCODING_DER``: the form ``Certificate.public_bytes`` gives DER in."""
_QUIT_TIMEOUT = 5.0
"""Longest wait for the reply to QUIT: politeness must not hold up a worker."""
_CLOSE_TIMEOUT = 2.0
_DOT_CHECK = 0.005
"""Seconds between looks at a final dot still in the write buffer: a connection lost
after it left is uncertain, one lost before it left has delivered nothing."""
_TAKING = "take the message"
"""What the peer is waited for while content is still in this process, paused or not:
to take it, each write within ``data_block`` (RFC 5321 §4.5.3.2.5)."""


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
    DANE = "dane"
    """TLS with a certificate chain matching the ``tlsa`` records (RFC 7672); no STARTTLS
    or no match is a failure that never falls back to plaintext."""


class TLSHandshakeError(TemporaryFailure):
    """STARTTLS was accepted but the TLS handshake failed or timed out.

    Under :attr:`StartTLS.OPPORTUNISTIC` the caller may retry the same host in plaintext on
    a new connection, as MTAs do.
    """


class TLSVerifyError(TLSHandshakeError):
    """The peer's certificate is not valid for the host name: never fall back to plaintext."""


class Abandoned(SMTPConnectError):
    """The worker dropped the connection itself (it stops): nothing went wrong with the
    peer or the network, which is what a reason built on this error says."""


class STARTTLSRefused(TemporaryFailure):
    """The server offered STARTTLS, refused it (``454``, or ``421`` closing the channel)
    and ended the session there. Its own type for TLS reports: a session that failed to
    get TLS, RFC 8460's ``starttls-not-supported``, which as a plain TemporaryFailure
    counted as nothing."""


class ServiceClosing(TemporaryFailure):
    """The server answered the greeting, EHLO or HELO with ``421``: it is closing the
    channel before any session could start (RFC 5321 §3.8), which says it takes no more
    connections now: a throttle of the whole destination (:mod:`mailstrom.policy.throttle`).
    A ``421`` later in the set-up (to STARTTLS, AUTH) ends that session alone."""


def _refused_setup(reply: SMTPReply, *, host: str, what: str) -> DeliveryError:
    """The failure of a greeting, EHLO or HELO answered with ``reply``."""
    if reply.code != 421:
        return failure(reply, host=host, what=what)
    return ServiceClosing(
        f"{host} refused {what}: {reply}",
        code=reply.code,
        enhanced=reply.enhanced,
        host=host,
        reply=reply,
    )


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
    # Kept once made: verifying_context raises (no context kept) where the system's CAs
    # could not be read, which out of descriptors made a context trusting none.
    return verifying_context()


def _tls_context(mode: StartTLS, verify_with: ssl.SSLContext | None) -> ssl.SSLContext:
    # DANE checks the chain against TLSA records after the handshake (_check_dane).
    if mode is StartTLS.VERIFY:
        return verify_with or _default_verify_context()
    return _unverified_context()


_MAX_HOST_NAME = 253
"""Characters in the longest host name (RFC 1035 §2.3.4's 255 octets, as text)."""


def _tls_name(host: str) -> str | None:
    """The name TLS sends as SNI and checks the certificate against: ``host``, but for an
    address literal (mail to ``user@[192.0.2.1]`` has ``[192.0.2.1]`` for its MX host) its
    address. Python's ssl matches an address against the certificate's IP addresses and
    leaves it out of SNI (RFC 6066 §3 permits no address there); the bracketed literal is
    no name any certificate can hold, and a strict TLS server refuses it as SNI.

    None for a name DNS allows but that is no host name: a label may hold any octet, and
    sixteen NULs are 64 characters once written as text ("\\000" each), which ssl's IDNA
    encoding refuses with a UnicodeError (and OpenSSL refuses SNI over 255 octets). Such
    a name cannot be sent as SNI nor found in a certificate."""
    address = literal_address(host)
    if address is not None:
        return str(address)
    try:
        encoded = host.encode("idna")  # what ssl does with server_hostname
    except UnicodeError:
        return None
    return host if len(encoded) <= _MAX_HOST_NAME else None


def _unnamed(host: str) -> TLSVerifyError:
    """The failure of a TLS connection that must check a certificate against ``host``,
    whose name no certificate can hold (see :func:`_tls_name`)."""
    return TLSVerifyError(
        f"the certificate of {host[:100]} cannot be checked: its name is no host name",
        host=host,
    )


def _reply_deadlines(timeouts: Timeouts) -> dict[Command, tuple[float, str]]:
    """Per command, how long its reply may take to complete and how a timeout names it
    (RFC 5321 §4.5.3.2; QUIT capped by ``_QUIT_TIMEOUT``)."""
    deadlines = {command: (timeouts.command, f"reply to {command.value}") for command in Command}
    deadlines[Command.GREETING] = (timeouts.greeting, "reply to the greeting")
    deadlines[Command.DATA] = (timeouts.data_init, "reply to DATA")
    deadlines[Command.BODY] = (timeouts.data_end, "reply to the end of data")
    deadlines[Command.QUIT] = (min(timeouts.command, _QUIT_TIMEOUT), "reply to QUIT")
    return deadlines


class _BeforeTLS(asyncio.Protocol):
    """A connection's protocol until its implicit TLS starts: it reads nothing, so that
    every octet the server sends goes to the TLS handshake (a plaintext greeting fails
    it, as it would with the TLS transport from the start), never lost or read as SMTP."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).pause_reading()


# Session states in which transactions can be submitted (some may be on the wire).
_TRANSACTING = frozenset({State.READY, State.MAIL, State.DATA})


class SMTPConnection(TransactionsMixin, asyncio.Protocol):
    """An open SMTP connection, ready for transactions; make one with :meth:`open`."""

    def __init__(
        self,
        *,
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
        self.encrypted = False
        """TLS is up (implicit or after STARTTLS): what follows goes encrypted."""
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.dane_match: str | None = None
        """Which TLSA record the peer's certificate matched (DANE connections only)."""
        self.dane_via_next_hop = False
        """The DANE-TA(2) certificate was accepted for naming the next-hop domain only
        (not the MX host): the connection serves that domain alone."""
        self._dane_names: tuple[str, ...] = ()
        self._dane_next_hops: tuple[str, ...] = ()
        self.tls_fallback: DeliveryError | None = None
        """Why this plaintext connection replaced one whose TLS handshake failed (set by
        the opener's opportunistic fallback; for TLS reports)."""
        self._session = session
        self._timeouts = timeouts
        self._reply_deadlines = _reply_deadlines(timeouts)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._healthy = True
        self._closed = False
        self._lost = False
        self._error: DeliveryError | None = None
        # A refused STARTTLS the session went on without (opportunistic TLS), until the
        # next reply: a peer that hangs up meanwhile ended the session with it.
        self._tls_refusal: DeliveryError | None = None
        # One handler per command on the wire, oldest first (the session pairs replies).
        self._handlers: deque[Handler] = deque()
        self._aborted = False
        # The handshake (greeting, EHLO, STARTTLS, AUTH, QUIT) waits for one reply at a
        # time; the greeting's handler is in place before the first octet can arrive.
        self._waiter: asyncio.Future[Reply] | None = None
        self._lost_waiter: asyncio.Future[None] = self._loop.create_future()
        self._push_waiter()
        # Deadline of the reply now due: one timer, moved lazily (see _arm).
        self._deadline = math.inf
        self._deadline_what = ""
        self._deadline_seconds = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._write_mark = 0
        # Octets handed to the transport, and the plaintext transport under TLS: together
        # they tell whether a final dot has left this process (see _sent_upto).
        self._written = 0
        self._raw_transport: asyncio.Transport | None = None
        self._dot_timer: asyncio.TimerHandle | None = None
        # True while data_received hands replies out: the deadline is then moved once, when
        # they are all handled, not after each command the handlers write.
        self._receiving = False
        self._init_transactions()

    # --- what the connection knows ---------------------------------------------------

    @property
    def extensions(self) -> Mapping[str, str]:
        """The EHLO keywords of the server (after STARTTLS, those sent over TLS)."""
        return self._session.extensions

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate as ``ssl.SSLSocket.getpeercert()`` gives it — filled in
        only when it was verified (StartTLS.VERIFY); None without TLS (for ``check``)."""
        if self._transport is None:
            return None
        ssl_object = self._transport.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.getpeercert()

    @property
    def error(self) -> DeliveryError | None:
        """Why the session could not go on (the peer broke the protocol, timed out, went
        away or said 421), or None."""
        if self._error is None and self._lost:
            # It hung up while nothing was due: after a refused STARTTLS, that refusal.
            return self._tls_refusal
        return self._error

    @property
    def usable(self) -> bool:
        """False once a transfer failed, the server said 421, or the connection closed."""
        return (
            self._healthy
            and not self._closed
            and not self._lost
            and self._session.state in _TRANSACTING
        )

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
        plaintext_auth: bool = False,
        tlsa: tuple[TLSARecord, ...] = (),
        dane_names: tuple[str, ...] = (),
        dane_next_hops: tuple[str, ...] = (),
    ) -> SMTPConnection:
        """Connect to ``ip``:``port`` and get ready to send mail to ``host``.

        ``tlsa`` are the host's usable TLSA records, for ``starttls=StartTLS.DANE``, and
        ``dane_names`` the names a DANE-TA(2) certificate may be issued for (``host``
        alone when empty; more when ``host`` is an alias, RFC 7672 §3.2.2); the first of
        them is the SNI name. ``dane_next_hops``, the recipient domain and its CNAME
        expansion, are accepted too, checked after them (:attr:`dane_via_next_hop` says
        when only one of those matched).

        ``implicit_tls`` (RFC 8314, port 465) wraps the connection in TLS from the start,
        verified against ``host`` unless ``starttls`` is OPPORTUNISTIC or REQUIRED; STARTTLS
        is then not attempted. ``auth`` is (username, password) for AUTH PLAIN or LOGIN, sent
        only over TLS unless ``plaintext_auth`` (else ``TLSRequiredError`` before AUTH).
        """
        conn = cls(
            session=ClientSession(helo_name=helo_name),
            host=host,
            ip=ip,
            port=port,
            timeouts=timeouts,
        )
        conn._dane_names = dane_names
        conn._dane_next_hops = dane_next_hops
        context: ssl.SSLContext | None = None
        if implicit_tls:
            unverified = starttls in (StartTLS.OPPORTUNISTIC, StartTLS.REQUIRED)
            context = _tls_context(
                StartTLS.OPPORTUNISTIC if unverified else StartTLS.VERIFY, tls_context
            )
        await conn._connect(context, source_address)
        try:
            if context is not None:
                conn._record_tls()
            await conn._greet()
            if not implicit_tls and starttls is not StartTLS.NEVER:
                await conn._starttls(starttls, tls_context, tlsa)
            if auth is not None:
                if not conn.encrypted and not plaintext_auth:
                    # STARTTLS refused or not offered (opportunistic): the password stays home.
                    raise TLSRequiredError(
                        f"{host} offers no TLS: AUTH would send the password in cleartext",
                        host=host,
                    )
                await conn._authenticate(*auth)
            # Lines the peer sent after the last reply of the handshake (replies to
            # commands never sent) broke the session: a failure to set it up, as any.
            conn._check_open()
        except DeliveryError:
            await conn.close()  # politely: QUIT if the session still allows it
            raise
        except BaseException:
            conn._healthy = False  # cancelled or a bug: just drop the connection
            await conn.close()
            raise
        return conn

    async def _connect(self, context: ssl.SSLContext | None, source_address: str | None) -> None:
        seconds = self._timeouts.connect
        host, ip, port = self.host, self.ip, self.port
        local_addr = (source_address, 0) if source_address else None
        try:
            async with asyncio.timeout(seconds):
                if context is None:
                    await self._loop.create_connection(
                        lambda: self, ip, port, local_addr=local_addr
                    )
                else:
                    await self._connect_tls(context, local_addr)
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
            what = f"connecting to {ip} port {port}"
            if source_address and exc.errno == errno.EADDRNOTAVAIL:
                # source_address is not this host's (or its ports are all taken): every
                # address fails the same way, and none is to blame. Without it this errno
                # may be one IP version's trouble alone (no usable IPv6 source address).
                what = f"{what} from source_address {source_address}"
                raise LocalResourceShortage(what, exc, host=host) from exc
            if local_shortage(exc) is not None:
                raise LocalResourceShortage(what, exc, host=host) from exc
            raise SMTPConnectError(
                f"cannot connect to {ip} port {port}: {exc.strerror or exc}", host=host
            ) from exc

    async def _connect_tls(
        self, context: ssl.SSLContext, local_addr: tuple[str, int] | None
    ) -> None:
        """TLS from the first octet (RFC 8314), started on a plain connection as STARTTLS
        is: the connection then knows the transport below TLS, whose buffer holds the
        ciphertext a final dot may still wait in (see _sent_upto). With the TLS transport
        alone, a dot there was taken for sent, and a message never sent for "maybe
        delivered"."""
        name = _tls_name(self.host)
        if name is None and context.check_hostname:
            raise _unnamed(self.host)
        raw, _ = await self._loop.create_connection(
            _BeforeTLS, self.ip, self.port, local_addr=local_addr
        )
        try:
            tls = await self._loop.start_tls(
                raw,
                self,
                context,
                server_hostname=name,
                ssl_handshake_timeout=self._timeouts.connect,
            )
        except BaseException:
            raw.abort()
            raise
        if tls is None:  # the peer went away during the handshake
            raw.abort()
            raise ConnectionResetError("connection closed during the TLS handshake")
        self._transport = tls
        self._raw_transport = raw

    async def _greet(self) -> None:
        greeting = await self._wait(self._timeouts.greeting, "the greeting")
        if not greeting.ok:
            raise _refused_setup(greeting.reply, host=self.host, what="the connection")
        await self._hello()

    async def _hello(self) -> None:
        ehlo = await self._request(self._session.ehlo, "EHLO")
        if ehlo.ok:
            return
        if ehlo.reply.code >= 500 and not ehlo.closing:
            # RFC 5321 §3.2: a server that does not know EHLO gets HELO.
            try:
                helo = await self._request(self._session.helo, "HELO")
            except (SMTPConnectError, SMTPTimeout):
                # It hung up after refusing EHLO (a block list's "554 5.7.1 rejected"), or
                # ignores all that follows its refusal: that was its last word, not a
                # host that could not be reached.
                raise _refused_setup(ehlo.reply, host=self.host, what="EHLO") from None
            if helo.ok:
                return
            raise _refused_setup(helo.reply, host=self.host, what="HELO")
        raise _refused_setup(ehlo.reply, host=self.host, what="EHLO")

    async def _starttls(
        self,
        mode: StartTLS,
        verify_with: ssl.SSLContext | None,
        tlsa: tuple[TLSARecord, ...] = (),
    ) -> None:
        if "STARTTLS" not in self._session.extensions:
            if mode is StartTLS.OPPORTUNISTIC:
                return
            raise TLSRequiredError(f"{self.host} does not offer STARTTLS", host=self.host)
        context = _tls_context(mode, verify_with)
        # SNI names the TLSA base domain under DANE (RFC 7672 §8.1), which is the MX host's
        # CNAME expansion when its records were found there; else the MX host name (an
        # address literal's address: see _tls_name). None: no SNI, as the name cannot be.
        sni = _tls_name(
            self._dane_names[0] if mode is StartTLS.DANE and self._dane_names else self.host
        )
        if sni is None and context.check_hostname:
            raise _unnamed(self.host)  # before STARTTLS: the session may still QUIT
        reply = await self._request(self._session.starttls, "STARTTLS")
        if not reply.ok:
            if reply.closing:
                raise STARTTLSRefused(
                    f"{self.host} refused STARTTLS: {reply.reply}",
                    code=reply.reply.code,
                    enhanced=reply.reply.enhanced,
                    host=self.host,
                    reply=reply.reply,
                )
            if mode is StartTLS.OPPORTUNISTIC:
                # Temporary whatever its code: it refuses this session, not the mail.
                self._tls_refusal = STARTTLSRefused(
                    f"{self.host} refused STARTTLS and closed the connection: {reply.reply}",
                    code=reply.reply.code,
                    enhanced=reply.reply.enhanced,
                    host=self.host,
                    reply=reply.reply,
                )
                return
            raise TLSRequiredError(
                f"{self.host} refused STARTTLS: {reply.reply}",
                code=reply.reply.code,
                enhanced=reply.reply.enhanced,
                host=self.host,
            )
        # Reading was paused the moment "220 go ahead" was parsed (see _on_starttls), and the
        # session refused any octet buffered after it: nothing sent in plaintext after the
        # reply can be taken for TLS-protected data (RFC 3207 §4.2, CVE-2011-0411).
        transport = self._transport
        assert transport is not None
        timeout = self._timeouts.command
        try:
            async with asyncio.timeout(timeout):
                tls_transport = await self._loop.start_tls(
                    transport,
                    self,
                    context,
                    server_hostname=sni,
                    ssl_handshake_timeout=timeout,
                )
        except ssl.SSLCertVerificationError as exc:
            self._drop()
            raise TLSVerifyError(
                f"certificate of {self.host} not accepted: {exc.verify_message or exc}",
                host=self.host,
            ) from exc
        except TimeoutError as exc:
            self._drop()
            raise TLSHandshakeError(
                f"TLS handshake with {self.host} timed out after {timeout:g}s", host=self.host
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            self._drop()
            raise TLSHandshakeError(
                f"TLS handshake with {self.host} failed: {exc}", host=self.host
            ) from exc
        if tls_transport is None:  # the peer went away during the handshake
            self._drop()
            raise TLSHandshakeError(
                f"{self.host} closed the connection during the TLS handshake", host=self.host
            )
        self._transport = tls_transport
        self._raw_transport = transport
        # Octets that came with the server's last handshake flight were handed to the
        # session before start_tls returned (asyncio's loop), or are in the next turn of
        # the loop (uvloop's, which reads them only once start_tls has returned): a reply
        # to no command (EHLO is not sent yet) broke the session, and is raised as itself.
        # Without the turn, uvloop had them read after EHLO was sent, as its reply.
        await asyncio.sleep(0)
        self._check_open()
        if mode is StartTLS.DANE:
            self._check_dane(tlsa)
        self._record_tls()
        self._session.tls_established()
        await self._hello()

    def _check_dane(self, tlsa: tuple[TLSARecord, ...]) -> None:
        """Match the peer's chain against ``tlsa`` before a single command goes over TLS;
        no match drops the connection (RFC 7672 §2.2: never plaintext)."""
        assert self._transport is not None
        ssl_object = self._transport.get_extra_info("ssl_object")
        chain: list[bytes] = []
        if ssl_object is not None:
            # Python 3.11's ssl has the chain as sent only on the private _sslobj
            # (public as get_unverified_chain() from 3.13); the leaf is public.
            inner = getattr(ssl_object, "_sslobj", None)
            get_chain = getattr(inner, "get_unverified_chain", None)
            if get_chain is not None:
                chain = [c.public_bytes(_ENCODING_DER) for c in get_chain() or ()]
            if not chain:
                leaf = ssl_object.getpeercert(binary_form=True)
                chain = [leaf] if leaf else []
        # The host's own names first: a certificate for one of them makes the connection
        # good for every domain this host receives mail for.
        names = self._dane_names or (self.host,)
        next_hops = self._dane_next_hops
        try:
            match = match_chain(chain, tlsa, host=self.host, names=(*names, *next_hops))
        except DaneMismatch as exc:
            self._drop()
            # The cause says which RFC 8460 failure it is (tlsrpt.recorder.classify).
            raise TLSVerifyError(f"DANE: {exc}", host=self.host) from exc
        self.dane_match = match.record
        self.dane_via_next_hop = match.name in next_hops

    def _record_tls(self) -> None:
        assert self._transport is not None
        self.encrypted = True
        ssl_object = self._transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.tls_cipher = cipher[0] if cipher else None

    async def _authenticate(self, username: str, password: str) -> None:
        session = self._session
        mechanisms = session.auth_mechanisms
        responses: list[bytes] = []
        first: Callable[[], bytes]
        if "PLAIN" in mechanisms:
            first = functools.partial(session.auth_plain, username, password)
        elif "LOGIN" in mechanisms:
            first = session.auth_login
            responses = [username.encode(), password.encode()]
        else:
            raise TemporaryFailure(
                f"{self.host} offers no AUTH mechanism we support (PLAIN, LOGIN); "
                f"offered: {session.extensions.get('AUTH', 'none')}",
                host=self.host,
            )
        reply = await self._request(first, "AUTH")
        while reply.reply.code == 334:
            answer = responses.pop(0) if responses else None  # None cancels the exchange
            reply = await self._request(functools.partial(session.auth_response, answer), "AUTH")
            if answer is None and reply.reply.code == 334:
                # RFC 4954 §4: a cancelled exchange ends with 501. A server that asks on
                # would hold the connection for as long as it liked, each of its
                # challenges well within the command timeout.
                raise SMTPProtocolError(
                    f"{self.host} went on asking (334) after AUTH was cancelled", host=self.host
                )
        if not 200 <= reply.reply.code < 300:
            # Temporary even for 535, as Postfix's smtp_sasl_auth_soft_bounce: wrong
            # credentials are a configuration error to fix, not a reason to bounce mail.
            raise TemporaryFailure(
                f"{self.host} refused authentication: {reply.reply}",
                code=reply.reply.code,
                enhanced=reply.reply.enhanced,
                host=self.host,
                reply=reply.reply,
            )

    async def _request(
        self, command: Callable[[], bytes], what: str, seconds: float | None = None
    ) -> Reply:
        """Write one handshake command and wait for its reply.

        ``command`` makes the line (a session method): called only once the connection is
        known to be open, so that an error the peer caused since the last reply (say an
        unsolicited line after it) is raised as itself, not as a session that refuses to
        send in state "closed".
        """
        self._check_open()
        line = command()
        self._push_waiter()
        self._write(line)
        return await self._wait(self._timeouts.command if seconds is None else seconds, what)

    def _push_waiter(self) -> None:
        self._waiter = self._loop.create_future()
        self._handlers.append(self._on_handshake_reply)

    async def _wait(self, seconds: float, what: str) -> Reply:
        waiter = self._waiter
        assert waiter is not None
        if not waiter.done():
            self._arm(seconds, f"reply to {what}")
        try:
            return await waiter
        except asyncio.CancelledError:
            self._drop()
            raise

    def _on_handshake_reply(self, command: Command, reply: SMTPReply) -> None:
        if command is Command.STARTTLS and 200 <= reply.code < 300:
            # Stop reading at once: octets arriving from now on belong to the TLS
            # handshake, never to the plaintext SMTP session.
            assert self._transport is not None
            self._transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(command=command, reply=reply))

    # --- the protocol's callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport, hence the cast).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        session = self._session
        handlers = self._handlers
        answered = False
        # These octets were all read before any command the handlers below write, so
        # they can answer only the commands already on the wire: a reply beyond those
        # (a server answering one command twice) would be paired with a command the
        # server has not seen, and every reply after it with the wrong command.
        answerable = len(handlers)
        self._receiving = True
        try:
            session.receive_data(data)
            while (answer := session.next_answer()) is not None:
                answered = True
                command, reply, _ = answer
                if not handlers:
                    raise SMTPProtocolError(f"unsolicited reply: {reply}")
                if not answerable:
                    quoted = str(reply)[:200]
                    raise SMTPProtocolError(
                        f"reply before its command was sent ({command.value}): {quoted}"
                    )
                answerable -= 1
                handlers.popleft()(command, reply)
                if self._aborted:
                    return
                if reply.code == 421:
                    # The session forgets the commands the server will never answer.
                    self._abort(None)
                    return
            if not answerable and session.buffered:
                # The start of a reply beyond those owed, split from its end: kept, it
                # would complete with the next read and answer the next command sent.
                raise SMTPProtocolError(
                    f"reply with no command outstanding: {session.buffered} octets "
                    "after the last reply owed"
                )
        except DeliveryError as exc:  # the peer broke the protocol, or our write failed
            exc.host = exc.host or self.host
            # A reply that cannot answer its command may be one meant for another: a
            # server that answered one command twice (the final dot, as LMTP does per
            # recipient) shifts every reply after it by one. The replies taken before it
            # are then not the server's word either, and none may decide a recipient.
            self._abort(exc, shifted=isinstance(exc, SMTPProtocolError))
            return
        finally:
            self._receiving = False
        if answered:
            self._tls_refusal = None  # it went on talking: not its last word
            # Only a complete reply moves the deadline, to the one due next: each reply
            # must complete within its own timeout (RFC 5321 §4.5.3.2), or a server that
            # drips a byte a second would hold the connection forever.
            self._progress()

    def eof_received(self) -> bool:
        # The transport still knows here what it sent: a peer that read a final dot and
        # then closed got it from the kernel, so the dot has left our buffers.
        self._check_dots()
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dot_timer is not None:
            self._dot_timer.cancel()
            self._dot_timer = None
        if self._handlers or self._queued or self._active:
            # _deadline_what is what the peer was to do ("reply to DATA", "take the message").
            what = self._deadline_what or "reply"
            error = self._tls_refusal or SMTPConnectError(
                f"{self.host} closed the connection (waiting for it to {what})"
                if exc is None
                else f"connection to {self.host} lost (waiting for it to {what}): {exc}",
                host=self.host,
            )
            self._abort(error)
        self._disarm()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._handlers:
            self._arm_taking()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._watch_dots()
        self._arm_next()

    # --- writing, deadlines and failure ---------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            raise SMTPConnectError(f"connection to {self.host} is closed", host=self.host)
        transport.write(data)
        self._written += len(data)

    def _sent_upto(self) -> int:
        """How many of the octets written have surely left this process; -1 when the
        transports cannot tell.

        A transport that failed a write empties its buffer and closes, so an empty buffer
        means "sent" only on a transport that is not closing. Under TLS the plaintext
        transport below holds ciphertext the TLS layer does not count; ciphertext is longer
        than the plaintext it carries, so adding both errs towards "not yet sent".
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return -1
        buffered = transport.get_write_buffer_size()
        raw = self._raw_transport
        if raw is not None:
            if raw.is_closing():
                return -1
            buffered += raw.get_write_buffer_size()
        return self._written - buffered

    def _unsent(self, end: int) -> bool:
        """Whether the octets written up to ``end`` are surely still in this process: in
        the buffer of the transport written to (under TLS, plaintext not yet encrypted,
        not the ciphertext below, whose length says nothing exact)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        return self._written - transport.get_write_buffer_size() < end

    def _check_dots(self) -> bool:
        """Mark the final dots that have left this process; True if one has not yet."""
        sent = self._sent_upto()
        waiting = False
        for txn in self._active:
            if txn.dot_pending:
                if txn.dot_end <= sent:
                    txn.dot_pending = False
                else:
                    waiting = True
        return waiting

    def _watch_dots(self) -> None:
        """Check the final dots now, and again while one waits in a buffer: the transport
        says when its buffer falls below the low-water mark, never when it is empty."""
        if self._dot_timer is None and not self._lost and self._check_dots():
            self._dot_timer = self._loop.call_later(_DOT_CHECK, self._on_dot_check)

    def _on_dot_check(self) -> None:
        self._dot_timer = None
        self._watch_dots()
        if self._dot_timer is None and self._deadline_what == _TAKING and not self._write_paused:
            self._arm_next()  # the final dot has gone: the wait for its reply starts now

    def _dot_waiting(self) -> bool:
        """Whether a final dot written is still in this process (as last looked at)."""
        return any(txn.dot_pending for txn in self._active)

    def _buffered(self) -> int:
        """Octets written and still in this process: under TLS, the ciphertext below too,
        so that a peer reading ciphertext out of the transport below shows progress."""
        transport = self._transport
        if transport is None:
            return 0
        raw = self._raw_transport
        size = transport.get_write_buffer_size()
        return size if raw is None else size + raw.get_write_buffer_size()

    def _arm_if_idle(self) -> None:
        """Arm the deadline for new commands unless a reply is already due: the reply
        due first keeps its own deadline when commands are queued behind it."""
        if self._deadline == math.inf:
            self._arm_next()

    def _arm_next(self) -> None:
        """Move the deadline to the reply now due (RFC 5321 §4.5.3.2 per command)."""
        if self._receiving:
            return  # data_received moves it once every reply at hand has been handled
        command = self._session.awaiting
        if self._write_paused or (command is Command.BODY and self._dot_waiting()):
            # Content not all written, or its tail with the final dot still in this
            # process (the transport resumed the writer under its low-water mark, or
            # never paused it): the peer is to take it, within data_block. The reply's
            # data_end counts once the dot has gone (see _on_dot_check): counted from
            # here, a peer that stopped reading held the session for data_end.
            self._arm_taking()
            return
        if command is None:
            self._disarm()
            return
        self._arm(*self._reply_deadlines[command])

    def _progress(self) -> None:
        if self._handlers:
            self._arm_next()
        else:
            self._disarm()

    def _arm_taking(self) -> None:
        """The deadline for the peer to take what is still written here; each write
        taken moves it on (see _on_deadline)."""
        self._write_mark = self._buffered()
        self._arm(self._timeouts.data_block, _TAKING)

    def _arm(self, seconds: float, what: str) -> None:
        # Moving a deadline costs a float store; the timer is only rescheduled when it
        # would fire too late, and otherwise re-checks the deadline when it fires.
        self._deadline = self._loop.time() + seconds
        self._deadline_seconds = seconds
        self._deadline_what = what
        timer = self._timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)

    def _disarm(self) -> None:
        self._deadline = math.inf
        self._deadline_what = ""

    def _on_deadline(self) -> None:
        self._timer = None
        if self._lost or (self._closed and not self._handlers):
            return
        now = self._loop.time()
        if self._deadline_what == _TAKING:
            size = self._buffered()
            if size < self._write_mark:  # the peer is still taking the message
                self._write_mark = size
                self._arm(self._timeouts.data_block, _TAKING)
                return
        if now < self._deadline:
            if self._deadline != math.inf:
                self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        silent = f"did not {self._deadline_what} within {self._deadline_seconds:g}s"
        refusal = self._tls_refusal
        if refusal is None or refusal.reply is None:
            self._abort(SMTPTimeout(f"{self.host} {silent}", host=self.host))
            return
        # Silent since it refused STARTTLS (opportunistic TLS went on without): that
        # refusal was its last word, kept as the reply, as when it hangs up there.
        reply = refusal.reply
        self._abort(
            SMTPTimeout(
                f"{self.host} refused STARTTLS ({reply}), then {silent}",
                code=reply.code,
                enhanced=reply.enhanced,
                host=self.host,
                reply=reply,
            )
        )

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._lost or self._transport is None:
            raise self._gone()

    def _gone(self) -> DeliveryError:
        """The failure of a connection the peer closed when no reply was due: what it
        refused last, if the session went on without it (STARTTLS), else the close."""
        return self._tls_refusal or SMTPConnectError(
            f"{self.host} closed the connection (waiting for it to "
            f"{self._deadline_what or 'reply to the greeting'})",
            host=self.host,
        )

    def _abort(self, error: DeliveryError | None, *, shifted: bool = False) -> None:
        """The session cannot go on: settle everything outstanding and drop the connection.

        ``error`` goes to whatever was waiting before its content was sent; a transaction
        whose final dot was on the wire is uncertain instead, and one its replies decided
        already (MAIL or every RCPT refused) gets them; one that got some RCPT replies gets
        its own copy of ``error`` keeping them (:func:`cut_short`), and one still queued
        behind them a copy saying that none of its commands went (:func:`not_written`).
        With ``error`` None (a 421, or 354 without recipients), transactions not yet
        answered fail as "not usable". With ``shifted`` (the peer broke the reply protocol: a
        reply that could not answer its command, or one malformed or past the limits), no
        reply an active transaction got decides it: ``error`` does, and it is tried again.
        """
        if self._aborted:
            return
        self._aborted = True
        self._healthy = False
        if error is None:
            error = SMTPConnectError(
                f"{self.host} is closing the connection"
                + (f" (waiting for it to {self._deadline_what})" if self._deadline_what else ""),
                host=self.host,
            )
        self._error = error
        if not self._lost:
            # The transport still holds what it could not send: a dot still in there never
            # left. (Once lost, the transport has emptied its buffer, so it cannot tell.)
            self._check_dots()
        self._handlers.clear()
        active = list(self._active)
        self._active.clear()
        queued = list(self._queued)
        self._queued.clear()
        for txn in active:
            if txn.data_reply is not None and txn.data_reply.code == 354 and not txn.dot_pending:
                txn.settle(txn.result(uncertain=True, cause=error))
            elif shifted:
                txn.settle(error)
            elif txn.decided:
                # Refused already (a pipelined MAIL, or every RCPT): the refusal stands,
                # as it does without PIPELINING, where the transaction ended at it.
                txn.settle(txn.result())
            elif txn.rcpt:
                # Some RCPTs were answered: a refusal among them still decides its
                # recipient (see answered_before), the others share the session's fate.
                txn.settle(cut_short(error, txn.result()))
            else:
                txn.settle(error)
        if queued:
            # None of their commands went: the session broke on a transaction ahead of
            # them (one of this connection's was written: messages_sent counts those
            # queued too), whose failure is not theirs (dispatch gives them back untried).
            # Should none ever have gone, the session's failure is theirs as it is.
            unsent = not_written(error) if self.messages_sent > len(queued) else error
            for txn in queued:
                txn.settle(unsent)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            # Read here, as Txn.settle does: a connection that failed to open (its TLS
            # handshake failed, then it was told it was lost) has nobody waiting for the
            # greeting, and asyncio would log the error as never retrieved.
            waiter.exception()
        self._disarm()
        self._drop()

    def _drop(self) -> None:
        self._healthy = False
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    # --- closing -----------------------------------------------------------------------

    def abandon(self) -> None:
        """Drop the connection at once, without QUIT: its session was cancelled (the
        worker stops). What was outstanding settles with an error nobody waits for."""
        if self._closed:
            return
        self._closed = True
        self._abort(Abandoned(f"connection to {self.host} abandoned", host=self.host))
        self._drop()

    async def close(self) -> None:
        """Say QUIT if the connection is healthy (briefly), then close it. Never raises."""
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is None:
            return
        polite = (
            self._healthy
            and not self._lost
            and not self.busy
            and self._session.can_send(Command.QUIT)
        )
        try:
            if polite:
                with contextlib.suppress(DeliveryError):
                    await self._request(
                        self._session.quit, "QUIT", min(self._timeouts.command, _QUIT_TIMEOUT)
                    )
            if self._healthy and not self._lost:
                transport.close()
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await asyncio.shield(self._lost_waiter)
                return
        except Exception:  # noqa: S110 - closing must not fail the caller
            pass
        except BaseException:  # cancelled: still release the socket
            transport.abort()
            raise
        # A broken connection (or one that would not close): drop it at once.
        with contextlib.suppress(Exception):
            transport.abort()
            await asyncio.sleep(0)  # let the transport release its socket
