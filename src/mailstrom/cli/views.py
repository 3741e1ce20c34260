"""``mailstrom status ID`` and ``mailstrom queue``: read-only views of the queue.

They open the store read-only, so they work on a read-only mount (a snapshot, a rescue
system) and never create, migrate or change it. ``status`` says why each failed recipient
failed (its reason class) and what to do, with the provider's help page when the reply is
a well-known one; the advice is looked up when shown, never stored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_OK, UsageError
from mailstrom.cli.output import (
    age,
    cell,
    echo,
    is_tty,
    print_fields,
    print_json,
    print_json_list,
    print_table,
    to_jsonable,
    visible_lines,
)
from mailstrom.cli.parsing import Subparsers, count_arg
from mailstrom.cli.selection import (
    COUNT_CAP,
    add_filter_options,
    has_filters,
    of_total,
    queue_filter,
)
from mailstrom.policy.reasons import advice_for
from mailstrom.status import (
    Attempt,
    DestinationThrottle,
    DKIMStatus,
    MessageStatus,
    QueueStats,
    RecipientState,
    RecipientStatus,
    state_reason,
)
from mailstrom.stores.base import Store
from mailstrom.stores.dead_holders import live_workers
from mailstrom.stores.operator import AGE_EDGES, ShapeRow, Suspension, next_try

STATUS_EPILOG = """\
examples:
  mailstrom status 0190f3a2c4e1b7d08a4f2c6e9b1d3f57
  mailstrom status --history 0190f3a2c4e1b7d08a4f2c6e9b1d3f57
  mailstrom status --json 0190f3a2c4e1b7d08a4f2c6e9b1d3f57 | jq '.recipients[].state'
  mailstrom status --json 0190f3a2c4e1b7d08a4f2c6e9b1d3f57 | jq '.recipients[].advice.help'
  mailstrom status --json 0190f3a2c4e1b7d08a4f2c6e9b1d3f57 | jq '.dkim.signed, .dkim.reason'
"""

QUEUE_EPILOG = """\
examples:
  mailstrom queue                          # the 100 newest pending messages
  mailstrom queue --state any              # delivered and failed ones too
  mailstrom queue --state deferred --older-than 2h
  mailstrom queue --domain example.org --limit 20
  mailstrom queue --held
  mailstrom queue --tag newsletter --state deferred
  mailstrom queue --counts                 # recipients by state, pending by domain
  mailstrom queue --shape                  # pending by destination and age (qshape)
  mailstrom queue --suspended              # destinations on hold (see suspend)
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        parents=parents,
        help="show one message and each recipient's state",
        description="Show where a message and each of its recipients stand: state, last "
        "reply and why it failed (its class, what to do, the provider's help page), MX host "
        "and address used, attempts and the next retry; and whether the message was "
        "DKIM-signed (by which keys, or why not).",
        epilog=STATUS_EPILOG,
    )
    p.add_argument("id", help="message id (as printed by send)")
    p.add_argument("--history", action="store_true", help="also list every attempt")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=status_command)

    q = sub.add_parser(
        "queue",
        parents=parents,
        help="list pending messages, count them, or show the queue's shape",
        description="List messages, newest first: pending ones (queued or deferred) "
        "unless --state says otherwise, with each one's last reason and next attempt, and "
        "a footer when there are more than --limit (with --json, a note on stderr). "
        "Filters combine.",
        epilog=QUEUE_EPILOG,
    )
    add_filter_options(q, default_state="pending")
    held = q.add_mutually_exclusive_group()
    held.add_argument(
        "--held", dest="held", action="store_const", const=True, help="only held messages"
    )
    held.add_argument(
        "--not-held", dest="held", action="store_const", const=False, help="only unheld ones"
    )
    q.add_argument(
        "--limit", type=count_arg, default=None, help=f"at most this many (default {LIMIT})"
    )
    view = q.add_mutually_exclusive_group()
    view.add_argument(
        "--counts", action="store_true", help="recipients by state and pending ones by domain"
    )
    view.add_argument(
        "--shape",
        action="store_true",
        help="pending recipients per destination domain and age (qshape), largest first",
    )
    view.add_argument(
        "--suspended", action="store_true", help="destinations suspended with `suspend`"
    )
    view.add_argument(
        "--throttled",
        action="store_true",
        help="destinations a throttling reply paused, until when and why",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=queue_command)

    show = sub.add_parser(
        "show",
        parents=parents,
        help="print a queued message as stored, recipients and states on top",
        description="Print a message as it is stored and will be sent (like postcat): "
        "the envelope, each recipient's state and last reason, then the message. "
        "--headers stops after the header section; --raw prints only the stored bytes.",
        epilog="examples:\n  mailstrom show 0190f3a2\n  mailstrom show --headers 0190f3a2\n"
        "  mailstrom show --raw 0190f3a2 > message.eml\n"
        "  mailstrom show --json 0190f3a2 | jq -r .message\n",
    )
    show.add_argument("id", help="message id, or any unique prefix of one")
    part = show.add_mutually_exclusive_group()
    part.add_argument("--raw", action="store_true", help="only the stored bytes, unchanged")
    part.add_argument("--headers", action="store_true", help="the header section only")
    show.add_argument(
        "--json",
        action="store_true",
        help="the status (as status --json) with the message as text in 'message'",
    )
    show.set_defaults(handler=show_command)


