"""Commands that change the queue: retry, hold, release, cancel, purge.

Each takes message ids (any unique prefix; ``-`` reads ids from standard input, one a
line, as ``postsuper -`` does) or the filters of ``queue`` (``--state``, ``--domain``,
``--older-than``, ``--tag``, or ``--all``), prints how many it changed, and with ``--dry-run``
changes nothing and lists what it would change. Every id is resolved before anything
changes, so a typo changes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_OK, UsageError
from mailstrom.cli.output import print_json
from mailstrom.cli.parsing import Subparsers, duration_arg, once
from mailstrom.cli.selection import (
    MAX_BULK,
    add_filter_options,
    add_id_arguments,
    check_selection,
    given_ids,
    has_filters,
    note_left_out,
    plural,
    print_ids,
    queue_filter,
    resolve_all,
    select_messages,
)
from mailstrom.errors import UnknownMessage
from mailstrom.status import MessageStatus, RecipientState, RecipientStatus
from mailstrom.stores.base import QueueFilter, Store
from mailstrom.stores.operator import PENDING_STATES, count_recipients, purge_candidates

BULK_EPILOG = """\
examples:
  mailstrom {name} 0190f3a2                     # a unique prefix is enough
  mailstrom {name} 0190f3a2c4e1 0190f3a2d7f0
  mailstrom queue --json --limit 100000 | jq -r '.[].id' | mailstrom {name} -
  mailstrom {name} --domain example.org --older-than 2h --dry-run
  mailstrom {name} --all
