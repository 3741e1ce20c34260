"""Fuzzing the reports ``mailstrom bounce`` reads: whoever can send mail can send a bounce
or a complaint, so every octet of one is hostile. Starting from the real samples in
``tests/samples/bounces``, the generator mutates them (header fields replaced, added,
duplicated or dropped with garbage: raw 8-bit, NUL and other controls, encoded words,
RFC 2231 parameters, ``\\x{...}`` escapes naming surrogates and code points past
U+10FFFF, overlong values; content types swapped for the RFC 6532/6533 ones, parts
re-encoded in base64 or quoted-printable, with garbage; parts nested deep; thousands of
recipient blocks or parts; CR, LF or CRLF line ends; cut anywhere) and checks that:

- ``parse_report`` returns a Report or None or raises InvalidReport, nothing else;
- every text of a Report is safe to store and show (:mod:`mailstrom.safetext`: no
  control character but TAB, no lone surrogate) and bounded;
- ``apply_report`` on whatever was parsed raises nothing, fails or suppresses only a
  recipient the report names legitimately (a valid VERP token for a message sent with
  VERP; for one sent without, a reference to the message and the recipient's address or
  it being the only recipient), never one no server accepted, and leaves every store
  readable (``status``, ``query``, ``list_suppressions``).

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (100 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/unit/test_report_fuzz.py``.
"""

from __future__ import annotations

import base64
import os
import quopri
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.bounces import Report, apply_report, parse_report, recipient_token
from mailstrom.bounces.reports import MAX_DEPTH, ReportedRecipient
from mailstrom.errors import InvalidReport
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from mailstrom.stores.base import RecipientResult

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "100"))
SAMPLES = Path(__file__).parents[1] / "samples" / "bounces"
PLACEHOLDER_ID = b"0190f3a2c4e1b7d08a4f2c6e9b1d3f57"
PLACEHOLDER = PLACEHOLDER_ID + b"-5d41402abc"
NOW = datetime(2026, 11, 30, 16, tzinfo=UTC)
# What safetext replaces, and lone surrogates: nothing of the kind may leave a Report.
UNSAFE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def sample_lines() -> dict[str, list[bytes]]:
    return {
        path.name: path.read_bytes().replace(b"\r\n", b"\n").split(b"\n")
        for path in sorted(SAMPLES.glob("*.eml"))
    }


SAMPLES_LINES = sample_lines()

# --- garbage ---------------------------------------------------------------------------

