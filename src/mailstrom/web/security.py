"""Who may use the dashboard, and proof that a form was posted by the dashboard itself.

Access: on loopback without a token anyone on the host may look (as with ``mailstrom
queue``, which needs only read access to the store file). With a token (``web.token``,
required for any other address), every page needs it: once through the login form,
which sets a session cookie (named by the dashboard's port, so that dashboards on other
ports of the same host keep theirs), or on each request as ``Authorization: Bearer <token>``.
The cookie holds a random session id and an HMAC of it and the token under a key made at
start, so it carries no secret and stops working when the server restarts or the token
changes. Logging out ends that session at the server (its id is kept among the revoked
ones, :data:`MAX_REVOKED` at most; past that a new key ends every session), so a copy of
the cookie stops working too. Sessions live in the serving process, as its key does.

Host: without a token, only requests that name the dashboard by a loopback name or
address (``Host: localhost:8025``, ``127.0.0.1``, ``[::1]``) are answered, so that a page
on another site cannot reach it by rebinding its own name to 127.0.0.1
(:mod:`mailstrom.loopback`); and only from a client on this host (a loopback address, or
none: a Unix socket), since any other client can send whatever Host it likes. With a
token, a request must name the dashboard by one of those, by any address literal, or by
a name it is told it has (the address it listens on, its public address behind a proxy:
:func:`serves_host`); any other name is refused before its token is looked at. A
rebound page cannot read the pages without the token, but its tries at the token would
count as guesses from the operator's own address and lock the operator out.

Guesses: a client (by its address; an IPv6 one by its /64) whose tries at the token,
through the login form or as a bearer token, failed :data:`MAX_GUESSES` times within
:data:`GUESS_WINDOW` is refused further tries (429) until the oldest of them is that old:
a short token put on a public address could otherwise be guessed at the speed of the
network.

CSRF: every browser gets a random ``mailstrom_csrf`` cookie (``SameSite=Strict``, so a
cross-site request never carries it; one the dashboard did not make is replaced) and
every form repeats it in a hidden field; a POST whose field and cookie differ, or whose
``Origin`` names another site, is refused. The dashboard's own site is the request's
scheme and ``Host``, or its public address behind a proxy (``web.public_url``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mailstrom.loopback import host_of, is_loopback

SESSION_COOKIE = "mailstrom_session"
"""The session cookie's name, followed by the dashboard's port (:func:`session_cookie`)."""
CSRF_COOKIE = "mailstrom_csrf"
CSRF_FIELD = "csrf"
MAX_TOKEN = 1024
"""Octets of a token accepted from a request (longer ones are refused unread)."""

SECURITY_HEADERS = {
    # Inline SVG needs no script; no page loads anything from elsewhere.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
"""Headers on every answer, a refusal and uvicorn's own 400 included
(:mod:`mailstrom.web.server`)."""


MAX_REVOKED = 10_000
"""Sessions ended by logging out that are remembered; one more makes a new key, which
ends every session (each browser logs in again) and forgets them all."""


@dataclass(slots=True)
class Access:
    """The dashboard's access rule: ``token`` None lets everyone in."""

    token: str | None
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    """Signs session cookies; new at every start."""
    _revoked: set[str] = field(default_factory=set)
    """Session ids ended by logging out, until the key changes."""

    @property
    def required(self) -> bool:
        return self.token is not None

    def session_value(self) -> str:
        """A new session's cookie value, for a browser that gave the right token."""
        session = secrets.token_urlsafe(16)
        return f"{session}.{self._signature(session)}"

    def _signature(self, session: str) -> str:
        assert self.token is not None
        signed = f"{session}\x00{self.token}".encode("utf-8", "surrogatepass")
        return hmac.new(self.key, signed, hashlib.sha256).hexdigest()

    def _session(self, cookie: str | None) -> str | None:
        """The id of the live session ``cookie`` holds, if it holds one."""
        if cookie is None or self.token is None or len(cookie) > MAX_TOKEN:
            return None
        session, _, signature = cookie.partition(".")
        if not session or not _equal(signature, self._signature(session)):
            return None
        return None if session in self._revoked else session

    def end_session(self, cookie: str | None) -> None:
        """End the session ``cookie`` holds (logging out): a copy of it is refused too."""
        session = self._session(cookie)
        if session is None:
            return
        if len(self._revoked) >= MAX_REVOKED:
            # Bounded: every session ends now, none need remembering.
            self.key = secrets.token_bytes(32)
            self._revoked.clear()
        else:
            self._revoked.add(session)

    def token_matches(self, given: str | None) -> bool:
        """Whether ``given`` is the token (compared in constant time)."""
        if self.token is None or given is None or len(given) > MAX_TOKEN:
            return False
        return _equal(given, self.token)

    def allows(self, *, cookie: str | None, authorization: str | None) -> bool:
        """Whether a request with this session cookie and Authorization header may in."""
        if self.token is None:
            return True
        if self._session(cookie) is not None:
            return True
        if not is_bearer(authorization):
            return False
        credentials = (authorization or "").partition(" ")[2]
        # Only HTTP's white space (SP, HTAB) is trimmed: str.strip() also takes U+00A0 and
        # U+0085, which a header value may carry (obs-text), and a token holds neither.
        return any(map(self.token_matches, _readings(credentials.strip(" \t"))))


