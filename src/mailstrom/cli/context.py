"""What every command starts from: settings from the global options, and the store."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from mailstrom.cli.exits import EX_CONFIG, CLIError, UsageError, one_line, say
from mailstrom.errors import ConfigError
from mailstrom.settings import Settings, load_settings, parse_dns_servers
from mailstrom.stores.base import Store

GLOBAL_VALUE_OPTIONS = frozenset(
    ["--config", "--store", "--helo-name", "--smtp-port", "--dns-server", "--tls", "--tls-ca"]
)
"""Global options that take a value (the sendmail dispatch skips over them)."""


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """Options accepted before or after the subcommand name.

    Defaults are SUPPRESS so that a value given before the subcommand is not overwritten
    by the subparser's default when it is not repeated after it.
    """
    from mailstrom.cli.parsing import (
        config_arg,
        dns_server_arg,
        helo_arg,
        setting_arg,
        store_arg,
    )

    s = argparse.SUPPRESS
    g = parser.add_argument_group("configuration (override the file and MAILSTROM_* variables)")
    g.add_argument(
        "--config", metavar="PATH", type=config_arg, default=s, help="TOML configuration file"
    )
    g.add_argument("--store", metavar="URL", type=store_arg, default=s, help=_store_help())
    g.add_argument(
        "--helo-name", metavar="NAME", type=helo_arg, default=s, help="name sent in EHLO"
    )
    g.add_argument(
        "--smtp-port",
        metavar="PORT",
        type=setting_arg("smtp_port", "--smtp-port"),
        default=s,
        help="port of MX hosts (25)",
    )
    g.add_argument(
        "--dns-server",
        metavar="HOST[:PORT]",
        action="append",
        type=dns_server_arg,
        default=s,
        help="DNS server for MX lookups (repeatable; default: the system's)",
    )
    g.add_argument(
        "--tls",
        choices=["opportunistic", "required", "verify"],
        default=s,
        help="STARTTLS policy towards MX hosts",
    )
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        type=setting_arg("tls_ca", "--tls-ca"),
        default=s,
        help="PEM CA bundle for certificate checks",
    )
    g.add_argument(
        "--traceback",
        action="store_true",
        default=s,
        help="on an internal error, show the traceback (for bug reports)",
    )


def _store_help() -> str:
    from mailstrom.errors import ConfigError
    from mailstrom.stores.url import default_store_url

    try:
        default = default_store_url()
    except ConfigError:
        default = "sqlite:///$XDG_STATE_HOME/mailstrom/queue.db"
    # argparse formats help with %: a path may hold one.
    return f"queue store (default: {default})".replace("%", "%%")


def global_parser() -> argparse.ArgumentParser:
    """A parser of the global options alone (a parent for every subcommand)."""
    from mailstrom.cli.parsing import ArgumentParser

    parser = ArgumentParser(add_help=False)
    add_global_options(parser)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Load file < environment < these options."""
    overrides: dict[str, Any] = {
        "store": getattr(args, "store", None),
        "helo_name": getattr(args, "helo_name", None),
        "smtp_port": getattr(args, "smtp_port", None),
        "tls": getattr(args, "tls", None),
        "tls_ca": getattr(args, "tls_ca", None),
        "metrics.listen": getattr(args, "metrics", None),
        "hook.url": getattr(args, "hook", None),
    }
    servers = getattr(args, "dns_server", None)
    if servers:
        try:
            overrides.update(parse_dns_servers(servers))
        except ConfigError as exc:  # e.g. two ports: the command line is wrong
            raise UsageError(str(exc)) from None
    return report(load_settings(config_path=getattr(args, "config", None), overrides=overrides))


def report(settings: Settings) -> Settings:
    """Print the settings' warnings on stderr (e.g. a password in a file others can read),
    control characters they quote (a file's path) as escapes, as an error's are.

    Written as :func:`~mailstrom.cli.exits.say` writes: a stderr that cannot be written
    (a pipe whose reader has gone) loses the warning, never the command's work. The
    BrokenPipeError ended ``sendmail`` as if a reader of ``-bp`` had gone, exit 0, with
    the message never queued."""
    from mailstrom.cli.output import visible

    for warning in settings.warnings:
        say(f"mailstrom: warning: {visible(warning)}")
    return settings


READ_WAIT = 5.0
"""Seconds a command that only looks waits for PostgreSQL (to open the store, and for a
pooled connection per read) and for a lock on a SQLite store another connection holds.
The store's own 30 s suit a worker, which has nothing better to do; with the server
down, ``events --follow`` said so half a minute late, and a ``status`` or ``queue`` sat
silent as long before its exit 75 (with a SQLite file held locked, too)."""