ESCAPES = st.lists(
    st.one_of(
        st.integers(0, 0x10FFFF),
        st.sampled_from([0, 0x1B, 0x85, 0xD800, 0xDFFF, 0x110000, 0xFFFFFF, 0x2028, 0x202E]),
    ).map(lambda n: f"\\x{{{n:X}}}"),
    max_size=4,
).map("".join)
TEXT = st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))
GARBAGE = st.one_of(
    st.binary(max_size=40),
    TEXT,
    st.sampled_from(
        [
            b"",
            b" ",
            b";",
            b"rfc822;",
            b"\x00",
            b"\x1b[2J",
            "\u2028\u202e".encode(),
            b"\xc2\x85",
            b"\xff\xfe",
            b"=?utf-8?b?G1sySg==?=",
            b"=?x-unknown?q?=FF=00?=",
            b"=?utf-8?q?=ED=A0=80?=",
            b"=?utf-8?b?!!!?=",
            b"<",
            b"<>",
            b"<<a@b>",
            b"(" * 600 + b"a@b",
            b'"' * 301,
            b"\\" * 99,
            b"5.1.1",
            b"5." + "\u00b2".encode() + b".1",
            b"4.4.7 extra",
            b"9.9.9",
            b"smtp; 550 5.1.1 gone",
            "smtp; 5\u00b2\u00b3 x".encode(),
            b"smtp;",
            b"x-unknown; ???",
            b"dns; mx.example\r\n\tfolded",
            b"abuse",
            b"fraud\x00",
        ]
    ),
    ESCAPES.map(lambda e: b"utf-8; " + e.encode() + b"@receiver.test"),
    st.integers(900, 5000).map(lambda n: b"y" * n),
    # Nesting the standard library's parsers recurse on: comments, groups, brackets.
    st.tuples(st.sampled_from([b"(", b"a:", b"<", b"[", b'"\\']), st.integers(1, 1000)).map(
        lambda p: p[0] * p[1] + b"a@b"
    ),
    st.integers(1, 300).map(lambda n: b"a@b, " * n),
)
FIELDS = st.sampled_from(
    [
        b"Final-Recipient",
        b"Original-Recipient",
        b"Status",
        b"Action",
        b"Diagnostic-Code",
        b"Remote-MTA",
        b"Reporting-MTA",
        b"Arrival-Date",
        b"Last-Attempt-Date",
        b"Original-Envelope-Id",
        b"X-Postfix-Sender",
        b"Feedback-Type",
        b"Original-Rcpt-To",
        b"Original-Mail-From",
        b"Message-ID",
        b"Return-Path",
        b"To",
        b"Delivered-To",
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"MIME-Version",
    ]
)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            b"message/rfc822",
            b"message/global",
            b"text/rfc822-headers",
            b"message/global-headers",
            b"message/delivery-status",
            b"message/global-delivery-status",
            b"message/feedback-report",
            b"multipart/mixed; boundary=x",
            b"multipart/report; report-type=delivery-status; boundary=x",
            b"multipart/report; report-type*=us-ascii'en'delivery-status; boundary=x",
            b"multipart/report; report-type*0*=utf-8''feedback%2D; report-type*1=report",
            b'multipart/report; report-type="Feedback-Report"; boundary="x"',
            b"multipart/report; boundary*=x-bogus''%FF%00",
            b"text/plain; charset=x-unknown",
            b"text/plain; charset*=utf-8''%FF",
            b"message/delivery-status; charset=utf-16",
            b"application/octet-stream",
        ]
    ),
    GARBAGE,
)
ENCODINGS = st.sampled_from([b"base64", b"quoted-printable", b"8bit", b"x-uuencode", b"BASE64"])


# --- mutations of a report's lines -----------------------------------------------------

Mutation = Callable[[list[bytes]], list[bytes]]


def header_positions(lines: list[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines) if re.match(rb"[A-Za-z-]+:", line)]


