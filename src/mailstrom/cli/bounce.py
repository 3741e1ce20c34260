"""``mailstrom bounce``: apply a bounce (RFC 3464 DSN) or complaint (RFC 5965 ARF) read
from standard input, as an MTA's pipe or a script reading a mailbox runs it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, BinaryIO

from mailstrom.bounces.reports import MAX_REPORT
from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_NOINPUT, EX_OK, EX_TEMPFAIL
from mailstrom.cli.output import echo, print_json
from mailstrom.cli.parsing import Subparsers, count_arg
from mailstrom.cli.reading import stdin_buffer

if TYPE_CHECKING:
    from mailstrom.bounces.apply import BounceOutcome

_DRAIN = 1 << 30
"""Octets of standard input read and dropped past ``--max-size`` (so that the MTA writing
it sees the message taken), at most."""

DESCRIPTION = """\
Read one delivery status notification (multipart/report; report-type=delivery-status),
complaint (report-type=feedback-report) or qmail bounce (QSBMF) from standard input, find
the queued message and recipient it speaks of, mark that recipient failed (a late bounce)
and put the address on the suppression list (a complaint only suppresses). Matching uses
the VERP token of the address the report was sent to (--recipient, else
$ORIGINAL_RECIPIENT or $RECIPIENT as Postfix's local and Exim's pipe set them, else the
report's own headers), then, for mail sent without VERP only, the report's
Original-Envelope-Id and the returned Message-ID (which every recipient sees), with
Original-Recipient and Final-Recipient naming the recipient. Only a recipient a server
accepted (delivered) fails late; one a worker is delivering right now (leased) is
reported in_flight with exit 75, so that the MTA delivers the report again later.

Input that is no report (an auto-reply, a plain message) is ignored with exit 0. At most
--max-size octets are parsed; a report's status part comes before the returned message,
so a long message cut short still reads.
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bounce",
        parents=parents,
        help="apply a bounce or complaint read from stdin",
        description=DESCRIPTION,
        epilog="examples:\n"
        "  mailstrom bounce < bounce.eml\n"
        "  # Postfix master.cf, for a bounces address delivered to a pipe:\n"
        "  #   mailstrom unix - n n - - pipe\n"
        "  #     user=mailstrom argv=/usr/local/bin/mailstrom bounce --recipient ${recipient}\n",
    )
    p.add_argument(
        "--recipient",
        metavar="ADDRESS",
        help="the address the report was delivered to (default: $ORIGINAL_RECIPIENT, $RECIPIENT)",
    )
    p.add_argument(
        "--max-size",
        type=count_arg,
        default=MAX_REPORT,
        metavar="OCTETS",
        help=f"octets of input parsed (default {MAX_REPORT})",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=bounce_command)


def bounce_command(args: argparse.Namespace) -> int:
    from mailstrom.bounces import apply_report, parse_report
    from mailstrom.bounces.apply import BounceAction

    stdin = stdin_buffer()
    data = _read_at_most(stdin, args.max_size)
    _drain(stdin)
    report = parse_report(data)
    if report is None:
        message = "ignored: not a delivery status notification or feedback report"
        if args.json:
            print_json({"ignored": message, "outcomes": []})
        else:
            sys.stderr.write(f"mailstrom: {message}\n")
        return EX_OK
    recipient = (
        args.recipient or os.environ.get("ORIGINAL_RECIPIENT") or os.environ.get("RECIPIENT")
    )
    settings = settings_from(args)
    with store_from(settings) as store:
        if settings.config.outbox:
            store.enable_events()  # late failures reach hooks and `mailstrom events` too
        outcomes = apply_report(
            store,
            report,
            now=utc_now(),
            envelope_recipient=recipient,
            suppress_on=settings.config.suppress_on,
            suppress_for=settings.config.suppress_for,
        )
    if args.json:
        print_json({"kind": report.kind.value, "outcomes": [_row(o) for o in outcomes]})
    else:
        for o in outcomes:
            echo(_line(o))
    if any(o.action is BounceAction.IN_FLIGHT for o in outcomes):
        # A recipient in delivery: the same report, applied again, finds its result (what
        # was applied now is not applied twice).
        return EX_TEMPFAIL
    if any(o.action is BounceAction.UNMATCHED for o in outcomes):
        return EX_NOINPUT
    return EX_OK


_CHUNK = 1 << 20


def _read_at_most(stream: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` octets of ``stream``, read a MiB at a time: one ``read(limit)``
    sets ``limit`` octets aside first, and a large ``--max-size`` (a terabyte, or the
    largest count the option takes) raised MemoryError or OverflowError before anything
    was read."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _drain(stream: object) -> None:
    read = getattr(stream, "read", None)
    left = _DRAIN
    while read is not None and left > 0:
        chunk = read(min(left, 1 << 20))
        if not chunk:
            return
        left -= len(chunk)


def _row(o: BounceOutcome) -> dict[str, object]:
    return {
        "action": o.action.value,
        "message_id": o.message_id,
        "address": o.address,
        "status": o.status,
        "reason": o.reason,
        "suppressed": o.suppressed.target if o.suppressed is not None else None,
    }


def _line(o: BounceOutcome) -> str:
    where = f"{o.message_id} {o.address}" if o.message_id else f"{o.address or '(no recipient)'}"
    text = f"{where}: {o.action.value}"
    if o.suppressed is not None:
        text += ", suppressed"
    return f"{text} ({o.reason})" if o.reason else text
