"""An address whose domain ends in an all-digit label names no host: refused at submission.

No top-level domain is all digits (RFC 1123 §2.1, RFC 3696 §2), so ``bob@192.0.2.1`` (an
IP address written bare) or ``bob@example.123`` can never be delivered; an IP address is
written as an address literal, ``bob@[192.0.2.1]`` (RFC 5321 §4.1.3).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mailstrom import Email
from mailstrom.errors import InvalidAddress
from mailstrom.message import prepare
from mailstrom.message.addrspec import validate_address

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("role", ["to", "cc", "bcc", "from_", "envelope_to", "envelope_from"])
def test_an_ip_address_written_bare_is_refused_and_the_literal_named(role: str) -> None:
    fields: dict[str, Any] = {"from_": "app@sender.test", "to": ["ann@example.org"]}
    kwargs: dict[str, Any] = {}
    if role == "envelope_to":
        kwargs["envelope_to"] = ["bob@192.0.2.1"]
    elif role == "envelope_from":
        kwargs["envelope_from"] = "bob@192.0.2.1"
    else:
        fields[role] = "bob@192.0.2.1" if role == "from_" else ["bob@192.0.2.1"]
    # Was accepted and queued; the worker then looked "192.0.2.1." up as a domain name and
    # failed it with "domain 192.0.2.1 does not exist (NXDOMAIN)".
    with pytest.raises(InvalidAddress, match=r"bob@\[192\.0\.2\.1\]") as caught:
        prepare(Email(subject="Hi", text="Hello", **fields), now=NOW, **kwargs)
    assert caught.value.address == "bob@192.0.2.1"


@pytest.mark.parametrize("address", ["bob@example.123", "bob@123", "bob@a.b.c.2026"])
def test_a_domain_ending_in_an_all_digit_label_is_refused(address: str) -> None:
    with pytest.raises(InvalidAddress, match="all digits"):
        validate_address(address)
    raw = f"From: app@sender.test\r\nTo: {address}\r\nSubject: Hi\r\n\r\nHello\r\n".encode()
    with pytest.raises(InvalidAddress, match="all digits"):
        prepare(raw, now=NOW)


@pytest.mark.parametrize(
    ("address", "envelope"),
    [
        ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
        ("bob@123.example", "bob@123.example"),
        ("bob@mx1.example.org", "bob@mx1.example.org"),
        ("bob@example.xn--p1ai", "bob@example.xn--p1ai"),
        ("bob@bücher.example", "bob@xn--bcher-kva.example"),
    ],
)
def test_digits_elsewhere_and_address_literals_still_pass(address: str, envelope: str) -> None:
    assert validate_address(address).envelope == envelope