# --- status ------------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    now = utc_now()
    with store_from(settings_from(args), read_only=True) as store:
        st = store.status(store.resolve_id(args.id))
        nobody = not args.json and _waiting([st]) and _nobody_delivers(store)
        suspended = {} if args.json else suspended_domains(store, now)
    if args.json:
        print_json(status_json(st))
        return EX_OK
    print_message(st, now, history=args.history, suspended=suspended)
    if nobody:
        print(f"mailstrom: note: {NOBODY}", file=sys.stderr)
    return EX_OK


def status_json(st: MessageStatus) -> dict[str, Any]:
    """The status as JSON-ready data: every field, plus ``advice`` (meaning, action, help,
    provider; null when nothing failed) beside each recipient and each attempt, and
    ``signed`` in ``dkim`` (null when no DKIM outcome was recorded)."""
    data: dict[str, Any] = to_jsonable(st)
    if st.dkim is not None:
        data["dkim"] = {"signed": st.dkim.signed, **data["dkim"]}
    for r, r_data in zip(st.recipients, data["recipients"], strict=True):
        r_data["advice"] = _advice_json(r)
        for a, a_data in zip(r.history, r_data["history"], strict=True):
            a_data["advice"] = _advice_json(a)
    return data


def _advice_json(subject: Attempt | RecipientStatus) -> dict[str, Any] | None:
    found = advice_for(subject)
    return None if found is None else to_jsonable(found)


def suspended_domains(store: Store, now: datetime) -> dict[str, Suspension]:
    """The destinations suspended at ``now``, by domain (a short list): no worker
    attempts their recipients before a suspension ends."""
    return {s.domain: s for s in store.suspensions(now=now)}


def print_message(
    st: MessageStatus,
    now: datetime,
    *,
    history: bool = False,
    suspended: Mapping[str, Suspension] | None = None,
) -> None:
    print_fields(
        [
            ("Message", st.id),
            ("State", st.state),
            ("From", st.envelope_from or "<>"),
            ("Subject", st.subject),
            ("Message-ID", st.header_message_id),
            ("Queued", f"{st.created_at:%Y-%m-%d %H:%M:%S} UTC ({age(st.created_at, now)} ago)"),
            ("Size", f"{st.size} bytes"),
            ("Held", st.held),
            ("DKIM", dkim_text(st.dkim)),
            *queue_fields(st),
        ]
    )
    print()
    print_table(
        ["RECIPIENT", "STATE", "ATTEMPTS", "HOST", "IP", "TLS", "NEXT RETRY", "CLASS", "REPLY"],
        [
            [
                r.address,
                r.state.value
                + (" (uncertain)" if r.uncertain else "")
                + (" (in delivery)" if r.leased else ""),
                r.attempts,
                r.mx_host,
                r.ip,
                r.tls if r.attempts else None,
                next_try(st, r, suspended or {}),
                r.reason_class,
                r.reason,
            ]
            for r in st.recipients
        ],
    )
    print_advice(st.recipients)
    print_throttles(st.recipients)
    if not history:
        return
    for r in st.recipients:
        print()
        if not r.history:
            echo(f"Attempts for {r.address}: none yet")
            continue
        print_table(
            ["AT", "OUTCOME", "HOST", "IP", "PORT", "TLS", "POLICY", "SECONDS", "CLASS", "REPLY"],
            [
                [
                    a.at,
                    a.outcome.value + (" (uncertain)" if a.uncertain else ""),
                    a.mx_host,
                    a.ip,
                    a.port,
                    " ".join(filter(None, [a.tls_version, a.tls_cipher])) or None,
                    a.tls_policy,
                    f"{a.duration:.3f}",
                    a.reason_class,
                    a.reason,
                ]
                for a in r.history
            ],
            title=f"Attempts for {r.address}",
        )