@st.composite
def mutations(draw: Any) -> Mutation:
    """One change to the lines of a report."""
    kind = draw(
        st.sampled_from(
            [
                "replace-value",
                "insert-field",
                "top-field",
                "drop-line",
                "duplicate-line",
                "content-type",
                "encode-part",
                "nest",
                "many-recipients",
                "many-parts",
                "bytes",
                "cut",
            ]
        )
    )
    event(f"mutation: {kind}")
    index = draw(st.integers(0, 10_000))
    garbage = draw(GARBAGE)
    field = draw(FIELDS)

    def at(lines: list[bytes], candidates: list[int] | None = None) -> int:
        pool = candidates if candidates else list(range(len(lines)))
        return pool[index % len(pool)] if pool else 0

    if kind == "replace-value":

        def replace_value(lines: list[bytes]) -> list[bytes]:
            i = at(lines, header_positions(lines))
            name = lines[i].split(b":", 1)[0] if lines else b"X"
            return [*lines[:i], name + b": " + garbage, *lines[i + 1 :]]

        return replace_value
    if kind == "insert-field":
        return lambda lines: [
            *lines[: at(lines)],
            field + b": " + garbage,
            *lines[at(lines) :],
        ]
    if kind == "top-field":  # among the report's own header fields
        name = draw(st.sampled_from([b"To", b"Delivered-To", b"X-Original-To", field]))

        def top_field(lines: list[bytes]) -> list[bytes]:
            i = index % ((lines.index(b"") if b"" in lines else len(lines)) + 1)
            return [*lines[:i], name + b": " + garbage, *lines[i:]]

        return top_field
    if kind == "drop-line":
        return lambda lines: [*lines[: at(lines)], *lines[at(lines) + 1 :]]
    if kind == "duplicate-line":
        times = draw(st.integers(2, 50))
        return lambda lines: [
            *lines[: at(lines)],
            *(lines[at(lines) : at(lines) + 1] * times),
            *lines[at(lines) :],
        ]
    if kind == "content-type":
        new = draw(CONTENT_TYPES)

        def content_type(lines: list[bytes]) -> list[bytes]:
            types = [i for i, line in enumerate(lines) if line.lower().startswith(b"content-type:")]
            i = at(lines, types)
            return [*lines[:i], b"Content-Type: " + new, *lines[i + 1 :]]

        return content_type
    if kind == "encode-part":
        return encode_part(index, draw(ENCODINGS), draw(st.booleans()))
    if kind == "nest":
        return nest(draw(st.integers(1, MAX_DEPTH + 3)), draw(st.booleans()))
    if kind == "many-recipients":
        count = draw(st.integers(1, 1500))
        block = [b"", b"Final-Recipient: rfc822; " + garbage, b"Action: failed", b"Status: 5.1.1"]

        def many_recipients(lines: list[bytes]) -> list[bytes]:
            i = at(lines, [j for j, line in enumerate(lines) if line.startswith(b"Status:")])
            return [*lines[: i + 1], *block * count, *lines[i + 1 :]]

        return many_recipients
    if kind == "many-parts":
        count = draw(st.integers(1, 3000))
        return lambda lines: [*lines[: at(lines)], *[b"--x", b""] * count, *lines[at(lines) :]]
    if kind == "bytes":

        def insert_bytes(lines: list[bytes]) -> list[bytes]:
            i = at(lines)
            line = lines[i] if lines else b""
            cut = index % (len(line) + 1)
            return [*lines[:i], line[:cut] + garbage + line[cut:], *lines[i + 1 :]]

        return insert_bytes
    return lambda lines: lines[: at(lines)]


def encode_part(index: int, encoding: bytes, corrupt: bool) -> Mutation:
    """Encode the body of one part (a ``Content-Type`` line up to the next boundary) and
    label it, or label it without encoding (garbage for the decoder)."""

    def mutate(lines: list[bytes]) -> list[bytes]:
        starts = [i for i, line in enumerate(lines) if line.lower().startswith(b"content-type:")]
        if not starts:
            return lines
        start = starts[index % len(starts)]
        try:
            blank = lines.index(b"", start)
        except ValueError:
            return lines
        end = next((j for j in range(blank + 1, len(lines)) if lines[j].startswith(b"--")), None)
        end = len(lines) if end is None else end
        body = b"\n".join(lines[blank + 1 : end]) + b"\n"
        if not corrupt and encoding.lower() == b"base64":
            encoded = base64.encodebytes(body).rstrip(b"\n").split(b"\n")
        elif not corrupt and encoding == b"quoted-printable":
            encoded = quopri.encodestring(body).rstrip(b"\n").split(b"\n")
        else:
            encoded = [*lines[blank + 1 : end], b"=ZZ!!%%==", b"=\xff"]
        label = b"Content-Transfer-Encoding: " + encoding
        return [*lines[: start + 1], label, *lines[start + 1 : blank + 1], *encoded, *lines[end:]]

    return mutate


def nest(levels: int, multipart: bool) -> Mutation:
    """Wrap the whole report ``levels`` deep in message/rfc822 or multipart/mixed entities
    (past MAX_DEPTH now and then)."""

    def mutate(lines: list[bytes]) -> list[bytes]:
        inner = lines
        for level in range(levels):
            if multipart:
                boundary = b"n%d" % level
                inner = [
                    b"Content-Type: multipart/mixed; boundary=" + boundary,
                    b"",
                    b"--" + boundary,
                    *inner,
                    b"--" + boundary + b"--",
                ]
            else:
                inner = [b"Content-Type: message/rfc822", b"", *inner]
        top = [b"Content-Type: multipart/report; report-type=delivery-status; boundary=top"]
        return [*top, b"", b"--top", *inner, b"--top--"]

    return mutate


