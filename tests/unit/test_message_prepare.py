"""prepare(): envelope rules, header rewriting and every validation error."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage, Message

import pytest

from mailstrom.errors import (
    HeaderInjection,
    InvalidAddress,
    InvalidHeaderValue,
    InvalidMessage,
    LineTooLong,
    MessageTooLarge,
    MissingFrom,
    MultipleFromWithoutSender,
    NoRecipients,
    UnencodableHeader,
)
from mailstrom.message import Attachment, Email, preparation, prepare
from mailstrom.message.addresses import mailboxes, parse_address_list

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def raw(*lines: str, body: str = "body\r\n") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


# --- envelope sender ---------------------------------------------------------------------


def test_envelope_sender_is_from_addr_spec_without_display_name() -> None:
    p = prepare(Email(from_="App <App@Example.COM>", to="bob@example.org"), now=NOW)
    assert p.envelope_from == "App@example.com"


def test_envelope_sender_prefers_sender_header_over_from() -> None:
    email = Email(
        from_=["Ann <ann@example.com>", "Bo <bo@example.com>"],
        sender="Desk <desk@example.net>",
        to="c@example.org",
    )
    p = prepare(email, now=NOW)
    assert p.envelope_from == "desk@example.net"
    assert parsed(p.data)["Sender"] == "Desk <desk@example.net>"
    assert parsed(p.data)["From"] == "Ann <ann@example.com>, Bo <bo@example.com>"


@pytest.mark.parametrize(
    "sender",
    ["app@example.com", "Application <app@EXAMPLE.com>", "  app@Example.Com  "],
)
def test_a_sender_that_is_the_one_from_mailbox_is_not_written(sender: str) -> None:
    """RFC 5322 §3.6.2: Sender SHOULD NOT be used when it would be identical to From.
    The builder wrote it anyway; the same mailbox (the domain in any case, a display
    name or none) is left out now, and the envelope is what it was."""
    email = Email(from_="App <app@example.com>", sender=sender, to="b@example.org")
    p = prepare(email, now=NOW)
    assert "Sender" not in parsed(p.data)
    assert p.envelope_from == "app@example.com"


@pytest.mark.parametrize(
    ("from_", "sender"),
    [
        ("App <app@example.com>", "App@example.com"),  # a local part is compared exactly
        ("App <app@example.com>", "desk@example.com"),
        (["app@example.com", "b@example.com"], "app@example.com"),  # several authors
        ("Team: app@example.com;", "app@example.com"),  # a group
    ],
)
def test_a_sender_other_than_the_one_from_mailbox_is_written(
    from_: str | list[str], sender: str
) -> None:
    p = prepare(Email(from_=from_, sender=sender, to="b@example.org"), now=NOW)
    assert parsed(p.data)["Sender"] == sender
    assert p.envelope_from == sender


def test_explicit_envelope_from_wins_and_loses_display_name() -> None:
    email = Email(from_="a@example.com", to="b@example.org")
    assert prepare(email, envelope_from="Bounce <bounce@example.net>").envelope_from == (
        "bounce@example.net"
    )


@pytest.mark.parametrize("null", ["", "<>"])
def test_null_reverse_path(null: str) -> None:
    p = prepare(Email(from_="a@example.com", to="b@example.org"), envelope_from=null)
    assert p.envelope_from == ""


def test_invalid_explicit_envelope_from() -> None:
    with pytest.raises(InvalidAddress) as info:
        prepare(Email(from_="a@example.com", to="b@example.org"), envelope_from="nope")
    assert info.value.address == "nope"
    assert "nope" in info.value.reason


# --- recipients --------------------------------------------------------------------------


def test_recipients_are_to_cc_bcc_deduplicated_in_order() -> None:
    email = Email(
        from_="a@example.com",
        to=["X <x@Example.org>", "y@example.org"],
        cc=["x@EXAMPLE.ORG", "X@example.org"],
        bcc=["y@example.org", "z@example.net"],
    )
    p = prepare(email, now=NOW)
    # Domain compared case-insensitively and stored lower-case; local part exactly.
    assert p.recipients == ("x@example.org", "y@example.org", "X@example.org", "z@example.net")


def test_explicit_envelope_to_replaces_headers() -> None:
    email = Email(from_="a@example.com", to="b@example.org")
    p = prepare(email, envelope_to=["c@Example.net", "c@example.NET", "d@example.net"])
    assert p.recipients == ("c@example.net", "d@example.net")
    assert parsed(p.data)["To"] == "b@example.org"


def test_bcc_is_in_envelope_but_not_in_bytes() -> None:
    email = Email(from_="a@example.com", to="b@example.org", bcc="Hidden <secret@example.net>")
    p = prepare(email, now=NOW)
    assert "secret@example.net" in p.recipients
    assert b"secret" not in p.data
    assert b"Bcc" not in p.data


def test_bcc_removed_from_raw_bytes_including_folded_lines() -> None:
    data = raw(
        "From: a@example.com",
        "To: b@example.org",
        "BCC: one@example.net,",
        " two@example.net",
        "Subject: s",
    )
    p = prepare(data, now=NOW)
    assert p.recipients == ("b@example.org", "one@example.net", "two@example.net")
    assert b"example.net" not in p.data
    assert p.data.startswith(b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n")


def test_a_utf8_name_in_a_dropped_bcc_needs_no_smtputf8() -> None:
    # What is sent decides: the field is gone, and the address itself is ASCII. With a
    # UTF-8 address, the envelope needs SMTPUTF8 all the same.
    p = prepare(raw("From: a@example.com", "To: b@example.org", "Bcc: Jürgen <j@example.net>"))
    assert p.data.isascii() and not p.smtputf8
    utf8 = prepare(raw("From: a@example.com", "To: b@example.org", "Bcc: Jürgen <jü@example.net>"))
    assert utf8.data.isascii() and utf8.smtputf8


@pytest.mark.parametrize("kind", [EmailMessage, Message])
def test_a_utf8_bcc_address_of_a_stdlib_message_leaves_the_sent_fields_ascii(
    kind: type[Message],
) -> None:
    """A UTF-8 address in the Bcc of an EmailMessage (or compat32 Message) made the
    stdlib write every field as raw UTF-8 (``Subject: Grüße``), so the message needed
    SMTPUTF8 in every transaction and its To recipients failed at servers without it,
    where the same Email, whose Subject is RFC 2047 encoded, is delivered. Only the
    envelope of the Bcc recipient's transaction needs SMTPUTF8."""
    message = kind()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Bcc"] = "Jörg <jörg@example.net>, c@example.org"
    message["Subject"] = "Grüße"
    message.set_payload("hi\n")
    p = prepare(message, now=NOW)
    assert p.recipients == ("b@example.org", "jörg@example.net", "c@example.org")
    assert p.data.isascii() and p.smtputf8
    assert parsed(p.data)["Subject"] == "Grüße"
    built = prepare(
        Email(
            from_="a@example.com",
            to="b@example.org",
            bcc=["Jörg <jörg@example.net>", "c@example.org"],
            subject="Grüße",
            text="hi",
        ),
        now=NOW,
    )
    assert built.data.isascii() and built.smtputf8


