"""One hook request: a POST that ends within its timeout, whatever the endpoint does.

urllib's own ``timeout`` bounds each socket operation, not the request: an endpoint that
sends a byte of its answer every second keeps a request going for as long as it likes, and
with it the thread it runs on (which the worker's loop waits for when it closes). Here the
request has a deadline instead. Its sockets are made by :class:`_Deadline` (so connecting
to a name with several addresses is bounded too), and a timer shuts them down when the
deadline passes: a thread blocked reading or writing one returns at once, and the request
counts as failed, unless the answer's status line and header had arrived by then (the
endpoint answered; only its body was cut short).

urllib still does the rest, so everything it honours stays as it was: the system trust
store and ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` for HTTPS, the ``https_proxy`` /
``no_proxy`` environment, and no redirects followed.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import http.client
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from mailstrom.config import url_rest
from mailstrom.domains import a_label
from mailstrom.errors import LocalResourceShortage
from mailstrom.safetext import safe_text
from mailstrom.tls.trust import verifying_context

BODY_READ_LIMIT = 65536
"""Bytes of an answer's body read at most (then discarded): the status is the answer."""
CONNECT_SHARE_MIN = 2.0
"""Seconds an address of the endpoint's host gets to connect at least (when the deadline
leaves that much), however many addresses come after it."""
MAX_QUOTED = 200
"""Characters of the endpoint's own words (its reason phrase, a status line or header
http.client could not read) a failure quotes at most: those run to 64 KiB."""
_PIECE = 65536
"""Bytes of an interim answer's header line read at once (a longer line in pieces)."""
_LEAST_TIMEOUT = 0.001
"""A positive socket timeout (0 would make the socket non-blocking): the deadline's
timer shuts the socket down anyway."""


class _Deadline:
    """The end of one request's time. Sockets it watches are shut down when it passes;
    use it as a context manager around the request."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    @property
    def expired(self) -> bool:
        return self._expired

    def connect(
        self, address: tuple[str, int], source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        """A TCP connection to ``address``, trying each of its addresses within what is
        left of the deadline (``socket.create_connection`` gives each one the whole
        timeout). The socket is watched from before it connects.

        Each address gets its share of what is left (at least :data:`CONNECT_SHARE_MIN`
        seconds, if that much is left), as Go's dialer shares its deadline: one that
        drops connection attempts (an AAAA record where IPv6 is filtered) took the whole
        deadline, and every request failed though the next address answered."""
        host, port = address
        error: OSError = TimeoutError(f"{host}:{port}: deadline passed before connecting")
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for index, (family, kind, proto, _, sockaddr) in enumerate(found):
            left = self._end - time.monotonic()
            if self._expired or left <= 0:
                break
            share = max(left / (len(found) - index), min(CONNECT_SHARE_MIN, left))
            sock = socket.socket(family, kind, proto)
            try:
                self._watch(sock)
                sock.settimeout(share)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                # Reading and writing are bounded by the deadline, not by the share.
                sock.settimeout(max(self._end - time.monotonic(), _LEAST_TIMEOUT))
            except OSError as exc:
                sock.close()
                error = exc
                continue
            return sock
        raise error

    def _watch(self, sock: socket.socket) -> None:
        # A duplicate of the descriptor: shutting it down ends the connection for every
        # descriptor of it, the TLS socket that later takes over this one's included.
        with self._lock:
            self._watched.append(sock.dup())
            if self._expired:
                self._shut_down_watched()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            self._shut_down_watched()

    def _shut_down_watched(self) -> None:
        for sock in self._watched:
            with contextlib.suppress(OSError):  # not connected (yet), or already closed
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._watched:
                sock.close()
            self._watched.clear()


class _FinalResponse(http.client.HTTPResponse):
    """An answer read past the interim (1xx) answers before it.

    RFC 9110 §15.2: a client must parse any number of 1xx answers before the final one,
    expected or not. http.client skips only 100 (Continue): it took a 102 (Processing, from
    a server working on a long request) or a 103 (Early Hints, which proxies and CDNs send)
    for the answer, a failure, and the batch the endpoint then took with a 2xx went again,
    every time. 101 (Switching Protocols) is final: HTTP ends on the connection. Interim
    headers are read past, never kept, and their size and number bounded by the deadline."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            read: tuple[str, int, str] = super()._read_status()  # type: ignore[misc]
            status = read[1]
            if not 100 <= status < 200 or status == http.client.SWITCHING_PROTOCOLS:
                return read
            _skip_header(self.fp)

    def begin(self) -> None:
        """The answer's status line and header; a header http.client cannot read (more
        than 100 lines, or a line of more than 64 KiB: its limits, the whole process's)
        dropped. The status line is the endpoint's answer: http.client raised, the
        request failed though the endpoint had answered 200, and the batch it took went
        again, for ever. Its body is not read then (its length is in that header)."""
        try:
            super().begin()
        except http.client.HTTPException:
            # Only once the status line has been read (its version set), not for one
            # the endpoint broke off or sent garbled.
            if self.version not in (10, 11) or self.headers is not None:
                raise
            self.headers = self.msg = http.client.HTTPMessage()
            self.chunked = False
            self.length = 0
            self.will_close = True


