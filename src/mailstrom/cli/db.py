"""``mailstrom db migrate`` brings the store's schema up to date; ``mailstrom db compact``
gives an SQLite store's free pages back to the disk."""

from __future__ import annotations

import argparse
import os

from mailstrom.cli.context import settings_from
from mailstrom.cli.exits import EX_NOINPUT, EX_OK, EX_USAGE, CLIError
from mailstrom.cli.output import print_json
from mailstrom.cli.parsing import Subparsers
from mailstrom.stores.url import redact_url


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    db = sub.add_parser(
        "db",
        help="store maintenance",
        description="Store maintenance.",
    )
    actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    m = actions.add_parser(
        "migrate",
        parents=parents,
        help="apply schema migrations and print the schema version",
        description="Apply the store's pending schema migrations and print the schema "
        "version. Safe to run repeatedly and while workers run; SQLite stores also "
        "migrate themselves when opened.",
        epilog="examples:\n  mailstrom db migrate --store sqlite:////var/lib/mailstrom/queue.db\n"
        "  mailstrom db migrate --store postgresql://mailstrom@db.internal/mailstrom\n",
    )
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(handler=migrate_command)
    c = actions.add_parser(
        "compact",
        parents=parents,
        help="give an SQLite store's free space back to the disk (VACUUM)",
        description="Write an SQLite store's live rows into a fresh file (checkpoint, "
        "VACUUM, checkpoint) and print its size before and after: the file otherwise "
        "keeps the size of the largest backlog it held. Safe while workers run, but "
        "every write waits while it runs (each for its busy timeout), and it needs free "
        "room for a copy of the live data twice. PostgreSQL stores are autovacuum's job.",
        epilog="examples:\n  mailstrom db compact --store sqlite:////var/lib/mailstrom/queue.db\n",
    )
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(handler=compact_command)


def migrate_command(args: argparse.Namespace) -> int:
    url = settings_from(args).store_url
    version = migrate(url)
    if args.json:
        print_json({"store": redact_url(url), "schema_version": version})
    elif version is None:
        print(f"nothing to migrate: store {redact_url(url)} is not persistent")
    else:
        print(f"{redact_url(url)}: schema version {version}")
    return EX_OK


def migrate(url: str) -> int | None:
    """Apply migrations; the resulting schema version (None for the memory store)."""
    from mailstrom.stores.url import StoreKind, open_store, parse_store_url, postgres_module

    parsed = parse_store_url(url)
    if parsed.kind is StoreKind.POSTGRES:
        version: int = postgres_module().migrate(parsed.target)
        return version
    if parsed.kind is StoreKind.SQLITE:
        from mailstrom.stores.sqlite_schema import latest_version

        # Migrates on open, as every worker does; opened as every command opens it, so
        # that the default queue's private directories are made when missing. An open
        # that succeeds leaves the file at this mailstrom's version (it migrates or
        # refuses): reading it again through a connection of its own let SQLite make a
        # new empty file in place of one deleted meanwhile, and waited and failed raw
        # behind a lock taken since.
        open_store(url).close()
        return latest_version()
    return None


def compact_command(args: argparse.Namespace) -> int:
    from mailstrom.stores.sqlite import SQLiteStore
    from mailstrom.stores.url import StoreKind, open_sqlite, parse_store_url

    url = settings_from(args).store_url
    parsed = parse_store_url(url)
    if parsed.kind is StoreKind.POSTGRES:
        raise CLIError(
            f"nothing to compact: {redact_url(url)} is PostgreSQL, whose autovacuum gives"
            " deleted rows' space back (VACUUM FULL, run by hand, also returns it to the"
            " disk, locking each table while it runs)",
            EX_USAGE,
        )
    if parsed.kind is not StoreKind.SQLITE:
        raise CLIError(f"nothing to compact: store {redact_url(url)} is not persistent", EX_USAGE)
    if not os.path.isfile(parsed.target) or os.path.getsize(parsed.target) == 0:
        # Opened for writing, a mistyped path (or an empty file) was made an empty queue
        # and "compacted".
        raise CLIError(f"nothing to compact: no queue at {redact_url(url)}", EX_NOINPUT)
    store = open_sqlite(parsed.target)
    try:
        assert isinstance(store, SQLiteStore)
        done = store.compact()
    finally:
        store.close()
    if args.json:
        print_json(
            {
                "store": redact_url(url),
                "bytes_before": done.before,
                "bytes_after": done.after,
                "checkpointed": done.checkpointed,
            }
        )
        return EX_OK
    print(f"{redact_url(url)}: {done.before:,} -> {done.after:,} bytes (database and -wal file)")
    if not done.checkpointed:
        print(
            "a reader kept an older snapshot open: the file shrinks at a later checkpoint"
            " (when the last process closes it at the latest)"
        )
    return EX_OK