@pytest.mark.parametrize("field", ["Resent-To", "Resent-Cc", "Resent-Bcc"])
def test_a_utf8_resent_address_of_a_stdlib_message_is_taken_as_raw_input_is(
    field: str,
) -> None:
    """A UTF-8 address in a Resent- field of an EmailMessage raised UnencodableHeader
    ("'ascii' codec can't encode"): only From, Sender, Reply-To, To, Cc and Bcc were
    looked at to choose raw UTF-8 fields (RFC 6532), though the same message as bytes
    is resent to that address. Resent-Bcc is dropped, so it needs no raw UTF-8 fields."""
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Resent-From"] = "a@example.com"
    message[field] = "Jörg <jörg@example.net>"
    message["Subject"] = "Grüße"
    message.set_content("hi")
    p = prepare(message, now=NOW)
    assert p.recipients == ("jörg@example.net",) and p.smtputf8
    assert p.data.isascii() == (field == "Resent-Bcc")
    source = message.as_bytes(policy=policy.SMTPUTF8)
    assert prepare(source, now=NOW).recipients == p.recipients


def test_no_recipients() -> None:
    with pytest.raises(NoRecipients, match="To, Cc or Bcc names no address"):
        prepare(Email(from_="a@example.com"))
    with pytest.raises(NoRecipients, match="envelope_to"):
        prepare(Email(from_="a@example.com", to="b@example.org"), envelope_to=[])


def test_group_recipients_are_expanded_and_empty_groups_ignored() -> None:
    email = Email(from_="a@example.com", to=["Team: t1@example.org, t2@example.org;", "U:;"])
    p = prepare(email, now=NOW)
    assert p.recipients == ("t1@example.org", "t2@example.org")
    assert "Team: t1@example.org, t2@example.org;" in str(parsed(p.data)["To"])


