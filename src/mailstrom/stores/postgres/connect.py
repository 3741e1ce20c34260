"""How mailstrom connects to PostgreSQL: bounded in time, in UTC, with statements
prepared on the server or not as the store URL's ``prepare_threshold`` says, and waiting
for another session's lock as its ``lock_timeout`` says (:func:`split_url`).

libpq's defaults wait without end: no connect timeout, and TCP keepalive only after the
kernel's idle time (two hours on Linux). A server that goes away without closing its
connections (a failover to a standby, a network partition, a host that died) would leave
a worker blocked in a query, and the LISTEN connection silently deaf, for that long. With
these settings such a connection fails within about a minute instead, and the worker's
usual handling of a failing store (retry with backoff, reconnect) takes over:

* ``keepalives_idle=30``, ``keepalives_interval=10``, ``keepalives_count=3``: an idle
  connection whose peer stopped answering is declared dead after about 60 s;
* ``tcp_user_timeout=60000`` (libpq 12 and later): so is one whose sent data has gone
  unacknowledged for 60 s;
* ``connect_timeout=10``;
* ``client_encoding=UTF8`` (see :data:`CLIENT_ENCODING`).

A slow query is not affected: the server's kernel acknowledges the query and answers the
probes while the server works. A parameter given in the store's URL (or
``PGCONNECT_TIMEOUT``, ``PGCLIENTENCODING`` in the environment) wins over these.

Nor is a query waiting for a lock another session holds (an operator's ``LOCK TABLE``
left open, a long ``ALTER TABLE``): the server is alive and answers. That wait is
bounded by PostgreSQL's ``lock_timeout``, 30 s unless the store URL's ``lock_timeout``
or the operator's own setting says otherwise, set per connection when it goes straight
to the server and per transaction behind a pooler (:mod:`~.locks`).
"""

from __future__ import annotations

import functools
import os
import re
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.adapt import Dumper, PyFormat
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.datetime import DatetimeBinaryDumper, DatetimeDumper
from psycopg_pool import ConnectionPool

from mailstrom.errors import InvalidStoreURL, StoreAccessDenied
from mailstrom.message.chars import shorten
from mailstrom.stores.clock import aware_utc
from mailstrom.stores.forks import keep, not_shared, renew_after_fork
from mailstrom.stores.postgres.locks import DEFAULT_LOCK_BOUND, LockBound, bound_session
from mailstrom.stores.postgres.reconnect import PromptPool
from mailstrom.stores.url import escape_userinfo, redact_url

KEEPALIVE = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
TCP_USER_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT = 10
CLIENT_ENCODING = "UTF8"
"""What the store writes and reads. Left to the server, a database in ``SQL_ASCII``
(initdb's default under the C locale) has the client take text as it is, and psycopg
handed back bytes for every text column: stats and listings found nothing, and a lease's
ids and addresses were bytes. (A ``SQL_ASCII`` server converts nothing either way.)"""
RECONNECT_WITHIN = 60.0
"""Seconds a pool tries to reconnect, backing off, before it starts again from a short
delay (see :func:`connection_pool`)."""


