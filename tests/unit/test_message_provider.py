"""Headers mailbox providers require of bulk senders: List-Unsubscribe with one-click
unsubscription (RFC 2369, RFC 8058), Feedback-ID, Auto-Submitted (RFC 3834)."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from mailstrom.errors import (
    ForbiddenCharacter,
    HeaderInjection,
    HeaderTooLong,
    InvalidHeaderValue,
    InvalidMessage,
)
from mailstrom.message import Email, prepare

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def headers(**fields: object) -> EmailMessage:
    email = Email(from_="shop@example.com", to="bob@example.org", text="x", **fields)  # type: ignore[arg-type]
    message = message_from_bytes(prepare(email, now=NOW).data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


# --- List-Unsubscribe --------------------------------------------------------------------


def test_one_click_url_and_mailto_in_one_field() -> None:
    m = headers(unsubscribe_url="https://example.com/u?id=42", unsubscribe_mailto="u@example.com")
    assert m.get_all("List-Unsubscribe") == [
        "<https://example.com/u?id=42>, <mailto:u@example.com>"
    ]
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_mailto_alone_has_no_one_click() -> None:
    m = headers(unsubscribe_mailto="mailto:u@example.com?subject=stop%20it")
    assert m["List-Unsubscribe"] == "<mailto:u@example.com?subject=stop%20it>"
    assert m["List-Unsubscribe-Post"] is None


def test_url_alone() -> None:
    m = headers(unsubscribe_url="HTTPS://example.com/u")
    assert m["List-Unsubscribe"] == "<HTTPS://example.com/u>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_mailto_address_domain_becomes_an_a_label() -> None:
    assert headers(unsubscribe_mailto="Stop@Bücher.example")["List-Unsubscribe"] == (
        "<mailto:Stop@xn--bcher-kva.example>"
    )


@pytest.mark.parametrize(
    ("address", "uri"),
    [
        ("stop?list=a@example.com", "mailto:stop%3Flist=a@example.com"),
        ("stop#1@example.com", "mailto:stop%231@example.com"),
        ("100%off@example.com", "mailto:100%25off@example.com"),
        ("{stop}|^`@example.com", "mailto:%7Bstop%7D%7C%5E%60@example.com"),
        ("bounce+bob=example.org@example.com", "mailto:bounce+bob=example.org@example.com"),
        # RFC 6068 §2: "/" is a gen-delim, which MUST be percent-encoded (it was left).
        ("~a/b@example.com", "mailto:~a%2Fb@example.com"),
    ],
)
def test_a_mailto_address_is_percent_encoded_where_a_uri_needs_it(address: str, uri: str) -> None:
    """An address given as ``unsubscribe_mailto`` was written after "mailto:" as it is: a
    "?" in its local part started the URI's header fields and a "#" its fragment, so the
    URI named another address ("stop"), and the unsubscribe mail went nowhere; "%" read
    as an escape, and "{" or "|" (atext, RFC 5322 §3.2.3) made the valid address refused
    as "not a valid URI". Such characters are percent-encoded (RFC 6068 §2) now; the
    others are left as they are, since some clients do not decode the address."""
    assert headers(unsubscribe_mailto=address)["List-Unsubscribe"] == f"<{uri}>"
    assert urllib.parse.unquote(uri.removeprefix("mailto:")) == address


@pytest.mark.parametrize(
    ("address", "uri"),
    [
        ("unsub@[192.0.2.1]", "mailto:unsub@%5B192.0.2.1%5D"),
        ("unsub@[IPv6:2001:db8::1]", "mailto:unsub@%5BIPv6:2001:db8::1%5D"),
    ],
)
def test_a_mailto_domain_literal_has_its_brackets_percent_encoded(address: str, uri: str) -> None:
    """RFC 6068 §2: "[" and "]" (gen-delims, like "/", "?" and "#") MUST be
    percent-encoded in a mailto URI's addr-spec; a domain literal kept its brackets."""
    assert headers(unsubscribe_mailto=address)["List-Unsubscribe"] == f"<{uri}>"
    assert urllib.parse.unquote(uri.removeprefix("mailto:")) == address


def test_long_urls_are_folded_between_uris_never_inside() -> None:
    url = "https://example.com/unsubscribe?token=" + "a1" * 300
    data = prepare(
        Email(
            from_="a@example.com",
            to="b@example.org",
            text="x",
            unsubscribe_url=url,
            unsubscribe_mailto="u@example.com",
        ),
        now=NOW,
    ).data
    assert f"List-Unsubscribe: <{url}>,\r\n <mailto:u@example.com>\r\n".encode() in data