# --- From / Sender rules -----------------------------------------------------------------


def test_missing_from_in_raw_message() -> None:
    with pytest.raises(MissingFrom, match="no From header"):
        prepare(raw("To: b@example.org"))


def test_empty_from() -> None:
    with pytest.raises(MissingFrom, match="names no address"):
        prepare(raw("From: ", "To: b@example.org"))


def test_multiple_from_without_sender() -> None:
    with pytest.raises(MultipleFromWithoutSender, match=r"2 mailboxes.*§3\.6\.2"):
        prepare(Email(from_=["a@example.com", "b@example.com"], to="c@example.org"))


def test_two_from_fields_rejected() -> None:
    with pytest.raises(InvalidMessage, match="2 From header fields"):
        prepare(raw("From: a@example.com", "From: b@example.com", "To: c@example.org"))


def test_sender_must_be_one_mailbox() -> None:
    data = raw("From: a@example.com", "Sender: x@example.com, y@example.com", "To: c@example.org")
    with pytest.raises(InvalidMessage, match="Sender header must be exactly one mailbox"):
        prepare(data)


def test_rfc6854_group_from_with_sender_is_allowed() -> None:
    data = raw("From: Undisclosed:;", "Sender: real@example.com", "To: c@example.org")
    p = prepare(data, now=NOW)
    assert p.envelope_from == "real@example.com"
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.com>", p.header_message_id or "")
    assert parsed(p.data)["From"] == "Undisclosed:;"


def test_rfc6854_group_with_members_and_sender_from_builder() -> None:
    email = Email(
        from_="Board: a@example.com, b@example.com;",
        sender="sec@example.com",
        to="c@example.org",
    )
    p = prepare(email, now=NOW)
    assert p.envelope_from == "sec@example.com"
    assert str(parsed(p.data)["From"]) == "Board: a@example.com, b@example.com;"


@pytest.mark.parametrize("group", ["Undisclosed:;", "Board: a@example.com;"])
def test_rfc6854_group_from_without_sender_is_a_typed_error(group: str) -> None:
    with pytest.raises(MultipleFromWithoutSender, match="RFC 6854") as info:
        prepare(raw(f"From: {group}", "To: c@example.org"))
    assert group.split(":")[0] in info.value.reason


# --- Date and Message-ID -----------------------------------------------------------------


def test_date_and_message_id_added_when_missing() -> None:
    p = prepare(raw("From: a@Example.com", "To: b@example.org"), now=NOW)
    message = parsed(p.data)
    assert message["Date"].datetime == NOW
    assert message["Message-ID"] == p.header_message_id
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.com>", p.header_message_id or "")


def test_message_id_domain_can_be_chosen_and_ids_differ() -> None:
    email = Email(from_="a@example.com", to="b@example.org")
    first = prepare(email, id_domain="mail.example.net")
    second = prepare(email, id_domain="mail.example.net")
    assert (first.header_message_id or "").endswith("@mail.example.net>")
    assert first.header_message_id != second.header_message_id


@pytest.mark.parametrize(
    "domain",
    [
        *("bücher.example", "", "a b", "x@y", "a,b", "a(b", "a..b", "a.", "[x", "a]"),
        "a" * 1000,  # was LineTooLong, saying to fold the Message-ID
        "a" * 64 + ".example",  # a label of more than 63 octets (RFC 1035 §2.3.4)
        ".".join(["a" * 63] * 5),  # 319 octets: a name of more than 255
        "[" + "1" * 1000 + "]",
    ],
)
def test_bad_id_domain(domain: str) -> None:
    with pytest.raises(InvalidMessage, match="id_domain"):
        prepare(Email(from_="a@example.com", to="b@example.org"), id_domain=domain)


@pytest.mark.parametrize("domain", [5, b"example.com", ["example.com"]])
def test_an_id_domain_that_is_no_str_is_refused_as_invalid(domain: object) -> None:
    """``prepare(id_domain=b"example.com")`` raised TypeError ("expected string or
    bytes-like object") from the character check, not the InvalidMessage that a bad
    ``envelope_from`` or ``envelope_to`` of the wrong type raises."""
    with pytest.raises(InvalidMessage, match="id_domain must be a str"):
        prepare(Email(from_="a@example.com", to="b@example.org"), id_domain=domain)  # type: ignore[arg-type]


@pytest.mark.parametrize("domain", ["mail.example.net", "x", "[192.0.2.1]"])
def test_good_id_domain_makes_a_valid_message_id(domain: str) -> None:
    p = prepare(Email(from_="a@example.com", to="b@example.org"), id_domain=domain)
    assert (p.header_message_id or "").endswith(f"@{domain}>")
    assert not parsed(p.data)["Message-ID"].defects


