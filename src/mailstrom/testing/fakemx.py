"""``FakeMX``: every domain's mail goes to one scripted SMTP server on loopback.

A :class:`~mailstrom.testing.dns.LoopbackDNS` answers every MX query with
:data:`MX_HOST` (127.0.0.1), where a :class:`~mailstrom.testing.smtp.ReceivingServer`
listens on an ephemeral port, offering STARTTLS with a certificate from a throwaway CA.
:attr:`FakeMX.config` is a :class:`~mailstrom.Config` delivering there, with short
timeouts. Needs the ``testing`` extra (``pip install 'mailstrom[testing]'``).

Recipients are accepted unless scripted otherwise, per address (case-insensitive; as
``send_email`` was given it, ``bob@bücher.example`` scripting what arrives as
``bob@xn--bcher-kva.example``). The scripts are the fake's: set before it starts, or
while it runs, they hold for every server it starts (``stop(); start()`` keeps them)::

    with FakeMX() as mx:                     # or the ``fake_mx`` pytest fixture
        mx.defer("busy@example.org", "451 4.2.1 Mailbox busy")
        mx.reject("nobody@example.org", "550 5.1.1 No such user")
        mx.drop_after_dot("flaky@example.org")
        mx.stall("slow@example.org")
        with Mailstrom(mx.config, store=MemoryStore()) as ms:
            ms.send_email(...)
            [got] = mx.wait_for(1)

A domain can still be given its own records with :attr:`FakeMX.dns` (``mx.dns.null_mx
("no-mail.test")``, ``mx.dns.nxdomain("typo.test")``); whole-server behaviour (a refusing
greeting, a stall at DATA for everyone) is set on :attr:`FakeMX.server`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import TYPE_CHECKING

from mailstrom.config import Config, Timeouts
from mailstrom.message.addresses import parse_mailbox
from mailstrom.testing._replies import _Rules
from mailstrom.testing.dns import LoopbackDNS
from mailstrom.testing.outbox import capture_active
from mailstrom.testing.smtp import (
    ReceivedMessage,
    ReceivingServer,
    Repeated,
    Rule,
    contexts_for,
    start_receiving_server,
)

if TYPE_CHECKING:
    import trustme

__all__ = ["MX_HOST", "FakeMX"]

MX_HOST = "mx.fake-mx.test"
"""The host name every domain's MX record names (and the server's certificate)."""

TIMEOUTS = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)
"""Seconds per SMTP phase in :attr:`FakeMX.config`: a stalled server costs a test 2 s,
while a loaded machine still answers a loopback command well within it."""


@functools.cache
def _certificate() -> tuple[trustme.CA, trustme.LeafCert]:
    # One throwaway CA per process: issuing it takes longer than starting the servers.
    import trustme  # here: importing smtp said what to install when it is missing

    ca = trustme.CA()
    return ca, ca.issue_cert(MX_HOST, "localhost", "127.0.0.1")


def _tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Contexts of this fake's own. Cached with the certificate, one client context went
    into every fake's :attr:`FakeMX.config`: a test that changed it (a TLS version, the
    CAs it trusts) changed it for every later test of the process."""
    return contexts_for(*_certificate())


def _check(reply: str, first: str, what: str) -> str:
    code = reply[:3]
    if not (code.isdigit() and code[0] == first and reply[3:4] in ("", " ")):
        raise ValueError(f"{what} needs a {first}xx reply line, got {reply!r}")
    # Sent as is, a line break (or a stray CR, NUL) ends the reply early: the client
    # then reads the rest as the reply to its next command, and fails another recipient.
    if any(c < " " or c == "\x7f" for c in reply):
        raise ValueError(f"{what} needs one reply line, without control characters, got {reply!r}")
    return reply


def _key(address: str) -> str:
    """``address`` as the server's rules are keyed: in the form RCPT TO carries it (what
    ``send_email`` made of it), in lower case. Taken as ``send_email`` takes a recipient,
    a display name allowed (``"Bob <bob@example.org>"``); :class:`~mailstrom.InvalidAddress`
    for anything but one address: kept as typed, such a script matched no RCPT, and the
    recipient it was to refuse was delivered without a word."""
    return parse_mailbox("address", address).address.envelope.lower()