def dkim_text(dkim: DKIMStatus | None) -> str:
    """The DKIM line of ``status``: each signature, or unsigned with the reason."""
    if dkim is None:
        return "not recorded (DKIM not configured when queued)"
    return str(dkim)


def queue_fields(st: MessageStatus) -> list[tuple[str, Any]]:
    """The message's queue attributes as status lines; only those it has (a message sent
    without any shows no more lines than before)."""
    fields: list[tuple[str, Any]] = []
    if st.priority:
        fields.append(("Priority", st.priority))
    if st.tags:
        fields.append(("Tags", ", ".join(st.tags)))
    for key, value in st.metadata.items():
        fields.append((f"Meta {key}", value))
    if st.send_at is not None:
        fields.append(("Send at", st.send_at))
    if st.expires_at is not None:
        fields.append(("Expires", st.expires_at))
    if st.idempotency_key is not None:
        fields.append(("Idempotency key", st.idempotency_key))
    return fields


def print_advice(recipients: tuple[RecipientStatus, ...]) -> None:
    """What to do about each recipient whose latest attempt failed, one block each::

    bob@example.org: authentication (Google): the receiver could not verify ...
      What to do: ...
      Help: https://...
    """
    first = True
    for r in recipients:
        found = advice_for(r)
        if found is None:
            continue
        if first:
            print()
            first = False
        source = f" ({found.provider})" if found.provider else ""
        echo(f"{r.address}: {found.reason_class}{source}: {found.meaning}")
        echo(f"  What to do: {found.action}")
        if found.help:
            echo(f"  Help: {found.help}")


def print_throttles(recipients: tuple[RecipientStatus, ...]) -> None:
    """One line per recipient held back by its destination's pause (traffic shaping)::

    bob@gmail.com: destination *.google.com throttled until 2026-11-30T17:02:00+00:00: 421 ...
    """
    notes = [(r.address, r.throttle_note) for r in recipients if r.throttle_note]
    if notes:
        print()
    for address, note in notes:
        echo(f"{address}: {cell(note)}")


# --- queue -------------------------------------------------------------------------------


LIMIT = 100
"""Messages ``queue`` lists without ``--limit``."""


def queue_command(args: argparse.Namespace) -> int:
    now = utc_now()
    summary = next(
        (f"--{v}" for v in ("counts", "shape", "suspended", "throttled") if getattr(args, v)),
        None,
    )
    if summary and (has_filters(args) or args.held is not None or args.limit is not None):
        # They cover the whole queue: a filter would be dropped without a word.
        raise UsageError(f"{summary} takes no filters or --limit")
    limit: int = args.limit or LIMIT
    with store_from(settings_from(args), read_only=True) as store:
        if args.counts:
            stats = store.stats()
            if args.json:
                print_json(stats)
            else:
                print_counts(stats)
            return EX_OK
        if args.shape:
            print_shape(store.shape(now=now, edges=AGE_EDGES), json=args.json)
            return EX_OK
        if args.suspended:
            print_suspensions(store.suspensions(now=now), now, json=args.json)
            return EX_OK
        if args.throttled:
            print_throttled(store.throttles(now=now), json=args.json)
            return EX_OK
        where = queue_filter(args, default_state="pending", limit=limit, held=args.held)
        messages = store.query(now=now, where=where)
        total = len(messages)
        if total >= limit:
            total = store.count(now=now, where=where, cap=COUNT_CAP)
        # For people reading the table; scripts ask `mailstrom workers`.
        nobody = not args.json and _waiting(messages) and _nobody_delivers(store)
        suspended = {} if args.json else suspended_domains(store, now)
    if nobody:
        print(f"mailstrom: note: {NOBODY}", file=sys.stderr)
    if args.json:
        print_json_list(messages)
        if total > len(messages):
            # stdout stays the list scripts parse; a pipeline into a bulk command (`| jq
            # -r '.[].id' | mailstrom retry -`) would otherwise act on the newest page only
            # and nobody would learn that more matched.
            note = f"showing {of_total(len(messages), total)} messages (use --limit for more)"
            print(f"mailstrom: note: {note}", file=sys.stderr)
        return EX_OK
    print_queue(messages, now, total=total, suspended=suspended)
    return EX_OK


