"""The dispatcher looks at every reply of a transaction for a throttling one, in the
order they came."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from mailstrom.policy.throttle import is_throttling
from mailstrom.runtime.dispatch import _replies, needs_smtputf8
from mailstrom.runtime.transactions import TransactionResult
from mailstrom.status import SMTPReply
from mailstrom.stores.base import LeasedRecipient, WorkItem

NOW = datetime(2026, 1, 5, tzinfo=UTC)

_REPLIES = st.builds(
    SMTPReply,
    code=st.sampled_from([250, 354, 421, 450, 451, 452, 550, 554]),
    text=st.sampled_from(["ok", "rate limited, slow down", "try again later"]),
    enhanced=st.sampled_from([None, "2.0.0", "4.7.28", "4.7.650", "4.3.2", "5.1.1"]),
)
_MAYBE = st.none() | _REPLIES


@given(
    _MAYBE,
    st.lists(st.tuples(st.sampled_from(["a@x.test", "b@x.test"]), _REPLIES), max_size=3),
    _MAYBE,
    _MAYBE,
)
def test_every_reply_is_looked_at_in_order(
    mail: SMTPReply | None,
    rcpt: list[tuple[str, SMTPReply]],
    data: SMTPReply | None,
    final: SMTPReply | None,
) -> None:
    result = TransactionResult(mail=mail, rcpt=tuple(rcpt), data=data, final=final)
    replies = [mail, *(reply for _, reply in rcpt), data, final]
    assert list(_replies(result)) == replies
    assert any(is_throttling(r) for r in _replies(result)) == any(
        r is not None and r.code in (421, 451) and is_throttling(r) for r in replies
    )


def _marked(data: bytes, *, sender: str = "app@example.com") -> WorkItem:
    """A transaction to an ASCII recipient of a message marked SMTPUTF8 by another's."""
    recipient = LeasedRecipient(
        address="ann@example.org", attempts=0, first_attempt_at=None, created_at=NOW
    )
    return WorkItem(
        message_id="m1",
        lease_token="t1",
        domain="example.org",
        envelope_from=sender,
        recipients=(recipient,),
        data=data,
        smtputf8=True,
        eightbit=not data.isascii(),
    )


_HEAD = b"From: a@example.com\r\nMIME-Version: 1.0\r\n"


def test_an_8bit_body_alone_does_not_need_smtputf8() -> None:
    # It needs 8BITMIME (or the 7-bit downgrade); with a UTF-8 address in another
    # transaction, these recipients failed at a server without SMTPUTF8.
    body = _HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    assert needs_smtputf8(_marked(body)) is False
    assert needs_smtputf8(_marked(b"Subject: x\r\n\r\nx\r\n")) is False


def test_utf8_header_fields_or_addresses_need_smtputf8() -> None:
    assert needs_smtputf8(_marked(_HEAD + "Subject: Grüße\r\n\r\nx\r\n".encode())) is True
    part = "--b\r\nContent-Type: text/plain; name=Grüße.txt\r\n\r\nx\r\n--b--\r\n".encode()
    multipart = _HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + part
    assert needs_smtputf8(_marked(multipart)) is True
    assert needs_smtputf8(_marked(b"Subject: x\r\n\r\nx\r\n", sender="jos\u00e9@example.com"))


def _multipart(part: bytes, content_type: bytes = b'multipart/mixed; boundary="b"') -> bytes:
    return _HEAD + b"Content-Type: " + content_type + b"\r\n\r\n--b\r\n" + part + b"\r\n--b--\r\n"


def test_a_part_refused_today_is_read_not_judged_for_smtputf8() -> None:
    """A stored message is read for 8-bit header octets only: a line of only white space
    in a part's header section (refused by prepare() since, not by older versions) made
    the check fail, and the failure was taken for a UTF-8 header."""
    white = b"Content-Type: text/plain; charset=utf-8\r\n \r\nX-A: b\r\n\r\nGr\xc3\xbc\xc3\x9fe"
    assert needs_smtputf8(_marked(_multipart(white))) is False
    assert needs_smtputf8(_marked(_multipart(white.replace(b"X-A: b", b"X-A: \xc3\xbc"))))


def test_where_readers_differ_on_a_part_header_its_8bit_octets_count() -> None:
    """Structure readers take differently (which check_structure refuses, so prepare()
    never queues it today) keeps the SMTPUTF8 mark if its body has 8-bit octets: they may
    be in a part's header section to the receiver."""
    text = b"Content-Type: text/plain\r\n\r\nGr\xc3\xbc\xc3\x9fe"
    repeated = _multipart(text).replace(b"MIME-Version", b"Content-Type: text/plain\r\nMIME")
    unread = _multipart(text, b"multipart/mixed; (c) boundary=b")
    first = _multipart(b" x\r\nContent-Type: text/plain\r\n\r\nGr\xc3\xbc\xc3\x9fe")
    for data in (repeated, unread, first):
        assert needs_smtputf8(_marked(data)) is True
