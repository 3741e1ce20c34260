"""Real aiosmtpd SMTP servers on loopback, scripted to accept, refuse, stall or drop.

Needs the ``testing`` extra (``pip install 'mailstrom[testing]'``). Each server runs its
own event loop on a thread, so tests of sync and async code alike can use it::

    server_context, client_context = tls_contexts("mx.test")
    mx = start_receiving_server(server_context)                  # 127.0.0.1, ephemeral port
    mx2 = start_receiving_server(server_context, host="127.0.0.2", port=mx.port)
    mx.rcpt_replies["rej@x.test"] = "550 5.1.1 No such user"
    mx.rcpt_replies["grey@x.test"] = ["451 4.7.1 Greylisted", "250 2.1.5 OK"]
    ...
    [msg] = mx.wait_for_messages(1)           # or: await mx.await_messages(1)
    assert msg.content == b"...\\r\\n" and msg.tls
    mx.stop(), mx2.stop()

A server is also a context manager that stops it, when the block fails too
(``with start_receiving_server(server_context) as mx: ...``).

:class:`~mailstrom.testing.FakeMX` wraps one with a DNS zone; mailstrom's own test suite
has this as the ``smtp_server`` fixture (a factory whose servers stop after the test).

Options of ``start_receiving_server(tls_context, ...)`` (all keyword-only)
    ``host="127.0.0.1"``, ``port=0`` (pass another server's ``.port`` to share it: MX
    delivery uses one port for every host), ``name="mx.test"`` (greeting/EHLO name),
    ``starttls=True`` (offer STARTTLS), ``require_starttls=False`` (530 before TLS),
    ``tls_broken=False`` (offer STARTTLS, answer 220, then break the handshake),
    ``implicit_tls=False`` (TLS from the first byte, as on port 465; STARTTLS is then
    not offered, and REQUIRETLS is with ``requiretls``),
    ``smtputf8=True``, ``eightbitmime=True``, ``pipelining=True``,
    ``enhancedstatuscodes=True`` (advertise the keywords), ``size_limit=DEFAULT_SIZE_LIMIT``
    (advertised as SIZE, RFC 1870; a MAIL with a larger SIZE, or content past it, gets
    552; None: no limit, nothing advertised), ``auth=None`` (no AUTH offered, over TLS
    either, and AUTH answered 502; ``(user, password)``: AUTH PLAIN and
    LOGIN offered even without TLS, only these credentials pass), ``auth_mechanisms=("PLAIN",
    "LOGIN")`` (which of the two to offer),
    ``requiretls=False`` (offer REQUIRETLS, RFC 8689, after STARTTLS, and accept it on
    MAIL FROM: it then shows in the message's ``mail_options``),
    ``greeting=None`` (e.g. ``"421 4.3.2 Go away"``: a non-2xx greeting is sent, then the
    connection closed), ``ehlo_reply=None`` (e.g. ``"502 5.5.1 No EHLO"`` forces HELO),
    ``stall_on=None``, ``drop_on=None`` (see below), ``dsn=False`` (advertise DSN and take
    its RFC 3461 MAIL and RCPT parameters, recorded in ``dsn_params``; aiosmtpd alone
    refuses them).

Rules on a :class:`ReceivingServer`, changeable while it runs (from any thread)
    ``rcpt_replies[address]``, ``mail_reply``, ``data_reply``: a reply line such as
    ``"451 4.7.1 Try later"``, or a list of them used one per command, the last one
    repeating (greylisting: ``["451 ...", "250 ..."]``; ``Repeated("451 ...", n, "250
    ...")`` for one reply ``n`` times over, however large ``n``; an empty list is
    refused with ValueError when set; a list set again, the same one too, starts from
    its first reply, on every server given that ``rcpt_replies``: ``mx2.rcpt_replies =
    mx1.rcpt_replies`` shares the rules, each server keeping its own turn in them). A 2xx
    rule accepts.
    ``starttls_reply``: a reply line to STARTTLS instead of going ahead (None: go ahead);
    after a ``421`` the server closes the connection.
    ``stall_on``: a command name (``"greeting"``, ``"ehlo"``, ``"starttls"``, ``"mail"``,
    ``"rcpt"``, ``"data"``, ``"rset"``, ``"quit"``) or ``"dot"`` (after the content): the
    server stops answering there, to test client timeouts. Stalls end when the client
    disconnects. ``drop_on``: the same names; the server closes the connection instead of
    answering. Shorthands: ``drop_on_data`` (closes on the DATA command, before 354, so
    the client has sent no content) and ``drop_after_dot`` (takes the content, closes
    without the final reply: the client cannot know whether the message was accepted).
    ``messages_per_connection``: how many MAIL commands one connection may give (None:
    no limit); the next gets ``over_limit_reply`` (``"421 4.7.0 Message limit of this
    connection reached, closing"``; None: no reply) and the connection is closed, as a
    server with Exim's ``smtp_accept_max_per_connection`` does.
    ``rcpt_limit``: how many recipients one transaction may have (None: no limit); each
    RCPT beyond it gets ``452 4.5.3 Too many recipients``, as RFC 5321 §4.5.3.1.10 has a
    server with such a limit answer (Postfix's ``smtpd_recipient_limit``).
    ``quit_delay``: seconds the server waits before it answers QUIT, a slow close (the
    connection stays open, and counted in ``open_connections``, until then).
    ``data_delay``: seconds the server waits after the final dot before it replies, a slow
    delivery (the message is in ``received``, and in ``messages`` when accepted, at once).
    Per recipient (lower-case addresses): ``stall_rcpts``, where the server stops
    answering at that RCPT, and ``drop_after_dot_rcpts``, where a transaction with one of
    them among its accepted recipients is closed after its content, without a reply.

What a server records
    ``messages``: :class:`ReceivedMessage` for every message answered 2xx after the dot;
    ``received``: every message whose final dot arrived, whatever happened next;
    ``commands``: command verbs in arrival order (``"EHLO"``, ``"MAIL"``, ...);
    ``pipelined``: how many commands arrived while later ones were already buffered
    (non-zero only when the client pipelines); ``connections``: connections accepted.
    ``connected_at``: the wall-clock time (``time.time()``) of each accepted connection;
    ``open_connections`` and ``peak_connections``: connections open now and at most at
    once; ``arrivals``: the wall-clock time of each ``received`` message's final dot.
    ``wait_for_messages(n, timeout)`` blocks on a condition until ``n`` messages are in
    and returns the first ``n`` of them, however many more arrived (raises AssertionError
    on timeout, saying what the server saw: connections, how far each of the last five
    got (its commands, the last three with their replies, a TLS handshake not completed),
    the reply to each RCPT, what arrived and how it was answered);
    ``await_messages(n, within)`` is its asyncio form (asyncio only: under trio,
    RuntimeError, no running event loop; call the blocking form in a thread there);
    ``wait_for_received(n, timeout)`` and ``await_received(n, within)`` wait on
    ``received`` instead.

This module starts servers and stops them (each on its own thread and event loop). The
rest lives beside it: the rules in :mod:`~mailstrom.testing._replies`, what a server
records and its waits in :mod:`~mailstrom.testing._receiving`, its SMTP side in
:mod:`~mailstrom.testing._protocol`; every name is importable from here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, cast

from mailstrom.testing._extra import missing_extra
from mailstrom.testing._protocol import _SMTP, _Handler
from mailstrom.testing._receiving import ReceivedMessage, ReceivingServer
from mailstrom.testing._replies import Repeated, Rule, _stall_point

try:
    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
except ImportError as exc:
    raise missing_extra(exc) from exc

__all__ = [
    "DEFAULT_SIZE_LIMIT",
    "ReceivedMessage",
    "ReceivingServer",
    "Repeated",
    "Rule",
    "ServerFactory",
    "contexts_for",
    "free_loopback_port",
    "start_receiving_server",
    "tls_contexts",
]

DEFAULT_SIZE_LIMIT = 64 * 1024 * 1024
"""Octets of a message a server takes unless told otherwise (``size_limit``): above all
mailstrom sends with its default configuration (``Config.max_message_size``, 35 MiB; a
bounce notice returning such a message in base64), yet bounded, as a server holds each
message in memory; without one, a test could make it hold gigabytes."""

_STOP_TIMEOUT = 10.0
"""Seconds a server's stop waits for its loop to close the connections (and, once that
timed out, for the rest of the stop on each later call)."""


class _Controller(Controller):
    """A Controller that reports its ephemeral port, builds :class:`_SMTP` and, when
    stopped, closes its connections before its loop so no transport is leaked."""

    def __init__(self, fixture: ReceivingServer, **kwargs: Any) -> None:
        super().__init__(_Handler(fixture), **kwargs)
        self._fixture = fixture
        self._live: set[_SMTP] = set()
        self._stopping: threading.Thread | None = None
        """Finishes a stop whose wait timed out, once the loop is free (see :meth:`stop`)."""

    def factory(self) -> SMTP:
        smtp = _SMTP(self.handler, fixture=self._fixture, loop=self.loop, **self.SMTP_kwargs)
        # Open connections only: kept until stop(), every connection ever accepted stayed
        # in memory with its TLS state, a few hundred kB each, for the server's life.
        smtp._on_lost = self._live.discard
        self._live.add(smtp)
        return smtp

    def start(self) -> None:
        try:
            super().start()
        except BaseException:
            self._clean_up_failed_start()
            raise

    def _clean_up_failed_start(self) -> None:
        """End what aiosmtpd leaves of a start that raised: its event loop open (and its
        self-pipe sockets) when the bind failed, its thread serving when a later step did.
        Left to the garbage collector, they fail some later test that runs with warnings
        as errors ("unclosed event loop")."""
        thread = self._thread
        if thread is not None:
            if thread.is_alive():
                self.loop.call_soon_threadsafe(self.cancel_tasks)  # its thread closes the loop
            thread.join()
            self._thread = None
        if not self.loop.is_closed():
            self.loop.close()

    def _trigger_server(self) -> None:
        server = cast(asyncio.Server, self.server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]

    def stop(self, no_assert: bool = False) -> None:
        async def close_connections() -> None:
            assert self.server is not None
            self.server.close()
            tasks = []
            for smtp in list(self._live):
                if smtp.transport is not None:
                    cast(asyncio.Transport, smtp.transport).abort()
                if smtp._handler_coroutine is not None:
                    tasks.append(smtp._handler_coroutine)
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            await asyncio.sleep(0)

        if self._stopping is not None:  # a stop that timed out, finishing on its own
            self._stopping.join(_STOP_TIMEOUT)
            if self._stopping.is_alive():
                raise self._blocked()
            self._stopping = None
            return
        if self._thread is not None and self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(close_connections(), self.loop)
            try:
                future.result(timeout=_STOP_TIMEOUT)
            except TimeoutError:
                # The loop is blocked (a handler that does not return to it). Raising
                # here, aiosmtpd's stop was never called: the loop ran on in its thread,
                # holding the port, unless the test called stop() again. It is called
                # now on a thread of its own, once the connections are closed.
                self._stopping = threading.Thread(
                    target=self._stop_when_free,
                    args=(future, no_assert),
                    name=f"stopping-smtp-{self.port}",
                    daemon=True,
                )
                self._stopping.start()
                raise self._blocked() from None
        super().stop(no_assert=no_assert)

    def _stop_when_free(self, closing: concurrent.futures.Future[None], no_assert: bool) -> None:
        """aiosmtpd's stop (its loop stopped, its thread joined, the port freed), once
        ``closing``, the connections' closing that waits for the blocked loop, is over."""
        with contextlib.suppress(Exception):
            closing.result()
        super().stop(no_assert=no_assert)

    def _blocked(self) -> TimeoutError:
        return TimeoutError(
            f"the SMTP server on port {self.port} did not stop within {_STOP_TIMEOUT} s: its "
            "event loop is blocked (a handler that does not return to it); it stops, and "
            "frees its port, as soon as the loop is free"
        )