def _skip_header(fp: Any) -> None:
    """Read past a header up to its empty line (or the end of the stream, which the next
    status line's read reports), keeping none of it. Not http.client's parse_headers: it
    keeps every line, so it raises past 100 lines or a line of 64 KiB, and an interim
    answer's header (a CDN's 103 with more than 100 Link lines) failed the request that
    the endpoint's final 200 then answered, for ever."""
    line_starts = True
    while True:
        piece: bytes = fp.readline(_PIECE)
        if not piece or (line_starts and piece in (b"\r\n", b"\n")):
            return
        line_starts = piece.endswith(b"\n")


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket comes from a :class:`_Deadline`, and which reads
    the endpoint's answer even when the endpoint closed before taking the whole request.

    A server with a size limit answers 413 as soon as it has read the Content-Length and
    closes without reading the body; writing the rest of it then fails (a broken pipe, a
    reset). http.client raised that error and never read the answer, so the sender saw a
    failure like any other and sent the same batch again, for ever, instead of sending
    fewer events at once. The rest of the request is dropped instead, and the answer read:
    one that is not 2xx is the endpoint's word; a 2xx (or none) is the write's error, since
    an endpoint that did not read the whole body cannot have taken the batch."""

    response_class = _FinalResponse

    def __init__(self, host: str, *, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        # http.client's hook for making the socket: socket.create_connection, set on the
        # instance by HTTPConnection.__init__.
        self._create_connection = self._open_socket
        self._deadline = deadline
        self._cut_short: OSError | None = None
        """Why the endpoint did not take the whole request, once writing it failed."""

    def send(self, data: Any) -> None:
        if self._cut_short is not None:
            return  # the endpoint closed: the rest of the request goes nowhere
        if self.sock is None:
            # Connecting (and the TLS handshake, a proxy's CONNECT) outside the guard
            # below: an error there is no endpoint that closed mid-request, and there is
            # no answer to read. A connection the deadline shut down while connecting
            # failed with a broken pipe or a reset, was taken for one, and reading the
            # answer on no socket raised AttributeError out of post().
            self.connect()
        try:
            super().send(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as exc:
            self._cut_short = exc

    def getresponse(self) -> http.client.HTTPResponse:
        cut_short = self._cut_short
        if cut_short is None:
            return super().getresponse()
        try:
            response = super().getresponse()
        except (OSError, http.client.HTTPException):
            raise cut_short from None
        if 200 <= response.status < 300:
            response.close()
            raise cut_short
        return response

    def _open_socket(
        self,
        address: tuple[str, int],
        timeout: object = None,  # the per-operation timeout: the deadline replaces it
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        return self._deadline.connect(address, source_address)


class _DeadlineTLSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    """The same over TLS, with the context of :func:`_https_context`."""


_VERIFY_PATHS = ssl.get_default_verify_paths()
_CA_ENVIRONMENT = (_VERIFY_PATHS.openssl_cafile_env, _VERIFY_PATHS.openssl_capath_env)
"""The variables naming the CAs a verifying context trusts in place of the system's
(``SSL_CERT_FILE``, ``SSL_CERT_DIR``)."""


def _https_context() -> ssl.SSLContext:
    """The context checking an endpoint's certificate against the system's CAs (or those
    the environment names now), made once for all requests.

    http.client made one per request: loading the system's trust store again each time
    took about 22 ms of CPU per request (144 CAs), on every batch of events sent.
    Out of descriptors, :class:`~mailstrom.errors.LocalResourceShortage` (none kept); a
    context made then trusted no CA, and the request failed as the endpoint's
    certificate."""
    return _context_for(*(os.environ.get(name) for name in _CA_ENVIRONMENT))


@functools.lru_cache(maxsize=1)
def _context_for(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    # Keyed on the environment that names the CAs, read when the context is made: one
    # kept for the process's life took no CA file named later. The names themselves are
    # not used here: create_default_context reads them.
    context = verifying_context()
    context.set_alpn_protocols(["http/1.1"])  # as http.client's own context says
    return context


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_DeadlineConnection, deadline=self._deadline)
        return self.do_open(connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        # Not HTTPSHandler.__init__: from Python 3.12 it makes a context of its own,
        # the trust store loaded again for every request, which https_open never uses.
        urllib.request.AbstractHTTPHandler.__init__(self)
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_DeadlineTLSConnection, deadline=self._deadline)
        return self.do_open(connection, req, context=_https_context())


_NOT_ASCII = re.compile(r"[^\x00-\x7f]+")


def _ascii_url(url: str) -> str:
    """``url`` with the characters that are not ASCII in its path, query and fragment
    percent-encoded as UTF-8 (RFC 3987 §3.1, as browsers send an IRI), and a host name of
    U-labels written as its A-labels (IDNA 2008, :func:`~mailstrom.domains.a_label`).
    http.client writes the request line in ASCII: a hook URL like
    ``https://app.example/événements``, which ``HookConfig`` accepts, failed every request
    with UnicodeEncodeError, and no event ever went. So did one like
    ``https://例え.jp/events`` (its Host header, which http.client writes in Latin-1; a
    Latin-1 name went as a Host no server knows), and either through a proxy (its name in
    the request line, or in CONNECT). Not the socket module's IDNA 2003, which maps "ß" to
    "ss" and drops a zero-width joiner: ``https://straße.example/`` went to
    strasse.example, another domain, with every event. ValueError for a host that has no
    IDNA 2008 form, which ``HookConfig`` refuses."""
    parts = urllib.parse.urlsplit(url)
    netloc = _ascii_netloc(parts.netloc)
    if url.isascii() and netloc == parts.netloc:
        return url

    def quoted(text: str) -> str:
        return _NOT_ASCII.sub(lambda m: urllib.parse.quote(m.group(), safe=""), text)

    return urllib.parse.urlunsplit(
        parts._replace(
            netloc=netloc,
            path=quoted(parts.path),
            query=quoted(parts.query),
            fragment=quoted(parts.fragment),
        )
    )


def _ascii_netloc(netloc: str) -> str:
    """``netloc`` with its host name as :func:`_ascii_url` writes it. urllib percent-decodes
    the host before it connects: ``stra%C3%9Fe.example`` (JavaScript's ``encodeURI()``
    writes an IRI's host so) went to strasse.example as ``straße.example`` would. The name
    is decoded here and its A-labels written instead, quoted so that urllib's decoding
    gives them back as they are."""
    # An IPv6 literal (its zone's "%25" included) is kept as it is; past it, the first
    # ":" after the user information, which HookConfig refuses anyway, starts the port.
    userinfo, at, host_port = netloc.rpartition("@")
    if host_port.startswith("["):
        return netloc
    host, colon, port = host_port.partition(":")
    if host.isascii() and "%" not in host:
        return netloc
    name = urllib.parse.quote(a_label(urllib.parse.unquote(host)), safe="")
    return userinfo + at + name + colon + port


class HTTPFailure(str):
    """A failure that is the endpoint's answer: the text :func:`post` gives (``"HTTP 503
    Service Unavailable"``), with the status and the seconds its ``Retry-After`` asks the
    client to wait (None without one), for a sender that acts on them."""

    status: int
    retry_after: float | None

    def __new__(cls, status: int, text: str, retry_after: float | None = None) -> HTTPFailure:
        failure = super().__new__(cls, text)
        failure.status = status
        failure.retry_after = retry_after
        return failure


_RETRY_AFTER_DIGITS = 9
"""Digits of a ``Retry-After`` in seconds read at most (more than 30 years)."""


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """The seconds a ``Retry-After`` value asks for (RFC 9110 §10.2.3: delay-seconds, or
    an HTTP-date, 0 once it has passed); None for no value or one that is neither.

    >>> retry_after("120"), retry_after("soon")
    (120.0, None)
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= _RETRY_AFTER_DIGITS else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322 §3.3 makes it UTC too
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _quoted(text: str) -> str:
    """``text``, which may be the endpoint's (a reason phrase, a status line), made safe to
    log (:func:`~mailstrom.safetext.safe_text`) and cut to :data:`MAX_QUOTED` characters.
    The sender's warning quoted it as sent: 64 KiB a line, with the ESC sequences that
    rewrite the terminal of whoever reads the log, and a CR or NUL to forge a line."""
    text = safe_text(text)
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx then surfaces as an HTTPError: a failed request


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> str | None:
    """POST ``body``; None when the endpoint answered 2xx, else why not (blocking): an
    :class:`HTTPFailure` when that is the endpoint's answer.

    Connecting, sending and the whole answer take ``timeout`` seconds at most (plus the
    name lookup, which nothing can interrupt); an answer whose status line and header are
    not complete by then is a failure, while one whose body is not is the endpoint's
    answer (only the status counts). At most :data:`BODY_READ_LIMIT` bytes of the
    answer's body are read.
    """
    try:
        # HookConfig admits only http:// and https:// URLs.
        request = urllib.request.Request(  # noqa: S310
            _ascii_url(url), data=body, headers=headers, method="POST"
        )
    except ValueError as exc:  # a URL urllib cannot read: a failed request, as any
        return _hide_target(f"ValueError: {exc}", url)
    with _Deadline(timeout) as deadline:
        opener = urllib.request.build_opener(
            _NoRedirects(), _HTTPHandler(deadline), _HTTPSHandler(deadline)
        )
        failure = _exchange(opener, request, deadline, timeout)
    return None if failure is None else _hide_target(failure, url, request.full_url)


def _hide_target(failure: str, *urls: str) -> str:
    """``failure`` with what each of ``urls`` has after its origin (its path and query,
    and its path alone) as ``/…``, as :func:`~mailstrom.config.shown_hook_url` shows it:
    an error, or the endpoint's words, may quote the request's target, and a hook URL's
    token may be there (``/T000/B000/XXXX``), for everyone who reads the log to see."""
    quoted: set[str] = set()
    for url in urls:
        target = url_rest(url).partition("#")[0]
        quoted.update((target, target.partition("?")[0]))
    text = str(failure)
    for part in sorted(quoted, key=len, reverse=True):
        if part.strip("/"):
            text = text.replace(part, "/…")
    if isinstance(failure, HTTPFailure):
        return HTTPFailure(failure.status, text, failure.retry_after)
    return text


def _exchange(
    opener: urllib.request.OpenerDirector,
    request: urllib.request.Request,
    deadline: _Deadline,
    timeout: float,
) -> str | None:
    late = f"no complete answer within {timeout:g} s (hook.timeout)"
    try:
        with opener.open(request, timeout=timeout) as response:
            # Whether the status line and header arrived in time, looked at before the
            # body is read: a connection the deadline shut down mid-header can still parse
            # as a complete 2xx answer, while one whose header arrived in time is the
            # endpoint's word, whatever its body does after. Looked at after the body, a
            # 200 whose body dripped past the deadline failed the request, and the batch
            # the endpoint had taken went again.
            if deadline.expired:
                return late
            status = int(response.status)
            # Read to let the connection close cleanly, not used: only the status counts.
            # A body that breaks off (a chunk cut short, a reset, the deadline) changes
            # nothing the endpoint said: failing the request sent the batch again, every
            # time if the endpoint always answers so.
            with contextlib.suppress(OSError, http.client.HTTPException):
                response.read(BODY_READ_LIMIT)
    except urllib.error.HTTPError as exc:
        with exc:
            if deadline.expired:
                return late
            asked = retry_after(exc.headers.get("Retry-After"))
            return HTTPFailure(exc.code, f"HTTP {exc.code} {_quoted(exc.reason)}", asked)
    except LocalResourceShortage as exc:  # the CAs could not be read: no endpoint asked
        return str(exc)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired:
            return late
        reason = str(getattr(exc, "reason", None) or exc)
        # http.client's errors quote what the endpoint sent; the others are the socket's
        # or TLS's own (never cut: one may quote the URL, which the sender hides).
        shown = _quoted(reason) if isinstance(exc, http.client.HTTPException) else safe_text(reason)
        return f"{type(exc).__name__}: {shown}"
    return None if 200 <= status < 300 else HTTPFailure(status, f"HTTP {status}")
