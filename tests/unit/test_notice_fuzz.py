"""Fuzzing the bounce notices the worker sends: whatever a failed message, its sender, its
recipients, the peer's reply, the remote MTA's name, the DSN request and the host's name
hold, the notices made (a final failure's or a delay warning, through its mark "notice
owed": ``owed_notice`` then ``notices_owed``) come out or are logged with why
they could not (InvalidMessage), never raised, and each notice rendered is ASCII (but
for the To field of a sender whose local part is UTF-8), with CRLF line ends, lines of at
most 998 octets and an RFC 2046 boundary, is accepted by ``prepare`` and reads back
with ``parse_report``.

Every input that reaches ``render_notice`` gets its notice: the only inputs that
legitimately get none are decided before rendering (the null sender; NOTIFY without
FAILURE, or DELAY for a warning; no DSN request while ``Config.bounce_notices`` is off).

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (200 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/unit/test_notice_fuzz.py``.
"""

from __future__ import annotations

import base64
import email.policy
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.bounces import notice as notice_module
from mailstrom.bounces import parse_report
from mailstrom.bounces.verp import check_verp_template
from mailstrom.config import Config
from mailstrom.errors import InvalidMessage
from mailstrom.message import prepare
from mailstrom.message.addrspec import validate_address
from mailstrom.message.dsn import DSN, Notify, Return
from mailstrom.message.prepared import PreparedMessage
from mailstrom.runtime import notices as notices_module
from mailstrom.runtime.notices import notices_owed, owed_notice
from mailstrom.smtp.replies import MAX_TEXT
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores.base import (
    LeasedRecipient,
    OwedNotice,
    RecipientResult,
    WorkItem,
    domain_of,
)

# RFC 2046 §5.1.1: 1 to 70 of these, not ending in a space.
BCHARS = re.compile(rb"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")
EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "200"))
NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
KEY = bytes(range(32))
PLAIN = prepare(b"From: app@sender.test\r\nTo: bob@example.org\r\n\r\nHello\r\n", now=NOW).data

# --- the inputs ------------------------------------------------------------------------

# Printable text of any script: reply texts and names have had control characters removed.
PRINTABLE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
LONG_PRINTABLE = st.one_of(
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=200, max_size=3000),
    st.integers(400, 2000).map(lambda n: "5.1.1 " + "z" * n),
)
LOCALS = st.one_of(
    st.sampled_from(
        ["bob", "a.b+c", "ñoño", "日本", '"q x"', '"a\\"b"', "x" * 64, "+=+=", "bounces+{token}"]
    ),
    st.from_regex(r"[a-z0-9+=_-]{1,64}", fullmatch=True),
    st.integers(1, 64).map(lambda n: "l" * n),
    st.text(st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF), min_size=1, max_size=20),
)
DOMAINS = st.one_of(
    st.sampled_from(
        [
            "example.org",
            "bücher.example",
            "xn--bcher-kva.example",
            "日本.example",
            "[127.0.0.1]",
            "[IPv6:2001:db8::1]",
            "a" * 63 + "." + "b" * 63 + ".example",
        ]
    ),
    st.integers(1, 3).map(lambda n: ".".join(["c" * 63] * n) + ".example"),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\.(test|example|org)", fullmatch=True),
)
ADDRESSES = st.builds(lambda local, domain: f"{local}@{domain}", LOCALS, DOMAINS)
HELO_NAMES = st.one_of(
    st.sampled_from(
        [
            "mx.client.test",
            "[127.0.0.1]",
            "[IPv6:2001:db8::1]",
            "bücher.example",
            "localhost",
            ("a" * 63 + ".") * 3 + "b" * 61,
        ]
    ),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
)
ID_DOMAINS = st.one_of(st.none(), st.sampled_from(["example.com", "bücher.example", "x.org"]))
REMOTE_MTAS = st.one_of(
    st.none(), st.sampled_from(["mx.example.org", "bücher.example", "[192.0.2.1]"]), PRINTABLE
)
DIAGNOSTICS = st.one_of(
    st.builds(
        SMTPReply,
        code=st.sampled_from([421, 450, 451, 550, 552, 553, 554]),
        text=st.one_of(PRINTABLE, LONG_PRINTABLE, st.lists(PRINTABLE).map("\n".join)),
        enhanced=st.sampled_from([None, "5.1.1", "4.2.1", "5.7.1", "4.4.7"]),
    ),
    st.one_of(PRINTABLE, LONG_PRINTABLE),
)
DSNS = st.one_of(
    st.none(),
    st.builds(
        DSN,
        notify=st.sampled_from(
            [
                (),
                (Notify.FAILURE,),
                (Notify.DELAY,),
                (Notify.FAILURE, Notify.DELAY),
                (Notify.NEVER,),
            ]
        ),
        ret=st.sampled_from([None, Return.FULL, Return.HEADERS]),
        envid=st.one_of(
            st.none(),
            st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=100),
        ),
        orcpt=st.booleans(),
    ),
)