def test_existing_date_and_message_id_are_kept() -> None:
    data = raw(
        "From: a@example.com",
        "To: b@example.org",
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        "Message-ID: <given@example.com>",
    )
    p = prepare(data, now=NOW)
    assert p.data.count(b"Date:") == 1
    assert p.data.count(b"Message-ID:") == 1
    assert p.header_message_id == "<given@example.com>"


def test_builder_date_and_message_id_fields() -> None:
    email = Email(
        from_="a@example.com",
        to="b@example.org",
        date=datetime(2020, 1, 1, 12, 0),  # naive: taken as UTC
        message_id="custom@example.com",
    )
    p = prepare(email, now=NOW)
    message = parsed(p.data)
    assert message["Date"].datetime == datetime(2020, 1, 1, 12, 0, tzinfo=UTC)
    assert message["Message-ID"] == "<custom@example.com>" == p.header_message_id


# Amsterdam's mean time until 1937 (zoneinfo's offset for it), and a made-up one.
_SECOND_OFFSETS = [timedelta(minutes=19, seconds=32), -timedelta(seconds=30)]


@pytest.mark.parametrize("offset", _SECOND_OFFSETS)
@pytest.mark.parametrize("kind", ["builder", "raw"])
def test_a_date_whose_offset_has_seconds_is_written_in_utc(kind: str, offset: timedelta) -> None:
    """A zone is four digits (RFC 5322 §3.3); ``format_datetime`` wrote six (+001932)."""
    when = datetime(1930, 1, 2, 3, 4, 5, tzinfo=timezone(offset))
    if kind == "builder":
        p = prepare(Email(from_="a@example.com", to="b@example.org", date=when))
    else:
        p = prepare(raw("From: a@example.com", "To: b@example.org"), now=when)
    [date] = re.findall(rb"^Date: (.*)\r$", p.data, re.M)
    assert re.fullmatch(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", date)
    assert parsed(p.data)["Date"].datetime == when


@pytest.mark.parametrize(
    "when",
    [
        datetime(1, 1, 1, tzinfo=UTC),  # written "0001", read back as 2001
        datetime(1899, 12, 31, 23, 59, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 10, tzinfo=timezone(timedelta(seconds=30))),  # OverflowError
        datetime(9999, 12, 31, 23, 59, tzinfo=timezone(-timedelta(hours=1, seconds=30))),
    ],
)
def test_a_builder_date_outside_what_rfc_5322_writes_is_refused(when: datetime) -> None:
    """RFC 5322 §3.3 dates have a year of 1900 or later, in four digits. Year 1 was
    written as ``0001``, which readers (the stdlib's ``parsedate``) take for 2001, and a
    time whose zone is written in UTC (seconds in its offset) raised OverflowError when
    that fell outside ``datetime``'s range."""
    with pytest.raises(InvalidHeaderValue, match="Date"):
        prepare(Email(from_="a@example.com", to="b@example.org", date=when), now=NOW)
    assert prepare(Email(from_="a@example.com", to="b@example.org", date=datetime(1900, 1, 1)))


def test_subject_is_decoded_for_display() -> None:
    data = raw("From: a@example.com", "To: b@example.org", "Subject: =?utf-8?q?h=C3=A9?=")
    assert prepare(data).subject == "hé"
    assert prepare(Email(from_="a@example.com", to="b@example.org", subject="hé")).subject == ("hé")


# --- raw bytes and EmailMessage input ----------------------------------------------------


def test_raw_bytes_keep_body_and_get_crlf() -> None:
    body = b"line one\nline two\r\nthree\rfour \xc3\xa9\n"
    data = b"From: a@example.com\nTo: b@example.org\nSubject: s\n\n" + body
    p = prepare(data, now=NOW)
    head, _, got = p.data.partition(b"\r\n\r\n")
    assert got == b"line one\r\nline two\r\nthree\r\nfour \xc3\xa9\r\n"
    assert b"\n" not in head.replace(b"\r\n", b"")
    assert p.eightbit is True
    assert p.smtputf8 is False


def test_raw_body_without_final_newline_gets_crlf() -> None:
    p = prepare(b"From: a@example.com\r\nTo: b@example.org\r\n\r\nno newline", now=NOW)
    assert p.data.endswith(b"\r\n\r\nno newline\r\n")


def test_raw_encoded_body_is_not_re_encoded() -> None:
    body = b"=E2=9C=93 already quoted-printable=\r\nsoft\r\n"
    data = raw(
        "From: a@example.com",
        "To: b@example.org",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        body=body.decode(),
    )
    assert prepare(data, now=NOW).data.endswith(b"\r\n\r\n" + body)


def test_email_message_input_is_not_mutated() -> None:
    message = EmailMessage()
    message["From"] = "App <a@example.com>"
    message["To"] = "b@example.org"
    message["Bcc"] = "c@example.net"
    message["Subject"] = "hello"
    message.set_content("hi there\n")
    p = prepare(message, now=NOW)
    assert p.recipients == ("b@example.org", "c@example.net")
    assert b"c@example.net" not in p.data
    assert parsed(p.data).get_content() == "hi there\r\n"
    assert message["Bcc"] == "c@example.net"
    assert "Date" not in message
    assert p.subject == "hello"


def test_compat32_message_with_line_break_in_value_is_injection() -> None:
    message = Message()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = "hi\nBcc: evil@example.net"
    with pytest.raises(HeaderInjection, match="Subject"):
        prepare(message)


def test_parsed_message_with_folded_headers_is_fine() -> None:
    source = b"From: a@example.com\r\nTo: b@example.org,\r\n c@example.org\r\n\r\nx\r\n"
    message = message_from_bytes(source, policy=policy.default)
    assert prepare(message).recipients == ("b@example.org", "c@example.org")


# --- header injection and encoding -------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        Email(from_="a@example.com", to="b@example.org", subject="hi\r\nBcc: x@example.net"),
        Email(from_="a@example.com", to="b@example.org", subject="hi\nX: y"),
        Email(from_="a@example.com\r\nBcc: x@example.net", to="b@example.org"),
        Email(from_="a@example.com", to=["b@example.org\n"]),
        Email(from_="a@example.com", to="b@example.org", headers={"X-A": "1\rX-B: 2"}),
        Email(from_="a@example.com", to="b@example.org", headers={"X-A\r\nX-B": "1"}),
        Email(from_="a@example.com", to="b@example.org", headers={"Bcc: x@y.example": "1"}),
    ],
)
def test_builder_header_injection(email: Email) -> None:
    with pytest.raises(HeaderInjection) as info:
        prepare(email)
    assert info.value.header
    assert "CR" in info.value.reason or "colon" in info.value.reason


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            b"From: a@example.com\r\nSubject: a\rBcc: x@example.net\r\nTo: b@example.org\r\n\r\n",
            "bare CR",
        ),
        (b"From: a@example.com\r\nSubject: hello\nworld\r\nTo: b@example.org\r\n\r\n", "neither"),
        (b" folded first\r\nFrom: a@example.com\r\nTo: b@example.org\r\n\r\n", "continuation"),
    ],
)
def test_raw_header_defects_are_injection(data: bytes, match: str) -> None:
    with pytest.raises(HeaderInjection, match=match):
        prepare(data)


