"""Fuzzing ``prepare()``: arbitrary input gets a typed error or a message that is safe.

Every builder field, raw bytes and ``EmailMessage`` input are filled with arbitrary text
and bytes, biased toward the characters and shapes that matter to mail (CR, LF, NUL,
quotes, angle brackets, encoded words, MIME boundaries, deep nesting). Whatever comes
in, ``prepare()`` either raises a subclass of ``InvalidMessage`` or returns a message
whose bytes have CRLF line ends only, lines of at most 998 octets, no control characters
in the header section, and a 7-bit downgrade that does not raise.

The strategies and :func:`check` are shared with ``scripts/fuzz_prepare.py``, which runs
the same property for millions of cases.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.errors import InvalidMessage
from mailstrom.message import Attachment, Email, PreparedMessage, downgrade_to_7bit, prepare

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)

FRAGMENTS = [
    "\r\n",
    "\n",
    "\r",
    "\0",
    "\t",
    " ",
    "\x0b",
    "\x0c",
    "\x1f",
    "\x7f",
    "\x85",
    "\u2028",
    "\ud800",
    "=?utf-8?q?a?=",
    "=?utf-8?b?w6k=?=",
    "=?",
    "?=",
    "<",
    ">",
    "@",
    '"',
    "\\",
    ",",
    ";",
    ":",
    "(",
    ")",
    "[",
    "]",
    ".",
    "é",
    "日本",
    "😀",
    "\xa0",
    "Bcc: x@evil.test",
    "a@example.org",
    "Name <b@example.org>",
    '"q,x" <c@example.org>',
    "G: d@x.test;",
    "xn--bcher-kva.example",
    "[127.0.0.1]",
    "=",
    "--B",
    "boundary=B",
    "x" * 70,
]
# Text drawn from everything, or assembled from the fragments above.
ANY_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=12).map("".join),
    st.sampled_from(FRAGMENTS),
    st.text(min_size=200, max_size=1000),
)
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=80)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad``: most cases get past validation."""
    return st.integers(0, 9).flatmap(lambda roll: bad if roll == 0 else good)


GOOD_ADDRESS = st.one_of(
    st.sampled_from(
        [
            "a@example.org",
            "Name <b@example.org>",
            "Zoë Ångström <z@bücher.example>",
            '"Doe, Jane" <jane@example.org>',
            '"q x"@example.org',
            "ñoño@example.org",
            "Team: d@x.test, e@x.test;",
            "u@[192.0.2.1]",
        ]
    ),
    st.builds(
        lambda name, local, n: f"{name} <{local}{n}@example.org>" if name else f"{local}{n}@x.org",
        SAFE_TEXT.map(lambda t: t.replace('"', "").replace("\\", "")).map(
            lambda t: f'"{t}"' if t else ""
        ),
        st.sampled_from(["a", "b.c", "d+e", "ж"]),
        st.integers(0, 50),
    ),
)
NAMES = st.builds(
    lambda name, local, domain: f"{name} <{local}@{domain}>" if name else f"{local}@{domain}",
    st.one_of(st.just(""), ANY_TEXT),
    st.one_of(st.sampled_from(["a", "b.c", '"q x"', "ñ", "x" * 65]), ANY_TEXT),
    st.one_of(st.sampled_from(["example.org", "bücher.example", "[::1]", "-x.test"]), ANY_TEXT),
)
ADDRESS = mostly(GOOD_ADDRESS, st.one_of(NAMES, ANY_TEXT))
ADDRESSES = st.one_of(ADDRESS, st.lists(ADDRESS, min_size=1, max_size=4))
TEXT = mostly(SAFE_TEXT, ANY_TEXT)
BODY = mostly(st.text(max_size=1500), ANY_TEXT)
# Now and then a value of the wrong type, which must also get a typed error.
WRONG = st.sampled_from([b"bytes", 3, None])