# Header fields as send_email takes them: printable text of any script (raw UTF-8,
# RFC 6532), encoded words, folded, long; now and then one prepare refuses.
HEADERS = st.one_of(
    st.tuples(st.sampled_from(["Subject", "X-Note", "Keywords", "Comments"]), PRINTABLE),
    st.tuples(st.just("Subject"), st.sampled_from(["=?utf-8?q?=C3=A9t=C3=A9?=", "x" * 990])),
    st.tuples(st.just("Message-ID"), st.sampled_from(["<a@b.example>", "<ü@bücher.example>"])),
    st.tuples(st.just("Reply-To"), st.sampled_from(["Zoë <z@bücher.example>", "ñ@x.test"])),
    st.tuples(st.just("X-Raw"), st.text(max_size=100)),
)
BODY_LINES = st.one_of(
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80).map(lambda b: b.replace(b"\0", b"").replace(b"\r", b"")),
    st.integers(900, 998).map(lambda n: b"y" * n),
    st.sampled_from([b".", b"--B", b"--B--", b"From x", b"\xff\xfe", b""]),
)


@st.composite
def originals(draw: Any, sender: str, recipients: Sequence[str]) -> bytes:
    """The message as queued: raw input accepted by ``prepare`` (8-bit and folded
    headers, long lines, multipart bodies, LF or CRLF line ends), as the store keeps it."""
    headers = [b"From: " + draw(st.sampled_from(["app@sender.test", sender])).encode()]
    for name, text in draw(st.lists(HEADERS, max_size=5, unique_by=lambda h: h[0])):
        value = text.encode("utf-8", "surrogatepass")
        if len(value) > 40 and draw(st.booleans()):
            value = value[:40] + b"\r\n " + value[40:]  # folded
        headers.append(name.encode() + b": " + value)
    lines = draw(st.lists(BODY_LINES, max_size=8))
    if draw(st.booleans()):
        headers.append(b'Content-Type: multipart/mixed; boundary="B"')
        lines = [b"--B", b"Content-Type: text/plain; charset=utf-8", b"", *lines, b"--B--"]
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    raw = ending.join([*headers, b"", *lines]) + ending
    try:
        return prepare(raw, envelope_to=recipients, now=NOW).data
    except InvalidMessage as exc:
        event(f"original refused ({type(exc).__name__}): a plain one instead")
        return PLAIN


