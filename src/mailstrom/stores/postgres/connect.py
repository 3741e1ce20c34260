"""How mailstrom connects to PostgreSQL: bounded in time, in UTC, and with statements
prepared on the server or not as the store URL's ``prepare_threshold`` says
(:func:`split_url`).

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
* ``connect_timeout=10``.

A slow query is not affected: the server's kernel acknowledges the query and answers the
probes while the server works. A parameter given in the store's URL (or
``PGCONNECT_TIMEOUT`` in the environment) wins over these.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from mailstrom.errors import InvalidStoreURL, StoreAccessDenied
from mailstrom.message.chars import shorten
from mailstrom.stores.url import redact_url

KEEPALIVE = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
TCP_USER_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT = 10


def connection_options(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> dict[str, str]:
    """The parameters to add to ``url`` when connecting (those it does not set itself)."""
    options = dict(KEEPALIVE)
    if psycopg.pq.version() >= 120000:
        options["tcp_user_timeout"] = str(TCP_USER_TIMEOUT_MS)
    if "PGCONNECT_TIMEOUT" not in os.environ:
        options["connect_timeout"] = str(max(1, round(connect_timeout)))
    given = conninfo_to_dict(url)
    return {key: value for key, value in options.items() if key not in given}


def bounded(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> str:
    """``url`` as a connection string with :func:`connection_options` added."""
    return make_conninfo(url, **connection_options(url, connect_timeout=connect_timeout))


PREPARE_THRESHOLD = "prepare_threshold"
"""The one query parameter of a store URL that is mailstrom's, not libpq's."""
DEFAULT_PREPARE_THRESHOLD = 5
"""psycopg's own default: a statement is prepared on the server at its 5th execution."""


def split_url(url: str) -> tuple[str, int | None]:
    """``url`` without ``prepare_threshold``, for libpq, and that parameter's value: an
    integer, or None for ``none`` (never prepare on the server).

    Prepared statements are named per client connection, so a proxy that hands one server
    connection to several clients in turn (PgBouncer before 1.21, or later without
    ``max_prepared_statements``, in transaction pooling) mixes them up: a statement
    missing, or another client's statement run with these parameters.
    ``?prepare_threshold=none`` is for such a proxy (each statement is then planned
    every time: in ``benchmarks/postgres.py``, 1,430 single enqueues a second instead
    of 2,470).

    >>> split_url("postgresql://app@db/mail?sslmode=require&prepare_threshold=none")
    ('postgresql://app@db/mail?sslmode=require', None)
    >>> split_url("postgresql://app@db/mail")
    ('postgresql://app@db/mail', 5)
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed "[", a bracketed host that is no IP address
        raise InvalidStoreURL(
            f"malformed PostgreSQL URL {shorten(redact_url(url))}: {exc}"
        ) from None
    pairs = parts.query.split("&") if parts.query else []
    ours = [p for p in pairs if p.partition("=")[0] == PREPARE_THRESHOLD]
    if not ours:
        return url, DEFAULT_PREPARE_THRESHOLD
    rest = "&".join(p for p in pairs if p.partition("=")[0] != PREPARE_THRESHOLD)
    value = unquote(ours[-1].partition("=")[2]).strip().lower()
    if value in ("none", "off", "never"):
        threshold = None
    elif value.isascii() and value.isdigit():  # isdigit() alone takes "\u0663" and "²"
        threshold = int(value)
    else:
        raise InvalidStoreURL(f"prepare_threshold must be a whole number or 'none', not {value!r}")
    return urlunsplit(parts._replace(query=rest)), threshold


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
    for host in str(params.get("host") or "").split(","):
        _check_host(host, conninfo)


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
        return psycopg.connect(bounded(conninfo, connect_timeout=connect_timeout))
    except psycopg.OperationalError as exc:
        if refuses_access(str(exc)):
            raise StoreAccessDenied(
                f"PostgreSQL store: the server refused the connection: {exc}"
            ) from exc
        raise


def _configure(conn: psycopg.Connection[Any], *, prepare_threshold: int | None) -> None:
    # Hand back UTC datetimes whatever the server's TimeZone, as the Store protocol says.
    # (PgBouncer carries TimeZone over to whichever server connection a client gets.)
    conn.execute("SET TimeZone TO 'UTC'")
    conn.prepare_threshold = prepare_threshold


def connection_pool(
    url: str, *, name: str, min_size: int, max_size: int, timeout: float
) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool (not yet open) of autocommit connections to ``url``: bounded in time, UTC,
    and preparing statements as the URL's ``prepare_threshold`` says."""
    conninfo, prepare_threshold = split_url(url)
    return ConnectionPool(
        bounded(conninfo),
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True},
        configure=functools.partial(_configure, prepare_threshold=prepare_threshold),
        timeout=timeout,
        open=False,
        name=name,
    )