def test_a_bare_cr_is_blamed_on_the_field_whose_line_holds_it() -> None:
    # The line "Subject: x\ry" is the Subject field's own, not a continuation of To.
    data = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: x\ry\r\n\r\n."
    with pytest.raises(HeaderInjection, match="inside the subject header") as info:
        prepare(data)
    assert info.value.header == "subject"
    with pytest.raises(HeaderInjection, match="inside the to header"):
        prepare(b"From: a@example.com\r\nTo: b@example.org,\r\n c@\rexample.org\r\n\r\n.")


def test_non_ascii_header_name() -> None:
    with pytest.raises(UnencodableHeader, match="not ASCII"):
        prepare(Email(from_="a@example.com", to="b@example.org", headers={"X-Grüße": "1"}))
    with pytest.raises(UnencodableHeader, match="not ASCII"):
        prepare("From: a@example.com\r\nTo: b@example.org\r\nX-Grüße: 1\r\n\r\n".encode())


def test_an_empty_header_name_is_called_empty() -> None:
    with pytest.raises(InvalidMessage, match="header name is empty"):
        prepare(Email(from_="a@example.com", to="b@example.org", headers={"": "1"}))


def test_a_bad_header_name_is_quoted_short() -> None:
    name = "X-" + "a" * 10_000 + "\r\nBcc"
    with pytest.raises(HeaderInjection) as info:
        prepare(Email(from_="a@example.com", to="b@example.org", headers={name: "1"}))
    assert info.value.header == name
    assert len(info.value.reason) < 300


