"""The DKIM outcome a message's status carries: what prepare() decides, the DKIMStatus
value, and the bounded column text the SQL stores write."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from tests.support.dkim import dual

from mailstrom import DKIMAlgorithm, DKIMSignature, DKIMStatus
from mailstrom.message import Email, prepare
from mailstrom.message.preparation import MAX_REASON_DOMAINS, unsigned_reason
from mailstrom.stores.dkim_column import (
    MAX_DKIM_REASON,
    MAX_DKIM_SIGNATURES,
    bounded_dkim,
    dkim_from_column,
    dkim_to_column,
)

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
DKIM = dual("example.com")
RSA = DKIMSignature(domain="example.com", selector="rsa", algorithm=DKIMAlgorithm.RSA_SHA256)
ED = DKIMSignature(domain="example.com", selector="ed", algorithm=DKIMAlgorithm.ED25519_SHA256)


def email(from_: str) -> Email:
    return Email(from_=from_, to="bob@example.org", text="Hello\n")


def test_prepare_says_signed_unsigned_or_nothing() -> None:
    signed = prepare(email("a@news.example.com"), now=NOW, dkim=DKIM)
    assert signed.dkim_status == DKIMStatus(signatures=(RSA, ED))
    assert signed.dkim_unsigned is None
    unsigned = prepare(email("a@example.net"), now=NOW, dkim=DKIM)
    assert unsigned.dkim_status == DKIMStatus(reason="no DKIM key for the From domain example.net")
    assert prepare(email("a@example.net"), now=NOW).dkim_status is None


def test_reason_names_every_from_domain_up_to_a_bound() -> None:
    several = prepare(
        Email(from_="a@one.test, b@two.test", sender="a@one.test", to="c@x.test", text="x"),
        dkim=DKIM,
    )
    assert several.dkim_unsigned == "no DKIM key for the From domains one.test, two.test"
    many = [f"d{i}.test" for i in range(MAX_REASON_DOMAINS + 3)]
    assert unsigned_reason(many).endswith(f"d{MAX_REASON_DOMAINS - 1}.test and 3 more")
    group = prepare(
        b"From: Team:;\r\nSender: desk@example.org\r\nTo: b@example.org\r\n\r\nx\r\n", dkim=DKIM
    )
    assert group.dkim_unsigned == "no From address to align a DKIM key with (From is a group)"


def test_status_is_signed_or_unsigned_never_both_or_neither() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DKIMStatus()
    with pytest.raises(ValueError, match="exactly one"):
        DKIMStatus(signatures=(RSA,), reason="why")
    assert DKIMStatus(signatures=(RSA, ED)).signed
    assert str(DKIMStatus(signatures=(RSA, ED))) == (
        "signed: example.com (rsa, rsa-sha256), example.com (ed, ed25519-sha256)"
    )
    assert str(DKIMStatus(reason="no key")) == "unsigned: no key"


@pytest.mark.parametrize(
    "status",
    [
        None,
        DKIMStatus(signatures=(RSA,)),
        DKIMStatus(signatures=(RSA, ED)),
        DKIMStatus(reason="no DKIM key for the From domain bücher.example"),
    ],
)
def test_column_round_trips(status: DKIMStatus | None) -> None:
    assert dkim_from_column(dkim_to_column(status)) == status


def test_column_is_compact_json() -> None:
    assert json.loads(dkim_to_column(DKIMStatus(signatures=(RSA,))) or "") == {
        "signed": [["example.com", "rsa", "rsa-sha256"]]
    }
    assert dkim_to_column(DKIMStatus(reason="r")) == '{"unsigned":"r"}'
    assert dkim_to_column(None) is None


def test_bounds() -> None:
    long = DKIMStatus(reason="ü" * MAX_DKIM_REASON)
    cut = bounded_dkim(long)
    assert cut is not None and cut.reason is not None
    assert cut.reason == "ü" * (MAX_DKIM_REASON // 2)  # two octets each
    short = DKIMStatus(reason="short")
    assert bounded_dkim(short) is short
    many = DKIMStatus(signatures=(RSA,) * (MAX_DKIM_SIGNATURES + 1))
    assert bounded_dkim(many) == DKIMStatus(signatures=(RSA,) * MAX_DKIM_SIGNATURES)
    text = dkim_to_column(many)
    assert text is not None and len(json.loads(text)["signed"]) == MAX_DKIM_SIGNATURES


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "5",
        "[]",
        '"unsigned"',
        "{}",
        '{"signed": []}',
        '{"signed": "x"}',
        '{"signed": [["d", "s"]]}',
        '{"signed": [[1, "s", "rsa-sha256"]]}',
        '{"signed": [["d", "s", "rsa-sha1"]]}',
        '{"unsigned": null}',
        '{"unsigned": ["x"]}',
    ],
)
def test_unreadable_column_reads_as_unknown(text: str) -> None:
    assert dkim_from_column(text) is None