def test_unused_fields_change_nothing() -> None:
    plain = Email(from_="a@example.com", to="b@example.org", text="x", message_id="<i@example.com>")
    assert b"List-" not in prepare(plain, now=NOW).data
    assert b"Feedback-ID" not in prepare(plain, now=NOW).data


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/u",  # one-click is an HTTPS POST (RFC 8058 §3.1)
        "mailto:u@example.com",
        "ftp://example.com/u",
        "https:///nohost",
        "https://example.com/a b",
        "https://example.com/<x>",
        'https://example.com/"x"',
        "https://example.com/%zz",
        "https://bücher.example/u",
        "javascript:alert(1)",
        "",
        "   ",
    ],
)
def test_bad_unsubscribe_urls(url: str) -> None:
    with pytest.raises(InvalidHeaderValue) as caught:
        headers(unsubscribe_url=url)
    assert caught.value.header == "List-Unsubscribe"


@pytest.mark.parametrize(
    "url",
    ["https://[::1/u", "https://example.com]/u", "https://example.com:99999/u", "https://a:x/u"],
)
def test_an_unsubscribe_url_the_url_parser_cannot_read_is_refused_as_invalid(url: str) -> None:
    """A bracket without its pair made ``urlsplit`` raise a plain ValueError ("Invalid
    IPv6 URL") out of ``prepare()``, not the InvalidMessage it promises; a port that is
    no number from 0 to 65535 was sent, a link no client can follow."""
    with pytest.raises(InvalidHeaderValue, match="not a valid URL") as caught:
        headers(unsubscribe_url=url)
    assert caught.value.header == "List-Unsubscribe"
    assert "List-Unsubscribe" in headers(unsubscribe_url="https://[2001:db8::1]:8443/u")


@pytest.mark.parametrize(
    "mailto",
    [
        "not an address",
        "mailto:",
        "mailto:a@example.com,b@example.com",
        "mailto:a b@example.com",
        "zoë@example.com",  # a UTF-8 local part must be percent-encoded in a URI
        "https://example.com/u",
    ],
)
def test_bad_unsubscribe_mailtos(mailto: str) -> None:
    with pytest.raises(InvalidHeaderValue):
        headers(unsubscribe_mailto=mailto)


def test_line_breaks_and_controls_are_refused() -> None:
    with pytest.raises(HeaderInjection):
        headers(unsubscribe_url="https://example.com/u\r\nBcc: victim@example.org")
    with pytest.raises(HeaderInjection):
        headers(unsubscribe_mailto="u@example.com\n")
    with pytest.raises(ForbiddenCharacter):
        headers(unsubscribe_url="https://example.com/\x00")
    with pytest.raises(HeaderInjection):
        headers(feedback_id="a:b\r\nX: y")
    with pytest.raises(ForbiddenCharacter):
        headers(auto_submitted="auto-generated\x0b")


def test_length_limits() -> None:
    with pytest.raises(HeaderTooLong) as caught:
        headers(unsubscribe_url="https://example.com/" + "a" * 900)
    assert caught.value.limit == 900
    with pytest.raises(HeaderTooLong):
        headers(feedback_id="a" * 257)


def test_a_field_and_the_same_header_in_headers_conflict() -> None:
    with pytest.raises(InvalidMessage, match="unsubscribe_url"):
        headers(unsubscribe_url="https://example.com/u", headers={"List-Unsubscribe": "<x>"})
    with pytest.raises(InvalidMessage, match="auto_submitted"):
        headers(auto_submitted="auto-replied", headers={"Auto-Submitted": "no"})
    # Without the field, headers= still sets them as it always did.
    assert headers(headers={"Auto-Submitted": "no"})["Auto-Submitted"] == "no"


# --- Feedback-ID and Auto-Submitted ------------------------------------------------------


def test_feedback_id() -> None:
    assert headers(feedback_id="spring:c42:newsletter:shop")["Feedback-ID"] == (
        "spring:c42:newsletter:shop"
    )
    for bad in ("two words", "", "é:x"):
        with pytest.raises(InvalidHeaderValue) as caught:
            headers(feedback_id=bad)
        assert caught.value.header == "Feedback-ID"


@pytest.mark.parametrize("value", ["auto-generated", "Auto-Replied", "auto-notified"])
def test_auto_submitted(value: str) -> None:
    assert headers(auto_submitted=value)["Auto-Submitted"] == value.lower()


@pytest.mark.parametrize("value", ["yes", "no", "auto-generated; x=y", "auto"])
def test_bad_auto_submitted(value: str) -> None:
    with pytest.raises(InvalidHeaderValue, match="RFC 3834"):
        headers(auto_submitted=value)


def test_non_strings_are_refused() -> None:
    with pytest.raises(InvalidHeaderValue, match="must be a str"):
        headers(feedback_id=42)
