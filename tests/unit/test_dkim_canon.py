"""Relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4) and splitting a header section."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom.dkim.canon import relaxed_body, relaxed_header, split_fields


def test_the_rfc_example() -> None:
    # RFC 6376 §3.4.6, "relaxed" for both parts.
    assert relaxed_header(b"A: X\r\n") == b"a:X\r\n"
    assert relaxed_header(b"B : Y\t\r\n\tZ  \r\n") == b"b:Y Z\r\n"
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"Subject: Hello  there\r\n", b"subject:Hello there\r\n"),
        (b"SUBJECT:\t  x \t\r\n", b"subject:x\r\n"),
        (b"To: a@example.org,\r\n b@example.org\r\n", b"to:a@example.org, b@example.org\r\n"),
        (b"X-Empty:\r\n", b"x-empty:\r\n"),
        (b"Subject: no CRLF", b"subject:no CRLF\r\n"),
        # UTF-8 is octets (RFC 8616 §4); a no-break space is not WSP.
        (
            "Subject: Grüße\u00a0 aus  Köln\r\n".encode(),
            "subject:Grüße\u00a0 aus Köln\r\n".encode(),
        ),
    ],
)
def test_relaxed_header(raw: bytes, canonical: bytes) -> None:
    assert relaxed_header(raw) == canonical


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b"", b""),
        (b"\r\n", b""),
        (b"\r\n\r\n  \r\n\t\r\n", b""),
        (b"text", b"text\r\n"),
        (b"text  ", b"text\r\n"),
        (b"a\r\n \r\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\t\tb  c \r\n", b"a b c\r\n"),
        (b"  leading stays\r\n", b" leading stays\r\n"),
        (b"plain\r\nlines\r\n", b"plain\r\nlines\r\n"),
    ],
)
def test_relaxed_body(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical


def _reference_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 line by line, as written there."""
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


@given(st.lists(st.sampled_from([b" ", b"\t", b"a", b"\xc2\xa0", b"\r\n", b"  \t "]), max_size=40))
def test_relaxed_body_is_the_rfc_s_line_by_line(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert relaxed_body(body) == _reference_body(body)


@given(st.lists(st.sampled_from([b" ", b"\t", b"a", b"\r\n ", b"\r\n\t", b":"]), max_size=30))
def test_relaxed_header_reduces_every_run_of_white_space(pieces: list[bytes]) -> None:
    value = b"".join(pieces)
    expected = re.sub(rb"[ \t]+", b" ", value.replace(b"\r\n", b"")).strip(b" ")
    assert relaxed_header(b"X-A :" + value + b"\r\n") == b"x-a:" + expected + b"\r\n"


def test_split_fields_keeps_folding_and_lower_cases_names() -> None:
    head = b"From: a@example.com\r\nTo: b@example.org,\r\n\tc@example.org\r\nX-A : 1\r\n"
    assert split_fields(head) == [
        (b"from", b"From: a@example.com\r\n"),
        (b"to", b"To: b@example.org,\r\n\tc@example.org\r\n"),
        (b"x-a", b"X-A : 1\r\n"),
    ]


_NAME = st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z")
_TEXT = st.from_regex(rb"\A[ -~]{0,30}\Z").map(lambda text: text.replace(b":", b""))
_CONTINUATION = st.tuples(st.sampled_from([b" ", b"\t"]), _TEXT).map(b"".join)


@given(st.lists(st.tuples(_NAME, _TEXT, st.lists(_CONTINUATION, max_size=5)), max_size=8))
def test_split_fields_gives_each_field_back_whole(
    fields: list[tuple[bytes, bytes, list[bytes]]],
) -> None:
    raws = [
        b"\r\n".join([name + b":" + value, *continuations]) + b"\r\n"
        for name, value, continuations in fields
    ]
    assert split_fields(b"".join(raws)) == [
        (name.lower(), raw) for (name, _, _), raw in zip(fields, raws, strict=True)
    ]