CONTENT_TYPES = mostly(
    st.sampled_from(
        [
            "application/octet-stream",
            "text/plain; charset=utf-8",
            "image/png",
            "message/rfc822",
            "message/global",
            "message/delivery-status",
            "multipart/mixed",
            "text/csv; name=\"a b\"; x*=utf-8''%C3%A9",
        ]
    ),
    ANY_TEXT,
)


@st.composite
def raw_entities(draw: Any, depth: int = 0) -> bytes:
    """A MIME entity, often structured, sometimes nested, sometimes broken."""
    headers = draw(st.lists(st.binary(max_size=40) | ANY_TEXT.map(_utf8), max_size=3))
    kind = draw(
        st.sampled_from(["leaf", "leaf", "multipart", "message"]) if depth < 4 else st.just("leaf")
    )
    cte = draw(st.sampled_from([b"", b"7bit", b"8bit", b"binary", b"base64", b"quoted-printable"]))
    lines = [*headers] if draw(st.integers(0, 4)) == 0 else []
    if cte:
        lines.append(b"Content-Transfer-Encoding: " + cte)
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"B", b"=_x", b"\xc3\xa9", b"a b"]))
        lines.insert(0, b'Content-Type: multipart/mixed; boundary="' + boundary + b'"')
        parts = draw(st.lists(raw_entities(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
        body += draw(st.binary(max_size=20))
    elif kind == "message":
        lines.insert(0, b"Content-Type: message/rfc822")
        body = draw(raw_entities(depth + 1))
    else:
        body = draw(
            mostly(
                st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"")),
                st.binary(max_size=300) | ANY_TEXT.map(_utf8),
            )
        )
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@st.composite
def raw_messages(draw: Any) -> bytes:
    top = [
        b"From: " + _utf8(draw(ADDRESS)),
        b"To: " + _utf8(draw(ADDRESS)),
        *draw(
            st.lists(
                st.sampled_from(
                    [
                        b"Cc: ",
                        b"Bcc: ",
                        b"Resent-To: ",
                        b"Resent-Bcc: ",
                        b"Sender: ",
                        b"Subject: ",
                        b"Message-ID: ",
                        b"Date: ",
                        b"X-A: ",
                        b" ",
                    ]
                ).flatmap(lambda name: TEXT.map(lambda v: name + _utf8(v))),
                max_size=4,
            )
        ),
    ]
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    return ending.join(top) + ending + draw(raw_entities())


@st.composite
def emails(draw: Any) -> Email:
    def field(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(strategy, WRONG) if draw(st.integers(0, 30)) == 0 else strategy)

    attachments = draw(
        st.lists(
            st.builds(
                Attachment,
                filename=TEXT,
                content=st.one_of(st.binary(max_size=2000), raw_entities()),
                content_type=CONTENT_TYPES,
                inline=st.booleans(),
                content_id=mostly(st.none() | st.just("logo@example.org"), ANY_TEXT),
            ),
            max_size=3,
        )
    )
    return Email(
        from_=field(ADDRESSES),
        to=field(ADDRESSES),
        cc=field(ADDRESSES),
        bcc=field(ADDRESSES),
        reply_to=field(ADDRESSES),
        sender=field(st.none() | ADDRESS),
        subject=field(TEXT),
        text=field(st.none() | BODY),
        html=field(st.none() | BODY),
        attachments=attachments,
        headers=draw(
            st.dictionaries(
                mostly(st.sampled_from(["X-A", "Keywords"]), ANY_TEXT), TEXT, max_size=3
            )
        ),
        date=draw(
            st.none()
            | st.datetimes(timezones=st.just(timezone(timedelta(hours=-7))))
            | st.datetimes()
        ),
        message_id=field(mostly(st.none() | st.just("id@example.org"), ANY_TEXT)),
    )


@st.composite
def email_messages(draw: Any) -> Message:
    """An EmailMessage (policy-checked headers) or a compat32 Message (raw strings)."""
    message: Message = EmailMessage() if draw(st.booleans()) else Message()
    for name in ("From", "To", "Cc", "Bcc", "Subject", "X-Note"):
        if draw(st.booleans()):
            value = draw(ADDRESS if name not in ("Subject", "X-Note") else TEXT)
            with contextlib.suppress(Exception):  # the stdlib refuses some values itself
                message[name] = value
    try:
        if isinstance(message, EmailMessage):
            message.set_content(draw(BODY))
            if draw(st.booleans()):
                message.add_attachment(draw(st.binary(max_size=300)), "application", "x-y")
        else:
            message.set_payload(draw(BODY))
    except Exception:
        pass
    return message


INPUTS = st.one_of(emails(), raw_messages(), st.binary(max_size=500), email_messages())
ENVELOPES = mostly(
    st.just({}),
    st.fixed_dictionaries(
        {},
        optional={
            "envelope_from": st.one_of(st.sampled_from(["", "<>"]), ADDRESS),
            "envelope_to": st.lists(ADDRESS, max_size=3),
            "max_recipients": st.integers(1, 5),
        },
    ),
)
_CONTROL_IN_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ONCE = (b"date", b"from", b"sender", b"reply-to", b"to", b"cc", b"message-id", b"subject")


def check(message: Email | Message | bytes, options: dict[str, Any]) -> PreparedMessage | None:
    """The property: a typed error, or output that is safe to send (see module docstring)."""
    try:
        prepared = prepare(message, now=NOW, **options)
    except InvalidMessage:
        return None
    data = prepared.data
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    head = data[: data.find(b"\r\n\r\n")]
    assert _CONTROL_IN_HEAD.search(head) is None, "control character in the header section"
    assert not prepared.eightbit or not isinstance(message, Email), "a built message is 7-bit"
    assert prepared.smtputf8 or head.isascii()
    fields = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")]
    assert b"bcc" not in fields and b"resent-bcc" not in fields
    # RFC 5322 §3.6 allows one of each (Gmail refuses a message with two).
    assert all(fields.count(name) <= 1 for name in _ONCE), "a field allowed once is repeated"
    assert prepared.recipients and len(prepared.recipients) <= options.get("max_recipients", 1000)
    out = downgrade_to_7bit(data)
    assert b"\n" not in out.replace(b"\r\n", b"") and b"\r" not in out.replace(b"\r\n", b"")
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    if not prepared.smtputf8:
        assert out.isascii(), "the downgrade left 8-bit octets"
    return prepared


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(message=INPUTS, options=ENVELOPES)
def test_prepare_raises_only_typed_errors_and_outputs_safe_bytes(
    message: Email | Message | bytes, options: dict[str, Any]
) -> None:
    event("accepted" if check(message, options) is not None else "rejected")


@pytest.mark.parametrize(
    "payload", [chr(0xD800), "x" + chr(0xDBFF), "é" + chr(0xDCFF), chr(0xDC00)]
)
@pytest.mark.parametrize("cte", [None, "base64", "quoted-printable"])
def test_a_payload_the_stdlib_cannot_read_back_is_refused(payload: str, cte: str | None) -> None:
    """Found by the property above: a str body holding a lone surrogate that carries no
    octet (surrogateescape carries U+DC80-U+DCFF, and no other character beside it) made
    the stdlib's get_payload() raise UnicodeEncodeError from prepare()."""
    message = Message()
    message["From"], message["To"] = "a@example.com", "b@example.org"
    if cte is not None:
        message["Content-Transfer-Encoding"] = cte
    message.set_payload(payload)
    with pytest.raises(InvalidMessage, match="surrogate"):
        prepare(message, now=NOW)


def test_the_property_accepts_good_input_of_every_kind() -> None:
    """The property is not vacuous: sound input of each kind is accepted and checked."""
    stdlib = EmailMessage(policy=policy.default)
    stdlib["From"] = "a@example.com"
    stdlib["To"] = "b@example.org"
    stdlib.set_content("x")
    for message in (
        b"From: a@example.com\r\nTo: b@example.org\r\n\r\nx\r\n",
        Email(from_="a@example.com", to="b@example.org", subject="é"),
        stdlib,
    ):
        assert check(message, {}) is not None
