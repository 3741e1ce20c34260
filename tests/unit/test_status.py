from datetime import UTC, datetime

import pytest

from mailstrom import Config, Email, Mailstrom
from mailstrom.status import MessageStatus, RecipientState, RecipientStatus, derive_message_state

Q, D, OK, F = (
    RecipientState.QUEUED,
    RecipientState.DEFERRED,
    RecipientState.DELIVERED,
    RecipientState.FAILED,
)


def test_pending_recipients_keep_message_open() -> None:
    assert derive_message_state([OK, Q]) is Q
    assert derive_message_state([OK, D, Q]) is D


def test_all_final() -> None:
    assert derive_message_state([OK, OK]) is OK
    assert derive_message_state([OK, F]) is F


def test_states_are_stored_strings() -> None:
    assert [s.value for s in RecipientState] == ["queued", "deferred", "delivered", "failed"]


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("bob@Exämple.org", "bob@xn--exmple-cua.org"),
        ("bob@straße.example", "bob@xn--strae-oqa.example"),
    ],
)
def test_a_recipient_is_found_by_the_domain_it_was_sent_to(written: str, stored: str) -> None:
    # The envelope holds the domain as an A-label: looking up the address the message was
    # sent to raised KeyError.
    with Mailstrom(Config(helo_name="mail.example.com"), store="memory:", worker=None) as ms:
        email = Email(from_="app@example.com", to=[written], subject="Hi", text="x")
        status = ms.query_status(ms.send_email(email))
    assert [r.address for r in status.recipients] == [stored]
    assert status.recipient(written) is status.recipient(stored) is status.recipients[0]


def test_idna_2008_is_how_a_looked_up_domain_is_converted() -> None:
    # Python's "idna" codec (IDNA 2003) maps ß to ss: another domain, not this recipient.
    status = MessageStatus(
        id="m1",
        state=Q,
        envelope_from="app@example.com",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        size=1,
        recipients=(RecipientStatus(address="bob@xn--strae-oqa.example", state=Q),),
    )
    assert status.recipient("bob@STRAßE.example") is status.recipients[0]
    with pytest.raises(KeyError):
        status.recipient("bob@strasse.example")
    with pytest.raises(KeyError):
        status.recipient("bob@exa mple.örg")  # no domain at all: compared as written


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("Jo\u0308rg@bücher.example", "J\u00f6rg@xn--bcher-kva.example"),  # decomposed: NFC
        ("Postmaster@example.org", "postmaster@example.org"),  # a role name: lower case
        ('"jörg"@example.org', "jörg@example.org"),  # needless quotes: dropped
    ],
)
def test_a_recipient_is_found_by_the_local_part_it_was_sent_to(written: str, stored: str) -> None:
    # The envelope holds the local part as validation normalises it (NFC, a role name in
    # lower case, quotes dropped); looking up the address as sent raised KeyError.
    with Mailstrom(Config(helo_name="mail.example.com"), store="memory:", worker=None) as ms:
        email = Email(from_="app@example.com", to=[written], subject="Hi", text="x")
        status = ms.query_status(ms.send_email(email))
    assert [r.address for r in status.recipients] == [stored]
    assert status.recipient(written) is status.recipient(stored) is status.recipients[0]


@pytest.mark.parametrize("address", [None, 5, b"bob@example.org", ["bob@example.org"]])
def test_looking_up_what_is_no_address_is_a_key_error(address: object) -> None:
    # What is no string names no recipient: it raised an AttributeError ("'NoneType'
    # object has no attribute 'rpartition'") or a TypeError (bytes), where the lookup of
    # an address not among the recipients raises KeyError.
    status = MessageStatus(
        id="m1",
        state=Q,
        envelope_from="app@example.com",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        size=1,
        recipients=(RecipientStatus(address="bob@example.org", state=Q),),
    )
    with pytest.raises(KeyError):
        status.recipient(address)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    ["bob@bücher.example", '"ann"@example.org', "Postmaster@example.net", "cy@Example.COM"],
)
def test_a_recipient_queued_as_written_is_found_as_written(address: str) -> None:
    # A message handed to a store by hand keeps its recipients as written: the lookup put
    # only the address asked for into the stored form, so the very address the message
    # named (a U-label domain, a quoted local part, a role name's case) raised KeyError.
    others = ("dan@example.org", "eve@xn--bcher-kva.example")
    status = MessageStatus(
        id="m1",
        state=Q,
        envelope_from="app@example.com",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        size=1,
        recipients=tuple(RecipientStatus(address=a, state=Q) for a in (*others, address)),
    )
    assert status.recipient(address) is status.recipients[-1]
    assert status.recipient("eve@bücher.example") is status.recipients[1]
    with pytest.raises(KeyError):
        status.recipient("bob@xn--bcher-kva.example.org")