def _readings(value: str) -> tuple[str, ...]:
    """The texts a header value's octets may stand for. The server hands them on as
    Latin-1 (one character an octet), while curl, browsers and most clients send a
    token with non-ASCII characters ("grüne wiese") in UTF-8: read as Latin-1 only, such
    a token never matched, and each try counted as a guess. Python's ``requests`` sends
    Latin-1, which the value as given is."""
    try:
        as_utf8 = value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8 (or not octets at all): as given
        return (value,)
    return (value,) if as_utf8 == value else (as_utf8, value)


_UNSENDABLE = re.compile(r"\A[ \t]|[ \t]\Z|[\x00-\x08\x0a-\x1f\x7f]")


def unsendable(token: str) -> bool:
    """Whether no ``Authorization`` header can carry ``token``: a field value's white
    space at either end is no part of it (RFC 9110 §5.5; the server drops it), and it
    holds no control character but HTAB. Such a token could be given only through the
    login form, and a script's every try would count as a wrong guess."""
    return _UNSENDABLE.search(token) is not None


def is_bearer(authorization: str | None) -> bool:
    """Whether an ``Authorization`` header gives a bearer token: a try at the token.
    Another scheme is not (a proxy in front may ask for Basic credentials and pass them
    on with every request)."""
    return (authorization or "").partition(" ")[0].lower() == "bearer"


_PORT = re.compile(r"(?:\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[0-9]{1,5}))?")
"""A Host header's or an origin's authority, with its port if it gives one."""


def session_cookie(host: str | None, scheme: str, *, public: str | None = None) -> str:
    """The session cookie's name for a dashboard the browser reaches at ``host`` (the
    request's Host header) over ``scheme``, or at ``public`` (its public address behind
    a proxy): :data:`SESSION_COOKIE` and the port the browser uses, ``mailstrom_session_8025``.

    Cookies ignore the port (RFC 6265 §8.5): two dashboards on one host (one per store)
    would share one cookie of one name, each login replacing the other's session and
    each logout ending both. Named by the port, each keeps its own; the name stays the
    same across restarts, so a browser holds one such cookie per dashboard."""
    authority = host or ""
    if public is not None:
        scheme, _, authority = public.partition("://")
    found = _PORT.fullmatch(authority)
    port = int(found["port"]) if found is not None and found["port"] is not None else 0
    if not 0 < port <= 65535:
        port = 443 if scheme.lower() == "https" else 80
    return f"{SESSION_COOKIE}_{port}"


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


_CSRF_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
"""What :func:`new_csrf_token` makes (32 octets in unpadded base64url)."""