@st.composite
def reports(draw: Any, token: bytes = PLACEHOLDER) -> bytes:
    """A sample report, mutated a few times, with its line ends chosen."""
    name = draw(st.sampled_from(sorted(SAMPLES_LINES)))
    event(f"sample: {name}")
    lines = [line.replace(PLACEHOLDER, token) for line in SAMPLES_LINES[name]]
    for mutate in draw(st.lists(mutations(), max_size=4)):
        lines = mutate(lines)
    ending = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\n\r"]))
    return ending.join(lines)


# --- what a Report must be -------------------------------------------------------------


def texts(value: Report | ReportedRecipient) -> Iterator[str]:
    for f in fields(value):
        item = getattr(value, f.name)
        for part in item if isinstance(item, tuple) else (item,):
            if isinstance(part, ReportedRecipient):
                yield from texts(part)
            elif isinstance(part, str):
                yield part


def check_report(data: bytes) -> Report | None:
    try:
        report = parse_report(data)
    except InvalidReport as exc:
        event(f"InvalidReport: {str(exc)[:40]}")
        return None
    if report is None:
        event("not a report")
        return None
    assert isinstance(report, Report)
    event(f"{report.kind} with {min(len(report.recipients), 2)}+ recipients")
    for text in texts(report):
        assert not UNSAFE.search(text), f"unsafe text in the report: {text[:80]!r}"
        assert len(text) <= 1000
    return report


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=reports())
def test_a_report_parses_to_safe_text_or_a_typed_error(data: bytes) -> None:
    check_report(data)


# --- applying what was parsed to a store -----------------------------------------------

