"""Property-based tests: whatever valid parts go in come back out of the prepared bytes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_string, policy
from email.headerregistry import Address
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailstrom.errors import ForbiddenCharacter, HeaderInjection, InvalidMessage
from mailstrom.message import Attachment, Email, prepare

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Printable text: no control characters (CR/LF are tested separately), no line or
# paragraph separators (str.splitlines would treat them as line breaks), no surrogates.
PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"


@dataclass(frozen=True, slots=True, kw_only=True)
class Mailbox:
    name: str
    local: str
    domain: str

    def text(self) -> str:
        return str(Address(display_name=self.name, username=self.local, domain=self.domain))


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
idn_labels = st.text("abcxyzäöüéñ", min_size=1, max_size=8)
domains = st.builds(
    lambda parts, tld: ".".join([*parts, tld]),
    st.lists(st.one_of(labels, idn_labels), min_size=1, max_size=2),
    st.sampled_from(["example", "com", "org", "test"]),
)
ascii_locals = st.lists(st.text(ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(
    ".".join
)
utf8_locals = st.text("abcñéüж日本", min_size=1, max_size=8)
names = st.one_of(st.just(""), st.text(PRINTABLE, max_size=20).map(str.strip))


def mailboxes(domain: st.SearchStrategy[str] = domains) -> st.SearchStrategy[Mailbox]:
    locals_ = st.one_of(ascii_locals, ascii_locals, utf8_locals)
    return st.builds(Mailbox, name=names, local=locals_, domain=domain)


# Bcc recipients live under their own domain so their absence from the bytes is checkable.
hidden = mailboxes(st.just("hidden-bcc.example"))

subjects = st.text(PRINTABLE, max_size=300).map(lambda s: " ".join(s.split()))
bodies = st.text(st.one_of(PRINTABLE, st.just("\n")), max_size=1500)
attachments = st.builds(
    Attachment,
    filename=st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=20),
    content=st.binary(max_size=2000),
    content_type=st.sampled_from(["application/octet-stream", "image/png", "text/csv"]),
)


def parse(data: bytes) -> EmailMessage:
    # Raw UTF-8 headers (RFC 6532) only come back as text through the str parser; the
    # bytes parser would turn them into surrogate escapes.
    message = message_from_string(data.decode("utf-8"), policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def header_boxes(message: EmailMessage, name: str) -> list[tuple[str, str, str]]:
    header = message[name]
    if header is None:
        return []
    return [(squeeze(a.display_name), a.username, a.domain) for a in header.addresses]


def squeeze(name: str) -> str:
    # The stdlib splits a long display name into several RFC 2047 words and, parsing them
    # back, keeps the folding space between them (RFC 2047 §6.2 says to drop it).
    return "".join(name.split())


def expected_boxes(boxes: list[Mailbox]) -> list[tuple[str, str, str]]:
    # ASCII local parts get A-label domains in headers; UTF-8 local parts stay as given.
    out = []
    for box in boxes:
        domain = box.domain
        if box.local.isascii():
            domain = domain.encode("idna").decode("ascii")
        out.append((squeeze(box.name), box.local, domain))
    return out


def normalise_text(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


@SETTINGS
@given(
    sender=mailboxes(),
    to=st.lists(mailboxes(), min_size=1, max_size=3),
    cc=st.lists(mailboxes(), max_size=2),
    bcc=st.lists(hidden, max_size=2),
    subject=subjects,
    text=st.none() | bodies,
    html=st.none() | bodies,
    files=st.lists(attachments, max_size=3),
)
def test_prepared_bytes_parse_back_to_the_parts(
    sender: Mailbox,
    to: list[Mailbox],
    cc: list[Mailbox],
    bcc: list[Mailbox],
    subject: str,
    text: str | None,
    html: str | None,
    files: list[Attachment],
) -> None:
    email = Email(
        from_=sender.text(),
        to=[box.text() for box in to],
        cc=[box.text() for box in cc],
        bcc=[box.text() for box in bcc],
        subject=subject,
        text=text,
        html=html,
        attachments=files,
    )
    prepared = prepare(email, now=NOW)
    data = prepared.data

    # Framing: CRLF everywhere, short lines, no Bcc.
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"hidden-bcc" not in data
    assert b"\nBcc:" not in data

    message = parse(data)
    assert message.defects == []
    assert header_boxes(message, "From") == expected_boxes([sender])
    assert header_boxes(message, "To") == expected_boxes(to)
    assert header_boxes(message, "Cc") == expected_boxes(cc)
    assert (message["Subject"] or "") == subject
    assert prepared.subject == subject
    assert message["Message-ID"].strip() == prepared.header_message_id
    assert message["Date"].datetime == NOW

    # Envelope: every To/Cc/Bcc mailbox, including the hidden ones.
    envelope_locals = {address.rpartition("@")[0] for address in prepared.recipients}
    assert {box.local for box in (*to, *cc, *bcc)} <= envelope_locals | {
        f'"{box.local}"' for box in (*to, *cc, *bcc)
    }
    assert len(prepared.recipients) <= len(to) + len(cc) + len(bcc)
    # Builder bodies never need 8BITMIME unless SMTPUTF8 already makes headers raw UTF-8.
    assert prepared.eightbit is False or prepared.smtputf8 is True

    if text is not None:
        plain = message.get_body(("plain",))
        assert plain is not None
        assert plain.get_content().replace("\r\n", "\n") == normalise_text(text)
    if html is not None:
        rich = message.get_body(("html",))
        assert rich is not None
        assert rich.get_content().replace("\r\n", "\n") == normalise_text(html)
    got = [(p.get_filename(), p.get_payload(decode=True)) for p in message.iter_attachments()]
    assert got == [(a.filename, a.content) for a in files]


injected = st.builds(
    lambda a, sep, b: a + sep + b,
    st.text(PRINTABLE, max_size=10),
    st.sampled_from(["\r\n", "\n", "\r", "\r\n ", "\n\t"]),
    st.sampled_from(["X-Injected: 1", "Bcc: evil@example.net", "", " x"]),
)


@SETTINGS
@given(
    where=st.sampled_from(["subject", "name", "header", "to"]),
    value=injected,
)
def test_no_header_value_can_smuggle_a_line(where: str, value: str) -> None:
    parts: dict[str, object] = {"from_": "a@example.com", "to": "b@example.org"}
    if where == "subject":
        parts["subject"] = value
    elif where == "name":
        parts["from_"] = f"{value} <a@example.com>"
    elif where == "header":
        parts["headers"] = {"X-Custom": value}
    else:
        parts["to"] = ["b@example.org", value]
    try:
        prepared = prepare(Email(**parts), now=NOW)  # type: ignore[arg-type]
    except HeaderInjection:
        return
    message = parse(prepared.data)
    assert "X-Injected" not in message
    assert "Bcc" not in message
    assert b"evil" not in prepared.data
    raise AssertionError(f"a value with a line break was accepted: {value!r}")


@SETTINGS
@given(
    body=st.binary(max_size=3000),
    ending=st.sampled_from([b"\r\n", b"\n"]),
)
def test_raw_body_is_kept_except_line_endings(body: bytes, ending: bytes) -> None:
    lines = body.replace(b"\r", b"").split(b"\n")
    # Keep lines legal (≤ 998 octets) so the message is valid whatever the content.
    lines = [line[:998] for line in lines]
    head = ending.join([b"From: a@example.com", b"To: b@example.org", b"Bcc: c@example.net"])
    data = head + ending + ending + ending.join(lines)
    if b"\0" in body:
        # Hardening #2: a NUL may not be sent in 7bit/8bit data (RFC 2045 §2.7, §2.8).
        with pytest.raises(ForbiddenCharacter):
            prepare(data, now=NOW)
        return
    prepared = prepare(data, now=NOW)
    expected = b"\r\n".join(lines)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert prepared.data.partition(b"\r\n\r\n")[2] == expected
    assert prepared.eightbit == (not expected.isascii())
    assert prepared.recipients == ("b@example.org", "c@example.net")
    assert b"c@example.net" not in prepared.data


BINARY_CONTENT = (
    st.lists(
        st.one_of(
            st.binary(max_size=100),
            st.sampled_from([b"\r", b"\n", b"--=_B", b"--=_B--"]),  # the part's own boundary
        ),
        max_size=12,
    )
    .map(lambda chunks: b"".join(chunks).replace(b"\0", b""))
    # After an LF (or first) the boundary makes a delimiter line in every reading: the
    # message was written with another part there, not a binary part holding it.
    .filter(lambda content: not content.startswith(b"--=_B") and b"\n--=_B" not in content)
)
"""Octets of a binary part: any, and among them CR, LF and the part's own boundary."""


@SETTINGS
@given(content=BINARY_CONTENT, line_ends=st.sampled_from([b"\r\n", b"\n"]))
@example(content=b"\x01\r", line_ends=b"\n")  # found at ~3,000 examples: the CR was cut off
@example(content=b"\x01\r--=_B\n\x02", line_ends=b"\n")  # the CR made a delimiter line
def test_a_binary_part_arrives_as_given_or_is_refused(content: bytes, line_ends: bytes) -> None:
    """Whatever octets a part labelled ``Content-Transfer-Encoding: binary`` holds, and
    whatever line ends the rest of the message has, prepare() either refuses it or sends
    its content octet for octet; it never makes another attachment of it."""
    head = (
        b"From: a@example.com\nTo: b@example.org\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="=_B"\n\n--=_B\n'
        b"Content-Type: text/plain\n\nhello\n--=_B\n"
        b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
    ).replace(b"\n", line_ends)
    data = head + content + line_ends + b"--=_B--" + line_ends
    try:
        prepared = prepare(data, now=NOW)
    except InvalidMessage:
        return
    start = prepared.data.index(b"binary\r\n\r\n") + len(b"binary\r\n\r\n")
    assert prepared.data[start:].startswith(content + b"\r\n--=_B--\r\n")
