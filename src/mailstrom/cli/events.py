"""``mailstrom events``: the delivery events of the store's outbox, for scripts.

The same events a hook receives (``--json`` prints each as the hook's JSON object, one a
line); ``--follow`` keeps printing new ones as workers record them, like ``tail -f``.
Events are written only while a worker runs with a hook or the ``events`` setting.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from mailstrom.bounds import MAX_INTEGER
from mailstrom.cli.context import (
    not_created,
    open_store,
    settings_from,
    store_from,
    utc_now,
    warning_lines,
)
from mailstrom.cli.exits import EX_OK, UsageError, reason_for, say
from mailstrom.cli.output import json_for, visible
from mailstrom.cli.parsing import Subparsers, count_arg, duration_arg, seconds_arg
from mailstrom.errors import StoreError
from mailstrom.safetext import escaped_json
from mailstrom.status import DeliveryEvent
from mailstrom.stores.base import Store
from mailstrom.stores.url import StoreKind, parse_store_url
from mailstrom.webhooks import event_json

if TYPE_CHECKING:
    from mailstrom.runtime.worker_store import _Backoff

EPILOG = """\
examples:
  mailstrom events                        # the last 20 events
  mailstrom events --follow --json | jq 'select(.type == "failed")'
  mailstrom events --after 1200 --limit 500
  mailstrom events --prune 7d             # delete events sent over a week ago
  mailstrom events --prune 7d --unsent    # and those no hook sent (events on, no hook)

