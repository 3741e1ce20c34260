"""Store URLs: one string in configuration picks the store.

=================================  ==========================================================
``memory:``                        :class:`~mailstrom.stores.memory.MemoryStore` (not durable)
``sqlite:///relative/path.db``     SQLite file relative to the working directory
``sqlite:////abs/path.db``         SQLite file at an absolute path (four slashes: the
                                   SQLAlchemy convention — ``sqlite://`` + empty host + path)
``mail.db``, ``/var/q.sqlite3``    a bare path ending in ``.db``, ``.sqlite`` or ``.sqlite3``
``postgresql://user@host/db``      :class:`~mailstrom.stores.postgres.PostgresStore`
``postgres://...``                 the same (libpq accepts both spellings)
``postgresql://...?prepare_...``   ``prepare_threshold=none``: statements never prepared on
                                   the server, for PgBouncer's transaction pooling (the one
                                   parameter that is mailstrom's, not libpq's)
=================================  ==========================================================

When nothing names a store, the command line and the facades use :func:`default_store_path`:
one fixed absolute path per user, never the working directory (``sendmail`` run from a web
application would otherwise drop the queue into the application's directory).
"""

from __future__ import annotations

import errno
import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailstrom.errors import ConfigError, InvalidStoreURL, StoreAccessDenied, StoreError
from mailstrom.message.chars import shorten, utf8_encodable
from mailstrom.stores.base import Store

_SCHEME = r"(?<![\w+.-])(?:(?![A-Za-z])[\w+.-])*+[A-Za-z][\w+.-]*"
"""A URL's scheme, and the characters a scheme may hold before it: a search tries it
only where a run of them begins. Tried at each letter of a long run, each attempt read
to the run's end, in time quadratic in its length (40,000 letters, 4 s); any later
start in the run ends its scheme at the same place, so finds nothing the first did not.
"""

# The user name runs to the first ":", "?", "#" and "@" included, and the password on to
# the last "@" before the path, "#" and "?" included (libpq's reading of user information:
# see escape_userinfo), and spaces too: a passphrase written unencoded is refused by libpq,
# in an error that quotes the URL. Digits alone before the path (or a "," of another host,
# a space, the end) are a port, not a password. A raw "/" in a password (to be written %2F)
# makes libpq read the user as a host and the password's start as a port, and fail; the
# password is no less a secret, so it runs past the "/" to the first "@" that a host
# follows (a user name holding "[" or "]" is an IPv6 host's start, not taken so).
_USERINFO_PASSWORD = re.compile(
    rf"(?P<head>{_SCHEME}://(?:(?P<plain>[^:/\s\[\]]*)|[^:/\s]*)):"
    r"(?!\d*(?:[,/\s]|$))"
    r"(?:[^/\r\n]*@|(?(plain)[^/@\r\n]*/[^\r\n]*?@(?=[^@/\s]*(?:[/?#\s'\"]|$))|(?!)))"
)
# A value ends at a space in a conninfo string (``password=x dbname=m``), where the next
# word is a ``name=value``; words after it without "=" are the rest of the passphrase. A
# quoted value ends at a quote no backslash escapes (``password='it\\'s'``).
_PASSWORD_PARAMETER = re.compile(
    r"(?i)(?P<head>\b(?:ssl)?password\s*=\s*)"
    r"(?:'(?:[^'\\]|\\.)*'?|[^\s&;#']+(?:[ \t]+[^\s&;#'=]+)*)"
)


def redact_url(text: str) -> str:
    """``text`` with every password in it replaced by ``***``: in URLs' userinfo
    (``postgresql://user:secret@host``) and in ``password=`` or ``sslpassword=`` parameters
    (of URLs or libpq conninfo strings). The one place mailstrom hides secrets in store URLs
    and in messages that may quote them, before anything is printed or logged.

    >>> redact_url("postgresql://app:s3cret@db/mail?sslmode=require&password=x")
    'postgresql://app:***@db/mail?sslmode=require&password=***'
    >>> redact_url("sqlite:////var/spool/mailstrom/queue.db")
    'sqlite:////var/spool/mailstrom/queue.db'
    """
    text = _UP_TO_LAST_AT.sub(lambda m: _USERINFO_PASSWORD.sub(r"\g<head>:***@", m[0]), text)
    return _PASSWORD_PARAMETER.sub(r"\g<head>***", text)


_UP_TO_LAST_AT = re.compile(r"(?<![^\r\n])[^\r\n]*@")
"""Each line's text up to its last ``@``, where every user information ends: searched
in the whole line, each ``://`` after that ``@`` was read on to the line's end, in time
quadratic in their number (5,000 ``a://u:x/``, 1.2 s). Tried at a line's start only."""


