"""``mailstrom send``: build (or read) a message, queue it, and optionally wait for delivery."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailstrom.cli.context import open_store, require_lasting_store, settings_from, utc_now
from mailstrom.cli.exits import (
    EX_DATAERR,
    EX_INTERRUPTED,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    CLIError,
    UsageError,
    say,
)
from mailstrom.cli.output import cell, echo, print_json
from mailstrom.cli.parsing import Subparsers, path_arg, seconds_arg
from mailstrom.cli.reading import FileBudget, stdin_buffer
from mailstrom.cli.signals import EarlyStops, early_stops, handled_stop_signals
from mailstrom.cli.views import print_message, status_json
from mailstrom.config import Config
from mailstrom.errors import InvalidMessage, StoreError
from mailstrom.message import Attachment, Email
from mailstrom.message.addresses import mailboxes, parse_address_list
from mailstrom.message.chars import replace_controls
from mailstrom.message.dsn import DSN
from mailstrom.message.prepared import PreparedMessage
from mailstrom.runtime.worker import Worker
from mailstrom.settings import parse_duration
from mailstrom.status import MessageStatus, RecipientState
from mailstrom.stores.base import RecipientResult, Store

EPILOG = """\
examples:
  mailstrom send --from "App <app@example.com>" --to bob@example.org \\
      --subject "Report" --text-file report.txt --attach report.pdf
  mailstrom send --from app@example.com --to bob@example.org --bcc audit@example.com \\
      --subject Hi --text Hello --header "X-Campaign: spring" --wait --timeout 30
  mailstrom send --file message.eml                   # recipients from To/Cc/Bcc
  cat message.eml | mailstrom send --file - --to bob@example.org   # explicit envelope
  mailstrom send --from app@example.com --to bob@example.org --subject Receipt --text ... \\
      --tag receipt --meta order=42 --idempotency-key order-42-receipt
  mailstrom send --from news@example.com --to bob@example.org --subject News --text ... \\
      --priority bulk --at 2026-12-01T09:00Z --expires 2h

Prints the message id. With --wait, runs a worker in this process until every recipient
is delivered or failed, or until --timeout, then shows each recipient's state.