def made_here(csrf_cookie: str | None) -> bool:
    """Whether a CSRF cookie is one :func:`new_csrf_token` could have made. Any other
    (empty, longer than a form's token may be, another application's on this host:
    cookies ignore the port) is replaced: kept, it would fail every form for good."""
    return csrf_cookie is not None and _CSRF_TOKEN.fullmatch(csrf_cookie) is not None


def csrf_matches(cookie: str | None, submitted: str | None) -> bool:
    """Whether the form's token is the browser's cookie (constant time)."""
    if not cookie or not submitted or len(submitted) > MAX_TOKEN:
        return False
    return _equal(cookie, submitted)


def _equal(given: str, expected: str) -> bool:
    """``given == expected`` in constant time. Compared as bytes: ``compare_digest``
    refuses ``str`` with non-ASCII characters (a TypeError), and a header value is any
    Latin-1 text a client sent."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def same_origin(
    origin: str | None, host: str | None, scheme: str, *, public: str | None = None
) -> bool:
    """A POST's ``Origin`` header (when the browser sent one) must be this server: as the
    request itself names it, or ``public``, its address behind a proxy (normalised by
    :func:`mailstrom.settings.parse_origin`). A proxy that terminates TLS makes the
    browser's ``https://`` an ``http`` request here, and may rewrite ``Host`` too."""
    if origin is None:
        return True  # older browsers and non-browser clients; the CSRF token still holds
    if public is not None and origin == public:
        return True
    return host is not None and origin == f"{scheme}://{host}"


def serves_host(host_header: str | None, names: frozenset[str]) -> bool:
    """Whether a dashboard with a token answers a request naming ``host_header``: a
    loopback name or address, any address literal, or one of ``names`` (in lower case,
    with no final dot or port); the port is not looked at.

    DNS rebinding needs a name: a page's origin that is an address literal is the server
    at that address, no other site's, so every address is served (a dashboard listening
    on 0.0.0.0 is reached by any of the host's). A name the dashboard was not told it
    has is another site's, rebound to the dashboard's address."""
    host = host_of(host_header)
    if host is None:
        return False
    if host in names or is_loopback(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


MAX_GUESSES = 10
"""Failed tries at the token one client address may make within :data:`GUESS_WINDOW`."""
GUESS_WINDOW = 600.0
"""Seconds over which failed tries are counted."""
MAX_GUESSERS = 10_000
"""Client addresses whose failed tries are remembered at most (the oldest go first)."""


@dataclass(slots=True)
class Guesses:
    """Failed tries at the token, per client address (see the module's docstring)."""

    limit: int = MAX_GUESSES
    window: float = GUESS_WINDOW
    clock: Callable[[], float] = time.monotonic
    _failed: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def wait(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        tries = self._recent(_guesser(client))
        if tries is None or len(tries) < self.limit:
            return 0.0
        return max(0.0, tries[0] + self.window - self.clock())

    def failed(self, client: str) -> None:
        """Count a failed try of ``client``."""
        client = _guesser(client)
        tries = self._recent(client)
        if tries is None:
            tries = self._failed[client] = deque(maxlen=self.limit)
            while len(self._failed) > MAX_GUESSERS:
                self._failed.popitem(last=False)
        self._failed.move_to_end(client)
        tries.append(self.clock())

    def _recent(self, client: str) -> deque[float] | None:
        tries = self._failed.get(client)
        if tries is None:
            return None
        since = self.clock() - self.window
        while tries and tries[0] <= since:
            tries.popleft()
        if not tries:
            del self._failed[client]
            return None
        return tries


def _guesser(client: str) -> str:
    """Whose tries a client address counts as: an IPv6 address's /64, since one client
    holds a /64 at least (a home line, a cloud host) and could take each of its 2**64
    addresses in turn; an IPv4-mapped address's IPv4 one; any other address as it is."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client  # not an address ("unknown", a Unix socket's path)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"  # drops a %scope too
    return client