# --- starting servers ----------------------------------------------------------------------


def tls_contexts(
    *names: str, ca: trustme.CA | None = None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context holding a certificate for ``names``, issued by ``ca`` (a new
    throwaway CA by default), and a client context trusting that CA alone."""
    ca = ca or trustme.CA()
    return contexts_for(ca, ca.issue_cert(*names))


def contexts_for(ca: trustme.CA, cert: trustme.LeafCert) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """New contexts for a certificate issued already: a server context holding ``cert``,
    and a client context trusting ``ca`` alone (host names checked, as in
    :func:`ssl.create_default_context`, whose loading of the system's CAs took most of the
    time). Each call gives contexts of their own, which a test may change without
    changing another's."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


ServerFactory = Callable[..., ReceivingServer]
"""A callable starting servers with :func:`start_receiving_server`'s keyword options."""


def start_receiving_server(
    tls_context: ssl.SSLContext,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "mx.test",
    starttls: bool = True,
    require_starttls: bool = False,
    tls_broken: bool = False,
    implicit_tls: bool = False,
    smtputf8: bool = True,
    eightbitmime: bool = True,
    pipelining: bool = True,
    enhancedstatuscodes: bool = True,
    size_limit: int | None = DEFAULT_SIZE_LIMIT,
    auth: tuple[str, str] | None = None,
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
    greeting: str | None = None,
    ehlo_reply: str | None = None,
    stall_on: str | None = None,
    drop_on: str | None = None,
    dsn: bool = False,
    requiretls: bool = False,
) -> ReceivingServer:
    """Start one receiving server (see the module docstring for the options); the caller
    stops it, or uses it as a context manager."""
    stall_on, drop_on = _stall_point(stall_on), _stall_point(drop_on)  # before starting
    fixture = ReceivingServer(
        host=host,
        pipelining=pipelining,
        eightbitmime=eightbitmime,
        enhancedstatuscodes=enhancedstatuscodes,
        tls_broken=tls_broken,
        greeting=greeting,
        ehlo_reply=ehlo_reply,
        auth=auth,
        requiretls=requiretls,
    )
    kwargs: dict[str, Any] = {
        "enable_SMTPUTF8": smtputf8,
        "data_size_limit": size_limit,
        "decode_data": False,
    }
    # Not over implicit TLS: a server must not offer STARTTLS on a connection that is over
    # TLS already (RFC 3207 §4.2), nor demand it (530) there.
    if (starttls or tls_broken) and not implicit_tls:
        kwargs["tls_context"] = tls_context
        kwargs["require_starttls"] = require_starttls
    if auth is not None:
        kwargs["authenticator"] = _authenticator(auth)
        kwargs["auth_require_tls"] = False
        kwargs["auth_exclude_mechanism"] = [
            m for m in ("PLAIN", "LOGIN") if m not in auth_mechanisms
        ]
    controller = _Controller(
        fixture,
        hostname=host,
        port=port,
        server_hostname=name,
        ssl_context=tls_context if implicit_tls else None,
        **kwargs,
    )
    controller.start()
    fixture._controller = controller
    fixture.port = controller.port
    # The controller's own start-up probe is no client of the test's.
    fixture.connections = 0
    fixture.connected_at.clear()
    fixture.open_connections = fixture.peak_connections = 0
    fixture.generation += 1
    fixture.commands.clear()
    with fixture._condition:
        fixture._conversations.clear()
    fixture.stall_on = stall_on
    fixture.drop_on = drop_on
    fixture.dsn = dsn
    return fixture


def _authenticator(credentials: tuple[str, str]) -> Callable[..., AuthResult]:
    user, password = (c.encode() for c in credentials)

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (user, password)
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    return authenticate


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for "connection refused" tests)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