def test_raw_header_octets_must_be_utf8() -> None:
    data = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: caf\xe9\r\n\r\nx\r\n"
    with pytest.raises(UnencodableHeader, match="not UTF-8"):
        prepare(data)


def test_builder_header_owned_by_a_field() -> None:
    with pytest.raises(InvalidMessage, match="'to'"):
        prepare(Email(from_="a@example.com", to="b@example.org", headers={"TO": "c@x.example"}))


def test_line_too_long_in_raw_body() -> None:
    data = raw("From: a@example.com", "To: b@example.org", body="x" * 999 + "\r\n")
    with pytest.raises(LineTooLong, match="999 octets"):
        prepare(data)
    ok = raw("From: a@example.com", "To: b@example.org", body="x" * 998 + "\r\n")
    assert prepare(ok).size > 998


def test_builder_wraps_long_lines_instead() -> None:
    p = prepare(Email(from_="a@example.com", to="b@example.org", text="x" * 5000))
    assert max(len(line) for line in p.data.split(b"\r\n")) <= 78
    assert parsed(p.data).get_content() == "x" * 5000 + "\r\n"


def test_message_too_large() -> None:
    email = Email(from_="a@example.com", to="b@example.org", text="hello\n" * 200)
    size = prepare(email, now=NOW).size
    assert prepare(email, max_size=size, now=NOW).size == size
    with pytest.raises(MessageTooLarge) as info:
        prepare(email, max_size=size - 1, now=NOW)
    assert (info.value.size, info.value.limit) == (size, size - 1)
    assert str(size) in info.value.reason


