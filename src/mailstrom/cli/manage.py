"""Commands that change the queue: retry, hold, release, cancel, purge."""

from __future__ import annotations

import argparse

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_OK
from mailstrom.cli.output import print_json
from mailstrom.cli.parsing import Subparsers, duration_arg


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "retry",
        parents=parents,
        help="make pending recipients due now",
        description="Make a message's queued and deferred recipients due at once, or every "
        "deferred recipient in the queue. A running worker picks them up on its next look "
        "at the store (at once with PostgreSQL, within poll_interval otherwise).",
        epilog="examples:\n  mailstrom retry 0190f3a2c4e1b7d08a4f2c6e9b1d3f57\n"
        "  mailstrom retry --all-deferred\n",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="message id")
    which.add_argument("--all-deferred", action="store_true", help="every deferred recipient")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=retry_command)

    for name, held, text in (
        ("hold", True, "keep a message from being delivered until released"),
        ("release", False, "let a held message be delivered again"),
    ):
        h = sub.add_parser(
            name,
            parents=parents,
            help=text,
            description=text[0].upper() + text[1:] + ". Deliveries already in flight finish.",
            epilog=f"example:\n  mailstrom {name} 0190f3a2c4e1b7d08a4f2c6e9b1d3f57\n",
        )
        h.add_argument("id", help="message id")
        h.add_argument("--json", action="store_true", help="print JSON")
        h.set_defaults(handler=hold_command, held=held)

    c = sub.add_parser(
        "cancel",
        parents=parents,
        help="fail a message's pending recipients",
        description="Fail every queued or deferred recipient of a message with the reason "
        '"cancelled". Delivered recipients stay delivered.',
        epilog="example:\n  mailstrom cancel 0190f3a2c4e1b7d08a4f2c6e9b1d3f57\n",
    )
    c.add_argument("id", help="message id")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(handler=cancel_command)

    pg = sub.add_parser(
        "purge",
        parents=parents,
        help="delete finished messages",
        description="Delete messages all of whose recipients are final (delivered or "
        "failed) and whose last attempt is older than AGE. Pending messages are never "
        "deleted.",
        epilog="example:\n  mailstrom purge --delivered-before 7d\n",
    )
    pg.add_argument(
        "--delivered-before",
        "--finished-before",
        dest="before",
        metavar="AGE",
        type=duration_arg,
        required=True,
        help="finished more than AGE ago (30s, 15m, 2h, 3d)",
    )
    pg.add_argument("--json", action="store_true", help="print JSON")
    pg.set_defaults(handler=purge_command)


def _report(args: argparse.Namespace, data: dict[str, object], text: str) -> int:
    if args.json:
        print_json(data)
    else:
        print(text)
    return EX_OK


def retry_command(args: argparse.Namespace) -> int:
    with store_from(settings_from(args)) as store:
        if args.all_deferred:
            n = store.retry_deferred(now=utc_now())
            return _report(args, {"rescheduled": n}, f"{n} deferred recipients due now")
        n = store.retry(args.id, now=utc_now())
    return _report(args, {"id": args.id, "rescheduled": n}, f"{args.id}: {n} recipients due now")


def hold_command(args: argparse.Namespace) -> int:
    with store_from(settings_from(args)) as store:
        store.set_held(args.id, args.held)
    word = "held" if args.held else "released"
    return _report(args, {"id": args.id, "held": args.held}, f"{args.id}: {word}")


def cancel_command(args: argparse.Namespace) -> int:
    with store_from(settings_from(args)) as store:
        n = store.cancel(args.id, now=utc_now())
    return _report(args, {"id": args.id, "cancelled": n}, f"{args.id}: {n} recipients cancelled")


def purge_command(args: argparse.Namespace) -> int:
    with store_from(settings_from(args)) as store:
        n = store.purge(finished_before=utc_now() - args.before)
    return _report(args, {"purged": n}, f"{n} message{'' if n == 1 else 's'} purged")