def open_store(url: str, *, read_only: bool = False) -> Store:
    """The store ``url`` names; ``read_only`` for commands that only look (they then work
    on a read-only mount and never create, migrate or change the store, and wait
    :data:`READ_WAIT` for the store)."""
    from mailstrom.stores.url import StoreKind, parse_store_url
    from mailstrom.stores.url import open_store as open_url

    if read_only:
        parsed = parse_store_url(url)
        if parsed.kind is StoreKind.SQLITE and not_created(parsed.target):
            # Nothing was ever queued there: an empty queue, and no file created to show it.
            from mailstrom.stores.memory import MemoryStore

            return MemoryStore()
        return open_url(url, read_only=True, timeout=READ_WAIT)
    return open_url(url)


def not_created(path: str) -> bool:
    """Whether the SQLite store at ``path`` was never created: its file is missing from a
    directory that exists, or from the default store's, which the first writer makes.

    StoreError (75, as the writers give) when the path cannot be looked up: its directory
    is missing (a typo, an unmounted volume); StoreAccessDenied (78, as the writers give)
    when it never can be as it is: unsearchable, or no directory (see
    :func:`~mailstrom.stores.url.path_error`). Read as "no file", such a path showed an
    empty queue, exit 0, where the queue was only out of sight, and ``status ID`` said
    the message did not exist. A symbolic link whose target is missing is a StoreError
    too: no writer creates the store through it."""
    from mailstrom.errors import StoreError
    from mailstrom.stores.url import default_store_path, path_error

    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            # No writer creates the file through it (SQLiteStore opens mode=rw once its
            # O_EXCL create found the name taken): every one fails on it, and the queue
            # behind it (a volume not mounted yet) is out of sight, not empty.
            raise StoreError(f"cannot open {path}: {_dangling(path)}") from None
        directory = os.path.dirname(os.path.abspath(path))
        try:
            default = os.path.abspath(path) == str(default_store_path())
        except ConfigError:
            default = False
        if default or os.path.isdir(directory):
            return True
        raise StoreError(f"cannot open {path}: no directory {directory}") from None
    except OSError as exc:
        raise path_error(f"cannot open {path}", exc) from None
    except ValueError:  # a NUL in the path: for the store to refuse as it does
        return False
    return False


def _dangling(link: str) -> str:
    """What the symbolic link ``link``, whose target is missing, points at."""
    try:
        return f"a symbolic link to {os.readlink(link)}, which does not exist"
    except OSError:  # replaced meanwhile
        return "a symbolic link to nothing"


def require_lasting_store(settings: Settings) -> None:
    """Refuse (CLIError, EX_CONFIG) a store that ends with this process, for a command
    that queues mail or changes the store: a memory store took the message (or the
    hold, the suppression, ...), the command exited 0 ("queued") and the change was
    gone with it, before any worker or later command could see it."""
    from mailstrom.stores.url import StoreKind, parse_store_url

    if parse_store_url(settings.store_url).kind is StoreKind.MEMORY:
        raise CLIError(
            "the store is a memory store, which ends with this command: what it queues or "
            "changes there would be lost; set store to a SQLite file or a PostgreSQL URL",
            EX_CONFIG,
        )


@contextlib.contextmanager
def store_from(settings: Settings, *, read_only: bool = False) -> Iterator[Store]:
    """The store, for one command; one opened to write must outlast the command
    (:func:`require_lasting_store`): only a command that changes it opens it so. What
    the store and its driver log meanwhile goes out as :func:`warning_lines`."""
    if not read_only:
        require_lasting_store(settings)
    with warning_lines():
        store = open_store(settings.store_url, read_only=read_only)
        try:
            yield store
        finally:
            store.close()


class WarningLines(logging.Handler):
    """Log records as the command's own warnings: ``mailstrom: warning: <message>``, one
    line each (see :func:`~mailstrom.cli.exits.one_line`), an exception a record carries
    as its type and text after the message, never its traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                text = f"{text}: {type(exc).__name__}: {exc}"
        except Exception:
            self.handleError(record)
            return
        say(f"mailstrom: warning: {one_line(text)}")


@contextlib.contextmanager
def warning_lines() -> Iterator[None]:
    """Warnings logged meanwhile (the store's, a message left out of a list; its
    driver's, psycopg's pool failing to connect) on stderr as the command's own, when
    nobody configured logging (``mailstrom worker`` and ``web`` do; so may an
    application that runs a command). Python's last resort wrote them raw: psycopg's
    "error connecting in 'mailstrom': ..." and a tab-indented half line, every second
    while PostgreSQL was down, among the command's lines."""
    top = logging.getLogger()
    if top.handlers:
        yield
        return
    handler = WarningLines(logging.WARNING)
    top.addHandler(handler)
    try:
        yield
    finally:
        top.removeHandler(handler)


def utc_now() -> datetime:
    return datetime.now(UTC)
