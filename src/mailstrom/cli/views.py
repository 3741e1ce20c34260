"""``mailstrom status ID`` and ``mailstrom queue``: read-only views of the queue.

They open the store read-only, so they work on a read-only mount (a snapshot, a rescue
system) and never create, migrate or change it. ``status`` says why each failed recipient
failed (its reason class) and what to do, with the provider's help page when the reply is
a well-known one; the advice is looked up when shown, never stored.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_OK
from mailstrom.cli.output import age, print_fields, print_json, print_table, to_jsonable
from mailstrom.cli.parsing import Subparsers, count_arg, duration_arg
from mailstrom.policy.reasons import advice_for
from mailstrom.status import (
    Attempt,
    DKIMStatus,
    MessageStatus,
    QueueStats,
    RecipientState,
    RecipientStatus,
)
from mailstrom.stores.base import QueueFilter

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
  mailstrom queue                          # the 100 newest messages
  mailstrom queue --state deferred --older-than 2h
  mailstrom queue --domain example.org --limit 20
  mailstrom queue --held
  mailstrom queue --tag newsletter --state deferred
  mailstrom queue --counts                 # recipients by state, pending by domain
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
        help="list queued messages, or count them",
        description="List messages in the queue, newest first. Filters combine.",
        epilog=QUEUE_EPILOG,
    )
    q.add_argument(
        "--state",
        choices=[s.value for s in RecipientState],
        help="only messages in this state (a message's state is derived from its recipients)",
    )
    q.add_argument("--domain", help="only messages with a recipient at this domain")
    q.add_argument(
        "--older-than",
        metavar="AGE",
        type=duration_arg,
        help="only messages queued more than AGE ago (30s, 15m, 2h, 3d)",
    )
    held = q.add_mutually_exclusive_group()
    held.add_argument(
        "--held", dest="held", action="store_const", const=True, help="only held messages"
    )
    held.add_argument(
        "--not-held", dest="held", action="store_const", const=False, help="only unheld ones"
    )
    q.add_argument("--tag", metavar="TAG", help="only messages carrying this tag")
    q.add_argument("--limit", type=count_arg, default=100, help="at most this many (default 100)")
    q.add_argument(
        "--counts", action="store_true", help="recipients by state and pending ones by domain"
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(handler=queue_command)


# --- status ------------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    with store_from(settings_from(args), read_only=True) as store:
        st = store.status(args.id)
    if args.json:
        print_json(status_json(st))
        return EX_OK
    print_message(st, utc_now(), history=args.history)
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


def print_message(st: MessageStatus, now: datetime, *, history: bool = False) -> None:
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
                r.state.value + (" (uncertain)" if r.uncertain else ""),
                r.attempts,
                r.mx_host,
                r.ip,
                r.tls if r.attempts else None,
                r.next_attempt_at if r.state is RecipientState.DEFERRED else None,
                r.reason_class,
                r.reason,
            ]
            for r in st.recipients
        ],
    )
    print_advice(st.recipients)
    if not history:
        return
    for r in st.recipients:
        print()
        if not r.history:
            print(f"Attempts for {r.address}: none yet")
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
        print(f"{r.address}: {found.reason_class}{source}: {found.meaning}")
        print(f"  What to do: {found.action}")
        if found.help:
            print(f"  Help: {found.help}")


# --- queue -------------------------------------------------------------------------------


def queue_command(args: argparse.Namespace) -> int:
    with store_from(settings_from(args), read_only=True) as store:
        if args.counts:
            stats = store.stats()
            if args.json:
                print_json(stats)
            else:
                print_counts(stats)
            return EX_OK
        where = QueueFilter(
            state=RecipientState(args.state) if args.state else None,
            domain=args.domain,
            older_than=args.older_than,
            held=args.held,
            limit=args.limit,
            tag=args.tag,
        )
        now = utc_now()
        messages = store.query(now=now, where=where)
    if args.json:
        print_json(messages)
        return EX_OK
    print_table(
        ["ID", "STATE", "AGE", "FROM", "RCPTS", "SIZE", "HELD", "SUBJECT"],
        [
            [
                m.id,
                m.state,
                age(m.created_at, now),
                m.envelope_from or "<>",
                _recipient_summary(m),
                m.size,
                m.held,
                m.subject,
            ]
            for m in messages
        ],
    )
    return EX_OK


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