NOBODY = (
    "no worker is running on this store: queued mail waits until one starts "
    "(`mailstrom worker`, or an application's Mailstrom)"
)
"""What ``workers`` says, and ``queue`` notes, when no worker runs."""


def _waiting(messages: list[MessageStatus]) -> bool:
    """Whether any of ``messages`` waits for a worker (pending, not held)."""
    pending = (RecipientState.QUEUED, RecipientState.DEFERRED)
    return any(m.state in pending and not m.held for m in messages)


def _nobody_delivers(store: Store) -> bool:
    """Whether ``store`` can tell that no worker runs on it, and does (a note: when it
    cannot tell, nothing is said)."""
    return live_workers(store) == []


def print_queue(
    messages: list[MessageStatus],
    now: datetime,
    *,
    total: int,
    suspended: Mapping[str, Suspension] | None = None,
) -> None:
    """The queue table, and a footer when ``total`` says there are more; the next attempt
    heeds the ``suspended`` destinations (:func:`suspended_domains`)."""
    print_table(
        ["ID", "STATE", "AGE", "SIZE", "FROM", "RCPTS", "NEXT ATTEMPT", "LAST REASON"],
        [
            [
                m.id,
                m.state.value + (", held" if m.held else ""),
                age(m.created_at, now),
                m.size,
                m.envelope_from or "<>",
                _recipient_summary(m),
                _next_attempt(m, now, suspended or {}),
                state_reason(m.recipients),
            ]
            for m in messages
        ],
    )
    if total > len(messages):
        print(f"\nshowing {of_total(len(messages), total)} (use --limit)")


def _next_attempt(
    m: MessageStatus, now: datetime, suspended: Mapping[str, Suspension]
) -> str | None:
    due = [when for r in m.recipients if (when := next_try(m, r, suspended)) is not None]
    if not due:
        return None
    first = min(due)
    return "now" if first <= now else f"in {age(now, first)}"


def print_shape(rows: list[ShapeRow], *, json: bool) -> None:
    """qshape's table: a TOTAL row, then one row per domain, largest first."""
    labels = age_labels(AGE_EDGES)
    if json:
        print_json(
            [
                {"domain": r.domain, "total": r.total, **dict(zip(labels, r.counts, strict=True))}
                for r in rows
            ]
        )
        return
    totals = [sum(r.counts[i] for r in rows) for i in range(len(labels))]
    print_table(
        ["DOMAIN", "TOTAL", *labels],
        [["TOTAL", sum(totals), *totals], *[[r.domain, r.total, *r.counts] for r in rows]],
    )