Events are written while a worker runs with a hook (--hook, hook.url) or with the events
setting (MAILSTROM_EVENTS=1); each is one recorded attempt's result.
"""

LIMIT = 20
"""Events listed without ``--limit``."""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "events",
        parents=parents,
        help="show delivery events (what hooks receive)",
        description="Show the delivery events of the store's outbox, oldest first: one per "
        "recorded attempt (delivered, deferred, failed).",
        epilog=EPILOG,
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--after", type=_event_id, default=None, metavar="ID", help="only events with a higher id"
    )
    p.add_argument(
        "--limit",
        type=count_arg,
        default=None,
        metavar="N",
        help=f"without --after: the last N events (default {LIMIT}); with it: at most N",
    )
    p.add_argument(
        "--interval",
        type=seconds_arg,
        default=0.5,
        metavar="S",
        help="with --follow: seconds between looks at the store (default 0.5)",
    )
    p.add_argument(
        "--prune",
        type=duration_arg,
        default=None,
        metavar="AGE",
        help="delete events sent (acknowledged by the hook) more than AGE ago, and exit "
        "(without --after, --limit or --follow)",
    )
    p.add_argument(
        "--unsent",
        action="store_true",
        help="with --prune: also delete events no hook has sent whose attempt is over AGE "
        "old (events on without a hook: nothing else ever deletes them)",
    )
    p.set_defaults(handler=events_command)


def _event_id(text: str) -> int:
    # isascii: isdigit() also takes "\u0663" (int() reads it as 3) and "²" (int() refuses).
    # At most a bigint: a larger id reached the store, which refused it as "unavailable,
    # try again" (75), which can never succeed.
    if not (text.isascii() and text.strip().isdigit() and int(text) <= MAX_INTEGER):
        raise argparse.ArgumentTypeError(
            f"expected an event id (a whole number up to {MAX_INTEGER}), got {text!r}"
        )
    return int(text)


def events_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.unsent and args.prune is None:
        raise UsageError("--unsent goes with --prune AGE")
    if args.prune is not None:
        # It deletes every event old enough: a listing's option beside it was dropped
        # without a word, and `--prune 0s --unsent --after ID` deleted those up to ID too.
        given = [
            option
            for option, there in (
                ("--after", args.after is not None),  # --after 0 too
                ("--limit", args.limit is not None),
                ("--follow", args.follow),
            )
            if there
        ]
        if given:
            raise UsageError(f"--prune takes no {given[0]}")
        before = utc_now() - args.prune
        with store_from(settings) as store:
            pruned = store.prune_events(
                sent_before=before, unsent_before=before if args.unsent else None
            )
        print(json.dumps({"pruned": pruned}) if args.json else f"pruned {pruned} events")
        return EX_OK
    # A follower waits out a passing trouble from the start, not only once following: it
    # runs for as long as the workers do, and may start while the store restarts.
    patience = _Patience(args.interval, waiting=args.follow)
    limit = LIMIT if args.limit is None else args.limit
    with warning_lines():
        # Looked at before the store is opened: a queue not created yet is read as an
        # empty stand-in, which nothing a worker records ever reaches.
        created = patience.call(lambda: _created(settings.store_url))
        store = patience.call(lambda: open_store(settings.store_url, read_only=True))
        with contextlib.closing(store):
            after = _listed(store, patience, args.after, limit, as_json=args.json)
            if args.follow and created:
                _follow(store, after, patience, as_json=args.json)
        if args.follow:
            with contextlib.closing(_once_created(settings.store_url, args.interval)) as store:
                _follow(store, after, patience, as_json=args.json)
    return EX_OK


def _listed(
    store: Store, patience: _Patience, after: int | None, limit: int, *, as_json: bool
) -> int:
    """Print the last ``limit`` events (``after`` None) or the first ``limit`` with an id
    above ``after``, oldest first; return the id a follower carries on after.

    Read and printed a page at a time: ``events --after 0 --limit 1000000`` (exporting
    the outbox) read every event into one list, and without ``--after`` the last ones
    were all kept, before the first line was written: 200,000 events held 275 MB. Each
    page is one store call, tried again on its own (:class:`_Patience`): a retry never
    prints again what was printed."""
    if after is None:
        last = patience.call(store.last_event_id)
        start, skip, kept = patience.call(lambda: _last_events_start(store, last, limit))
        if kept is not None:  # a page at most, read already: read once, as before
            for event in kept:
                _print(event, as_json=as_json)
        else:
            _print_pages(store, patience, start, limit, upto=last, skip=skip, as_json=as_json)
        return last
    return _print_pages(store, patience, after, limit, as_json=as_json)


def _print_pages(
    store: Store,
    patience: _Patience,
    after: int,
    limit: int,
    *,
    upto: int | None = None,
    skip: int = 0,
    as_json: bool,
) -> int:
    """Print up to ``limit`` events with an id above ``after`` (and at most ``upto``),
    after leaving out the first ``skip`` of them; return the id of the last printed, or
    ``after``."""
    while limit > 0:
        size = min(_PAGE, skip + limit)
        # A partial, not a lambda: a retry reads this page again, whatever comes after.
        read = functools.partial(store.read_events, after=after, limit=size)
        page = patience.call(read)
        for event in page:
            if upto is not None and event.id > upto:
                return after
            after = event.id
            if skip:
                skip -= 1
                continue
            _print(event, as_json=as_json)
            limit -= 1
            if limit == 0:
                break
        if len(page) < size:
            break
    return after


_T = TypeVar("_T")

_PAGE = 1000
"""Events read at once: while looking for the last ones, and while printing."""


def _last_events_start(
    store: Store, last: int, limit: int
) -> tuple[int, int, list[DeliveryEvent] | None]:
    """Where the last ``limit`` events up to the id ``last`` begin: an id to read after,
    and how many events after it (fewer than a page) come before them; and, when
    ``limit`` is a page at most, those events themselves (read once: a row that cannot
    be read is warned of once). Ids have gaps (a prune deletes the events a hook sent,
    which need not be the oldest; PostgreSQL's sequence skips the ids of rolled-back
    transactions), so the ``limit`` ids below the last may hold fewer events: the range
    looked at is doubled until it holds ``limit`` or starts at the first id. Read a page
    at a time, keeping a page at most and, per page, the id it was read after."""
    span = max(limit, 1)
    while True:
        start = max(0, last - span)
        kept: collections.deque[DeliveryEvent] = collections.deque(maxlen=min(limit, _PAGE))
        # The id each page was read after, the n-th page holding events n*_PAGE on: the
        # printing resumes at the page where the wanted events begin. Skipping them all
        # by count from ``start`` shifted the window when a prune between the two reads
        # removed events before it (45 asked, 44 printed, two late, for one prune).
        page_starts: list[int] = []
        found, after = 0, start
        while True:
            page_starts.append(after)
            page = [e for e in store.read_events(after=after, limit=_PAGE) if e.id <= last]
            kept.extend(page)
            found += len(page)
            if len(page) < _PAGE:
                break
            after = page[-1].id
        if found >= limit or start == 0:
            skip = max(0, found - limit)
            pages = skip // _PAGE
            whole = list(kept) if limit <= _PAGE else None
            return page_starts[pages], skip - pages * _PAGE, whole
        span *= 2


def _created(url: str) -> bool:
    """Whether the store ``url`` names exists: an SQLite file is made by the first
    command that writes to it; the other stores always are. StoreError when the file's
    path cannot be looked up (see :func:`~mailstrom.cli.context.not_created`)."""
    parsed = parse_store_url(url)
    return parsed.kind is not StoreKind.SQLITE or not not_created(parsed.target)


def _once_created(url: str, interval: float) -> Store:
    """The store ``url`` names, opened read-only once a writer has made it: looked for
    every ``interval`` seconds. A file just made may hold no schema yet, or part of it,
    and a directory may be missing (a volume not mounted yet): those are looked at again
    too; a path that can never be the store (a file where its directory goes, one this
    user may not search), a damaged store or another program's file is not."""
    from mailstrom.runtime.store_opening import worth_waiting

    while True:
        time.sleep(interval)
        try:
            if _created(url):
                return open_store(url, read_only=True)
        except StoreError as exc:
            if not worth_waiting(exc):
                raise
            # Being created: its schema comes in its writer's transactions.