def _route(dns: LoopbackDNS) -> None:
    """Send every domain's mail to :data:`MX_HOST` (127.0.0.1)."""
    dns.wildcard_mx([(10, MX_HOST)])
    dns.a(MX_HOST, "127.0.0.1")


class _FakeMXDNS(LoopbackDNS):
    """A FakeMX's zone: every domain routed to the fake. :meth:`reset` gives back the
    zone the fake started with, as :meth:`LoopbackDNS.reset` gives back the empty one
    a plain server starts with: the fake's own records went too, and every domain was
    NXDOMAIN from then on, every recipient failed."""

    def reset(self) -> None:
        """Forget the records, AD settings and query counts the test set; keep the
        fake's routing."""
        super().reset()
        _route(self)


class FakeMX:
    """A loopback DNS zone routing every domain to one scripted SMTP server."""

    host = MX_HOST

    def __init__(self) -> None:
        self.dns: LoopbackDNS = _FakeMXDNS()
        """The DNS server; edit its zone to give a domain other records (its ``reset()``
        forgets them, and keeps the fake's routing)."""
        self._server: ReceivingServer | None = None
        """The last server started: after :meth:`stop`, still there to read what arrived."""
        self._running = False
        self._config: Config | None = None
        # The per-address scripts are the fake's, handed to every server it starts: kept
        # on the server, they were gone after ``stop(); start()``, and an address scripted
        # to be refused was delivered.
        self._rcpt_replies: dict[str, Rule] = _Rules()
        self._stall_rcpts: set[str] = set()
        self._drop_after_dot_rcpts: set[str] = set()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeMX:
        """Start the DNS and SMTP servers; returns self (at once when started already,
        as in ``with FakeMX().start() as mx``). Started again after :meth:`stop`, the
        fake has a new SMTP server: its per-address scripts go on (each from its first
        reply), while what the old server recorded and the whole-server settings made on
        :attr:`server` stay with the old one."""
        if self._running:
            return self
        server_context, client_context = _tls()
        self.dns.start()
        try:
            server = start_receiving_server(server_context, name=MX_HOST)
        except BaseException:
            self.dns.stop()
            raise
        self._adopt()
        server.rcpt_replies = self._rcpt_replies
        server.stall_rcpts = self._stall_rcpts
        server.drop_after_dot_rcpts = self._drop_after_dot_rcpts
        self._server = server
        self._running = True
        _route(self.dns)
        self._config = Config(
            helo_name="client.fake-mx.test",
            smtp_port=self._server.port,
            dns=self.dns.dns_config,
            timeouts=TIMEOUTS,
            allow_loopback=True,  # the server is on 127.0.0.1
            tls_context=client_context,  # so that tls=VERIFY trusts the server's certificate
        )
        return self

    def stop(self) -> None:
        """Stop both servers. Idempotent. What arrived stays readable (:attr:`received`,
        :attr:`server`), as a test reads it after its ``with`` block. The DNS server
        stops also when the SMTP server's stop raises (its event loop blocked by a
        handler: it stops once the loop is free): it was left serving, its threads and
        sockets for the process's life. The next call waits for such a stop to end."""
        try:
            if self._running:
                self.server.stop()
                self._running = False
        finally:
            self.dns.stop()

    def __enter__(self) -> FakeMX:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def server(self) -> ReceivingServer:
        """The SMTP server (its rules apply to every connection); once stopped, the
        stopped server, with what it recorded."""
        if self._server is None:
            raise RuntimeError("FakeMX is not started")
        return self._server

    @property
    def config(self) -> Config:
        """A Config delivering to this fake: its DNS server, its SMTP port, loopback
        allowed, 2 s timeouts; change it with :func:`dataclasses.replace`."""
        if self._config is None:
            raise RuntimeError("FakeMX is not started")
        return self._config

    def __repr__(self) -> str:
        return f"<FakeMX dns=127.0.0.1:{self.dns.port} smtp={self._server!r}>"

    # --- scripting, per recipient address (the fake's, see :meth:`start`) ------------------

    def _adopt(self) -> None:
        """Take up the scripts the server has now: a test may have replaced them there
        (``mx.server.rcpt_replies = {...}``), and the fake's methods then edited, and
        its next server got, the ones the server no longer read."""
        if self._server is not None:
            self._rcpt_replies = self._server.rcpt_replies
            self._stall_rcpts = self._server.stall_rcpts
            self._drop_after_dot_rcpts = self._server.drop_after_dot_rcpts

    def accept(self, address: str) -> None:
        """Accept ``address`` (the default): forget what was scripted for it."""
        self._adopt()
        key = _key(address)
        self._rcpt_replies.pop(key, None)
        self._stall_rcpts.discard(key)
        self._drop_after_dot_rcpts.discard(key)

    def defer(
        self,
        address: str,
        reply: str = "451 4.2.1 Mailbox busy, try again later",
        *,
        times: int | None = None,
    ) -> None:
        """Answer RCPT TO for ``address`` with the 4xx ``reply``: always, or the first
        ``times`` times and then accept (greylisting); ``times`` is a whole number, at
        least 1 (:class:`ValueError`: ``-1`` accepted at once, and ``0`` deferred none)."""
        _check(reply, "4", "defer")
        if times is not None and (
            isinstance(times, bool) or not isinstance(times, int) or times < 1
        ):
            raise ValueError(f"defer(times=...) must be an int of at least 1, got {times!r}")
        self.accept(address)
        if times is None:
            self._rcpt_replies[_key(address)] = reply
        else:
            # A count, not a list of ``times`` replies: ``times=10**9`` is "as good as
            # always", and built a list of 8 GB.
            self._rcpt_replies[_key(address)] = Repeated(reply, times, "250 2.1.5 OK")

    def reject(self, address: str, reply: str = "550 5.1.1 No such user here") -> None:
        """Answer RCPT TO for ``address`` with the 5xx ``reply``."""
        _check(reply, "5", "reject")
        self.accept(address)
        self._rcpt_replies[_key(address)] = reply

    def drop_after_dot(self, address: str) -> None:
        """Take the content of a transaction that includes ``address``, then close the
        connection without a reply: the client cannot know whether it was accepted."""
        self.accept(address)
        self._drop_after_dot_rcpts.add(_key(address))

    def stall(self, address: str) -> None:
        """Stop answering at RCPT TO for ``address``: the client's command timeout (2 s
        in :attr:`config`) decides the whole transaction."""
        self.accept(address)
        self._stall_rcpts.add(_key(address))

    # --- what arrived ----------------------------------------------------------------------

    @property
    def received(self) -> list[ReceivedMessage]:
        """Every transaction whose content arrived, in order, accepted or not (see
        ``.accepted``, ``.envelope_from``, ``.envelope_to``, ``.message``)."""
        return self.server.received

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until ``count`` transactions' content arrived, and return the first
        ``count`` of them in arrival order (however many more came: ``[got] =
        wait_for(1)`` holds with two in); AssertionError after ``timeout`` seconds. In
        async tests use :meth:`wait_for_async`."""
        try:
            return self.server.wait_for_received(count, timeout)
        except AssertionError as exc:
            blocked = self._running and _on_a_running_loop()  # not when nothing can come
            raise _explained(exc, blocked=blocked, count=count) from None

    async def wait_for_async(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """:meth:`wait_for` without blocking the event loop (where the worker may run).
        asyncio only, as :class:`~mailstrom.AsyncMailstrom` is: under trio it raises
        RuntimeError (no running event loop); call :meth:`wait_for` in a thread there."""
        try:
            return await self.server.await_received(count, timeout)
        except AssertionError as exc:
            raise _explained(exc) from None


def _on_a_running_loop() -> bool:
    """Whether this thread runs an event loop (a blocking wait here stops it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _explained(
    failed_wait: AssertionError, *, blocked: bool = False, count: int = 0
) -> AssertionError:
    """A failed wait's error, saying why nothing arrives where a capture is open, or
    where :meth:`FakeMX.wait_for` blocked the event loop a worker delivers on (an async
    test's: it then read as a delivery gone wrong)."""
    notes = [str(failed_wait)]
    if blocked:
        notes.append(
            "wait_for blocked this thread's running event loop, where an AsyncMailstrom "
            f"worker delivers; in async code use await fake_mx.wait_for_async({count})"
        )
    if capture_active():
        notes.append(
            "a mailstrom capture (mailstrom_outbox) is open, which holds every queued "
            "message, so none reaches the fake MX"
        )
    return failed_wait if len(notes) == 1 else AssertionError("; ".join(notes))
