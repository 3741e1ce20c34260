"""Which messages a command acts on: ids (any unique prefix), ``-`` for ids on standard
input, and the filters ``queue`` takes. Shared by ``queue`` and the bulk commands
(hold, release, retry, cancel, purge).

New filters are added in :func:`add_filter_options`, :data:`FILTERS` and
:func:`queue_filter`, and then work for every one of those commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from datetime import datetime
from itertools import chain
from typing import BinaryIO

from mailstrom.arguments import check_key
from mailstrom.cli.exits import EX_DATAERR, CLIError, UsageError, say
from mailstrom.cli.parsing import duration_arg
from mailstrom.cli.reading import stdin_buffer
from mailstrom.errors import InvalidArgument, StoreError, StoreUnreachable
from mailstrom.message.chars import shorten
from mailstrom.status import RecipientState
from mailstrom.stores.base import MAX_FILTER_TEXT, QueueFilter, Store
from mailstrom.stores.operator import PENDING_STATES, filter_domain

MAX_BULK = 100_000
"""Messages one bulk command changes at most (and ids read from standard input): the ids
are held in memory (the SQLite store changes them 500 a transaction)."""
COUNT_CAP = 1_000_000
"""Messages a count of those a selection matches reads at most: the queue view's footer
("showing 100 of 1,000,000+") and the bulk commands' note on a selection cut short."""
MAX_ID_LINE = 200
"""Octets of one line of ids on standard input, its end (LF or CRLF) not counted (an id
is 32)."""

STATE_CHOICES = ["pending", "finished", "any", *(s.value for s in RecipientState)]
"""What ``--state`` takes: a recipient state (a message's is derived from its
recipients), ``pending`` (queued or deferred) or ``any``."""


def add_id_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    """Positional ids: full ids or unique prefixes; ``-`` reads them from stdin."""
    parser.add_argument(
        "ids",
        nargs="*",
        metavar="ID",
        help=f"{what}: a message id or any unique prefix of one; '-' reads ids from "
        "standard input, one a line",
    )


def add_filter_options(parser: argparse.ArgumentParser, *, default_state: str) -> None:
    """The filters of ``queue``, also for the bulk commands. A new filter goes here and
    into :data:`FILTERS` and :func:`queue_filter`; every command that selects messages
    then takes it."""
    parser.add_argument(
        "--state",
        choices=STATE_CHOICES,
        default=None,
        help="messages in this state: a message's state is derived from its recipients; "
        "pending = queued or deferred; finished = delivered or failed; any = all "
        f"(default {default_state})",
    )
    parser.add_argument(
        "--domain", type=_domain_arg, help="messages with a recipient at this domain"
    )
    parser.add_argument(
        "--older-than",
        metavar="AGE",
        type=duration_arg,
        help="messages queued more than AGE ago (30s, 15m, 2h, 3d)",
    )
    parser.add_argument(
        "--tag", metavar="TAG", type=_tag_arg, help="messages carrying this tag (exact)"
    )


# A filter's value is checked here, so that a bad one is a usage error (64) naming the
# option. An empty one (``--domain "$D"`` with D unset) would otherwise be no filter at
# all, and cancel or purge would act on every message the other filters select.


def _domain_arg(text: str) -> str:
    return _filter_text("a domain", filter_domain(text), text)


def _tag_arg(text: str) -> str:
    return _filter_text("a tag", text, text)