def age_labels(edges: tuple[timedelta, ...]) -> list[str]:
    """Bucket names: 0-5m, 5-10m, ..., 160m+."""
    minutes = [int(e.total_seconds() // 60) for e in edges]
    lows = [0, *minutes]
    return [f"{lo}-{hi}m" for lo, hi in zip(lows, minutes, strict=False)] + [f"{minutes[-1]}m+"]


def print_suspensions(found: list[Suspension], now: datetime, *, json: bool) -> None:
    if json:
        print_json(found)
        return
    print_table(
        ["DOMAIN", "SUSPENDED", "UNTIL"],
        # No end: "until resumed", as `suspend` says it; "resumed", the word of `resume`,
        # read as if the suspension had been lifted.
        [[s.domain, s.suspended_at, s.until or "until resumed"] for s in found],
    )


def print_throttled(found: list[DestinationThrottle], *, json: bool) -> None:
    """The running pauses: the destination (a shaping rule's pattern, or a recipient
    domain), its end, how many throttles in a row, and the reply that started it."""
    if json:
        print_json(found)
        return
    print_table(
        ["DESTINATION", "UNTIL", "STRIKES", "REPLY"],
        [[t.destination, t.until, t.strikes, t.reply] for t in found],
    )


def _recipient_summary(m: MessageStatus) -> str:
    if len(m.recipients) == 1:
        return m.recipients[0].address
    done = sum(r.state.is_final for r in m.recipients)
    return f"{len(m.recipients)} ({done} final)"


def print_counts(stats: QueueStats) -> None:
    print_table(
        ["STATE", "RECIPIENTS"],
        [[s.value, stats.by_state.get(s, 0)] for s in RecipientState],
        title=f"{stats.messages} message{'' if stats.messages == 1 else 's'}, {stats.held} held",
    )
    print()
    pending = sorted(stats.pending_by_domain.items(), key=lambda kv: (-kv[1], kv[0]))
    print_table(["DOMAIN", "PENDING"], pending, title="Pending recipients by domain")


# --- show --------------------------------------------------------------------------------


def show_command(args: argparse.Namespace) -> int:
    if args.json and args.raw:
        # --raw is the stored bytes exactly; JSON can only hold them as text.
        raise UsageError("argument --json: not allowed with argument --raw")
    with store_from(settings_from(args), read_only=True) as store:
        mid = store.resolve_id(args.id)
        data = store.message_data(mid)
        st = None if args.raw else store.status(mid)
        now = utc_now()
        suspended = {} if st is None or args.json else suspended_domains(store, now)
    if args.json:
        assert st is not None
        shown = header_section(data) if args.headers else data
        # Octets that are not UTF-8 (a stored 8-bit message) as U+FFFD: JSON is UTF-8.
        print_json({**status_json(st), "message": shown.decode("utf-8", "replace")})
        return EX_OK
    out = sys.stdout.buffer
    if st is not None:
        sys.stdout.write(envelope_text(st, now, suspended=suspended))
        sys.stdout.flush()
    if args.headers:
        data = header_section(data)
    if not args.raw and is_tty():
        # On a terminal, not in a file: what the message holds is shown, never obeyed,
        # in the terminal's encoding (what it cannot hold as escapes), as every line is.
        sys.stdout.write(visible_lines(data))
        sys.stdout.flush()
        return EX_OK
    out.write(data)
    out.flush()
    return EX_OK


def envelope_text(
    st: MessageStatus, now: datetime, *, suspended: Mapping[str, Suspension] | None = None
) -> str:
    """postcat's envelope part: who, when, and each recipient's state, then a line that
    says where the message starts."""
    lines = [
        "*** ENVELOPE RECORDS ***",
        f"message_id: {st.id}",
        f"state: {st.state.value}{' (held)' if st.held else ''}",
        f"queued: {st.created_at:%Y-%m-%d %H:%M:%S} UTC ({age(st.created_at, now)} ago)",
        f"size: {st.size}",
        f"sender: {cell(st.envelope_from or '<>')}",
    ]
    for r in st.recipients:
        line = f"recipient: {cell(r.address)}  {r.state.value}  attempts={r.attempts}"
        due = next_try(st, r, suspended or {})
        if due is not None:
            line += f"  next={due:%Y-%m-%d %H:%M:%S}"
        if r.reason:
            line += "  reason=" + cell(r.reason)
        lines.append(line)
    lines.append("*** MESSAGE CONTENTS ***")
    return "\n".join(lines) + "\n"


def header_section(data: bytes) -> bytes:
    """The header section of ``data``: up to and including the empty line that ends it."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = data.find(separator)
        if end >= 0:
            return data[: end + len(separator)]
    return data
