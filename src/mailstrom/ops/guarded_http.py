"""An ``http.server`` that a worker can leave open to the network: a bounded number of
handler threads, a deadline for each request to arrive, and a size limit on it.

The stdlib's ``ThreadingHTTPServer`` starts a thread for every connection and reads with
no timeout, so a client that connects and sends nothing (or one byte a minute) holds a
thread for ever, and ten thousand of them make ten thousand threads in the process that
delivers the mail. Here:

- at most ``max_connections`` handler threads run at once. A connection past the limit
  closes the one that has waited longest for its request to arrive (a client that is
  slow to send it is a slowloris or a dead peer; a scraper sends its request in one
  packet): a flood of idle connections cannot keep a scrape out, since the scrape's own
  connection takes a slot at once. When every slot is answering a request, a new
  connection waits (at most :data:`EVICTION_WAIT`) for one to end, and is closed
  unanswered only if none does: an answer takes milliseconds, but its thread may end
  after its client has read it and asked again (a scraper that retries, a probe after a
  scrape).
- a request's head has ``request_timeout`` seconds *in total* to arrive (a timeout on
  each read alone lets a client reset it with every byte), and may be at most
  :data:`MAX_REQUEST_HEAD` bytes (431 otherwise). Bodies are never read: the server
  answers GET, and HTTP/1.0 closes the connection after one answer.
- writing the answer has ``request_timeout`` seconds too: a client that does not read
  it cannot hold its thread.
- every answer, the stdlib's error pages included, carries :data:`SECURITY_HEADERS`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import sys
import threading
import time
from email.errors import MissingHeaderBodySeparatorDefect
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger("mailstrom.ops")

MAX_CONNECTIONS = 8
"""Handler threads at once. Who asks: Prometheus (two replicas for high availability),
the kubelet's liveness and readiness probes, an operator's curl: a handful at a time,
each answered in milliseconds; 8 leaves room and costs the worker at most 8 threads."""
REQUEST_TIMEOUT = 10.0
"""Seconds a request has to arrive, and its answer to be written. A scraper sends its
request in one packet within milliseconds; 10 s survives a congested link and still frees
a slot a silent client holds before a scrape (every 15 s or more) comes again."""
MAX_REQUEST_HEAD = 16 * 1024
"""Bytes in a request line and headers together (h11's default, what the dashboard's
server takes). A scrape's request is about 300 bytes; the stdlib alone accepts 100
headers of 64 KiB each, 6.5 MB a thread."""
EVICTION_WAIT = 1.0
"""Seconds a new connection past the limit waits for a slot: for the thread of the
connection it displaced to end (its socket is shut down, so its read returns at once),
or, when none could be displaced, for a thread whose answer is written to end."""

SECURITY_HEADERS = {
    # What the dashboard's answers say (mailstrom.web.security), for pages that are
    # text, JSON and the stdlib's HTML error pages: nothing to load, frame or sniff.
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""Headers on every answer, an error the stdlib writes included (a browser may be
shown any of them)."""
_SECURITY_LINES = "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items())

_TOO_LARGE = (
    b"HTTP/1.0 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain\r\nConnection: close\r\n"
    + _SECURITY_LINES.encode()
    + b"\r\n"
    + f"the request line and headers are over {MAX_REQUEST_HEAD} bytes\n".encode()
)


class _HeadTooLarge(Exception):
    """The request line and headers went past :data:`MAX_REQUEST_HEAD` bytes (answered
    with a 431 by the handler; never leaves it)."""


class GuardedHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with at most ``max_connections`` handler threads; a new
    connection past the limit displaces the one waiting longest for its request (see the
    module's docstring). Its handler must be a :class:`GuardedRequestHandler`."""

    daemon_threads = True  # a handler stuck writing must not hold up the worker's exit
    # server_close() hangs up on the handlers' connections and waits for them itself,
    # boundedly: the stdlib's join would wait out each one's request deadline.
    block_on_close = False
    # The listen backlog: connections not accepted yet wait there, costing no thread. The
    # stdlib's 5 drops a burst's connection attempts (retried by the client 1 s later).
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[GuardedRequestHandler],
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        # The stdlib's servers are IPv4 (a class attribute): "::1" or "::" would fail to
        # bind ("Address family for hostname not supported").
        self.address_family = listen_family(address[0])
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._slots = threading.Condition()
        self._handlers = 0
        # Connections whose request has not arrived yet, oldest first (dicts keep order).
        self._waiting: dict[socket.socket, None] = {}
        # Every connection a handler thread serves, for server_close() to hang up on.
        self._open: set[socket.socket] = set()
        # Last: it calls server_close() when it cannot bind.
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._slots:
            taken = self._take_slot(request)
        if not taken:
            # Every slot is answering a request: close this one unanswered (no thread).
            log.debug("refused a connection from %s: all slots are answering", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._free_slot(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._free_slot(request)

    def request_arrived(self, request: socket.socket) -> bool:
        """Mark ``request`` as being answered, so that no newcomer displaces it; False if
        it was already displaced (its socket is shut: do not answer)."""
        with self._slots:
            return self._waiting.pop(request, False) is None

    def server_close(self) -> None:
        """Close the listening socket, hang up on every connection still served and wait
        (at most :data:`EVICTION_WAIT`) for their threads to end: a closed server keeps
        no client connected nor a thread of its own until the request deadline."""
        super().server_close()
        with self._slots:
            for sock in self._open:
                _hang_up(sock)
            self._slots.wait_for(lambda: self._handlers == 0, EVICTION_WAIT)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback on stderr, also for every client that hangs up
        # early (or is displaced) before its answer is written: that is no news.
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("the connection from %s broke", client_address, exc_info=True)
        else:
            log.exception("serving a request from %s failed", client_address)

    def _take_slot(self, request: socket.socket) -> bool:
        """Count ``request`` in (the lock held), displacing the longest-waiting connection
        when all slots are taken; False when every slot is still answering a request
        after :data:`EVICTION_WAIT`."""
        if self._handlers >= self.max_connections:
            oldest = next(iter(self._waiting), None)
            if oldest is not None:
                del self._waiting[oldest]
                _hang_up(oldest)
            # Not refused at once when none was waiting: a thread may still hold the slot
            # of an answer its client has read already (it ends once it is scheduled).
            self._slots.wait_for(lambda: self._handlers < self.max_connections, EVICTION_WAIT)
            if self._handlers >= self.max_connections:
                return False
        self._handlers += 1
        self._waiting[request] = None
        self._open.add(request)
        return True

    def _free_slot(self, request: socket.socket) -> None:
        with self._slots:
            self._waiting.pop(request, None)
            self._open.discard(request)
            self._handlers -= 1
            self._slots.notify_all()  # a newcomer waiting for a slot, or server_close()


class GuardedRequestHandler(BaseHTTPRequestHandler):
    """Reads a request within its server's ``request_timeout`` and
    :data:`MAX_REQUEST_HEAD` bytes; answers nothing to a connection its server displaced."""

    server: GuardedHTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader, replaced by one with a deadline
        raw = _DeadlineReader(
            self.connection, timeout=self.server.request_timeout, limit=MAX_REQUEST_HEAD
        )
        self.rfile = io.BufferedReader(raw)

    def handle(self) -> None:
        try:
            super().handle()
        except _HeadTooLarge:
            self.connection.settimeout(self.server.request_timeout)
            self.wfile.write(_TOO_LARGE)

    def end_headers(self) -> None:
        # Here rather than in each answer: the stdlib's own errors (send_error) pass here.
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    # Errors found before the request's version is read (``FOO/1.0``) are answered in
    # HTTP/1.0: the stdlib's default, HTTP/0.9, writes the error page without a status
    # line, bytes no HTTP/1.x client reads as an answer.
    default_request_version = "HTTP/1.0"

    def parse_request(self) -> bool:
        # As the stdlib sets them before it refuses a request line (send_error reads them).
        self.command = ""
        raw: bytes = self.raw_requestline  # type: ignore[attr-defined]  # not in typeshed
        self.requestline = str(raw, "iso-8859-1").rstrip("\r\n")
        if len(self.requestline.split()) in (1, 2):
            # No HTTP version: an HTTP/0.9 request (or none), which the stdlib takes and
            # then reads header lines for that never come, to the request deadline.
            return self._refuse("expected METHOD TARGET HTTP/1.x")
        if not super().parse_request():
            return False
        if self.request_version < "HTTP/1.0":
            # An explicit HTTP/0.x, which the stdlib answers without a status line.
            return self._refuse("HTTP/1.0 or HTTP/1.1 only")
        if any("\r" in value or "\n" in value for value in self.headers.values()):
            # A field folded over lines (obs-fold): the stdlib keeps the line break and
            # what follows in the value, and an answer that echoes it (prometheus-client
            # puts the Accept's version into Content-Type) wrote a folded field of its
            # own. RFC 9112 §5.2 has a server refuse it or unfold it; no client sends it.
            return self._refuse("a header field folded over lines (obs-fold)")
        if any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in self.headers.defects):
            # A line that is no field ("X-A : b", RFC 9112 §5.1: 400; "junk"): the stdlib's
            # parser takes it and every line after it for a body, unseen: a second Host
            # behind it passed the one-Host check, which a proxy in front may route by.
            # (That defect only: a multipart Content-Type without a body is one too, and
            # the body taken can be empty, a "--x--" line ending a multipart one.)
            return self._refuse("a malformed header field line")
        if not self.server.request_arrived(self.connection):
            self.close_connection = True
            return False
        # From here the answer is written, with a deadline of its own.
        self.connection.settimeout(self.server.request_timeout)
        return True

    def _refuse(self, why: str) -> bool:
        """Answer 400 in HTTP/1.0 (unless the connection was displaced) and close; False."""
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        if self.server.request_arrived(self.connection):
            self.connection.settimeout(self.server.request_timeout)
            self.send_error(HTTPStatus.BAD_REQUEST, why)
        return False


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, each read waiting only for what is left of one deadline, and at
    most ``limit`` bytes in all (then :class:`_HeadTooLarge`)."""

    def __init__(self, sock: socket.socket, *, timeout: float, limit: int) -> None:
        self._sock = sock
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._left <= 0:
            raise _HeadTooLarge(f"over {MAX_REQUEST_HEAD} bytes")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the request did not arrive within {self._timeout:g} s")
        self._sock.settimeout(remaining)
        with memoryview(buffer) as view:
            received = self._sock.recv_into(view[: self._left])
        self._left -= received
        return received


def listen_family(host: str) -> socket.AddressFamily:
    """The address family to listen on ``host`` with: IPv6 for an IPv6 address, and for
    a name that resolves to IPv6 addresses only (Debian's ``::1 ip6-localhost``); IPv4
    otherwise. An IPv4 socket bound to such a name got, from glibc, 127.0.0.1 for its
    ``::1``: the server listened where the name does not lead. A name that does not
    resolve is left for bind() to refuse."""
    if ":" in host:
        return socket.AF_INET6
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return socket.AF_INET
    families = {info[0] for info in found}
    if socket.AF_INET6 in families and socket.AF_INET not in families:
        return socket.AF_INET6
    return socket.AF_INET


def _hang_up(sock: socket.socket) -> None:
    """Wake a thread blocked reading ``sock`` (its read returns end of file at once)."""
    with contextlib.suppress(OSError):  # already gone
        sock.shutdown(socket.SHUT_RDWR)