def _filter_text(what: str, value: str, text: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    try:
        check_key(value, what, limit=MAX_FILTER_TEXT)
    except InvalidArgument:
        raise argparse.ArgumentTypeError(
            f"expected {what} of at most {MAX_FILTER_TEXT} octets of text, got {shorten(text)}"
        ) from None
    return value


def queue_filter(
    args: argparse.Namespace, *, default_state: str, limit: int, held: bool | None = None
) -> QueueFilter:
    """The filter ``args`` describe (``--state`` defaulting to ``default_state``)."""
    state = args.state or default_state
    states: frozenset[RecipientState] | None
    if state == "any":
        states = None
    elif state == "pending":
        states = PENDING_STATES
    elif state == "finished":
        states = frozenset({RecipientState.DELIVERED, RecipientState.FAILED})
    else:
        states = frozenset({RecipientState(state)})
    return QueueFilter(
        states=states,
        domain=args.domain,
        older_than=args.older_than,
        held=held,
        limit=limit,
        tag=args.tag,
    )


FILTERS = {"--state": "state", "--domain": "domain", "--older-than": "older_than", "--tag": "tag"}
"""The filters of :func:`add_filter_options`, by option, with the attribute each sets."""
_FILTER_NAMES = ", ".join(FILTERS)


def has_filters(args: argparse.Namespace) -> bool:
    return any(getattr(args, dest) is not None for dest in FILTERS.values())


def check_selection(args: argparse.Namespace, *, required: bool = True) -> None:
    """A usage error (64) for ids given with filters or ``--all``, and (``required``)
    for none of them. Checked before the store is opened or standard input read: ``purge
    ID --all`` resolved the id first and exited 66 for an unknown one, where every other
    command said 64."""
    filtered = has_filters(args) or args.all
    if args.ids and filtered:
        raise UsageError(f"give message ids or filters ({_FILTER_NAMES}, --all), not both")
    if required and not args.ids and not filtered:
        raise UsageError(
            f"name messages: ids, '-' for ids on standard input, filters ({_FILTER_NAMES}),"
            " or --all"
        )


_BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark, which may start a list of ids written on Windows."""


def read_ids(stream: BinaryIO) -> list[str]:
    """Ids on ``stream``, one a line (blank lines and ``#`` comments skipped, a UTF-8 byte
    order mark at the start ignored), at most :data:`MAX_BULK`; CLIError (65) for more,
    or for a line too long to be an id."""
    ids: list[str] = []
    # Room for the line's end (CRLF), which the bound does not count: read with it, a
    # line of 200 octets was refused. The first line has room for the mark too.
    first = stream.readline(len(_BOM) + MAX_ID_LINE + 2)
    rest = iter(lambda: stream.readline(MAX_ID_LINE + 2), b"")
    for number, raw in enumerate(chain([first] if first else [], rest), 1):
        line = raw.rstrip(b"\r\n")
        if number == 1 and line.startswith(_BOM):
            # As Windows editors and PowerShell write a list: read as part of the first
            # id, it made that id unknown and the whole command fail.
            line = line[len(_BOM) :]
        if len(line) > MAX_ID_LINE:
            raise CLIError(f"standard input line {number}: too long for a message id", EX_DATAERR)
        text = line.decode("ascii", "replace").strip()
        if not text or text.startswith("#"):
            continue
        ids.append(text)
        if len(ids) > MAX_BULK:
            raise CLIError(f"more than {MAX_BULK:,} ids on standard input", EX_DATAERR)
    return ids


def given_ids(args: argparse.Namespace) -> list[str]:
    """The ids on the command line, with ``-`` replaced by those on standard input."""
    ids: list[str] = []
    for arg in args.ids:
        if arg == "-":
            ids.extend(read_ids(stdin_buffer()))
        else:
            ids.append(arg)
    return ids


def resolve_all(store: Store, ids: Iterable[str]) -> list[str]:
    """Every id resolved to a full id, in order, without repeats; the first unknown or
    ambiguous one raises (before anything changes)."""
    return list(dict.fromkeys(store.resolve_id(i) for i in ids))


def select_messages(
    store: Store,
    args: argparse.Namespace,
    *,
    now: datetime,
    default_state: str,
    held: bool | None = None,
) -> tuple[list[str], QueueFilter | None]:
    """The full ids a bulk command acts on: the ids given, or every message the filters
    (or ``--all``) select, at most :data:`MAX_BULK` (their ids alone: a status read
    for each walked past its bytes in SQLite); with the filter that selected them, None
    for ids given. ``args`` passed :func:`check_selection` (before the store was
    opened)."""
    if args.ids:
        return resolve_all(store, given_ids(args)), None
    where = queue_filter(args, default_state=default_state, limit=MAX_BULK, held=held)
    ids = store.select_ids(now=now, where=where)
    note_left_out(store, where, len(ids), now=now)
    return ids, where


def note_left_out(store: Store, where: QueueFilter, selected: int, *, now: datetime) -> None:
    """Say on stderr when ``where`` matches more messages than the ``selected`` its limit
    let through (a bulk command takes the newest :data:`MAX_BULK` a run): its report
    counts only those, and said nothing of the older ones, left as they were (``hold
    --all`` went on delivering them; ``retry``, run again, took the same newest ones).
    Counted only when the limit was reached."""
    if selected < where.limit:
        return
    try:
        total = store.count(now=now, where=where, cap=COUNT_CAP)
    except StoreUnreachable:
        raise
    except StoreError as exc:
        # Only a note: counting 500,000 queued messages took 1.6 s, past many a server's
        # statement_timeout, and its cancel stopped the command itself, on every run.
        say(
            f"mailstrom: note: only the newest {selected:,} messages the filters match were"
            f" selected (at most {MAX_BULK:,} a run); whether more match was not counted"
            f" ({exc})"
        )
        return
    if total > selected:
        say(
            f"mailstrom: note: only the newest {of_total(selected, total)} messages the filters"
            f" match were selected (at most {MAX_BULK:,} a run): the others are left as they are"
        )


def of_total(listed: int, total: int) -> str:
    """What a cut selection holds: "100 of 151", or "100 of 1,000,000+" when ``total``
    reached :data:`COUNT_CAP`."""
    more = f"{total:,}+" if total >= COUNT_CAP else f"{total:,}"
    return f"{listed:,} of {more}"


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def print_ids(ids: Sequence[str]) -> None:
    for mid in ids:
        print(mid)
