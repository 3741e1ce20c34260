"""``mailstrom workers``: the workers delivering from this queue now, where each runs and
how much it holds.

A queue nobody delivers from looks like a slow one: ``status`` says "queued" and nothing
more. The stores that can tell which lease holders live (SQLite by their lock files,
PostgreSQL by their beats: :class:`~mailstrom.stores.dead_holders.DeadHolderReaper`) say
who is there; the command exits 69 when nobody is, so that a scheduled check can alert.
"""

from __future__ import annotations

import argparse

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_OK, EX_UNAVAILABLE
from mailstrom.cli.output import age, print_json, print_table
from mailstrom.cli.parsing import Subparsers
from mailstrom.cli.views import NOBODY
from mailstrom.stores.dead_holders import DeadHolderReaper, HolderInfo


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    w = sub.add_parser(
        "workers",
        parents=parents,
        help="list the workers delivering from this store",
        description="List the workers that deliver from this store now, oldest first: "
        "each one's lease holder, host, process id, start, when it was last seen (on "
        "PostgreSQL; on SQLite its lock file says it lives at this moment) and how many "
        "recipients it leases. Every worker appears from its start: `mailstrom worker` "
        "processes and the workers of applications' Mailstrom facades alike. Exits 69 "
        "when none runs.",
        epilog="examples:\n  mailstrom workers\n  mailstrom workers --json\n",
    )
    w.add_argument("--json", action="store_true", help="print JSON (a list, [] for none)")
    w.set_defaults(handler=workers_command)


def workers_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with store_from(settings, read_only=True) as store:
        # The command only looks, so a memory store is an empty queue, as for every
        # command that only looks: one made for this command has no worker. An SQLite
        # file that does not exist yet is read as such an empty store: no worker has
        # opened it (a worker creates it), so nobody delivers from it either.
        live = store.live_holders() if isinstance(store, DeadHolderReaper) else []
    if args.json:
        print_json(live)
    elif live:
        print_workers(live)
    else:
        print(NOBODY)
    return EX_OK if live else EX_UNAVAILABLE


def print_workers(live: list[HolderInfo]) -> None:
    now = utc_now()
    print_table(
        ["HOLDER", "HOST", "PID", "STARTED", "LAST SEEN", "LEASED"],
        [
            [
                w.holder,
                w.host,
                w.pid,
                w.started_at,
                "now" if w.seen_at is None else f"{age(w.seen_at, now)} ago",
                w.leased,
            ]
            for w in live
        ],
    )