@st.composite
def envelope_addresses(draw: Any, *, template: bool = False) -> str:
    """An address as the store keeps it (its envelope form): one ``send_email`` accepts,
    and for the sender now and then a VERP template (``bounces+{token}@...``)."""
    text = draw(ADDRESSES)
    if not template:
        text = text.replace("{token}", "t")
    try:
        address = validate_address(text).envelope
        if "{token}" in address:
            check_verp_template(address)
    except InvalidMessage:
        event("address refused: a valid one instead")
        return draw(st.sampled_from(["bob@example.org", "ñoño@xn--bcher-kva.example"]))
    return address


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    sender = draw(mostly(envelope_addresses(template=True), st.just("")))
    recipients = draw(st.lists(envelope_addresses(), min_size=1, max_size=5, unique=True))
    delayed = draw(st.booleans())
    try:
        config = Config(
            helo_name=draw(HELO_NAMES),
            message_id_domain=draw(ID_DOMAINS),
            bounce_notices=draw(mostly(st.just(True), st.just(False))),
            delay_warning=timedelta(hours=1) if delayed else None,
        )
    except ValueError:
        event("helo name refused by Config: a valid one instead")
        config = Config(helo_name="mx.client.test", bounce_notices=True)
    return {
        "sender": sender,
        "recipients": recipients,
        "config": config,
        "original": draw(originals(sender.replace("{token}", "t") or "a@b.test", recipients)),
        "dsn": draw(DSNS),
        "delayed": delayed,
        "diagnostics": [draw(DIAGNOSTICS) for _ in recipients],
        "remote_mtas": [draw(REMOTE_MTAS) for _ in recipients],
        "outcome": draw(st.sampled_from(list(AttemptOutcome))),
    }


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad``."""
    return st.integers(0, 9).flatmap(lambda roll: bad if roll == 0 else good)


def worker_inputs(
    case: dict[str, Any],
) -> tuple[list[RecipientResult], dict[tuple[str, str], WorkItem]]:
    """The results and leased items as the worker hands them to ``owed_notice``."""
    mid = "0190f3a2c4e1b7d08a4f2c6e9b1d3f57"
    queued = NOW - timedelta(hours=2)
    by_domain: dict[str, list[LeasedRecipient]] = {}
    results = []
    for address, diagnostic, mta in zip(
        case["recipients"], case["diagnostics"], case["remote_mtas"], strict=True
    ):
        by_domain.setdefault(domain_of(address), []).append(
            LeasedRecipient(address=address, attempts=1, first_attempt_at=queued, created_at=queued)
        )
        reply = diagnostic if isinstance(diagnostic, SMTPReply) else None
        attempt = Attempt(
            at=NOW,
            outcome=case["outcome"],
            mx_host=mta,
            reply=reply,
            error=None if reply else diagnostic,
        )
        results.append(
            RecipientResult(
                message_id=mid,
                address=address,
                state=RecipientState.DEFERRED if case["delayed"] else RecipientState.FAILED,
                attempt=attempt,
                lease_token="t",
                queued_at=queued,
                envelope_from=case["sender"],
            )
        )
    items = {
        (mid, domain): WorkItem(
            message_id=mid,
            lease_token="t",
            domain=domain,
            envelope_from=case["sender"],
            recipients=tuple(leased),
            data=case["original"],
            smtputf8=False,
            eightbit=False,
            dsn=case["dsn"],
        )
        for domain, leased in by_domain.items()
    }
    return results, items


def made(
    results: list[RecipientResult], items: dict[tuple[str, str], WorkItem], config: Config
) -> list[PreparedMessage]:
    """The notices the worker makes of ``results``: from the marks their records leave
    in the store."""
    notices: list[PreparedMessage] = []
    owed = []
    data = {}
    for result in results:
        item = items[(result.message_id, domain_of(result.address))]
        text = owed_notice(result, item, config=config, verp_key=KEY)
        if text is not None:
            assert text.isascii()
            owed.append(
                OwedNotice(message_id=result.message_id, address=result.address, notice=text)
            )
            data[result.message_id] = item.data
    for listed in notices_owed(owed, data, config=config, now=NOW).values():
        notices += listed
    return notices


def check_notice(raw: bytes) -> None:
    """What every rendered notice must be: ASCII, but for the To field of a sender with a
    UTF-8 local part (RFC 6532), which needs SMTPUTF8 to be reached at all."""
    to = raw.split(b"\r\n")[1]
    assert to.startswith(b"To: ")
    assert raw.replace(to, b"").isascii(), "8-bit octets in the notice"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    longest = max(len(line) for line in raw.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets"
    boundary = re.search(rb'boundary="([^"]*)"', raw)
    assert boundary is not None and BCHARS.fullmatch(boundary.group(1)), "bad boundary"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_notices_never_raise_and_are_safe_to_send(case: dict[str, Any]) -> None:
    results, items = worker_inputs(case)
    rendered: list[bytes] = []

    def recording(**kwargs: Any) -> bytes:
        raw = notice_module.render_notice(**kwargs)
        rendered.append(raw)
        return raw

    with mock.patch.object(notices_module, "render_notice", recording):
        notices = made(results, items, case["config"])
    event(f"{len(rendered)} rendered")
    for raw in rendered:
        check_notice(raw)
    # Every notice rendered was prepared: none was dropped with a logged InvalidMessage.
    assert len(notices) == len(rendered)
    reported = []
    for prepared in notices:
        assert prepared.envelope_from == ""
        report = parse_report(prepared.data)
        assert report is not None and report.original_message_id is not None
        reported += [r.final_recipient for r in report.recipients]
    if notices:  # one notice per VERP address, else one for all
        assert sorted(reported) == sorted(case["recipients"])


# --- what the fuzzing found ------------------------------------------------------------


def one_notice(
    *,
    helo: str = "mx.client.test",
    sender: str = "app@sender.test",
    recipient: str = "bob@example.org",
    original: bytes = PLAIN,
    reply: str = "550 5.1.1 No such user",
    dsn: DSN | None = None,
) -> tuple[bytes, list[bytes]]:
    """(the notice rendered, the notices prepared) for one failed recipient."""
    case = {
        "sender": sender,
        "recipients": [recipient],
        "config": Config(helo_name=helo, bounce_notices=True),
        "original": original,
        "dsn": dsn,
        "delayed": False,
        "diagnostics": [reply],
        "remote_mtas": ["mx.example.org"],
        "outcome": AttemptOutcome.PERMANENT,
    }
    results, items = worker_inputs(case)
    rendered: list[bytes] = []

    def recording(**kwargs: Any) -> bytes:
        rendered.append(notice_module.render_notice(**kwargs))
        return rendered[-1]

    with mock.patch.object(notices_module, "render_notice", recording):
        notices = made(results, items, case["config"])
    [raw] = rendered
    check_notice(raw)
    return raw, [n.data for n in notices]


def test_a_host_name_in_unicode_is_reported_in_its_ascii_form() -> None:
    # Was: UnicodeEncodeError out of render_notice, which stopped the worker.
    raw, [_] = one_notice(helo="bücher.example")
    assert b"\r\nReporting-MTA: dns; xn--bcher-kva.example\r\n" in raw
    assert b"<MAILER-DAEMON@xn--bcher-kva.example>" in raw


def test_the_boundary_holds_no_host_name() -> None:
    # Was: "...[IPv6:2001:db8::1]" or a 253-character name in the boundary, which RFC
    # 2046 limits to 70 characters without brackets.
    for helo in ("[IPv6:2001:db8::1]", ("a" * 63 + ".") * 3 + "b" * 61):
        raw, [_] = one_notice(helo=helo)
        assert f"Reporting-MTA: dns; {helo}\r\n".encode() in raw


def test_a_host_no_address_can_name_still_sends_notices() -> None:
    # Was: From MAILER-DAEMON@localhost (the default helo_name on a host without a
    # usable name; or mac.local), refused by prepare: every notice was lost.
    for helo in ("localhost", "mac.local"):
        raw, [prepared] = one_notice(helo=helo)
        assert b"From: Mail Delivery System <MAILER-DAEMON@sender.test>\r\n" in prepared
        assert f"Reporting-MTA: dns; {helo}\r\n".encode() in raw


def test_an_8bit_original_is_returned_in_base64() -> None:
    # Was: its 8-bit octets copied into the notice as text/rfc822-headers, or into a
    # message/rfc822 part that may not be encoded for a server without 8BITMIME.
    queued = prepare(
        "From: app@sender.test\r\nTo: bob@example.org\r\nSubject: Grüße\r\n"
        "Message-ID: <m@sender.test>\r\n\r\nDanke schön\r\n".encode(),
        now=NOW,
    ).data
    raw, [prepared] = one_notice(original=queued)
    assert b"Content-Type: message/global-headers\r\nContent-Transfer-Encoding: base64" in raw
    report = parse_report(prepared)
    assert report is not None and report.original_message_id == "<m@sender.test>"
    raw, [prepared] = one_notice(original=queued, dsn=DSN(ret=Return.FULL))
    assert b"Content-Type: message/global\r\nContent-Transfer-Encoding: base64" in raw
    assert base64.b64encode("Danke schön".encode())[:8] in raw.replace(b"\r\n", b"")
    report = parse_report(prepared)
    assert report is not None and report.original_message_id == "<m@sender.test>"
    # An ASCII one is returned as it was.
    raw, _ = one_notice(dsn=DSN(ret=Return.FULL))
    assert b"Content-Type: message/rfc822\r\n\r\n" + PLAIN in raw


def test_an_address_in_unicode_is_named_not_replaced() -> None:
    # Was: "Final-Recipient: rfc822; ?o?o@example.org" (another address) and the same in
    # the To field.
    raw, [prepared] = one_notice(sender="zoë@sender.test", recipient="ñoño@example.org")
    assert "\r\nTo: <zoë@sender.test>\r\n".encode() in raw  # RFC 6532: needs SMTPUTF8
    assert b"\r\nFinal-Recipient: utf-8; \\x{F1}o\\x{F1}o@example.org\r\n" in raw
    report = parse_report(prepared)
    assert report is not None
    assert [r.final_recipient for r in report.recipients] == ["ñoño@example.org"]
    # What an escape names is made safe like any other text of a report.
    hostile = raw.replace(b"\\x{F1}o\\x{F1}o", b"\\x{1B}[2J\\x{D800}\\x{110000}")
    report = parse_report(hostile)
    assert report is not None
    assert [r.final_recipient for r in report.recipients] == ["\ufffd[2J\ufffd\ufffd@example.org"]


def test_a_long_address_with_a_long_reply_stays_within_998_octets() -> None:
    # Was: "<address>: reply" of up to 1,800 octets, refused by prepare: the notice lost.
    address = "x" * 64 + "@" + "a" * 63 + "." + "b" * 63 + ".example"
    raw, [_] = one_notice(recipient=address, reply="550 5.1.1 " + "y" * 2000)
    assert f"\r\n<{address}>: 550 5.1.1 yyy".encode() in raw


def test_a_mark_keeps_no_more_of_a_reply_than_the_notice_shows() -> None:
    # Was: the whole reply in each recipient's mark, a 4,096-character one (what a
    # session hands out) of emoji escaped to 49,103 octets of JSON: 49 MB of marks for
    # a message of 1,000 recipients, kept in the store and read back 100 messages a look.
    reply = SMTPReply(code=550, enhanced="5.1.1", text="\U0001f600" * (MAX_TEXT - 10))
    case = {
        "sender": "app@sender.test",
        "recipients": ["bob@example.org"],
        "config": Config(helo_name="mx.client.test", bounce_notices=True),
        "original": PLAIN,
        "dsn": None,
        "delayed": False,
        "diagnostics": [reply],
        "remote_mtas": ["mx.example.org"],
        "outcome": AttemptOutcome.PERMANENT,
    }
    results, items = worker_inputs(case)
    [result] = results
    mark = owed_notice(
        result, items[(result.message_id, "example.org")], config=case["config"], verp_key=KEY
    )
    assert mark is not None
    assert len(mark) <= 2 * 1024, len(mark)
    [prepared] = made(results, items, case["config"])
    assert b"\r\nDiagnostic-Code: smtp; 550 5.1.1 ????" in prepared.data


# RFC 3464 §2.2 and §2.3: the fields of each block in the order its grammar lists them,
# the extension fields (X-...) after them.
PER_MESSAGE = ["original-envelope-id", "reporting-mta", "dsn-gateway", "received-from-mta"]
PER_MESSAGE += ["arrival-date"]
PER_RECIPIENT = ["original-recipient", "final-recipient", "action", "status", "remote-mta"]
PER_RECIPIENT += ["diagnostic-code", "last-attempt-date", "final-log-id", "will-retry-until"]


def in_grammar_order(names: list[str], grammar: list[str]) -> bool:
    ranks = [grammar.index(n) if n in grammar else len(grammar) for n in names]
    return ranks == sorted(ranks)


def test_the_delivery_report_fields_come_in_the_order_rfc_3464_gives() -> None:
    # Was: Reporting-MTA, X-Mailstrom-Queue-ID, Original-Envelope-Id, Arrival-Date, where
    # the per-message fields are [Original-Envelope-Id] Reporting-MTA ... [Arrival-Date]
    # and then the extension fields.
    _, [prepared] = one_notice(dsn=DSN(envid="order-42"))
    notice = BytesParser(policy=email.policy.default).parsebytes(prepared)
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    [status] = [p for p in notice.walk() if p.get_content_type() == "message/delivery-status"]
    per_message, *per_recipient = status.get_payload()
    names = [name.lower() for name in per_message]
    assert names[:3] == ["original-envelope-id", "reporting-mta", "arrival-date"]
    assert in_grammar_order(names, PER_MESSAGE), names
    assert per_message["Original-Envelope-Id"] == "order-42"
    [block] = per_recipient
    names = [name.lower() for name in block]
    assert in_grammar_order(names, PER_RECIPIENT), names
    assert block["Final-Recipient"] == "rfc822; bob@example.org"


# Replies as a hostile server may send them: line breaks and fields of its own, controls,
# octets that are no UTF-8 (read with surrogateescape), and far past the 998-octet line.
HOSTILE_REPLIES = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="\r\n\x00\x0b\x0c\x85\u2028:-X Status5.1\t", max_size=200),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.integers(100, 10_000).map(lambda n: "\r\nAction: delivered\r\nX-Evil: 1" * n),
)
FIELDS = set(PER_RECIPIENT)


@settings(max_examples=EXAMPLES, deadline=None)
@given(replies=st.lists(HOSTILE_REPLIES, min_size=1, max_size=3), delayed=st.booleans())
def test_a_hostile_reply_stays_inside_its_diagnostic_code(
    replies: list[str], delayed: bool
) -> None:
    """Read back with the stdlib parser, the report has one block per recipient, each
    with only the fields RFC 3464 names, its Action, and the reply in Diagnostic-Code."""
    failed = [
        notice_module.FailedRecipient(
            address=f"u{i}@example.org",
            status="4.0.0" if delayed else "5.1.1",
            diagnostic="550 5.1.1 " + reply,
            remote_mta="mx.example.org",
            at=NOW,
        )
        for i, reply in enumerate(replies)
    ]
    raw = notice_module.render_notice(
        reporting_mta="mx.client.test",
        sender="app@sender.test",
        message_id="0190f3a2c4e1b7d08a4f2c6e9b1d3f57",
        original=PLAIN,
        arrival=NOW,
        failed=failed,
        dsn=DSN(),
        now=NOW,
        delayed=delayed,
        retry_until=NOW + timedelta(days=5) if delayed else None,
    )
    check_notice(raw)
    notice = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert all(not part.defects for part in notice.walk())
    [status] = [p for p in notice.walk() if p.get_content_type() == "message/delivery-status"]
    _, *blocks = status.get_payload()
    assert len(blocks) == len(failed)
    for block in blocks:
        names = [name.lower() for name in block]
        assert len(names) == len(set(names)) and set(names) <= FIELDS, names
        assert block["Action"] == ("delayed" if delayed else "failed")
        assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