def test_a_built_message_surely_too_large_is_refused_before_it_is_rendered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An Email with a 300 MB attachment was base64-encoded whole (1.8 GB of memory, 3 s)
    before it was found over the 35 MiB limit; raw input is refused before it is parsed.
    The attachment's base64 size alone (4 characters for 3 octets) now refuses it."""
    attachment = Attachment(filename="a.bin", content=bytes(3000))
    email = Email(from_="a@example.com", to="b@example.org", text="hi", attachments=[attachment])
    assert prepare(email, now=NOW).size > 4002

    def render(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a message known to be too large was rendered")

    monkeypatch.setattr(preparation, "render", render)
    with pytest.raises(MessageTooLarge, match="at least 4002 octets") as info:
        prepare(email, max_size=4001, now=NOW)
    assert (info.value.size, info.value.limit) == (4002, 4001)


# --- addresses: validation, IDN, SMTPUTF8 ------------------------------------------------


@pytest.mark.parametrize(
    "address", ["nope", "a@", "@example.com", "a@@example.com", "a b@example.com", "a@-x.com"]
)
def test_invalid_address(address: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        prepare(Email(from_="a@example.com", to=address))
    assert info.value.reason


def test_unquoted_comma_in_display_name_is_invalid() -> None:
    with pytest.raises(InvalidAddress, match="malformed"):
        prepare(Email(from_="a@example.com", to="Doe, John <j@example.org>"))


def test_invalid_address_in_raw_cc_header() -> None:
    with pytest.raises(InvalidAddress):
        prepare(raw("From: a@example.com", "To: b@example.org", "Cc: broken@"))


def test_idn_domain_with_ascii_local_part_needs_no_smtputf8() -> None:
    p = prepare(Email(from_="a@example.com", to="Bob <bob@Bücher.example>"), now=NOW)
    assert p.recipients == ("bob@xn--bcher-kva.example",)
    assert p.smtputf8 is False
    assert p.data.isascii()
    assert parsed(p.data)["To"].addresses[0].domain == "xn--bcher-kva.example"


def test_utf8_local_part_needs_smtputf8() -> None:
    p = prepare(Email(from_="a@example.com", to="José <josé@example.org>"), now=NOW)
    assert p.recipients == ("josé@example.org",)
    assert p.smtputf8 is True
    assert "josé@example.org".encode() in p.data  # raw UTF-8 header (RFC 6532)
    assert p.eightbit is False


@pytest.mark.parametrize(
    "domain",
    [
        "bücher\u3002example",  # an ideographic full stop between the labels
        "\uff22ücher.example",  # a full-width B
        "BÜCHER.example",  # a U-label in upper case
        "bu\u0308cher.example",  # ü decomposed (u and a combining diaeresis)
    ],
)
def test_a_utf8_address_has_its_domain_as_a_u_label_in_the_header(domain: str) -> None:
    # With a UTF-8 local part the header kept the domain as typed, which is no U-label
    # (IDNA 2008 maps none of these): a reader saw one label "bücher。example", and a
    # From domain so written fails DMARC's lookup though the envelope went to the right one.
    p = prepare(Email(from_=f"jörg@{domain}", to=f"Jörg <jörg@{domain}>"), now=NOW)
    assert p.recipients == ("jörg@xn--bcher-kva.example",)
    assert "From: jörg@bücher.example\r\n".encode() in p.data
    assert 'To: "Jörg" <jörg@bücher.example>\r\n'.encode() in p.data


def test_a_utf8_address_keeps_an_ascii_domain_as_written() -> None:
    p = prepare(Email(from_="a@example.com", to="jörg@XN--Bcher-kva.Example"), now=NOW)
    assert "To: jörg@XN--Bcher-kva.Example\r\n".encode() in p.data


def test_utf8_envelope_only_needs_smtputf8() -> None:
    email = Email(from_="a@example.com", to="b@example.org")
    assert prepare(email, envelope_to=["ñ@example.org"]).smtputf8 is True
    assert prepare(email, envelope_from="ñ@example.com").smtputf8 is True
    assert prepare(email).smtputf8 is False


def test_raw_utf8_header_needs_smtputf8() -> None:
    data = "From: a@example.com\r\nTo: b@example.org\r\nSubject: héllo\r\n\r\nx\r\n".encode()
    p = prepare(data)
    assert (p.smtputf8, p.eightbit, p.subject) == (True, False, "héllo")


@pytest.mark.parametrize("compat32", [False, True])
def test_email_message_to_an_idn_domain_needs_no_smtputf8(compat32: bool) -> None:
    # Its domain goes as an A-label, as the Email builder writes it; the message was
    # written with raw UTF-8 headers instead, so a non-ASCII Subject or display name made
    # it need SMTPUTF8 and fail at every server without it.
    message: Message = Message() if compat32 else EmailMessage()
    message["From"] = "Jörg <a@bücher.example>"
    message["To"] = "bob@Straße.de"
    message["Subject"] = "Grüße"
    message.set_payload("x")
    p = prepare(message)
    assert p.recipients == ("bob@xn--strae-oqa.de",)
    assert p.smtputf8 is False
    assert p.data.isascii()
    assert parsed(p.data)["Subject"] == "Grüße"
    assert b"To: bob@xn--strae-oqa.de\r\n" in p.data


@pytest.mark.parametrize("name", ["In-Reply-To", "References"])
def test_a_non_ascii_msg_id_in_an_ascii_message_is_refused(name: str) -> None:
    # RFC 2047 words may not stand in a msg-id (RFC 2047 §5): the field was written as
    # one (=?utf-8?b?PMO8QHg+?=), which no reader takes for the message it replies to.
    value = "<a@example.org> <jörg@bücher.example>"
    with pytest.raises(UnencodableHeader, match=name):
        prepare(Email(from_="a@example.com", to="b@example.org", headers={name: value}))
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message[name] = value
    message.set_content("x")
    with pytest.raises(UnencodableHeader, match=name):
        prepare(message)
    # With UTF-8 header fields (RFC 6532) it is written as it is.
    p = prepare(Email(from_="a@example.com", to="jörg@example.org", headers={name: value}))
    assert f"{name}: {value}\r\n".encode() in p.data


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("List-Unsubscribe", "<https://exämple.com/u?list=1>"),
        ("List-Help", "<mailto:help@bücher.example>"),
        ("Archived-At", "<https://example.com/archiv/grüße>"),
        ("Content-ID", "<bild@bücher.example>"),
    ],
)
def test_a_non_ascii_uri_or_msg_id_field_in_an_ascii_message_is_refused(
    name: str, value: str
) -> None:
    # Written as an RFC 2047 word (List-Unsubscribe: =?utf-8?q?=3Chttps=3A//ex=C3=A4...),
    # which is no URI: no client found the unsubscribe link (RFC 2369 §2).
    with pytest.raises(UnencodableHeader, match=name):
        prepare(Email(from_="a@example.com", to="b@example.org", headers={name: value}))
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message.set_content("x")  # after it: set_content() drops Content-ID
    message[name] = value
    with pytest.raises(UnencodableHeader, match=name):
        prepare(message)
    # With UTF-8 header fields (RFC 6532) it is written as it is; ASCII always is.
    p = prepare(Email(from_="a@example.com", to="jörg@example.org", headers={name: value}))
    assert f"{name}: {value}\r\n".encode() in p.data
    ascii_value = value.encode("ascii", "backslashreplace").decode().replace("\\", "%")
    p = prepare(Email(from_="a@example.com", to="b@example.org", headers={name: ascii_value}))
    assert f"{name}: {ascii_value}\r\n".encode() in p.data


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("List-Unsubscribe", "<https://example.com/u?r=?a?b?c?=>"),
        ("In-Reply-To", "<=?utf-8?q?x?=@example.com>"),
        ("List-Unsubscribe", "<https://example.com/" + "a" * 1000 + ">"),
        ("References", "<a@example.com> <" + "b" * 1000 + "@example.com>"),
    ],
)
def test_a_uri_or_msg_id_field_is_never_encoded(name: str, value: str) -> None:
    """An ASCII URI or msg-id that looks like an encoded word, or is too long for a
    998-octet line, was written as RFC 2047 words (``List-Unsubscribe:
    =?utf-8?q?=3Chttps=3A//...``), which may not stand there (RFC 2047 §5): no client
    followed the link or threaded by the msg-id. One is written as it is, the other
    refused."""
    email = Email(from_="a@example.com", to="b@example.org", headers={name: value})
    if len(value) < 998:
        assert f"{name}: {value}\r\n".encode() in prepare(email, now=NOW).data
    else:
        with pytest.raises(LineTooLong, match=f"the {name} header holds a word of 10"):
            prepare(email, now=NOW)