VERP = "bounces+{token}@sender.test"
VERP_RECIPIENTS = ("nosuchuser@receiver.test", "Carol@mailbox.test")
PLAIN_RECIPIENTS = ("nosuchuser@receiver.test", "dave@receiver.test")
LONE_RECIPIENT = ("carol@mailbox.test",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Queue:
    """A store with messages in every situation a report may name."""

    store: Store
    verp: str
    """Sent with VERP, both recipients delivered."""
    plain: str
    """Sent without VERP, Message-ID <sample-1@sender.test>, both delivered."""
    lone: str
    """Without VERP, one recipient, Message-ID <sample-4@sender.test>, delivered."""
    queued: str
    """Without VERP, Message-ID <sample-2@sender.test>, not yet tried."""


def prepared(recipients: tuple[str, ...], sender: str, header_id: str) -> PreparedMessage:
    return PreparedMessage(
        data=f"Message-ID: {header_id}\r\nSubject: Hello\r\n\r\nHi.\r\n".encode(),
        envelope_from=sender,
        recipients=recipients,
        smtputf8=False,
        eightbit=False,
        header_message_id=header_id,
        subject="Hello",
    )


def deliver_all(store: Store) -> None:
    lease = store.lease(now=NOW, limit=1000, lease_for=timedelta(minutes=5))
    assert lease is not None
    store.record(
        [
            RecipientResult(
                message_id=item.message_id,
                address=r.address,
                lease_token=lease.token,
                ref=r.ref,
                state=RecipientState.DELIVERED,
                attempt=Attempt(
                    at=NOW,
                    outcome=AttemptOutcome.DELIVERED,
                    reply=SMTPReply(code=250, enhanced="2.0.0", text="ok"),
                ),
            )
            for item in lease.items
            for r in item.recipients
        ]
    )


def filled(store: Store) -> Queue:
    verp = store.enqueue(prepared(VERP_RECIPIENTS, VERP, "<sample-3@sender.test>"), now=NOW)
    plain = store.enqueue(
        prepared(PLAIN_RECIPIENTS, "app@sender.test", "<sample-1@sender.test>"), now=NOW
    )
    lone = store.enqueue(
        prepared(LONE_RECIPIENT, "app@sender.test", "<sample-4@sender.test>"), now=NOW
    )
    deliver_all(store)
    queued = store.enqueue(
        prepared(PLAIN_RECIPIENTS, "app@sender.test", "<sample-2@sender.test>"),
        now=NOW + timedelta(days=1),  # not due: stays queued
    )
    return Queue(store=store, verp=verp, plain=plain, lone=lone, queued=queued)


@contextmanager
def stores() -> Iterator[Iterator[Queue]]:
    with tempfile.TemporaryDirectory() as tmp:

        def each() -> Iterator[Queue]:
            memory = MemoryStore()
            sqlite = SQLiteStore(Path(tmp) / "q.db")
            try:
                yield filled(memory)
                yield filled(sqlite)
            finally:
                memory.close()
                sqlite.close()

        yield each()


def snapshot(queue: Queue) -> dict[tuple[str, str], RecipientState]:
    store = queue.store
    return {
        (m, r.address): r.state
        for m in (queue.verp, queue.plain, queue.lone, queue.queued)
        for r in store.status(m).recipients
    }


TOKEN_CHOICES = st.sampled_from(["verp-0", "verp-1", "plain-0", "queued-0", "forged", "none"])


def token_for(queue: Queue, choice: str) -> bytes:
    key = queue.store.verp_key()
    if choice == "forged":
        return queue.verp.encode() + b"-0123456789"
    if choice == "none":
        return b"0" * 32 + b"-5d41402abc"
    which, n = choice.split("-")
    message = {"verp": queue.verp, "plain": queue.plain, "queued": queue.queued}[which]
    address = (VERP_RECIPIENTS if which == "verp" else PLAIN_RECIPIENTS)[int(n)]
    return recipient_token(message, address, key=key).encode()


def named_legitimately(
    queue: Queue, report: Report, envelope_recipient: str, message: str, address: str
) -> bool:
    """Whether the report (what it says, or the address it was delivered to) may change
    this recipient: a valid token for it, or for a message sent without VERP, a reference
    to the message (its id, a token of it, its Message-ID) and the recipient's address
    or its being the only one. (What it says, not its octets: a part in base64 says it
    too.)"""
    seen = " ".join([envelope_recipient, *texts(report)]).lower().encode()
    key = queue.store.verp_key()
    if recipient_token(message, address, key=key).encode() in seen:
        return True
    if message == queue.verp:
        return False
    status = queue.store.status(message)
    header_id = {queue.plain: b"sample-1@", queue.lone: b"sample-4@"}.get(message, b"-")
    referenced = message.encode() in seen or header_id in seen
    alone = len(status.recipients) == 1
    return referenced and (alone or address.lower().encode() in seen)


@settings(
    max_examples=max(EXAMPLES // 2, 10),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    template=reports(token=b"@@TOKEN@@"),
    in_report=TOKEN_CHOICES,
    in_envelope=TOKEN_CHOICES,
    envid=st.sampled_from(["verp", "plain", "lone", "queued", "keep"]),
)
def test_applying_a_report_changes_only_what_it_names(
    template: bytes, in_report: str, in_envelope: str, envid: str
) -> None:
    with stores() as each:
        for queue in each:
            data = template.replace(b"@@TOKEN@@", token_for(queue, in_report))
            if envid != "keep":
                data = data.replace(PLACEHOLDER_ID, getattr(queue, envid).encode())
            envelope_recipient = b"bounces+" + token_for(queue, in_envelope) + b"@sender.test"
            report = check_report(data)
            if report is None:
                continue
            before = snapshot(queue)
            outcomes = apply_report(
                queue.store,
                report,
                now=NOW + timedelta(hours=1),
                envelope_recipient=envelope_recipient.decode(),
            )
            event(f"outcomes: {sorted({o.action.value for o in outcomes})}")
            after = snapshot(queue)
            changed = [key for key in before if before[key] != after[key]]
            for message, address in changed:
                assert before[(message, address)] is RecipientState.DELIVERED
                assert named_legitimately(
                    queue, report, envelope_recipient.decode(), message, address
                )
            for o in outcomes:
                if o.suppressed is not None:
                    assert o.message_id is not None and o.address is not None
                    assert named_legitimately(
                        queue, report, envelope_recipient.decode(), o.message_id, o.address
                    )
            # Still readable, every way it is read.
            queue.store.query(now=NOW)
            queue.store.list_suppressions()
            queue.store.stats()


# --- what the fuzzing found ------------------------------------------------------------


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def test_nested_comments_in_an_address_field_are_read_without_recursion() -> None:
    # Was: RecursionError out of email.utils.getaddresses (one frame per "("), and
    # `mailstrom bounce` exiting 70 with a traceback.
    data = sample("exim-dsn.eml").replace(b"\nTo: ", b"\nTo: " + b"(" * 600 + b")" * 600 + b" ")
    report = parse_report(data)
    assert report is not None
    assert PLACEHOLDER.decode() in " ".join(report.envelope_senders)
    assert len(report.recipients) == 1


def test_nested_groups_in_address_fields_are_read_without_recursion() -> None:
    # Was: RecursionError out of email.utils.getaddresses, which reads a group
    # ("name: a@b, c@d;") by recursion, one frame per colon after a phrase, over all the
    # fields joined: three To fields of "a:a:a:..." and `mailstrom bounce` exited 70.
    nested = b"".join(b"\nTo: " + b"a:" * 495 for _ in range(3))
    data = sample("exim-dsn.eml").replace(b"\nTo: ", nested + b"\nTo: ", 1)
    report = parse_report(data)
    assert report is not None
    assert PLACEHOLDER.decode() in " ".join(report.envelope_senders)
    assert len(report.recipients) == 1
    # A group's members are its addresses, as getaddresses reads them; its name is not.
    grouped = sample("exim-dsn.eml").replace(
        b"\nTo: bounces+", b'\nTo: "Our: list" <x@y>, Bounces: <a@[IPv6:1::2]>, bounces+', 1
    )
    report = parse_report(grouped)
    assert report is not None
    [mailbox, literal, token, *_] = report.envelope_senders
    assert (mailbox, literal) == ("x@y", "a@[IPv6:1::2]")
    assert PLACEHOLDER.decode() in token


@pytest.mark.parametrize("nesting", ["(", "a:", ":"])
@pytest.mark.parametrize("start", ["", '"', "<", "[", "<a@", 'x "'])
def test_address_fields_nest_nothing_past_a_bound(start: str, nesting: str) -> None:
    # Was: comments and groups were taken out of each field apart, with quoted strings
    # left as they were, but getaddresses read the fields joined: a quote left open in
    # one field closed in the next, whose "((((" or "a:a:a:" it then read by recursion
    # (RecursionError, exit 70). Nor does it read an angle address as a scanner would.
    field = (start + nesting * 1000)[:990].encode()
    nested = b"".join(b"\nTo: " + field for _ in range(5))
    data = sample("exim-dsn.eml").replace(b"\nTo: ", nested + b"\nTo: ", 1)
    report = parse_report(data)
    assert report is not None
    assert PLACEHOLDER.decode() in " ".join(report.envelope_senders)


def test_lines_past_max_lines_are_not_parsed(monkeypatch: Any) -> None:
    # Was: every line parsed into objects: ten megabytes of empty parts or header blocks
    # took 16 s and 0.9 GB. Cut at MAX_LINES lines (CRLF, CR or LF), a report still
    # reads; here only the returned message, which comes last, is lost.
    from mailstrom.bounces import reports

    lines = sample("postfix-dsn-full.eml").split(b"\r\n")
    returned = lines.index(b"Content-Description: Undelivered Message")
    monkeypatch.setattr(reports, "MAX_LINES", returned, raising=False)
    for ending in (b"\n", b"\r", b"\r\n"):
        report = parse_report(ending.join(lines))
        assert report is not None
        assert [r.status for r in report.recipients] == ["5.1.1"]
        assert report.original_message_id is None  # past the cut
    monkeypatch.setattr(reports, "MAX_LINES", len(lines))
    report = parse_report(b"\r".join(lines))
    assert report is not None and report.original_message_id == "<sample-2@sender.test>"
