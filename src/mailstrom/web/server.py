"""Serving the dashboard with uvicorn on a socket the caller bound.

uvicorn alone bounds neither the number of connections nor the time a request takes to
arrive: its keep-alive timer starts only after a first answer (a client that connects
and sends nothing, or one header byte a minute, is kept for ever) and any byte received
stops it. Its ``limit_concurrency`` does not help: it counts idle connections too and
answers 503 to the request that comes next, so a flood of silent connections would shut
the operator out rather than the flood. So the HTTP protocol here is uvicorn's h11 one
(pinned: httptools, which ``auto`` picks when installed, has no header size limit), with
what it lacks added:

- at most ``max_connections`` connections; a new one past the limit closes the one that
  has been stalled longest: waiting for its request (a slowloris or a browser's idle
  keep-alive connection, which it reopens when needed) or with its answer stuck because
  the client does not read it; so a flood cannot keep an operator out; only when all
  are being answered is the newcomer closed unanswered;
- each request (headers and body) must have arrived within ``request_timeout`` seconds
  of the connection starting to wait for it, on the first request and every kept-alive
  one after it;
- an answer may stay blocked on a client that does not read it (uvicorn's writing
  paused: its buffer is full) for ``request_timeout`` seconds at a time; then the
  connection is dropped. Without this, a client pipelining requests and reading
  nothing would keep its connection, and the app's ``send()``, for ever;
- a connection closed with answers still to send (fewer than pause writing) is gone
  ``request_timeout`` after its last answer or request at most: close() waits for the
  client to read them, and one that never does kept the socket, uncounted by the limit;
- headers are at most :data:`MAX_REQUEST_HEAD` bytes, answered 400 past it (h11 bounds
  only a head that has not all arrived: one that came in a single read went through,
  60 KB of it on loopback); bodies are refused past 16 KiB by the app
  (``MAX_FORM_BYTES``);
- uvicorn's own answer to a request h11 cannot parse (a 400 the app never sees) carries
  the security headers every page of the app has.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
from types import FrameType
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from mailstrom.web.security import SECURITY_HEADERS

MAX_CONNECTIONS = 16
"""Connections at once: a browser opens up to 6 to one server (Chromium's and Firefox's
limit), so two or three operators' browsers fit; the dashboard is not a public site."""
REQUEST_TIMEOUT = 10.0
"""Seconds a request (headers and body, a few KiB at most) has to arrive once the
connection waits for one. A browser sends it at once; 10 s survives a congested link,
and a browser whose idle connection is closed opens another. Also how long an answer may
wait for its client to read on (a browser reads at once)."""
MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of request line and headers (h11's default, made explicit): a browser sends
well under 2 KiB, cookies included."""


_SECURITY_HEADERS = tuple(SECURITY_HEADERS.items())


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on SIGTERM/SIGINT and then returning, so that the command
    exits 0 (uvicorn re-raises the signal after its shutdown, which would end the process
    by the signal instead)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait for open connections
        else:
            self.should_exit = True


def server_for(
    app: Starlette,
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
) -> uvicorn.Server:
    """The uvicorn server :func:`serve` runs (``run(sockets=[sock])``; ``should_exit``
    stops it). mailstrom's loggers say what happens (actions, refusals); uvicorn's access
    log is off."""
    config = uvicorn.Config(
        app,
        http=_guarded_h11(max_connections, request_timeout),
        ws="none",  # no WebSocket here: an upgrade would leave the limits behind
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    return _Server(config)


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT."""
    server_for(app).run(sockets=[sock])


class _BoundedHeadConnection(h11.Connection):
    """h11's server side, refusing a request whose head, all arrived at once, is past
    :data:`MAX_REQUEST_HEAD` (``max_incomplete_event_size`` bounds an incomplete one)."""

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = super().next_event()
        if isinstance(event, h11.Request) and _head_size(event) > MAX_REQUEST_HEAD:
            # uvicorn answers a protocol error with 400 and closes the connection.
            raise h11.RemoteProtocolError("request head too large")
        return event


def _head_size(request: h11.Request) -> int:
    """Bytes of ``request``'s line and header fields as sent (white space aside)."""
    line = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + 1
    fields = sum(len(name) + len(value) + len(b": \r\n") for name, value in request.headers)
    return line + fields + len(b"\r\n")


def _guarded_h11(max_connections: int, request_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection limit and a request deadline (a class per
    pair of limits: uvicorn makes one protocol per connection from the class)."""

    turns = itertools.count()  # the loop's clock may not tell apart connections made at once

    class GuardedH11Protocol(H11Protocol):
        waiting_since = 0
        """When this connection began to wait for its next request, in turns: the lowest
        has waited longest."""
        paused_since = 0
        """When its writing was last paused (the client stopped reading), in turns."""
        _deadline: asyncio.TimerHandle | None = None
        _write_deadline: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = _BoundedHeadConnection(h11.SERVER, MAX_REQUEST_HEAD)

        def connection_made(  # type: ignore[override]  # as uvicorn's own
            self, transport: asyncio.Transport
        ) -> None:
            if not self._room_for_one_more():
                self.transport = transport  # connection_lost closes it
                transport.close()
                return
            super().connection_made(transport)
            self._await_request()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            # The app's send() now waits for the client to read; nothing else would end
            # that wait. The timer restarts at each pause, so a slow reader that makes
            # progress keeps its connection.
            self.paused_since = next(turns)
            if self._write_deadline is None:
                self._write_deadline = self.loop.call_later(request_timeout, self._drop)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request it could not parse, with the headers every
            answer of the app carries (uvicorn's has only its type): it is a page a
            browser shows too, framed by another site's page if nothing says otherwise.

            No answer when one has gone out already (the app answered before reading
            the body, and what came of the body does not parse): h11 refuses a second
            (LocalProtocolError, which asyncio logs with a traceback at ERROR level, as
            often as a client likes); the connection is closed instead."""
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.close()
                return
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"connection", b"close"),
                *((name.lower().encode(), value.encode()) for name, value in _SECURITY_HEADERS),
            ]
            response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
            try:
                for event in (response, h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event) or b"")
            except h11.LocalProtocolError:
                # The request was a HEAD, whose answer has no content (h11 refuses it):
                # the head, written already, is the whole answer.
                pass
            self.transport.close()
            if self.cycle is not None and not self.cycle.response_complete:
                # The app may be at the request already (its head came in the same read):
                # its answer, a second one, goes nowhere, as after a hang-up; h11 refused
                # it, and uvicorn logged "Exception in ASGI application" at ERROR level.
                self.cycle.disconnected = True
                self.cycle.message_event.set()

        def _unsupported_upgrade_warning(self) -> None:
            """Nothing to say of a request asking to switch protocols (``Upgrade: h2c``,
            which ``curl --http2`` adds to every plain-HTTP request; a WebSocket): it is
            answered over HTTP/1.1, as RFC 9110 §7.8 lets a server do. uvicorn warned
            twice for each, the second time telling to install a WebSocket library,
            which the dashboard does without on purpose (``ws="none"``)."""

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Kept alive: the next request's deadline. Closed after the answer
            # ("Connection: close"): how long the rest of the answer may take to be read.
            self._await_request()

        @property
        def waiting_for_request(self) -> bool:
            """The request has not (all) arrived; none is being answered."""
            return not self.transport.is_closing() and self.conn.their_state in (
                h11.IDLE,
                h11.SEND_BODY,
            )

        @property
        def writing_paused(self) -> bool:
            """An answer is stuck: the client is not reading it."""
            return self.flow.write_paused

        @property
        def stalled_since(self) -> int | None:
            """Since when (in turns) this connection has waited for its request or for
            its client to read; None while it is being answered."""
            turns_stalled = [
                *([self.waiting_since] if self.waiting_for_request else []),
                *([self.paused_since] if self.writing_paused else []),
            ]
            return min(turns_stalled, default=None)

        def _room_for_one_more(self) -> bool:
            """Whether this connection may be served, closing the connection that has
            been stalled longest when all places are taken."""
            peers = [
                peer
                for peer in self.connections
                if isinstance(peer, GuardedH11Protocol) and not peer.transport.is_closing()
            ]
            if len(peers) < max_connections:
                return True
            stalled = [(since, peer) for peer in peers if (since := peer.stalled_since) is not None]
            if not stalled:
                return False
            min(stalled, key=lambda pair: pair[0])[1]._drop()
            return True

        def _drop(self) -> None:
            """Hang up now. close() would first flush the write buffer, which a client
            that does not read never lets happen: the socket, and the app's send()
            waiting on it, would stay; abort() discards the buffer (the same as close()
            when it is empty)."""
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None
            self.transport.abort()

        def _await_request(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self.waiting_since = next(turns)
            self._deadline = self.loop.call_later(request_timeout, self._request_overdue)

        def _request_overdue(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                # Closed (by uvicorn's keep-alive timer, after a "Connection: close"
                # answer, on an error) with answers left in the buffer, below what
                # pauses writing: close() waits for the client to read them, for ever if
                # it never does, and the limit no longer counts the connection.
                self.transport.abort()
            elif self.waiting_for_request:
                self._drop()
            else:  # being answered: looked at again, so that a close after it is bounded
                self._deadline = self.loop.call_later(request_timeout, self._request_overdue)

    return GuardedH11Protocol
