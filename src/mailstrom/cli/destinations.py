"""``mailstrom suspend DOMAIN`` and ``mailstrom resume DOMAIN``: stop and restart delivery to
one destination without touching its messages.

The suspension lives in the store, so every worker of the queue (on every host, with
PostgreSQL) honours it at once: recipients at the domain are not attempted and no attempt
is counted; they keep their state and schedule. A worker that leased some of them is told
and gives back what it has not started (``Store.watch_cancels``). ``queue --suspended``
lists the suspensions in force.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_NOINPUT, EX_OK, CLIError, UsageError
from mailstrom.cli.output import print_json
from mailstrom.cli.parsing import Subparsers, duration_arg
from mailstrom.stores.operator import normalize_domain


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "suspend",
        parents=parents,
        help="stop delivery to one destination domain (messages stay queued)",
        description="Stop delivering to DOMAIN: no worker attempts its recipients (and "
        "none is counted as an attempt) until `resume DOMAIN` or the --for time ends. "
        "Its messages stay in the queue as they are; other domains of the same message "
        "are delivered. Suspending again replaces the end.",
        epilog="examples:\n  mailstrom suspend example.org\n"
        "  mailstrom suspend example.org --for 2h\n  mailstrom queue --suspended\n",
    )
    s.add_argument("domain", metavar="DOMAIN", help="the destination (after the @)")
    s.add_argument(
        "--for",
        dest="duration",
        metavar="AGE",
        type=_suspension_arg,
        help="end by itself after AGE (30s, 15m, 2h, 3d; longer than 0); default: until resumed",
    )
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(handler=suspend_command)

    r = sub.add_parser(
        "resume",
        parents=parents,
        help="restart delivery to a suspended destination",
        description="End the suspension of DOMAIN. Its recipients are attempted as they "
        "were scheduled (use `retry --domain DOMAIN` to make them due now); running "
        "workers are woken. Exits 66 when DOMAIN was not suspended.",
        epilog="example:\n  mailstrom resume example.org\n",
    )
    r.add_argument("domain", metavar="DOMAIN", help="the destination (after the @)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(handler=resume_command)


def _suspension_arg(text: str) -> timedelta:
    """``--for``: a duration longer than 0. A suspension that ends as it is written
    suspends nothing: ``--for 0s`` said "suspended until <now>" and exited 0."""
    age = duration_arg(text)
    if age <= timedelta(0):
        raise argparse.ArgumentTypeError(f"a suspension must last longer than 0: {text!r}")
    return age


def _domain(text: str, *, stored: bool = False) -> str:
    try:
        return normalize_domain(text, stored=stored)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def suspend_command(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    now = utc_now()
    until = now + args.duration if args.duration is not None else None
    with store_from(settings_from(args)) as store:
        store.suspend(domain, now=now, until=until)
    if args.json:
        print_json({"domain": domain, "suspended": True, "until": until})
    else:
        end = f"until {until:%Y-%m-%d %H:%M:%S} UTC" if until else "until resumed"
        print(f"{domain}: suspended {end}")
    return EX_OK


def resume_command(args: argparse.Namespace) -> int:
    domain = _domain(args.domain, stored=True)
    with store_from(settings_from(args)) as store:
        found = store.resume(domain, now=utc_now())
    if not found:
        raise CLIError(f"{domain} is not suspended", EX_NOINPUT)
    if args.json:
        print_json({"domain": domain, "suspended": False})
    else:
        print(f"{domain}: resumed")
    return EX_OK