SYSTEM_STORE_PATH = Path("/var/spool/mailstrom/queue.db")
"""The default store of root (the system's queue, where Postfix keeps /var/spool/postfix)."""


def default_store_path(env: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """Where the queue is when no store is configured.

    root: :data:`SYSTEM_STORE_PATH`, whatever the environment says. Anyone else:
    ``$XDG_STATE_HOME/mailstrom/queue.db``, by default ``~/.local/state/mailstrom/queue.db``
    (a relative ``XDG_STATE_HOME`` is ignored, as the XDG specification asks).

    >>> str(default_store_path({"XDG_STATE_HOME": "/home/ann/.state"}, euid=1000))
    '/home/ann/.state/mailstrom/queue.db'
    >>> str(default_store_path({"XDG_STATE_HOME": "/tmp/x"}, euid=0))
    '/var/spool/mailstrom/queue.db'
    """
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return SYSTEM_STORE_PATH
    state = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        home = env.get("HOME", "")
        if not os.path.isabs(home):
            try:
                home = pwd.getpwuid(euid).pw_dir
            except KeyError:
                home = ""
        if not os.path.isabs(home):
            raise ConfigError(
                "no store configured and no home directory for the default one: set store"
            )
        state = os.path.join(home, ".local", "state")
    return Path(state) / "mailstrom" / "queue.db"


def default_store_url(env: Mapping[str, str] | None = None, *, euid: int | None = None) -> str:
    """:func:`default_store_path` as a store URL (``sqlite:////absolute/path``)."""
    return f"sqlite:///{default_store_path(env, euid=euid)}"


def make_private_parents(path: str | os.PathLike[str]) -> None:
    """Create the missing directories above ``path``, each mode 0700 (its owner only);
    directories that exist are left as they are."""
    missing: list[Path] = []
    parent = Path(path).absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        except PermissionError as exc:
            # Permanent: a worker starting on it exits (78) rather than wait for ever.
            raise StoreAccessDenied(
                f"this user may not create {directory} ({exc.strerror or exc}), the"
                " directory of its default store"
            ) from None
        except OSError as exc:
            raise path_error(f"cannot create {directory}", exc) from None
        os.chmod(directory, 0o700)  # exactly, whatever the umask


PERMANENT_ERRNOS = frozenset(
    [errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG]
)
"""What a store's path failing with one of these errors says does not change by
waiting: this user may not search or open it, a component of it is a file (or the file
a directory), a symlink loop, a name too long. Only someone changing the file system or
the store setting mends it. (A missing directory may be an unmounted volume; a
read-only mount may be made writable: those are worth waiting for.)"""


def path_error(doing: str, exc: OSError) -> StoreError:
    """The store error for ``exc``, an OSError of looking up or creating a store's path
    while ``doing`` (``"cannot open PATH"``): StoreAccessDenied (permanent: a worker or
    a follower ends, 78) for :data:`PERMANENT_ERRNOS`, else StoreError (75)."""
    text = f"{doing}: {exc.strerror or exc}"
    if exc.errno in PERMANENT_ERRNOS:
        return StoreAccessDenied(text)
    return StoreError(text)


_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class StoreKind(StrEnum):
    """Which store a URL names."""

    MEMORY = "memory"
    SQLITE = "sqlite"
    POSTGRES = "postgres"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreURL:
    """A parsed store URL: the kind, and what to open (file path or connection URL)."""

    kind: StoreKind
    target: str


def parse_store_url(url: str) -> StoreURL:
    """Parse ``url`` without opening anything; raises :class:`InvalidStoreURL`.

    >>> parse_store_url("sqlite:////var/lib/mailstrom/queue.db")
    StoreURL(kind=<StoreKind.SQLITE: 'sqlite'>, target='/var/lib/mailstrom/queue.db')
    """
    text = url.strip()
    if "\0" in text:  # no file name or connection string holds one (a TOML "\u0000")
        raise InvalidStoreURL(f"store URL with a NUL character: {_shown(url)}")
    if text in ("memory:", "memory://"):
        return StoreURL(kind=StoreKind.MEMORY, target="")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("postgresql", "postgres"):
        if not rest:
            raise InvalidStoreURL(f"PostgreSQL URL without host or database: {_shown(url)}")
        if not utf8_encodable(text):
            # libpq takes the URL as UTF-8: a MAILSTROM_STORE set from a shell that is
            # not UTF-8 (a lone surrogate) raised UnicodeEncodeError, an internal error
            # (70) in every command. A file name may hold one; a connection URL cannot.
            raise InvalidStoreURL(
                f"PostgreSQL URL holding octets that are not UTF-8: {_shown(url)}"
                " (percent-encode them, as %E9)"
            )
        _check_url_syntax(text)
        return StoreURL(kind=StoreKind.POSTGRES, target=text)
    if sep and scheme == "sqlite":
        if not rest.startswith("/"):
            raise InvalidStoreURL(
                f"SQLite URLs have no host: use sqlite:///relative.db or "
                f"sqlite:////absolute/path.db, not {_shown(url)}"
            )
        # sqlite:///x → "x" (relative); sqlite:////x → "/x" (absolute).
        path = rest[1:]
        if not path or path.endswith("/") or path == ":memory:":
            raise InvalidStoreURL(f"SQLite URL names no database file: {_shown(url)}")
        if path.startswith("file:"):
            # What SQLiteStore refuses (a SQLite URI is no file path): refused here, with
            # the file name's other spelling, not as a ValueError when the store opens.
            raise InvalidStoreURL(
                f"SQLite URL names a SQLite URI, not a file: {_shown(url)} (a file whose"
                f" name begins with file: is sqlite:///./{shorten(path)})"
            )
        if "?" in path:
            # SQLAlchemy-style parameters (?mode=ro, ?timeout=5) would be part of the file
            # name: mail queued in "q.db?mode=ro", beside the q.db the worker reads.
            raise InvalidStoreURL(
                f"SQLite URLs take no parameters: {_shown(url)} (the options of SQLiteStore"
                " are given in code; a file whose name holds '?' is a plain path)"
            )
        return StoreURL(kind=StoreKind.SQLITE, target=path)
    if not sep and ":" not in text.partition("/")[0] and text.lower().endswith(_SQLITE_SUFFIXES):
        return StoreURL(kind=StoreKind.SQLITE, target=text)
    raise InvalidStoreURL(
        f"unknown store URL {_shown(url)}: expected memory:, sqlite:///path.db, a *.db "
        "file path, or postgresql://..."
    )


def check_store_url(url: str) -> StoreURL:
    """:func:`parse_store_url`, and for PostgreSQL also every parameter of the URL the
    store would refuse when opened (``dead_after``, ``lock_timeout``, an unknown libpq
    parameter), still without opening anything: what a configuration check can find.

    Raises :class:`InvalidStoreURL`, or :class:`ConfigError` when a PostgreSQL URL is
    given and psycopg cannot be loaded.
    """
    parsed = parse_store_url(url)
    if parsed.kind is StoreKind.POSTGRES:
        postgres_module()  # ConfigError naming the extra when psycopg is missing
        from mailstrom.stores.postgres.connect import check_url

        check_url(parsed.target)
    return parsed


_ENDS_AUTHORITY = "#?@[]"
"""What ends a URL's user information or host for urlsplit, but not for libpq."""


def escape_userinfo(url: str) -> str:
    """``url`` with the ``#``, ``?``, ``@``, ``[`` and ``]`` of its user information (up
    to the last ``@`` before the path) percent-encoded, as libpq decodes them: a password
    is taken as libpq takes it when it is given unencoded (``postgresql://app:pa#ss@db``),
    where :func:`urllib.parse.urlsplit` ended the host at the ``#`` and read its start as
    a port, and an ``@`` in it no longer ends it.

    >>> escape_userinfo("postgresql://app:pa#s@s@db/mail")
    'postgresql://app:pa%23s%40s@db/mail'
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, _ = rest.partition("/")[0].rpartition("@")
    if not sep or not at or not any(c in _ENDS_AUTHORITY for c in userinfo):
        return url
    escaped = "".join(f"%{ord(c):02X}" if c in _ENDS_AUTHORITY else c for c in userinfo)
    return f"{scheme}{sep}{escaped}{rest[len(userinfo) :]}"


def _check_url_syntax(url: str) -> None:
    """InvalidStoreURL when ``url`` is no URL at all (an unclosed ``[`` of an IPv6 address,
    a bracketed host that is no IP address): the PostgreSQL store splits its URL with
    :func:`urllib.parse.urlsplit`, which raises a bare ValueError on these.

    Also for a port that is no port (``:99999``, ``:5432x``, ``:0``), of each host of
    libpq's ``host1:port1,host2:port2`` form: libpq refuses it only when connecting,
    which looked like a store that is down (exit 75, a worker waiting for ever)."""
    try:
        hosts = urlsplit(escape_userinfo(url)).netloc.rpartition("@")[2]
        ports = [urlsplit(f"//{host}").port for host in hosts.split(",")]
    except ValueError as exc:
        raise InvalidStoreURL(f"malformed store URL {_shown_malformed(url)}: {_why(exc)}") from None
    if 0 in ports:
        raise InvalidStoreURL(f"malformed store URL {_shown_malformed(url)}: port 0")


_ANY_USERINFO = re.compile(rf"(?P<head>{_SCHEME}://)[^\r\n]*@")


def _shown_malformed(url: str) -> str:
    """A malformed ``url`` as its error quotes it: everything before its last ``@`` hidden.
    libpq ends the user information at the first ``/``, so a password holding one (to be
    written ``%2F``) makes the URL malformed, and :func:`redact_url`, which goes by that
    reading, would show it."""
    hidden = _UP_TO_LAST_AT.sub(lambda m: _ANY_USERINFO.sub(r"\g<head>***@", m[0]), url)
    return shorten(hidden)


def _why(exc: ValueError) -> str:
    """What urlsplit found wrong, not quoting what stood where the port goes: in
    ``user:pass/word@host`` that is the start of the password."""
    text = str(exc)
    if text.startswith("Port could not be cast"):
        return "a port that is no number (or a password holding '/', which is written %2F)"
    return text


def _shown(url: str) -> str:
    """``url`` as errors quote it: password hidden, cut in the middle when long (it may
    be 10,000 characters from a script gone wrong, and the error is one line)."""
    return shorten(redact_url(url))


def open_store(url: str, *, read_only: bool = False, timeout: float | None = None) -> Store:
    """Open the store ``url`` names (see the module docstring for the forms).

    ``read_only`` opens a SQLite store for reading only (nothing created, migrated or
    written); other stores ignore it. ``timeout``, given, is a PostgreSQL store's wait
    for the database when opening and for a pooled connection per call, and a read-only
    SQLite store's wait for a lock another connection holds (their own defaults
    otherwise); the memory store ignores it.

    >>> store = open_store("sqlite:////var/lib/mailstrom/queue.db")  # doctest: +SKIP
    """
    parsed = parse_store_url(url)
    if parsed.kind is StoreKind.MEMORY:
        from mailstrom.stores.memory import MemoryStore

        return MemoryStore()
    if parsed.kind is StoreKind.SQLITE:
        # A read-only store only waits to read, as long as a look-only command gives: with
        # another connection holding the file locked, `status` sat silent for the
        # writers' 30 s before its exit 75.
        wait = timeout if read_only else None
        return open_sqlite(parsed.target, read_only=read_only, busy_timeout=wait)
    postgres = postgres_module()
    if timeout is None:
        store: Store = postgres.PostgresStore(parsed.target)
    else:
        store = postgres.PostgresStore(parsed.target, timeout=timeout)
    return store


def open_sqlite(path: str, *, read_only: bool = False, busy_timeout: float | None = None) -> Store:
    """The SQLite store in the file at ``path``, a path as it is (what a ``sqlite:`` URL or
    a path object names), the directories of this user's default store created first;
    ``busy_timeout``, given, is its wait for a lock (the store's default otherwise)."""
    from mailstrom.stores.sqlite import SQLiteStore

    if not read_only and _is_default_path(path):
        make_private_parents(path)
    if busy_timeout is None:
        return SQLiteStore(path, read_only=read_only)
    return SQLiteStore(path, read_only=read_only, busy_timeout=busy_timeout)


POSTGRES_EXTRA = "pip install 'mailstrom[postgres]' (or 'mailstrom[postgres-binary]')"
"""What to install for PostgreSQL stores."""


def postgres_module() -> Any:
    """:mod:`mailstrom.stores.postgres`, imported only when asked for (SQLite users never
    load the driver); ConfigError naming the extra when psycopg is missing or unusable."""
    try:
        from mailstrom.stores import postgres
    except ImportError as exc:
        # A missing psycopg or psycopg_pool, or psycopg without libpq ("no pq wrapper
        # available", an ImportError without a module name); anything else is a bug.
        if exc.name is not None and not exc.name.startswith("psycopg"):
            raise
        raise ConfigError(
            f"PostgreSQL stores need the psycopg driver, which cannot be loaded ({exc}): "
            f"{POSTGRES_EXTRA}"
        ) from None
    return postgres


def _is_default_path(target: str) -> bool:
    """Whether ``target`` is this user's default store (whose directories mailstrom
    creates; a path someone configured must exist, so a typo or an unmounted volume is
    an error rather than a new, empty queue somewhere unexpected)."""
    try:
        return os.path.abspath(target) == str(default_store_path())
    except ConfigError:
        return False