class _Patience:
    """Store calls tried again while they fail with a passing trouble (a database
    restarting, a connection lost, a lock held past the store's wait), as a worker tries
    its store again: the waits grow from ``interval`` up to 5 s (or stay at a longer
    ``interval``), and stderr says when the calls fail and when they work again. Only a
    store that waiting cannot mend (damaged, a newer schema, access refused) raises, for
    its exit code. Not ``waiting``, the first failure raises (a listing: exit 75)."""

    def __init__(self, interval: float, *, waiting: bool = True) -> None:
        self.interval = interval
        self._waiting = waiting
        self._backoff: _Backoff | None = None
        self._failures = 0

    def call(self, read: Callable[[], _T]) -> _T:
        """What ``read()`` returns, once it works."""
        while True:
            try:
                result = read()
            except StoreError as exc:
                self._failed(exc)
                continue
            if self._failures:
                say(
                    "mailstrom: warning: reading the events again after "
                    f"{self._failures} failed tries"
                )
                self._failures = 0
                self._backoff = None
            return result

    def _failed(self, exc: StoreError) -> None:
        """Raise ``exc``, or wait before the next try. (The worker's modules are loaded
        only then: a listing that works never pays for them.)"""
        from mailstrom.runtime.store_opening import worth_waiting
        from mailstrom.runtime.worker_store import _Backoff

        if not (self._waiting and worth_waiting(exc)):
            raise exc
        self._failures += 1
        if self._failures == 1:
            say(f"mailstrom: warning: cannot read the events, trying again: {reason_for(exc)}")
        if self._backoff is None:
            self._backoff = _Backoff()
        time.sleep(max(self.interval, self._backoff.take()))


def _follow(store: Store, after: int, patience: _Patience, *, as_json: bool) -> None:
    """Print the events after ``after`` as they appear until interrupted (Ctrl-C ends the
    command), looking every ``patience.interval`` seconds. Every store makes its events
    visible in id order (PostgreSQL draws their ids under a lock, see its
    ``append_events``), so the highest id printed is the place to go on from.

    A read that fails with a passing trouble is tried again (:class:`_Patience`): a
    follower runs for as long as the workers do; ended by the first such failure, it
    left a script reading it with nothing."""
    while True:
        # Polling: events come from other processes, and a SQLite reader has nothing to
        # wait on. Each look is one indexed range read of the ids above the last.
        time.sleep(patience.interval)
        read = functools.partial(store.read_events, after=after, limit=10_000)
        for event in patience.call(read):
            _print(event, as_json=as_json)
            after = event.id


def _print(event: DeliveryEvent, *, as_json: bool) -> None:
    if as_json:
        # Escaped as the other --json views are: a stored reply or metadata value could
        # hold controls a terminal obeys (U+009B) or bidi overrides that reorder the line.
        line = json_for(escaped_json(json.dumps(event_json(event), ensure_ascii=False)), sys.stdout)
    else:
        parts = [
            event.at.isoformat(timespec="seconds"),
            f"#{event.id}",
            event.state.value,
            event.address,
            f"attempt={event.attempt}",
            f"message_id={event.message_id}",
        ]
        if event.mx_host:
            parts.append(f"host={event.mx_host}")
        if event.reason_class:
            parts.append(f"class={event.reason_class}")
        if event.tags:
            parts.append("tags=" + ",".join(event.tags))
        reason = " ".join(event.reason.split())
        line = visible(" ".join(parts) + (f": {reason}" if reason else ""))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
