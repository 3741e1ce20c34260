"""verify_signature() reads a header whoever sent the request wrote: it answers True or
False, whatever the header holds."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.stores.base import RecipientResult
from mailstrom.webhooks import _digest, encode_events, sign, verify_signature

SECRET = "whsec"
BODY = b'{"events":[]}'
NOW = 1_700_000_000


def test_a_signature_made_by_sign_verifies() -> None:
    assert verify_signature(SECRET, sign(SECRET, BODY, timestamp=NOW), BODY, now=NOW)
    header = f"t={NOW}, \tv1={_digest(SECRET, NOW, BODY)}"  # HTTP's own white space
    assert verify_signature(SECRET, header, BODY, now=NOW)


@pytest.mark.parametrize(
    "timestamp",
    [
        "\u00b2",  # SUPERSCRIPT TWO: isdigit(), yet int() raised ValueError
        "1\u00b2",
        "9" * 5000,  # past int()'s 4,300 digits: ValueError
        "9" * 400,  # an int, but none a float can hold: OverflowError against the clock
    ],
)
def test_a_timestamp_int_cannot_read_is_no_signature(timestamp: str) -> None:
    header = f"t={timestamp},v1={_digest(SECRET, NOW, BODY)}"
    # A float, as the clock gives it: float minus a 400-digit int overflows.
    assert verify_signature(SECRET, header, BODY, now=float(NOW)) is False


def _in_digits(number: int, zero: int) -> str:
    """``number`` written in the digits of the script whose zero is code point ``zero``."""
    return "".join(chr(zero + int(d)) for d in str(number))


@pytest.mark.parametrize("zero", [0x0660, 0xFF10, 0x0966])  # Arabic-Indic, fullwidth, Devanagari
def test_a_timestamp_in_other_digits_is_no_signature(zero: int) -> None:
    """int() reads other scripts' digits: the signature over "1700000000" verified under a
    t= that shows as something else."""
    header = f"t={_in_digits(NOW, zero)},v1={_digest(SECRET, NOW, BODY)}"
    assert verify_signature(SECRET, header, BODY, now=NOW) is False


@pytest.mark.parametrize("space", ["\u00a0", "\u3000"])
def test_only_http_white_space_surrounds_a_part(space: str) -> None:
    header = f"t={NOW},{space}v1={_digest(SECRET, NOW, BODY)}"
    assert verify_signature(SECRET, header, BODY, now=NOW) is False


def test_a_request_without_the_header_is_no_signature() -> None:
    """A receiver passes ``request.headers.get("Mailstrom-Signature")``: None for a request
    without the header, which raised AttributeError."""
    assert verify_signature(SECRET, None, BODY, now=NOW) is False


def test_a_signature_that_is_not_ascii_is_no_signature() -> None:
    """hmac.compare_digest() raised TypeError for a str with a non-ASCII character."""
    header = f"t={NOW},v1=\u00e9,v1={_digest(SECRET, NOW, BODY)}"
    assert verify_signature(SECRET, header, BODY, now=NOW) is True
    assert verify_signature(SECRET, f"t={NOW},v1=\u00e9", BODY, now=NOW) is False


def test_an_event_whose_text_is_not_utf8_still_makes_a_body(tmp_path: Path) -> None:
    """SQLite reads text that is not UTF-8 (a row written by another tool) with a lone
    surrogate per octet, which passed the store's type checks: encoding the hook body
    then raised UnicodeEncodeError, the batch stayed leased, and as the outbox goes
    oldest first no later event was ever sent. The octet is U+FFFD in the body now."""
    path = tmp_path / "queue.db"
    store = SQLiteStore(path)
    try:
        store.enable_events()
        now = datetime.now(UTC)
        store.enqueue(
            PreparedMessage(
                data=b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n",
                envelope_from="a@example.com",
                recipients=("bob@example.org",),
            ),
            now=now,
        )
        lease = store.lease(now=now, limit=1, lease_for=timedelta(minutes=5))
        assert lease is not None
        [item] = lease.items
        [recipient] = item.recipients
        attempt = Attempt(at=now, outcome=AttemptOutcome.TEMPORARY, error="try later")
        store.record(
            [
                RecipientResult(
                    message_id=item.message_id,
                    address=recipient.address,
                    state=RecipientState.DEFERRED,
                    attempt=attempt,
                    lease_token=item.lease_token,
                    ref=recipient.ref,
                    next_attempt_at=now + timedelta(minutes=10),
                )
            ]
        )
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("UPDATE events SET error = CAST(X'6f6bff21' AS TEXT)")
        finally:
            conn.close()
        batch = store.lease_events(now=now, limit=10, lease_for=timedelta(minutes=1))
        assert batch is not None
    finally:
        store.close()
    body = encode_events(batch.events)
    [event] = json.loads(body.decode("utf-8"))["events"]
    assert event["error"] == "ok\ufffd!"
    assert event["recipient"] == "bob@example.org"


def test_an_empty_secret_verifies_nothing() -> None:
    """HookConfig refuses an empty secret, so no worker signs with one: a receiver whose
    secret is empty (an unset environment variable read as "") accepted any request
    signed with the empty key, which anybody can compute."""
    forged = sign("", BODY, timestamp=NOW)
    with pytest.raises(ValueError, match="secret"):
        verify_signature("", forged, BODY, now=NOW)


def test_a_raw_header_in_bytes_is_read_as_ascii() -> None:
    """Raw ASGI (and some WSGI) headers are bytes: ``header.split(",")`` raised TypeError."""
    header = sign(SECRET, BODY, timestamp=NOW)
    assert verify_signature(SECRET, header.encode(), BODY, now=NOW) is True
    assert verify_signature("other-secret", header.encode(), BODY, now=NOW) is False
    assert verify_signature(SECRET, header.encode() + b"\xe9", BODY, now=NOW) is False
    assert verify_signature(SECRET, b"t=\xff,v1=\x00", BODY, now=NOW) is False


@pytest.mark.parametrize("raw", [False, True])
def test_a_header_past_the_bound_is_no_signature_whatever_it_holds(raw: bool) -> None:
    """Whoever sends the request chooses the header: a megabyte of ``v1=`` values cost a
    comparison each. Past MAX_HEADER characters it is not read at all, so a valid
    signature hidden at its end does not verify."""
    good = sign(SECRET, BODY, timestamp=NOW)
    header = ",".join(["v1=" + "f" * 64] * 20_000 + [good])
    assert verify_signature(SECRET, header.encode() if raw else header, BODY, now=NOW) is False
    assert verify_signature(SECRET, "t=" + "9" * 10**6, BODY, now=NOW) is False


@pytest.mark.parametrize(
    "header",
    [
        f"t={NOW},v1=not-hex-at-all",
        f"t={NOW},v1=",
        f"t={NOW},v1={'z' * 64}",
        f"t={NOW}," + ",".join(["v1=x"] * 500),
        f"t={NOW},v1={'0' * 3000}",
        ",,,===,t,v1",
        "",
    ],
)
def test_a_malformed_header_is_false_and_never_raises(header: str) -> None:
    assert verify_signature(SECRET, header, BODY, now=NOW) is False
    assert verify_signature(SECRET, header.encode(), BODY, now=NOW) is False