def connection_options(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> dict[str, str]:
    """The parameters to add to ``url`` when connecting (those it does not set itself)."""
    options = dict(KEEPALIVE)
    if psycopg.pq.version() >= 120000:
        options["tcp_user_timeout"] = str(TCP_USER_TIMEOUT_MS)
    if "PGCONNECT_TIMEOUT" not in os.environ:
        options["connect_timeout"] = str(max(1, round(connect_timeout)))
    if "PGCLIENTENCODING" not in os.environ:
        options["client_encoding"] = CLIENT_ENCODING
    given = conninfo_to_dict(url)
    return {key: value for key, value in options.items() if key not in given}


def bounded(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> str:
    """``url`` as a connection string with :func:`connection_options` added."""
    return make_conninfo(url, **connection_options(url, connect_timeout=connect_timeout))


PREPARE_THRESHOLD = "prepare_threshold"
"""A query parameter of a store URL that is mailstrom's, not libpq's: see :func:`split_url`."""
LOCK_TIMEOUT = "lock_timeout"
"""Another: how long a statement waits for a lock (see :mod:`.locks`)."""
DEAD_AFTER = "dead_after"
"""Another: how long a worker goes unseen before others take it for dead (see :mod:`.holders`)."""
_OURS = (PREPARE_THRESHOLD, LOCK_TIMEOUT, DEAD_AFTER)
DEFAULT_PREPARE_THRESHOLD = 5
"""psycopg's own default: a statement is prepared on the server at its 5th execution."""
MAX_LOCK_TIMEOUT_MS = 2**31 - 1
"""PostgreSQL's largest ``lock_timeout`` (an int of milliseconds, about 24 days)."""
DEFAULT_DEAD_AFTER = 120.0
"""Seconds a lease holder may go unseen before the others give back its leases."""
DEAD_AFTER_RANGE = (1.0, 86400.0)
"""The ``dead_after`` a URL may give, in seconds (or 0: never)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreParams:
    """mailstrom's own query parameters of a PostgreSQL store URL (see :func:`split_url`)."""

    prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD
    lock_bound: LockBound | None = DEFAULT_LOCK_BOUND
    """The wait for a lock mailstrom sets; None (``lock_timeout=0``): it sets none."""
    dead_after: float | None = DEFAULT_DEAD_AFTER
    """Seconds unseen after which a lease holder is taken for dead; None (``dead_after=0``):
    never, its leases expire."""


def split_url(url: str) -> tuple[str, StoreParams]:
    """``url`` without mailstrom's own query parameters, for libpq, and their values.

    ``prepare_threshold``: an integer, or ``none`` (never prepare on the server).
    Prepared statements are named per client connection, so a proxy that hands one server
    connection to several clients in turn (PgBouncer before 1.21, or later without
    ``max_prepared_statements``, in transaction pooling) mixes them up: a statement
    missing, or another client's statement run with these parameters.
    ``?prepare_threshold=none`` is for such a proxy (each statement is then planned
    every time: in ``benchmarks/postgres.py``, 1,430 single enqueues a second instead
    of 2,470).

    ``lock_timeout``: how long a statement waits for a lock another session holds before
    it fails with :class:`~mailstrom.errors.StoreLocked` (``30s``, ``500ms``, ``2m``; a
    bare number is seconds). Given, it wins over the role's, the database's or the
    server's own ``lock_timeout``; not given, 30 s applies where none of them (nor the
    URL's ``options``) set one; ``0`` leaves PostgreSQL's setting as it is (by default,
    waiting without end). See :mod:`~mailstrom.stores.postgres.locks`.

    ``dead_after``: how long a worker that leased may go without saying it lives before
    the other workers give back what it leased (``2m`` by default; from ``1s`` to a day;
    ``0``: never, its leases wait until they expire). See
    :mod:`~mailstrom.stores.postgres.holders`.

    >>> split_url("postgresql://app@db/mail?sslmode=require&prepare_threshold=none")
    ('postgresql://app@db/mail?sslmode=require', StoreParams(prepare_threshold=None, \
lock_bound=LockBound(ms=30000, given=False), dead_after=120.0))
    >>> split_url("postgresql://app@db/mail?lock_timeout=500ms")[1].lock_bound
    LockBound(ms=500, given=True)
    """
    url = escape_userinfo(url)  # a password's "#" or "?" is no fragment or query
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed "[", a bracketed host that is no IP address
        raise InvalidStoreURL(
            f"malformed PostgreSQL URL {shorten(redact_url(url))}: {exc}"
        ) from None
    given = url[: len(parts.scheme)]
    if given != parts.scheme and given.lower() == parts.scheme:
        # "PostgreSQL://": a scheme is case-insensitive, libpq's are lower-case.
        url = parts.scheme + url[len(parts.scheme) :]
    pairs = parts.query.split("&") if parts.query else []
    ours = {
        name: unquote(value).strip()
        for name, _, value in (p.partition("=") for p in pairs)
        if name in _OURS
    }  # the last of each wins
    params = StoreParams(
        prepare_threshold=_prepare_threshold(ours.get(PREPARE_THRESHOLD)),
        lock_bound=_lock_bound(ours.get(LOCK_TIMEOUT)),
        dead_after=_dead_after(ours.get(DEAD_AFTER)),
    )
    if not ours:
        return url, params
    rest = "&".join(p for p in pairs if p.partition("=")[0] not in _OURS)
    return urlunsplit(parts._replace(query=rest)), params


def _prepare_threshold(text: str | None) -> int | None:
    if text is None:
        return DEFAULT_PREPARE_THRESHOLD
    value = text.lower()
    if value in ("none", "off", "never"):
        return None
    if value.isascii() and value.isdigit():  # isdigit() alone takes "\u0663" and "²"
        return int(value)
    raise InvalidStoreURL(f"prepare_threshold must be a whole number or 'none', not {value!r}")


def _lock_bound(text: str | None) -> LockBound | None:
    if text is None:
        return DEFAULT_LOCK_BOUND
    from mailstrom.settings import parse_duration  # here: only when the URL gives one

    try:
        ms = round(parse_duration(text).total_seconds() * 1000)
    except ValueError:
        ms = -1
    if not 0 <= ms <= MAX_LOCK_TIMEOUT_MS or (ms == 0 and not _zero(text)):
        raise InvalidStoreURL(
            "lock_timeout in a PostgreSQL store URL must be a duration from 1ms to 24 days "
            f"(30s, 500ms, 2m; a bare number is seconds) or 0, not {shorten(text, 40)}"
        )
    return LockBound(ms=ms, given=True) if ms else None


def _dead_after(text: str | None) -> float | None:
    if text is None:
        return DEFAULT_DEAD_AFTER
    from mailstrom.settings import parse_duration  # here: only when the URL gives one

    try:
        seconds = parse_duration(text).total_seconds()
    except ValueError:
        seconds = -1.0
    low, high = DEAD_AFTER_RANGE
    if seconds == 0 and _zero(text):
        return None
    if not low <= seconds <= high:
        raise InvalidStoreURL(
            "dead_after in a PostgreSQL store URL must be a duration from 1s to 1 day "
            f"(2m, 90s; a bare number is seconds) or 0, not {shorten(text, 40)}"
        )
    return seconds


def _zero(text: str) -> bool:
    """Whether ``text`` says 0 (rather than a time that rounds to 0 ms, like 0.1ms)."""
    return text.rstrip("smhdw").strip(" .0") == ""


def check_url(url: str) -> None:
    """What :class:`~mailstrom.stores.postgres.PostgresStore` refuses in ``url`` before it
    connects (mailstrom's own parameters, then what libpq cannot parse), found without
    connecting: InvalidStoreURL. For a configuration check, so that a bad parameter is
    reported there rather than by the first store call."""
    conninfo, _ = split_url(url)
    check_conninfo(conninfo)


def check_conninfo(conninfo: str) -> None:
    """InvalidStoreURL when libpq cannot parse ``conninfo`` (an unknown query parameter, a
    bad percent-escape): a mistake in the configuration that retrying will not mend, so
    not the StoreError (try again) that connecting with it would raise. libpq's reason is
    left out when the URL holds a password, which it may quote."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        shown = redact_url(conninfo)
        detail = "" if shown != conninfo else f": {str(exc).strip()}"
        raise InvalidStoreURL(
            f"PostgreSQL URL libpq cannot parse {shorten(shown)}{detail}"
        ) from None
    except UnicodeDecodeError:
        # libpq decodes a percent-escape to any octet ("%FF" in a password), and psycopg
        # reads every value back as UTF-8: a bare UnicodeDecodeError, an internal error
        # (70) in every command and a worker that died of it, for a mistake in the URL.
        raise InvalidStoreURL(
            f"PostgreSQL URL with a percent-escape that is not UTF-8: "
            f"{shorten(redact_url(conninfo))} (libpq's values are UTF-8 text)"
        ) from None
    for host in str(params.get("host") or "").split(","):
        _check_host(host, conninfo)
    for port in str(params.get("port") or "").split(","):
        _check_port(port.strip())
    for name, value in params.items():
        _check_value(name, str(value))


_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "sslcertmode": ("disable", "allow", "require"),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
}
"""libpq's parameters that take one of a few words (compared as written, case and all),
and the words (libpq 18; a parameter an older libpq lacks is refused before this)."""
_WHOLE_NUMBERS = frozenset(
    {
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    }
)
_WHOLE_NUMBER = re.compile(r"\s*[-+]?[0-9]+\s*")
_INT_RANGE = range(-(2**31), 2**31)


def _check_port(port: str) -> None:
    """InvalidStoreURL for a port (one of a multi-host URL's; empty: the default) that is
    no port, without showing it: in ``user:pass/word@host`` libpq reads ``user`` as the
    host and the password's start as the port (it ends the authority at the first "/"),
    and connecting failed as a server out of reach, a StoreUnreachable waited for."""
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise InvalidStoreURL(
            "PostgreSQL URL with a port that is no port (or a password holding '/', "
            "which is written %2F)"
        )


def _check_value(name: str, value: str) -> None:
    """InvalidStoreURL for a value of a libpq parameter that libpq refuses only when it
    connects ("invalid sslmode value"): that failure read as a server out of reach, a
    StoreUnreachable worth waiting for, and a worker waited for ever."""
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise InvalidStoreURL(
            f"PostgreSQL URL with {name}={shorten(value, 40)}: expected one of "
            + ", ".join(choices)
        )
    if name in _WHOLE_NUMBERS and not (_WHOLE_NUMBER.fullmatch(value) and int(value) in _INT_RANGE):
        raise InvalidStoreURL(
            f"PostgreSQL URL with {name}={shorten(value, 40)}: expected a whole number"
        )


def _check_host(host: str, conninfo: str) -> None:
    """InvalidStoreURL for a host that no DNS name can be: psycopg looks host names up
    itself, and ``getaddrinfo`` raises UnicodeError (not an OSError, so no StoreError)
    for a label over 63 octets, an empty one, or Unicode that IDNA refuses."""
    if not host or host.startswith("/") or ":" in host:  # none, a socket dir, IPv6
        return
    try:
        host.encode("idna")
    except UnicodeError as exc:
        raise InvalidStoreURL(
            f"PostgreSQL URL with a host that is no DNS name, {shorten(host)}, in "
            f"{shorten(redact_url(conninfo))}: {exc}"
        ) from None


_ACCESS_DENIED = re.compile(
    r"authentication failed for user"  # password, SCRAM, ident, peer, cert, LDAP...
    r"|no password supplied"  # the server asks for one and the URL has none
    r"|no pg_hba\.conf entry"
    r"|(?:role|database) \"[^\"]*\" does not exist"
    r"|is not permitted to log in"  # a NOLOGIN role
    r"|permission denied for database"
    r"|does not have CONNECT privilege"
)
"""What libpq says when a server answered and refused us. A failed connection carries no
SQLSTATE in psycopg, so its text is all there is: these are PostgreSQL's own messages
(``lc_messages`` other than English translates them, and such a refusal is then taken
for a passing failure: waited out, and logged, rather than failed on)."""


def refuses_access(message: str) -> bool:
    """Whether a connection failure's ``message`` says the server refused us (see
    :data:`_ACCESS_DENIED`), rather than that it was not there to ask.

    >>> refuses_access('FATAL:  password authentication failed for user "mail"')
    True
    >>> refuses_access('connection to server at "db", port 5432 failed: Connection refused')
    False
    """
    return _ACCESS_DENIED.search(message) is not None


def connect(conninfo: str, *, connect_timeout: float) -> psycopg.Connection[Any]:
    """One connection to ``conninfo``, bounded as :func:`bounded` says; StoreAccessDenied
    when the server refuses it (a wrong password, an unknown role or database): retrying
    cannot mend that, where a server that is down or starting up is worth waiting for."""
    try:
        conn = psycopg.connect(bounded(conninfo, connect_timeout=connect_timeout))
    except psycopg.OperationalError as exc:
        if refuses_access(str(exc)):
            raise StoreAccessDenied(
                f"PostgreSQL store: the server refused the connection: {exc}"
            ) from exc
        raise
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # see read_committed
    return conn


_UTC = "SET TimeZone TO 'UTC'"
# Hand back UTC datetimes whatever the server's TimeZone, as the Store protocol says.
# (PgBouncer carries TimeZone over to whichever server connection a client gets.)
_NO_JIT = "SET jit TO off"
"""The store's statements are short and index-driven. PostgreSQL's JIT compiles a
statement whose estimated cost passes ``jit_above_cost`` (100,000 by default), which a
lease's estimate does on a deep backlog (a fair lease's at about 250,000 due recipients,
a plain one's at a few million): compiling then took 7 to 12 s for a statement that
runs in 2 ms."""


def unheard(conn: psycopg.Connection[Any]) -> None:
    """Let ``conn`` (a connection that never LISTENs) drop the notifications it is
    handed: psycopg keeps those that arrive outside ``notifies()`` for its next call, a
    list without bound. A direct connection gets none; behind a transaction pooler, a
    server connection some client LISTENed on (a worker pointed at the pooler) hands
    every NOTIFY of the queue to whichever client runs on it next, and each pooled
    connection of every process behind the pooler kept one more per wake-up for as
    long as it lived."""
    conn.add_notify_handler(_drop)


def _drop(_: psycopg.Notify) -> None:
    pass


class _AwareText(DatetimeDumper):
    """Binds a datetime as ``timestamptz``, as the driver does, and refuses a naive one,
    which the driver bound as a ``timestamp`` for the server to read in the session's
    time zone: a caller's naive clock was taken for UTC here where the other stores
    refuse it (see :func:`~mailstrom.stores.clock.aware_utc`)."""

    def upgrade(self, obj: datetime, format: PyFormat) -> Dumper:
        # Asked only of a naive datetime (get_key tells the aware ones apart).
        aware_utc(obj, "time")
        return super().upgrade(obj, format)


class _AwareBinary(DatetimeBinaryDumper):
    """:class:`_AwareText` in the binary format, which the driver picks by default."""

    def upgrade(self, obj: datetime, format: PyFormat) -> Dumper:
        aware_utc(obj, "time")
        return super().upgrade(obj, format)


def read_committed(conn: psycopg.Connection[Any]) -> sql.Composed:
    """A statement (no parameters) making READ COMMITTED the isolation of ``conn``'s
    statements outside a transaction, when ``conn`` goes straight to the server (see
    :mod:`.locks` for why not behind a pooler); ``conn.isolation_level`` is set too, for
    the transactions it begins.

    The store's statements and transactions are written for READ COMMITTED: each
    statement sees what committed before it began, and a row it locks that changed
    since is rechecked (the lease's SKIP LOCKED, a throttle's read after its advisory
    lock, a migration's after the migration lock). A server, database or role whose
    ``default_transaction_isolation`` is REPEATABLE READ or SERIALIZABLE froze a
    transaction's view at its first statement instead: two workers throttling one
    destination at once, or a lease meeting a hold, failed with serialization errors
    (40001), and two processes opening a new database applied its migrations twice."""
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    return sql.SQL(
        "SELECT set_config('default_transaction_isolation', 'read committed', false)"
        " WHERE pg_backend_pid() = {pid}"
    ).format(pid=sql.Literal(conn.info.backend_pid))


def _configure(
    conn: psycopg.Connection[Any],
    *,
    params: StoreParams,
    on_connect: Callable[[], None] | None,
) -> None:
    not_shared(conn)
    unheard(conn)
    conn.adapters.register_dumper(datetime, _AwareText)
    conn.adapters.register_dumper(datetime, _AwareBinary)  # last: the default format
    setup = sql.SQL("; ").join([sql.SQL(_UTC), sql.SQL(_NO_JIT), read_committed(conn)])
    if params.lock_bound is None:
        conn.execute(setup)
    else:
        bound_session(conn, params.lock_bound, setup)  # the same round trip
    conn.prepare_threshold = params.prepare_threshold
    if on_connect is not None:
        on_connect()


class LivePool(PromptPool):
    """A pool that never hands out a connection the server closed while it sat idle in
    the pool: a server restarted or failed over, an operator's ``pg_terminate_backend``,
    ``idle_session_timeout``. psycopg_pool finds such a connection broken only when the
    call using it fails, so every pooled connection cost a call, a ``send_email``
    among them, a StoreUnreachable from a server that answered. (psycopg_pool's own
    ``check`` would cost every call a round trip, and waits a second or more after each
    connection found dead.) Nor does a caller wait out the backoff of its attempts to
    reconnect (:class:`~mailstrom.stores.postgres.reconnect.PromptPool`)."""

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        for _ in range(self.max_size):  # at most every pooled connection is dead
            conn = super().getconn(timeout)
            if not closed_by_server(conn):
                return conn
            self.putconn(conn)  # broken: the pool drops it and makes another
        return super().getconn(timeout)


def closed_by_server(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server closed ``conn``, an idle connection: then it said why (an
    ErrorResponse, "terminating connection due to administrator command") and closed its
    end, and the socket has something to read, which an idle connection otherwise only
    has rarely (a ParameterStatus the server sends unasked). Something to read costs a
    round trip to tell which; nothing costs one ``poll``, no round trip."""
    if conn.closed:
        return True
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        return True
    return False


def connection_pool(
    url: str,
    *,
    name: str,
    min_size: int,
    max_size: int,
    timeout: float,
    reconnect_within: float = RECONNECT_WITHIN,
    on_connect: Callable[[], None] | None = None,
) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool (not yet open) of autocommit connections to ``url``: bounded in time, UTC,
    preparing statements as the URL's ``prepare_threshold`` says, waiting for a lock
    as its ``lock_timeout`` says (see :mod:`~mailstrom.stores.postgres.locks`), and
    handing out none the server closed meanwhile (:class:`LivePool`).

    After losing the server the pool reconnects soon after it comes back, whatever the
    outage lasted: its attempts back off (1 s, 2 s, 4 s, ...) for ``reconnect_within``
    seconds only, then start again from 1 s, so two attempts are never more than about
    half of it apart. psycopg_pool's own would back off for five minutes, leaving a
    worker without a connection for up to two and a half minutes after a long outage,
    longer than another worker, back sooner, waits before it takes this one for dead
    (:mod:`~mailstrom.stores.postgres.holders`). While callers wait for a connection
    the attempts do not back off: one is made as a caller begins to wait, and then one
    a second (:class:`~mailstrom.stores.postgres.reconnect.PromptPool`), so a call made
    once the server is back is served at once.

    ``on_connect`` is called (in the pool's thread) for every connection the pool makes:
    the server answers, a long outage may be over (the store's LISTEN connection then
    stops waiting out its backoff)."""
    conninfo, params = split_url(url)
    return LivePool(
        bounded(conninfo),
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True},
        configure=functools.partial(_configure, params=params, on_connect=on_connect),
        timeout=timeout,
        reconnect_timeout=reconnect_within,
        reconnect_failed=_reconnect_again,
        open=False,
        name=name,
    )


class ProcessPool:
    """The connection pool of this process: a process forked from this one makes its own
    (by ``make``) and opens it at its first use, never using the parent's (see
    :mod:`~mailstrom.stores.forks`). Opened on first use, not in the fork handler: a
    fork that runs no code of ours (a subprocess's ``preexec_fn``) must not start
    threads and connections."""

    def __init__(self, make: Callable[[], ConnectionPool[psycopg.Connection[Any]]]) -> None:
        self._make = make
        self._pool = make()
        self._lock = threading.Lock()
        self._forked = False
        self._closed = False
        renew_after_fork(self)

    @property
    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """This process's pool."""
        if self._forked:
            with self._lock:
                if self._forked:
                    self._forked = False
                    if not self._closed:
                        self._pool.open(wait=False)
        return self._pool

    def close(self) -> None:
        self._closed = True
        self._pool.close()

    def _before_fork(self) -> None:
        pass  # the parent's connections are of no use in the fork, in use or not

    def _after_fork_in_parent(self) -> None:
        pass

    def _after_fork(self) -> None:
        keep(self._pool)
        self._lock = threading.Lock()
        self._pool = self._make()
        self._forked = True


def _reconnect_again(pool: ConnectionPool[Any]) -> None:
    """Start a new run of attempts once psycopg_pool gave one up: on its own it would
    wait for the next client to ask, and a client already waiting does not ask again."""
    if not pool.closed:  # check() itself would queue work for workers that stopped
        pool.check()