exit codes with --wait: 0 all delivered, 69 a recipient failed, 75 some still pending,
130 stopped while waiting (SIGINT, SIGTERM or SIGHUP: what is known is shown all the same).
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "send",
        parents=parents,
        help="queue a message (built from options, or a raw file)",
        description="Queue one message for delivery and print its id. Build it from "
        "options, or give a complete RFC 5322 message with --file. Invalid input is "
        "rejected before anything is queued.",
        epilog=EPILOG,
    )
    build = p.add_argument_group("building the message")
    build.add_argument("--from", dest="from_", metavar="ADDR", help="From header")
    addresses: dict[str, Any] = {"action": "append", "default": [], "type": address_arg}
    build.add_argument("--to", **addresses, metavar="ADDR", help="repeatable")
    build.add_argument("--cc", **addresses, metavar="ADDR", help="repeatable")
    build.add_argument("--bcc", **addresses, metavar="ADDR", help="repeatable; never shown")
    build.add_argument("--reply-to", **addresses, metavar="ADDR")
    build.add_argument("--subject", default="", help="Subject header")
    body = build.add_mutually_exclusive_group()
    body.add_argument("--text", help="plain-text body")
    body.add_argument(
        "--text-file", metavar="PATH", type=path_arg, help="plain-text body from a file (- stdin)"
    )
    build.add_argument("--html-file", metavar="PATH", type=path_arg, help="HTML body from a file")
    build.add_argument(
        "--attach",
        action="append",
        type=path_arg,
        default=[],
        metavar="FILE",
        help="attach a file (repeatable; type guessed from its name)",
    )
    build.add_argument(
        "--header",
        action="append",
        default=[],
        metavar='"NAME: VALUE"',
        help="extra header (repeatable)",
    )
    bulk = p.add_argument_group("headers mailbox providers ask of bulk mail")
    bulk.add_argument(
        "--unsubscribe-url",
        metavar="URL",
        help="https URL for one-click unsubscription (List-Unsubscribe and "
        "List-Unsubscribe-Post, RFC 8058)",
    )
    bulk.add_argument(
        "--unsubscribe-mailto",
        metavar="ADDR",
        help="address or mailto: URI that unsubscribes by mail (List-Unsubscribe)",
    )
    bulk.add_argument("--feedback-id", metavar="ID", help="Feedback-ID header")
    bulk.add_argument(
        "--auto-submitted",
        choices=["auto-generated", "auto-replied", "auto-notified"],
        help="Auto-Submitted header (RFC 3834): mail a program sent on its own",
    )
    raw = p.add_argument_group("sending a complete message")
    raw.add_argument(
        "--file",
        metavar="PATH",
        type=path_arg,
        help="raw RFC 5322 message (- for stdin); --from/--to/--cc/--bcc then set the envelope",
    )
    queueing = p.add_argument_group("queue attributes (kept with the message, never sent)")
    queueing.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=None,
        metavar="TAG",
        help="a tag (repeatable): shown by status, in events, filtered by queue --tag",
    )
    queueing.add_argument(
        "--meta",
        dest="meta",
        action="append",
        default=[],
        type=meta_arg,
        metavar="KEY=VALUE",
        help="a metadata entry (repeatable), returned by status and in events",
    )
    queueing.add_argument(
        "--priority", metavar="LANE", help="the priority lane (default: default_priority)"
    )
    queueing.add_argument(
        "--at",
        dest="send_at",
        type=time_arg,
        metavar="TIME",
        help="deliver not before TIME (ISO 8601, e.g. 2026-12-01T09:00Z; UTC when no zone)",
    )
    queueing.add_argument(
        "--expires",
        type=expiry_arg,
        metavar="AGE|TIME",
        help="fail what is still pending as 'expired' after AGE (2h, from --at or now) or at TIME",
    )
    queueing.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a second send with this KEY within idempotency_window prints the first "
        "message's id and queues nothing",
    )
    dsn = p.add_argument_group(
        "delivery status notifications (RFC 3461; sent only to servers offering DSN)"
    )
    dsn.add_argument(
        "--notify",
        metavar="WHEN",
        type=notify_arg,
        help="never, or a comma-separated list of success, failure, delay",
    )
    dsn.add_argument("--ret", choices=["full", "hdrs"], help="what a failure report returns")
    dsn.add_argument("--envid", help="envelope id quoted by reports (default: the message id)")
    p.add_argument("--hold", action="store_true", help="queue it held (release to deliver)")
    p.add_argument(
        "--require-tls",
        action="store_true",
        help="REQUIRETLS (RFC 8689): only over authenticated TLS to a server offering it",
    )
    p.add_argument("--wait", action="store_true", help="deliver now and wait for the outcome")
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=60.0,
        metavar="S",
        help="with --wait: give up waiting after S seconds (default 60)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=send_command)


# --- option values -----------------------------------------------------------------------


def address_arg(text: str) -> str:
    """An argparse ``type`` for ``--to``, ``--cc``, ``--bcc`` and ``--reply-to``: not
    empty. An empty one ("$AUDIT" unset) was no address to the message builder: the
    message went without that Bcc or Cc, without a word. (The builder checks the rest.)"""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected an address, got {text!r}")
    return text


def notify_arg(text: str) -> str:
    """An argparse ``type`` for ``--notify``: at least one word (checked further with the
    rest of the DSN). An empty one asked for nothing, and the server's default applied."""
    if not any(word.strip() for word in text.split(",")):
        raise argparse.ArgumentTypeError(
            f"expected never, or success, failure, delay separated by commas, got {text!r}"
        )
    return text