"""


@dataclass(frozen=True, slots=True)
class _Action:
    """One bulk command: what it does to the selected messages."""

    name: str
    help: str
    description: str
    unit: str
    """What the count counts: "message" or "recipient"."""
    done: str
    """The past tense in the report ("3 messages held")."""
    held: bool | None
    """Which messages the filters select by default: held ones (release), unheld ones
    (hold), or either."""
    apply: Callable[[Store, list[str], datetime], int]
    changes: Callable[[MessageStatus], bool]
    """Whether :attr:`apply` would change the message (a dry run of ids lists only those)."""
    changing: Callable[[QueueFilter], QueueFilter] | None = None
    """A filter narrowed to the messages :attr:`apply` would change, as :attr:`changes`
    judges them (a dry run of filters lists only those); None: every message the
    filters select (held or not, as :attr:`held` says)."""
    unchanged: str = "already so"
    """What the report says of the selected messages it did not change."""


def _pending(m: MessageStatus) -> bool:
    return any(r.state in PENDING_STATES for r in m.recipients)


def _pending_among(where: QueueFilter) -> QueueFilter:
    """``where`` narrowed to pending messages, as :func:`_pending` judges them."""
    states = PENDING_STATES if where.states is None else where.states & PENDING_STATES
    return replace(where, states=states)


_ACTIONS = (
    _Action(
        "hold",
        "keep messages from being delivered until released",
        "Keep messages from being delivered until released. Deliveries already in flight "
        "finish. A finished message (nothing pending) is left as it is. Filters select "
        "pending messages not held yet.",
        "message",
        "held",
        False,
        lambda store, ids, now: store.hold_many(ids, True),
        lambda m: not m.held and _pending(m),
        _pending_among,
        "already held or finished",
    ),
    _Action(
        "release",
        "let held messages be delivered again",
        "Let held messages be delivered again. Filters select held pending messages.",
        "message",
        "released",
        True,
        lambda store, ids, now: store.hold_many(ids, False),
        lambda m: m.held,
        # Not held: never, released already, or finished while held (its delivery in
        # flight, or cancelled), which waited for no release.
        unchanged="not held or finished",
    ),
    _Action(
        "retry",
        "make pending recipients due now",
        "Make the queued and deferred recipients of messages due at once. A running "
        "worker picks them up at once (SQLite and PostgreSQL wake it), or within "
        "poll_interval; those of a held message once it is released. Filters select "
        "pending messages.",
        "recipient",
        "due now",
        None,
        lambda store, ids, now: store.retry_many(ids, now=now),
        _pending,
        _pending_among,
    ),
    _Action(
        "cancel",
        "fail messages' pending recipients",
        'Fail every queued or deferred recipient of messages with the reason "cancelled". '
        "Delivered recipients stay delivered. Filters select pending messages.",
        "recipient",
        "cancelled",
        None,
        lambda store, ids, now: store.cancel_many(ids, now=now),
        _pending,
        _pending_among,
    ),
)


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    for action in _ACTIONS:
        p = sub.add_parser(
            action.name,
            parents=parents,
            help=action.help,
            description=action.description
            + f" At most {MAX_BULK:,} messages per run, the newest (a note on stderr says "
            f"when the filters match more). Prints how many {action.unit}s changed.",
            epilog=BULK_EPILOG.format(name=action.name),
        )
        add_id_arguments(p, what="messages")
        add_filter_options(p, default_state="pending")
        _add_common(p)
        if action.name == "retry":
            p.add_argument(
                "--all-deferred",
                action="store_true",
                help="every deferred recipient in the queue, however many (one statement)",
            )
        p.set_defaults(handler=bulk_command, action=action)

    pg = sub.add_parser(
        "purge",
        parents=parents,
        help="delete finished messages",
        description="Delete messages all of whose recipients are final (delivered or "
        "failed, cancelled included). Pending messages are never deleted. Choose by age "
        "(--delivered-before, --failed-before, --finished-before), by ids, or by the "
        "filters of queue (which select finished messages unless --state says otherwise); "
        "an age option with ids or filters deletes only those finished long enough ago.",
        epilog="examples:\n  mailstrom purge --delivered-before 7d\n"
        "  mailstrom purge --failed-before 30d --dry-run\n"
        "  mailstrom purge --finished-before 30d\n"
        "  mailstrom purge --domain example.org --finished-before 1d\n"
        "  mailstrom purge 0190f3a2c4e1\n",
    )
    add_id_arguments(pg, what="messages to delete (when finished)")
    add_filter_options(pg, default_state="finished: delivered or failed")
    age = pg.add_mutually_exclusive_group()
    for flag, state, text in (
        ("--delivered-before", RecipientState.DELIVERED, "every recipient delivered"),
        ("--failed-before", RecipientState.FAILED, "every recipient final, one at least failed"),
        ("--finished-before", None, "every recipient final, delivered or failed"),
    ):
        age.add_argument(
            flag,
            dest="before",
            metavar="AGE",
            type=duration_arg,
            action=_StoreAge,
            const=state,
            help=f"messages with {text}, the last more than AGE ago (30s, 15m, 2h, 3d)",
        )
    _add_common(pg)
    pg.set_defaults(handler=purge_command, before=None, purge_state=None)


class _StoreAge(argparse.Action):
    """Stores the age and remembers which of the three purge flags gave it."""

    def __init__(self, *args: object, const: RecipientState | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.purge_state = const

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        once(self, parser)
        setattr(namespace, self.dest, values)
        namespace.purge_state = self.purge_state


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every message the filters admit")
    p.add_argument("--dry-run", action="store_true", help="change nothing; list what would change")
    p.add_argument("--json", action="store_true", help="print JSON")


def _report(args: argparse.Namespace, data: dict[str, object], text: str) -> int:
    if args.json:
        print_json(data)
    else:
        print(text)
    return EX_OK


def bulk_command(args: argparse.Namespace) -> int:
    action: _Action = args.action
    now = utc_now()
    all_deferred = getattr(args, "all_deferred", False)
    # Misuse is a usage error (64) whatever the ids, standard input or store say.
    if all_deferred:
        if args.ids or has_filters(args) or args.all or args.dry_run:
            raise UsageError("--all-deferred takes no ids, filters, --all or --dry-run")
    else:
        check_selection(args)
    settings = settings_from(args)
    with store_from(settings, read_only=args.dry_run) as store:
        if settings.config.outbox and not args.dry_run:
            store.enable_events()  # cancelled recipients end for hooks and `events` too
        if all_deferred:
            return _retry_all_deferred(args, store, now)
        ids, where = select_messages(
            store, args, now=now, default_state="pending", held=action.held
        )
        if args.dry_run:
            # Ids are taken as given, held or not, finished or not, and filters select
            # finished mail too (--state any): list only those the command would change,
            # as it counts them (and as purge's dry run does).
            return _dry_run(args, action.name, _changing(store, action, ids, where, now))
        if action.name == "retry":
            return _retry(args, store, ids, now)
        changed = action.apply(store, ids, now) if ids else 0
    data: dict[str, object] = {"action": action.name, "selected": len(ids), "changed": changed}
    if action.unit == "recipient":
        text = f"{plural(changed, 'recipient')} {action.done} ({plural(len(ids), 'message')})"
    else:
        text = f"{plural(changed, 'message')} {action.done}"
        if changed != len(ids):
            text += f" ({len(ids) - changed:,} {action.unchanged})"
    return _report(args, data, text)


def _changing(
    store: Store, action: _Action, ids: list[str], where: QueueFilter | None, now: datetime
) -> list[str]:
    """The ``ids`` ``action`` would change: of ids given, those whose status it changes;
    of those ``where`` selected, those the filter narrowed to what it changes finds too,
    by ids alone as they were selected (the newest MAX_BULK selected that change are
    among the newest MAX_BULK the narrowed filter finds)."""
    if where is None:
        return [mid for mid in ids if action.changes(store.status(mid))]
    narrowed = where if action.changing is None else action.changing(where)
    if narrowed == where:
        return ids
    changing = set(store.select_ids(now=now, where=narrowed))
    return [mid for mid in ids if mid in changing]


def _retry(args: argparse.Namespace, store: Store, ids: list[str], now: datetime) -> int:
    """Retry ``ids``, and say which recipients are due now: those of a held message are
    made due too, but no worker leases them until it is released; nor those at a
    destination suspended now, until it is resumed; and those whose destination's pause
    (a throttle) holds them back are given back by the worker until it ends."""
    held = _held_among(store, ids, now)
    free = [mid for mid in ids if mid not in held]
    paused = _suspended_among(store, free, now)
    throttled = _throttled_among(store, free, now) if free else 0
    # Counted a moment before the retry: one finished meanwhile may still be among them.
    waiting = count_recipients(held.values(), PENDING_STATES)
    # One call for held and free alike (retried in two, a store failing between them
    # left the free ones due and the held ones not, under an error that said nothing of
    # it); the held ones' share is the count above.
    changed = store.retry_many(ids, now=now) if ids else 0
    due = max(changed - waiting - paused - throttled, 0)
    waiting = min(waiting, changed)
    data = {
        "action": "retry",
        "selected": len(ids),
        "changed": changed,
        "held": waiting,
        "suspended": paused,
        "throttled": throttled,
    }
    parts = []
    if free or not held:
        parts.append(f"{plural(due, 'recipient')} due now ({plural(len(free), 'message')})")
    parts += _waiting_parts(paused, waiting, len(held), throttled=throttled)
    return _report(args, data, "; ".join(parts))


def _retry_all_deferred(args: argparse.Namespace, store: Store, now: datetime) -> int:
    """Make every deferred recipient due in one call, and say, as :func:`_retry`
    does, which of them wait all the same: those of held messages (until released) and
    those at a destination suspended now (until resumed). Counted a moment before."""
    deferred = frozenset({RecipientState.DEFERRED})
    held = [m for m in _held_messages(store, now) if count_recipients([m], deferred)]
    held_ids = {m.id for m in held}
    suspended = _suspended_domains(store, now)
    free_at_suspended = [m for m in _pending_at(store, suspended, now) if m.id not in held_ids]
    waiting = count_recipients(held, deferred)
    paused = count_recipients(free_at_suspended, deferred, at=suspended)
    throttled = _throttled_in(store, None, now, deferred, held_ids)
    changed = store.retry_deferred(now=now)
    due = max(changed - waiting - paused - throttled, 0)
    data: dict[str, object] = {
        "rescheduled": changed,
        "held": waiting,
        "suspended": paused,
        "throttled": throttled,
    }
    parts = [f"{plural(due, 'deferred recipient')} due now"]
    parts += _waiting_parts(paused, waiting, len(held), throttled=throttled)
    return _report(args, data, "; ".join(parts))


def _waiting_parts(
    paused: int, waiting: int, held_messages: int, *, throttled: int = 0
) -> list[str]:
    """What a retry says of the recipients it made due that no worker sends yet:
    ``paused`` at a suspended destination, ``throttled`` at one whose pause holds them
    back, ``waiting`` in ``held_messages`` held ones."""
    parts = []
    if paused:
        parts.append(
            f"{plural(paused, 'recipient')} at a suspended destination, due once it is resumed"
        )
    if throttled:
        parts.append(
            f"{plural(throttled, 'recipient')} at a throttled destination, due once its pause ends"
        )
    if held_messages:
        parts.append(
            f"{plural(waiting, 'recipient')} due once released"
            f" ({plural(held_messages, 'held message')})"
        )
    return parts


def _held_messages(store: Store, now: datetime) -> list[MessageStatus]:
    """The held pending messages: one query (a queue holds few; past :data:`MAX_BULK` of
    them the rest count as not held)."""
    return store.query(now=now, where=QueueFilter(states=PENDING_STATES, held=True, limit=MAX_BULK))


def _held_among(store: Store, ids: list[str], now: datetime) -> dict[str, MessageStatus]:
    """The held pending messages among ``ids``, by id."""
    if not ids:
        return {}
    wanted = set(ids)
    return {m.id: m for m in _held_messages(store, now) if m.id in wanted}


_READ_EACH = 100
"""Selections up to this many messages are read one by one to find their recipients at
suspended destinations; larger ones by a query per suspended destination."""


def _suspended_among(store: Store, ids: list[str], now: datetime) -> int:
    """How many pending recipients of ``ids`` are at a destination suspended at ``now``:
    made due, they wait for its end all the same. Nothing is read when no destination is
    suspended, the usual case; then a few messages are read by id (a suspended
    destination may have a large queue, read whole only for a large selection)."""
    suspended = _suspended_domains(store, now) if ids else frozenset()
    if not suspended:
        return 0
    wanted = set(ids)
    if len(wanted) <= _READ_EACH:
        found = [m for m in (_status_or_none(store, mid) for mid in wanted) if m is not None]
    else:
        found = [m for m in _pending_at(store, suspended, now) if m.id in wanted]
    return count_recipients(found, PENDING_STATES, at=suspended)


def _throttled_among(store: Store, ids: list[str], now: datetime) -> int:
    """How many pending recipients of ``ids`` wait for their destination's pause (their
    status shows it; those at a suspended destination are counted there): made due, the
    worker leases them and gives them back, due at its end. Nothing is read when no
    destination is paused, the usual case."""
    return _throttled_in(store, ids, now, PENDING_STATES, frozenset())


def _throttled_in(
    store: Store,
    ids: list[str] | None,
    now: datetime,
    states: frozenset[RecipientState],
    skip: Collection[str],
) -> int:
    """How many recipients in ``states`` of ``ids`` (None: of every message but those in
    ``skip``) wait for a pause of their destination, not at a suspended one."""
    if not store.throttles(now=now):
        return 0
    if ids is not None and len(ids) <= _READ_EACH:
        found = [m for m in (_status_or_none(store, mid) for mid in set(ids)) if m is not None]
    else:
        wanted = None if ids is None else set(ids)
        found = [
            m
            for m in store.query(now=now, where=QueueFilter(states=PENDING_STATES, limit=MAX_BULK))
            if (m.id in wanted if wanted is not None else m.id not in skip)
        ]
    suspended = _suspended_domains(store, now)
    return len(
        {
            (m.id, r.address)
            for m in found
            for r in m.recipients
            if r.state in states and r.throttle is not None and r.domain.lower() not in suspended
        }
    )


def _suspended_domains(store: Store, now: datetime) -> frozenset[str]:
    """The destinations suspended at ``now`` (usually none)."""
    return frozenset(s.domain for s in store.suspensions(now=now))


def _pending_at(store: Store, domains: frozenset[str], now: datetime) -> list[MessageStatus]:
    """The pending messages with a recipient at one of ``domains``: a query per domain
    (at most :data:`MAX_BULK` messages each); a message may come more than once."""
    return [
        m
        for domain in sorted(domains)
        for m in store.query(
            now=now, where=QueueFilter(states=PENDING_STATES, domain=domain, limit=MAX_BULK)
        )
    ]


def _status_or_none(store: Store, message_id: str) -> MessageStatus | None:
    """The status of ``message_id``; None once it is gone (purged meanwhile)."""
    try:
        return store.status(message_id)
    except UnknownMessage:
        return None


def _dry_run(args: argparse.Namespace, name: str, ids: list[str], *, more: bool = False) -> int:
    """List ``ids``; ``more``: the command would change more than those (a purge by age
    alone deletes every message old enough, the dry run lists at most MAX_BULK)."""
    if args.json:
        data = {"action": name, "dry_run": True, "selected": len(ids), "ids": ids, "more": more}
        print_json(data)
        return EX_OK
    print_ids(ids)
    if more:
        n = len(ids)
        print(
            f"would {name} at least {plural(n, 'message')}, the {n:,} listed and more"
            " (dry run: nothing changed)"
        )
    else:
        print(f"would {name} {plural(len(ids), 'message')} (dry run: nothing changed)")
    return EX_OK


def purge_command(args: argparse.Namespace) -> int:
    now = utc_now()
    before: timedelta | None = args.before
    cutoff = now - before if before is not None else None
    state: RecipientState | None = args.purge_state
    # As the other commands, before the ids are resolved: an unknown one with --all
    # exited 66, a known one 64.
    check_selection(args, required=False)
    chosen = args.ids or has_filters(args) or args.all
    if not chosen and cutoff is None:
        raise UsageError(
            "say what to purge: --delivered-before, --failed-before, "
            "--finished-before, ids, filters or --all"
        )
    with store_from(settings_from(args), read_only=args.dry_run) as store:
        if not chosen and cutoff is not None and not args.dry_run:
            n = (
                store.purge(finished_before=cutoff)
                if state is None
                else store.purge_state(finished_before=cutoff, state=state)
            )
            return _purged(args, n)
        more = False
        if args.ids:
            ids = resolve_all(store, given_ids(args))
            if args.dry_run:
                ids = [mid for mid in ids if _purgeable(store.status(mid), state, cutoff)]
        else:
            default = "finished" if state is None else state.value
            where = queue_filter(args, default_state=default, limit=MAX_BULK)
            # Only what purge can delete: the newest MAX_BULK finished messages, too
            # recent to purge, filled the selection, and older ones were never purged.
            where = purge_candidates(where, before, state)
            if args.dry_run:
                # When each recipient finished is in the statuses alone.
                found = store.query(now=now, where=where)
                ids = [m.id for m in found if _purgeable(m, state, cutoff)]
                selected = len(found)
            else:
                # Their ids alone: purge_many checks each as _purgeable does (final, in
                # state, finished before the cutoff).
                ids = store.select_ids(now=now, where=where)
                selected = len(ids)
            # By age alone, purge deletes every message old enough, not only those listed;
            # by filters, only those selected.
            more = selected >= MAX_BULK and not has_filters(args) and not args.all
            if not more:
                note_left_out(store, where, selected, now=now)
        if args.dry_run:
            return _dry_run(args, "purge", ids, more=more)
        # The flag says what it deletes, of ids as of filters (--state any included):
        # --delivered-before deleted failed (cancelled) messages too.
        n = store.purge_many(ids, finished_before=cutoff, state=state) if ids else 0
    return _purged(args, n)


def _purgeable(m: MessageStatus, state: RecipientState | None, cutoff: datetime | None) -> bool:
    """Whether purge_many would delete ``m``: finished, in ``state`` (when given), and
    (the dry run's estimate) finished before ``cutoff``."""
    if not m.state.is_final or (state is not None and m.state is not state):
        return False
    return cutoff is None or _finished_before(m.recipients, cutoff)


def _finished_before(recipients: tuple[RecipientStatus, ...], cutoff: datetime) -> bool:
    """Whether every recipient became final (its last attempt, or its cancellation) before
    ``cutoff``, as purge_many checks: judged by the last attempt alone, mail queued long
    ago and cancelled just now was listed, and purge then left it alone."""
    for r in recipients:
        finished = r.finished_at or r.last_attempt_at
        if finished is None or finished >= cutoff:
            return False
    return True


def _purged(args: argparse.Namespace, n: int) -> int:
    return _report(args, {"purged": n}, f"{plural(n, 'message')} purged")