@pytest.mark.parametrize("stdlib", [False, True])
def test_an_added_address_field_is_written_as_addresses(stdlib: bool) -> None:
    # Encoded as text, the whole value became one RFC 2047 word, which names no address
    # (RFC 2047 §5): a read receipt could not be sent anywhere.
    name, value = "Disposition-Notification-To", "Jörg <bob@bücher.example>, ann@example.org"

    def prepared(to: str, value: str) -> bytes:
        if not stdlib:
            return prepare(Email(from_="a@example.com", to=to, headers={name: value})).data
        message = EmailMessage()
        message["From"] = "a@example.com"
        message["To"] = to
        message[name] = value
        message.set_content("x")
        return prepare(message).data

    data = prepared("b@example.org", value)
    assert data.isascii()
    # Read as an address list: RFC 2047 words only in display names.
    head = data.split(b"\r\n\r\n")[0].decode().replace("\r\n ", " ")
    [line] = [x for x in head.split("\r\n") if x.startswith(f"{name}:")]
    boxes = mailboxes(parse_address_list(name, line.partition(":")[2]))
    assert [(b.name, b.address.written) for b in boxes] == [
        ("Jörg", "bob@xn--bcher-kva.example"),
        ("", "ann@example.org"),
    ]
    with pytest.raises(UnencodableHeader, match=name):
        prepared("b@example.org", "jörg@example.org")
    assert f"{name}: jörg@example.org\r\n".encode() in prepared(
        "jörg@example.org", "jörg@example.org"
    )


def test_email_message_with_utf8_local_part_is_written_raw() -> None:
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "ñoño@example.org"
    message.set_content("x")
    p = prepare(message)
    assert p.smtputf8 is True
    assert "To: ñoño@example.org".encode() in p.data
    assert b"=?" not in p.data


def test_domain_literal_is_accepted() -> None:
    p = prepare(Email(from_="a@example.com", to="b@[127.0.0.1]"))
    assert p.recipients == ("b@[127.0.0.1]",)


def test_unsupported_input_type() -> None:
    with pytest.raises(TypeError):
        prepare("From: a@example.com\r\n\r\n")  # type: ignore[arg-type]


def test_malformed_address_error_quotes_what_the_user_wrote() -> None:
    from mailstrom import Email, InvalidAddress, prepare

    with pytest.raises(InvalidAddress) as caught:
        prepare(Email(from_="a@b.example", to=["x@y.example"], cc=["carol@@x.example"]))
    assert "carol@@x.example" in str(caught.value)
    assert caught.value.address == "carol@@x.example"


@pytest.mark.parametrize(
    ("address", "quoted"),
    [("not an address", "'not an address'"), ('Bob  "x" (c) y', "'Bob \"x\" y'")],
)
def test_an_address_without_an_at_sign_is_quoted_with_its_spaces(address: str, quoted: str) -> None:
    """The README's first error example: ``to=["not an address"]`` was reported as
    "'notanaddress' is not an address", naming a word the caller never wrote."""
    with pytest.raises(InvalidAddress) as caught:
        prepare(Email(from_="a@example.com", to=[address]))
    assert f"{quoted} is not an address: it has no @-sign" in caught.value.reason