def meta_arg(text: str) -> tuple[str, str]:
    """An argparse ``type`` for ``KEY=VALUE`` (the value may hold ``=``)."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def time_arg(text: str) -> datetime:
    """An argparse ``type`` for an ISO 8601 time; without a zone it is UTC.

    A time with a zone is kept in it: the queue attributes convert it to UTC and refuse
    one out of range there (9999-12-31T23:00-05:00) as for the API (exit 65).
    """
    try:
        # Upper case: RFC 3339 (§5.6) allows "z" for UTC, which fromisoformat refused.
        when = datetime.fromisoformat(text.strip().upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2026-12-01T09:00Z, got {text!r}"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def expiry_arg(text: str) -> timedelta | datetime:
    """An argparse ``type`` for ``--expires``: an age (``2h``) or an ISO 8601 time."""
    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        return time_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected an age (30m, 2h, 3d) or an ISO 8601 time, got {text!r}"
        ) from None


def queue_options(args: argparse.Namespace) -> dict[str, Any]:
    """The queue attributes given on the command line, as ``prepare_for`` takes them."""
    metadata: dict[str, str] = {}
    for key, value in args.meta:
        if key in metadata:
            raise UsageError(f"--meta {key}= given twice")
        metadata[key] = value
    expires = args.expires
    return {
        "tags": args.tags,
        "metadata": metadata or None,
        "priority": args.priority,
        "send_at": args.send_at,
        "expires_at": expires if isinstance(expires, datetime) else None,
        "max_age": expires if isinstance(expires, timedelta) else None,
        "idempotency_key": args.idempotency_key,
    }


# --- reading input -----------------------------------------------------------------------


def read_bytes(path: str, budget: FileBudget) -> bytes:
    """A file's bytes (``-`` is stdin), charged to ``budget``: MessageTooLarge past it (the
    rest is not read); unreadable → EX_NOINPUT."""
    if path == "-":
        return budget.read(stdin_buffer(), source="standard input")
    try:
        with open(path, "rb") as stream:
            return budget.read(stream, source=path)
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}", EX_NOINPUT) from None


def read_message(path: str, budget: FileBudget) -> bytes:
    """The message ``--file`` names: :func:`read_bytes`, and EX_NOINPUT when it holds
    nothing but white space (an empty pipe is no input, as for ``sendmail``; not a
    message to refuse for its missing From)."""
    data = read_bytes(path, budget)
    if not data.strip():
        where = "on standard input" if path == "-" else f"in {path}"
        raise CLIError(f"no message {where}", EX_NOINPUT)
    return data


def read_text(path: str, budget: FileBudget) -> str:
    """A UTF-8 text file (``--text-file``, ``--html-file``) without its byte order mark:
    Notepad and PowerShell 5 write one, which no reader takes for text, and the body was
    sent with an invisible U+FEFF at its start."""
    try:
        return read_bytes(path, budget).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not UTF-8 text", EX_DATAERR) from None


def attachment(path: str, budget: FileBudget) -> Attachment:
    import mimetypes

    content_type, encoding = mimetypes.guess_type(path, strict=False)
    if content_type is None or encoding is not None:
        # A compressed file (report.csv.gz) is sent as what it is: opaque bytes.
        content_type = "application/octet-stream"
    content = read_bytes(path, budget)
    content_type = carried_type(content_type, content)
    # A name holding octets that are not UTF-8 (an old Latin-1 file name) has them as lone
    # surrogates, which no header can carry: the file was refused for its name. Sent with
    # U+FFFD for each such octet instead, as the file is otherwise what was asked for.
    filename = os.fsencode(Path(path).name).decode("utf-8", "replace")
    # A name may hold any character but "/" and NUL, so a file named with a line break or
    # an escape sequence (saved from an upload, a script's typo) was refused for its name
    # alone, exit 65. Each such character is sent as "_", as mail clients save it: in a
    # header it is an injection, in a saved file's name hostile to the reader's terminal.
    filename = replace_controls(filename.replace("\r", "_").replace("\n", "_"), "_")
    return Attachment(filename=filename, content=content, content_type=content_type)


def carried_type(guessed: str, content: bytes) -> str:
    """The type a file is attached as, for the type ``guessed`` from its name.

    message/rfc822 (.eml, .mht) must be sent 7bit with 7-bit headers (RFC 2046 §5.2.1):
    a saved message with UTF-8 headers (RFC 6532), its own or a part's, was refused with
    advice to attach it as message/global, which no option of ``send`` can do, and a
    file named so but holding NUL octets is no message at all. The first is sent as
    message/global (which may be base64-encoded, RFC 6532 §3.7), the second as opaque
    bytes; both as read. Which headers are 8-bit is judged on the message as the
    renderer sends it (its 8-bit bodies re-encoded), so the two cannot disagree."""
    if guessed != "message/rfc822":
        return guessed
    if b"\0" in content:
        return "application/octet-stream"
    from mailstrom.message.render import attached_message  # as prepare_for: send only

    return guessed if attached_message(content).isascii() else "message/global"


def headers(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, colon, text = value.partition(":")
        if not colon or not name.strip():
            raise UsageError(f"--header expects 'Name: value', got {value!r}")
        if name.strip() in out:
            # A message carries one value per name here (Email.headers is a mapping): the
            # first one was dropped without a word.
            raise UsageError(f"--header {name.strip()} given twice")
        out[name.strip()] = text.strip()
    return out


def build_email(args: argparse.Namespace, *, max_size: int) -> Email:
    """The message the options describe; its files are read up to ``max_size`` octets
    together (the message size limit: past it, the message would be refused anyway)."""
    if not args.from_:
        raise UsageError("--from is required (or give a complete message with --file)")
    stdin = [
        option
        for option, paths in (
            ("--text-file", [args.text_file]),
            ("--html-file", [args.html_file]),
            ("--attach", args.attach),
        )
        for path in paths
        if path == "-"
    ]
    if len(stdin) > 1:
        # The first one read it to its end: the next got nothing, an empty HTML part or
        # an empty attachment named "-", and the message was queued without a word.
        raise UsageError(f"standard input (-) can be read once; given to {', '.join(stdin)}")
    one_reader_per_pipe(
        [("--text-file", args.text_file), ("--html-file", args.html_file)]
        + [("--attach", path) for path in args.attach]
    )
    budget = FileBudget(max_size)
    text = args.text
    if args.text_file is not None:
        text = read_text(args.text_file, budget)
    return Email(
        from_=args.from_,
        to=args.to,
        cc=args.cc,
        bcc=args.bcc,
        reply_to=args.reply_to,
        subject=args.subject,
        text=text,
        html=read_text(args.html_file, budget) if args.html_file else None,
        attachments=[attachment(path, budget) for path in args.attach],
        headers=headers(args.header),
        unsubscribe_url=args.unsubscribe_url,
        unsubscribe_mailto=args.unsubscribe_mailto,
        feedback_id=args.feedback_id,
        auto_submitted=args.auto_submitted,
    )


def envelope_addresses(values: list[str]) -> list[str]:
    """The addresses of ``--to``, ``--cc`` and ``--bcc`` given with ``--file``, each an
    address list as it is when the message is built from them ("a@x, Bob <b@y>", a
    group): the envelope takes one address per entry, and a list was refused there. A
    value that is no list of at least one mailbox is kept whole, for prepare() to refuse
    with its reason (an empty group must not leave the envelope to the headers)."""
    out: list[str] = []
    for value in values:
        try:
            boxes = mailboxes(parse_address_list("envelope_to", value))
        except InvalidMessage:
            boxes = []
        out.extend([box.address.written for box in boxes] or [value])
    return out


def one_reader_per_pipe(inputs: list[tuple[str, str | None]]) -> None:
    """UsageError when two of the ``(option, path)`` inputs are the same pipe or socket:
    standard input named as ``-`` and as ``/dev/stdin`` (or ``/dev/fd/0``), or one FIFO
    named twice. The first read it to its end and the second got nothing: an empty part
    or attachment, queued without a word. A regular file or a device reads again."""
    seen: dict[tuple[int, int], str] = {}
    for option, path in inputs:
        if path is None:
            continue
        try:
            found = os.fstat(0) if path == "-" else os.stat(path)
        except (OSError, ValueError):
            continue  # reading it says what is wrong
        if not (stat.S_ISFIFO(found.st_mode) or stat.S_ISSOCK(found.st_mode)):
            continue
        key = (found.st_dev, found.st_ino)
        if key in seen:
            raise UsageError(
                f"{seen[key]} and {option} {path} read the same pipe, which can be read once"
            )
        seen[key] = f"{option} {path}"


_BUILDER_ONLY = (
    "subject",
    "text",
    "text_file",
    "html_file",
    "attach",
    "header",
    "reply_to",
    "unsubscribe_url",
    "unsubscribe_mailto",
    "feedback_id",
    "auto_submitted",
)


# --- the command -------------------------------------------------------------------------


def send_command(args: argparse.Namespace) -> int:
    # The facade's prepare step (and what it imports) is loaded by this command only.
    from mailstrom.client.common import prepare_for

    settings = settings_from(args)
    require_lasting_store(settings)
    now = utc_now()
    dsn = DSN.from_options(args.notify, args.ret, args.envid)
    if args.file is not None:
        given = [f"--{n.replace('_', '-')}" for n in _BUILDER_ONLY if getattr(args, n)]
        if given:
            raise UsageError(f"--file takes a complete message; drop {', '.join(given)}")
        envelope_to = envelope_addresses([*args.to, *args.cc, *args.bcc]) or None
        prepared = prepare_for(
            settings.config,
            read_message(args.file, FileBudget(settings.config.max_message_size)),
            envelope_from=args.from_,
            envelope_to=envelope_to,
            now=now,
            dsn=dsn,
            **queue_options(args),
        )
    else:
        prepared = prepare_for(
            settings.config,
            build_email(args, max_size=settings.config.max_message_size),
            envelope_from=None,
            envelope_to=None,
            now=now,
            dsn=dsn,
            **queue_options(args),
        )
    if args.require_tls:
        prepared = dataclasses.replace(prepared, require_tls=True)
    if settings.config.dkim is not None and not prepared.dkim:
        # Written as errors are (say): a stderr that cannot take it loses the warning,
        # never the message it warns of, which is queued after it.
        say(
            f"mailstrom: warning: the message is not DKIM-signed: {prepared.dkim_unsigned}; "
            "add a [[dkim.keys]] entry for it or a parent domain"
        )
    store = open_store(settings.store_url)
    try:
        # With --wait, the stop signals are handled from when the message is queued (not
        # before: one while the store opens still stops the command with nothing queued).
        # One ends the wait (a second stops at once), and what is known is printed, the
        # id above all. Ctrl-C printed nothing with --json, and SIGTERM (a supervisor's,
        # or timeout(1)'s) killed the process: the message stayed queued, its id lost.
        with early_stops() if args.wait else contextlib.nullcontext(None) as early:
            return _queue_and_report(args, settings.config, store, prepared, now, early)
    finally:
        store.close()


def _queue_and_report(
    args: argparse.Namespace,
    config: Config,
    store: Store,
    prepared: PreparedMessage,
    now: datetime,
    early: EarlyStops | None,
) -> int:
    message_id = store.enqueue(prepared, now=now, hold=args.hold)
    try:
        if not args.json:
            # First, before anything else can fail: the id finds or cancels the mail.
            print(message_id, flush=True)
        return _report(args, config, store, message_id, early)
    except BaseException:
        # The store failing as the message is read back, the worker of --wait crashing,
        # a Ctrl-C, standard output on a full disk: --json printed nothing, and the exit
        # code said nothing was queued (65 for a row read back wrong, 73 for the output);
        # the mail went out all the same, its id lost. Said on standard error first,
        # which a failing standard output cannot take with it.
        say(f"mailstrom: message {message_id} is queued; what came after it failed")
        if args.json:
            with contextlib.suppress(OSError, ValueError, CLIError):
                print_json({"id": message_id})
        raise


def _report(
    args: argparse.Namespace,
    config: Config,
    store: Store,
    message_id: str,
    early: EarlyStops | None,
) -> int:
    """Print what ``send`` says of the message queued as ``message_id`` (the id itself
    already, without --json) and return the exit code."""
    if not args.wait:
        if args.json:
            # What the store holds under the id: a repeat of an idempotency key queues
            # nothing and gives the first message's id, and its own recipients (never
            # queued) were printed as if they had been.
            stored = store.status(message_id)
            signatures = () if stored.dkim is None else stored.dkim.signatures
            print_json(
                {
                    "id": message_id,
                    "recipients": [r.address for r in stored.recipients],
                    "dkim": [str(signature) for signature in signatures],
                }
            )
        return EX_OK
    asyncio.run(deliver_and_wait(config, store, message_id, wait_for=args.timeout, stops=early))
    status = store.status(message_id)
    if args.json:
        print_json(status_json(status))  # the same document as `mailstrom status --json`
    else:
        print()
        print_message(status, utc_now())
        print_deferred(status)
    if early is not None and early.count:
        pending = any(not r.state.is_final for r in status.recipients)
        rest = "; what is pending stays queued for a worker" if pending else ""
        sys.stderr.write(f"mailstrom: interrupted while waiting{rest}\n")
        return EX_INTERRUPTED
    return wait_exit_code(status)


def print_deferred(status: MessageStatus) -> None:
    """One line per recipient still deferred: when the next attempt comes (UTC), with its
    date: a retry after a long backoff or a destination's pause may be another day's."""
    lines = [
        f"{r.address}: deferred until {r.next_attempt_at:%Y-%m-%d %H:%M} UTC"
        + (f" ({cell(r.reason)})" if r.reason else "")
        for r in status.recipients
        if r.state is RecipientState.DEFERRED and r.next_attempt_at is not None
    ]
    if lines:
        print()
    for line in lines:
        echo(line)


async def deliver_and_wait(
    config: Config,
    store: Store,
    message_id: str,
    *,
    wait_for: float,
    stops: EarlyStops | None = None,
) -> bool:
    """Run a worker until every recipient of ``message_id`` is final or due only after
    the end of the wait (its next retry, its destination's pause, or the message's
    ``--at`` time, falls after ``wait_for`` seconds), or for ``wait_for`` seconds.
    Whether the wait ended before its time (False: it ran out, or was stopped).

    With ``stops`` (from :func:`~mailstrom.cli.signals.early_stops`), the stop signals
    are this loop's while it runs, counted there too: the first (or one that came
    before) ends the wait as its timeout does, a second stops the worker at once."""
    # Loaded here, as prepare_for is: the facade's module is for this command only.
    from mailstrom.client.operations import WAIT_POLL, settled

    deadline = utc_now() + timedelta(seconds=wait_for)
    status = store.status(message_id)
    pending = {
        r.address
        for r in status.recipients
        if not r.state.is_final and (r.next_attempt_at is None or r.next_attempt_at <= deadline)
    }
    finished = asyncio.Event()
    if not pending or status.held:
        finished.set()

    def on_result(result: RecipientResult) -> None:
        if result.message_id != message_id:
            return
        later = result.next_attempt_at is not None and result.next_attempt_at > deadline
        if result.state.is_final or later:
            pending.discard(result.address)
            if not pending:
                finished.set()

    over = asyncio.Event()

    async def look_at_the_store() -> None:
        # A recipient the worker postpones for its destination's pause gets no result:
        # only the store tells that its next attempt falls after the wait (as
        # Mailstrom.wait looks).
        while not finished.is_set():
            try:
                await asyncio.wait_for(over.wait(), WAIT_POLL)
                return
            except TimeoutError:
                pass
            try:
                status = await asyncio.to_thread(store.status, message_id)
            except StoreError:
                continue  # the worker says so and tries again; so does the next look
            if settled(status, deadline):
                finished.set()

    worker = Worker(config, store, on_result=on_result)
    running = asyncio.create_task(worker.run())
    waiting = asyncio.create_task(finished.wait())
    looking = asyncio.create_task(look_at_the_store())
    stopped = asyncio.Event()
    previous = _take_stop_signals(stops, stopped, running) if stops is not None else {}
    halting = asyncio.create_task(stopped.wait())
    try:
        await asyncio.wait(
            {running, waiting, halting}, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        halting.cancel()
        over.set()
        await looking  # a read of the store in its thread ends before the store is closed
        # Done: let other in-flight work finish briefly. Timed out or stopped: give it back.
        done = finished.is_set() and not stopped.is_set()
        worker.request_stop(drain_timeout=5.0 if done else 0.0)
        try:
            await running  # re-raises a worker crash; results are recorded before it returns
        except asyncio.CancelledError:
            if stops is None or stops.count < 2:
                raise
        return done
    finally:
        # Removing the loop's handlers sets the defaults: early_stops' are put back, or a
        # signal during the clean-up after the loop killed the process.
        loop = asyncio.get_running_loop()
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)


def _take_stop_signals(
    stops: EarlyStops, stopped: asyncio.Event, running: asyncio.Task[None]
) -> dict[signal.Signals, Any]:
    """Make the stop signals this loop's, each counted in ``stops``: the first sets
    ``stopped``, the second cancels ``running`` (the worker). Those ``stops`` counted
    before count as the first ones. Returns the handlers they had. Not those this process
    was started with ignored (``nohup``'s SIGHUP), as ``mailstrom worker`` leaves them."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in handled_stop_signals()}
    cancelled = False

    def on_signal(counted: bool = True) -> None:
        nonlocal cancelled
        if counted:
            stops.count += 1
        if stops.count >= 1:
            stopped.set()
        if stops.count >= 2 and not cancelled:
            cancelled = True  # once: a further cancel cut short the worker's give-back
            running.cancel()

    for sig in previous:
        loop.add_signal_handler(sig, on_signal)
    on_signal(counted=False)
    return previous


def wait_exit_code(status: MessageStatus) -> int:
    states = [r.state for r in status.recipients]
    if RecipientState.FAILED in states:
        return EX_UNAVAILABLE
    if any(not s.is_final for s in states):
        return EX_TEMPFAIL
    return EX_OK
