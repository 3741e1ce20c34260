"""Django's mail API through ``mailstrom.contrib.django.EmailBackend``, delivered to the
loopback MX: what the server receives is what Django's own SMTP backend sends."""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from email.header import decode_header, make_header
from email.mime.base import MIMEBase
from email.mime.image import MIMEImage
from pathlib import Path
from typing import Any

import pytest

from tests.django_project import configure

configure()

from django.core import mail  # noqa: E402  (Django must be configured first)
from django.core.mail import BadHeaderError  # noqa: E402
from django.test import override_settings  # noqa: E402
from django.test.utils import setup_test_environment, teardown_test_environment  # noqa: E402
from django.utils.functional import Promise, lazy  # noqa: E402

from mailstrom import (  # noqa: E402
    HeaderInjection,
    HeaderTooLong,
    InvalidAddress,
    InvalidMessage,
    RecipientState,
    TooManyRecipients,
    UnencodableHeader,
)
from mailstrom.contrib.django import EmailBackend, get_mailstrom  # noqa: E402
from mailstrom.stores.sqlite import SQLiteStore  # noqa: E402
from tests.fixtures.dns_server import LoopbackDNS  # noqa: E402
from tests.fixtures.smtp_server import ReceivedMessage, ReceivingServer, ServerFactory  # noqa: E402
from tests.support.django import (  # noqa: E402
    HAS_MAILERS,
    attach_mime_base,
    django_smtp_backend,
    loopback_mx,
    mailstrom_setting,
    silently,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> ReceivingServer:
    return loopback_mx(smtp_server, dns_server)


@pytest.fixture
def project(dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path) -> Iterator[None]:
    """The project's settings for this test; leaving it stops the backend's worker."""
    with override_settings(MAILSTROM=mailstrom_setting(dns_server, mx, tmp_path)):
        yield


def without_volatile_parts(content: bytes) -> bytes:
    """Date, Message-ID and MIME boundaries differ between two ``message()`` calls."""
    content = re.sub(rb"(?m)^(Date|Message-ID): .*\r\n", b"", content)
    return re.sub(rb"===============\d+==", b"BOUNDARY", content)


def django_smtp_would_send(message: mail.EmailMessage, mx: ReceivingServer) -> ReceivedMessage:
    """What the server gets when Django's own SMTP backend sends ``message``."""
    before = len(mx.messages)
    with django_smtp_backend(mx.host, mx.port) as backend:
        assert backend.send_messages([message]) == 1
    return mx.wait_for_messages(before + 1)[before]


def full_message() -> mail.EmailMultiAlternatives:
    message = mail.EmailMultiAlternatives(
        subject="Your order — Nr. 1234",
        body="Grüße!\nYour order is on its way.\nFrom now on, track it online.\n",
        to=["Bob <bob@example.org>"],
        cc=["carol@example.org"],
        bcc=["audit@example.net"],
        reply_to=["Help <help@example.org>"],
        headers={"X-Order": "1234"},
    )
    message.attach_alternative('<p>Grüße! <img src="cid:logo@shop"></p>', "text/html")
    message.attach("invoice.txt", "Total: 12.00 EUR\n", "text/plain")
    message.attach("data.bin", bytes(range(256)), "application/octet-stream")
    logo = MIMEImage(PNG, "png")
    logo.add_header("Content-ID", "<logo@shop>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    attach_mime_base(message, logo)
    return message


def test_send_mail_queues_and_delivers_plain_text(project: None, mx: ReceivingServer) -> None:
    assert mail.send_mail("Hi", "Hello Bob", None, ["bob@example.org"]) == 1
    [received] = mx.wait_for_messages(1)
    assert received.mail_from == "site@sender.test"  # DEFAULT_FROM_EMAIL, as an addr-spec
    assert received.rcpt_tos == ("bob@example.org",)
    assert b"\r\nFrom: Site <site@sender.test>\r\n" in received.content
    assert received.content.endswith(b"\r\n\r\nHello Bob\r\n")


def test_html_attachments_inline_image_cc_bcc_reply_to_and_headers_arrive_as_django_sends_them(
    project: None, mx: ReceivingServer
) -> None:
    message = full_message()
    assert message.send() == 1
    # One transaction per destination domain: example.org, and example.net for the Bcc.
    ours = mx.wait_for_messages(2)
    theirs = django_smtp_would_send(message, mx)

    assert {m.mail_from for m in ours} == {theirs.mail_from} == {"site@sender.test"}
    assert sorted(r for m in ours for r in m.rcpt_tos) == sorted(theirs.rcpt_tos)
    assert sorted(theirs.rcpt_tos) == ["audit@example.net", "bob@example.org", "carol@example.org"]
    for received in ours:
        assert without_volatile_parts(received.content) == without_volatile_parts(theirs.content)
        assert b"audit@example.net" not in received.content  # Bcc: in the envelope only
    for part in (
        b"Reply-To: Help <help@example.org>",
        b"X-Order: 1234",
        b"Content-Type: text/html",
        b'filename="invoice.txt"',
        b"Content-ID: <logo@shop>",
    ):
        assert part in theirs.content
    status = get_mailstrom().query_status(message.mailstrom_id)  # type: ignore[attr-defined]
    assert {r.address for r in status.recipients} == set(theirs.rcpt_tos)


def test_send_mass_mail_counts_what_was_queued(project: None, mx: ReceivingServer) -> None:
    datatuples = [
        (f"n{i}", f"body {i}", "App <app@sender.test>", [f"u{i}@example.org"]) for i in range(5)
    ]
    assert mail.send_mass_mail(datatuples) == 5
    received = mx.wait_for_messages(5)
    assert {m.mail_from for m in received} == {"app@sender.test"}
    assert sorted(r for m in received for r in m.rcpt_tos) == [
        f"u{i}@example.org" for i in range(5)
    ]


def test_the_envelope_follows_django_not_the_headers(project: None, mx: ReceivingServer) -> None:
    # Extra headers may override what the headers say; the envelope stays from_email and
    # recipients(), as with Django's SMTP backend.
    message = mail.EmailMessage(
        "Hi",
        "Hello",
        "bounces@sender.test",
        ["bob@example.org"],
        headers={"From": "Shop <shop@sender.test>", "To": "Customers <list@example.org>"},
    )
    assert message.send() == 1
    [received] = mx.wait_for_messages(1)
    assert received.mail_from == "bounces@sender.test"
    assert received.rcpt_tos == ("bob@example.org",)
    assert b"\r\nFrom: Shop <shop@sender.test>\r\n" in received.content


def test_the_message_id_is_mailstroms_unless_the_application_gives_one(
    dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path
) -> None:
    """Django names its Message-IDs after the host (``socket.getfqdn()``: ``localhost``, a
    container's id, an internal name), which spam filters score and which leaks the name;
    ``MAILSTROM["message_id_domain"]`` was accepted and did nothing for Django's mail.
    The one Django makes is left out, so mailstrom makes it as for any message (and
    ``query_status`` knows it); one the application gives in ``headers`` is kept."""
    setting = mailstrom_setting(dns_server, mx, tmp_path, message_id_domain="mid.sender.test")
    with override_settings(MAILSTROM=setting):
        made = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
        given = mail.EmailMessage(
            "Hi", "x", to=["ann@example.org"], headers={"message-id": "<order-1@shop.test>"}
        )
        assert EmailBackend().send_messages([made, given]) == 2
        received = {m.rcpt_tos: m for m in mx.wait_for_messages(2)}
        statuses = {
            message: get_mailstrom().query_status(message.mailstrom_id)  # type: ignore[attr-defined]
            for message in (made, given)
        }
    ids = {
        rcpt: email.message_from_bytes(m.content).get_all("Message-ID")
        for rcpt, m in received.items()
    }
    [made_id] = ids[("bob@example.org",)]
    assert re.fullmatch(r"<[0-9a-f]{32}@mid\.sender\.test>", made_id)
    assert statuses[made].header_message_id == made_id
    assert ids[("ann@example.org",)] == ["<order-1@shop.test>"]


def test_a_message_id_set_by_a_subclass_message_method_is_kept(
    project: None, mx: ReceivingServer
) -> None:
    """An ``EmailMessage`` subclass whose ``message()`` sets the Message-ID (to thread the
    replies to it, as Django's SMTP backend sends it) had it dropped, and mailstrom's sent
    in its place: the application's record of it named no mail. Only the one Django makes
    at the host's name is mailstrom's to replace, also beside one a subclass appended."""

    class Replaced(mail.EmailMessage):
        def message(self, **kwargs: Any) -> Any:
            built = super().message(**kwargs)
            del built["Message-ID"]
            built["Message-ID"] = "<order-7@shop.test>"
            return built

    class Appended(mail.EmailMessage):
        def message(self, **kwargs: Any) -> Any:
            built = super().message(**kwargs)
            built["Message-ID"] = "<order-8@shop.test>"  # (beside Django's)
            return built

    class Untouched(mail.EmailMessage):
        def message(self, **kwargs: Any) -> Any:
            built = super().message(**kwargs)
            built["X-Order"] = "9"
            return built

    messages = [
        Replaced("Hi", "x", to=["ann@example.org"]),
        Appended("Hi", "x", to=["bob@example.org"]),
        Untouched("Hi", "x", to=["cy@example.org"]),
    ]
    assert EmailBackend().send_messages(messages) == 3
    received = {m.rcpt_tos[0]: m for m in mx.wait_for_messages(3)}
    ids = {
        rcpt: email.message_from_bytes(m.content).get_all("Message-ID")
        for rcpt, m in received.items()
    }
    assert ids["ann@example.org"] == ["<order-7@shop.test>"]
    assert ids["bob@example.org"] == ["<order-8@shop.test>"]
    [made] = ids["cy@example.org"]
    assert re.fullmatch(r"<[0-9a-f]{32}@sender\.test>", made)
    assert b"\r\nX-Order: 9\r\n" in received["cy@example.org"].content
    status = get_mailstrom().query_status(messages[0].mailstrom_id)  # type: ignore[attr-defined]
    assert status.header_message_id == "<order-7@shop.test>"


def test_empty_addresses_are_left_out_as_django_leaves_them_out(
    project: None, mx: ReceivingServer
) -> None:
    # A blank User.email, or a setting that turns a copy off: recipients() skips "" and
    # Django's SMTP backend delivers to the rest. The whole message was refused
    # (InvalidAddress), and with fail_silently it was lost.
    message = mail.EmailMessage(
        "Hi", "Hello", to=["bob@example.org", ""], cc=[""], bcc=[""], reply_to=[""]
    )
    assert EmailBackend(fail_silently=True).send_messages([message]) == 1
    [ours] = mx.wait_for_messages(1)
    theirs = django_smtp_would_send(message, mx)
    assert ours.rcpt_tos == theirs.rcpt_tos == ("bob@example.org",)
    assert without_volatile_parts(ours.content) == without_volatile_parts(theirs.content)


def test_invalid_input_raises_mailstroms_typed_errors_and_queues_nothing(project: None) -> None:
    with pytest.raises(InvalidAddress) as info:
        mail.send_mail("Hi", "Hello", None, ["bob@example.org", "not an address"])
    assert info.value.address == "not an address"
    with pytest.raises(InvalidAddress):
        mail.send_mail("Hi", "Hello", "nobody", ["bob@example.org"])
    with pytest.raises(HeaderInjection) as injected:
        mail.send_mail("Hi\nBcc: victim@example.org", "Hello", None, ["bob@example.org"])
    assert injected.value.header == "Subject"
    with pytest.raises(HeaderInjection):
        mail.EmailMessage("Hi", "x", to=["b@example.org"], headers={"X-A": "1\r\nB: 2"}).send()
    # One bad message of a batch: none of the batch is queued.
    good = mail.EmailMessage("ok", "x", to=["bob@example.org"])
    bad = mail.EmailMessage("bad", "x", to=["bob@"])
    with pytest.raises(InvalidAddress):
        EmailBackend().send_messages([good, bad])
    assert get_mailstrom().query_recent() == []


@pytest.mark.parametrize(
    ("field", "address"),
    [("to", "jö@example.org"), ("cc", "Jörg <jö@example.org>"), ("from_email", "ö@sender.test")],
)
def test_a_local_part_django_cannot_write_is_refused_naming_the_address_given(
    project: None, field: str, address: str
) -> None:
    """Django 5.2 writes a local part that is not ASCII as an RFC 2047 encoded word
    (``=?utf-8?b?asO2?=@example.org``, in its SMTP backend's envelope too), which is no
    address: mailstrom refused the header, and ``InvalidAddress.address`` was that
    encoded word, which the application never wrote and cannot find among its
    recipients. It is the addr-spec given, as for any address refused."""
    fields: dict[str, object] = {"to": ["bob@example.org"], field: address}
    if field != "from_email":
        fields[field] = ["bob@example.org", address] if field == "to" else [address]
    message = mail.EmailMessage("Hi", "x", **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidAddress) as info:
        message.send()
    assert info.value.address == address.removeprefix("Jörg <").removesuffix(">")
    assert "not ASCII" in info.value.reason
    assert get_mailstrom().query_recent() == []


def test_a_local_part_that_is_not_ascii_is_sent_where_django_writes_no_header(
    project: None,
) -> None:
    """Bcc is never written, nor ``from_email`` when ``headers`` give the From: such an
    address is only in the envelope, which mailstrom sends with SMTPUTF8."""
    message = mail.EmailMessage(
        "Hi",
        "x",
        "bounces-ö@sender.test",
        ["bob@example.org"],
        bcc=["jö@example.org"],
        headers={"From": "Shop <shop@sender.test>"},
    )
    assert message.send() == 1
    status = get_mailstrom().query_status(message.mailstrom_id)  # type: ignore[attr-defined]
    assert {r.address for r in status.recipients} == {"bob@example.org", "jö@example.org"}


def test_header_injection_is_djangos_bad_header_error_too(project: None) -> None:
    """Django's documented guard (``except BadHeaderError:`` around ``send_mail`` in a
    contact form's view) did not catch mailstrom's HeaderInjection: a 500 instead."""
    with pytest.raises(BadHeaderError) as info:
        mail.send_mail("Hi\nBcc: victim@example.org", "Hello", None, ["bob@example.org"])
    assert isinstance(info.value, HeaderInjection)
    assert info.value.header == "Subject"
    for headers in ({"X-A": "1\r\nB: 2"}, {"X-A: v\r\nReply-To: a@evil.example\r\nX-B": "v"}):
        with pytest.raises(BadHeaderError):
            mail.EmailMessage("Hi", "x", to=["b@example.org"], headers=headers).send()
    with pytest.raises(BadHeaderError):
        with_mime_attachment_named("a\r\nX-Evil: 1.txt").send()
    assert get_mailstrom().query_recent() == []


def test_a_bad_header_error_django_raises_while_building_is_one_still(project: None) -> None:
    """Django refuses a line break in a header an ``EmailMessage`` subclass's ``message()``
    sets (an In-Reply-To taken from a form) with ``BadHeaderError``, which its own
    backends let through: it came out as a bare ``InvalidMessage``, and the guard Django
    documents (``except BadHeaderError:``) let a 500 through."""

    class Reply(mail.EmailMessage):
        def message(self, **kwargs: Any) -> Any:
            built = super().message(**kwargs)
            built["In-Reply-To"] = "<a@example.org>\nBcc: victim@example.org"
            return built

    with pytest.raises(BadHeaderError) as info:
        Reply("Hi", "x", to=["bob@example.org"]).send()
    assert isinstance(info.value, HeaderInjection)
    assert info.value.header == "In-Reply-To"
    assert get_mailstrom().query_recent() == []


@pytest.mark.parametrize("line_break", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_every_line_break_python_splits_at_is_a_header_injection(
    project: None, line_break: str
) -> None:
    """Django refuses only CR and LF, but the email package splits a header's text into
    lines at these too (``str.splitlines``), so ``Hi<VT>Bcc: victim@...`` became two header
    lines: the standard library's check refused it as ``HeaderParseError``, which came out
    as a bare ``InvalidMessage``, and the guard Django documents (``except
    BadHeaderError:`` in a contact form's view) let a 500 through. (In the Subject such a
    break is sent as a space: see the test below.)"""
    injected = f"Hi{line_break}Bcc: victim@example.org"
    with pytest.raises(BadHeaderError) as info:
        mail.EmailMessage("Hi", "x", to=["b@example.org"], headers={"X-A": injected}).send()
    assert isinstance(info.value, HeaderInjection)
    assert info.value.header == "X-A"
    assert get_mailstrom().query_recent() == []


def test_fail_silently_leaves_out_and_does_not_count_invalid_messages(
    project: None, mx: ReceivingServer
) -> None:
    datatuples = [
        ("bad", "x", None, ["not an address"]),
        ("good", "x", None, ["bob@example.org"]),
        ("injected", "x", None, ["ann@example.org\nBcc: x@example.org"]),
    ]
    assert mail.send_mass_mail(datatuples, **silently()) == 1
    [received] = mx.wait_for_messages(1)
    assert received.rcpt_tos == ("bob@example.org",)
    assert mail.send_mail("x", "y", None, ["bob@"], **silently()) == 0


def with_header_named(name: str) -> Callable[[], mail.EmailMessage]:
    return lambda: mail.EmailMessage("Hi", "x", to=["bob@example.org"], headers={name: "v"})


def with_attachment(filename: str, mimetype: str = "application/pdf") -> mail.EmailMessage:
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    message.attach(filename, b"%PDF-", mimetype)
    return message


def with_attached_message(content: str) -> mail.EmailMessage:
    """A message forwarding ``content``, a mail the application received, as Django
    attaches one: it parses it."""
    message = mail.EmailMessage("Fwd", "x", to=["bob@example.org"])
    message.attach("fwd.eml", content, "message/rfc822")
    return message


def with_alternative(mimetype: str) -> mail.EmailMessage:
    message = mail.EmailMultiAlternatives("Hi", "x", to=["bob@example.org"])
    message.attach_alternative("<p>x</p>", mimetype)
    return message


def with_mime_attachment_named(filename: str) -> mail.EmailMessage:
    part = MIMEBase("application", "pdf")
    part.set_payload(b"%PDF-")
    part.add_header("Content-Disposition", "attachment", filename=filename)
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    attach_mime_base(message, part)
    return message


def with_appended(attribute: str, item: tuple[object, ...]) -> mail.EmailMessage:
    """A message whose list of attachments or alternatives the application filled itself."""
    message = mail.EmailMultiAlternatives("Hi", "x", to=["bob@example.org"])
    getattr(message, attribute).append(item)
    return message


def with_encoding(encoding: str) -> mail.EmailMessage:
    message = mail.EmailMessage("Hi", "Grüße", to=["bob@example.org"])
    message.encoding = encoding
    return message


BAD_MESSAGES: dict[str, tuple[Callable[[], mail.EmailMessage], type[InvalidMessage]]] = {
    # A line break in a header *name* wrote the attacker's header lines into the message.
    "name adds Reply-To": (
        with_header_named("X-A: v\r\nReply-To: attacker@evil.example\r\nX-B"),
        HeaderInjection,
    ),
    "name adds a second To": (
        with_header_named("X-A: v\r\nTo: victim@evil.example\r\nX-B"),
        HeaderInjection,
    ),
    "name starts the body": (with_header_named("X-A: v\r\n\r\nInjected\r\nX-B"), HeaderInjection),
    "name with bare LF": (
        with_header_named("X-A: v\nReply-To: a@evil.example\nX-B"),
        HeaderInjection,
    ),
    "name with a colon": (with_header_named("X-A:B"), HeaderInjection),
    "non-ASCII name": (with_header_named("X-Ä"), UnencodableHeader),
    # Django's serialiser raised the standard library's errors for these.
    "filename with CRLF": (lambda: with_attachment("a\r\nX-Evil: 1.txt"), HeaderInjection),
    "filename with LF": (lambda: with_attachment("a\nContent-Type: text/html"), HeaderInjection),
    "attachment type with CRLF": (
        lambda: with_attachment("a.txt", "text/plain\r\nX-Evil: 1"),
        HeaderInjection,
    ),
    "alternative type with CRLF": (
        lambda: with_alternative("text/html\r\nX-E: 1"),
        HeaderInjection,
    ),
    # Refused by mailstrom on every Python: Django does not look into a MIMEBase part, the
    # legacy Header class (Django 5.2) refuses only a line that looks like a header, and
    # the BytesGenerator (Django 6) nothing before the fix of CVE-2026-1299.
    "MIME attachment filename with CRLF": (
        lambda: with_mime_attachment_named("a\r\nX-Evil: 1.txt"),
        HeaderInjection,
    ),
    "MIME attachment filename starting the part's body": (
        lambda: with_mime_attachment_named('a.pdf"\r\n\r\n--forged-boundary'),
        HeaderInjection,
    ),
    "MIME attachment filename with a line that is no header": (
        lambda: with_mime_attachment_named("a.pdf\nforged"),
        HeaderInjection,
    ),
    "alternative type without subtype": (lambda: with_alternative("nonsense"), InvalidMessage),
    "unknown encoding": (lambda: with_encoding("no-such-charset"), InvalidMessage),
    "lone surrogate in the body": (
        lambda: mail.EmailMessage("Hi", "\udc80", to=["bob@example.org"]),
        InvalidMessage,
    ),
    # Found by tests/integration/test_django_fuzz.py: AttributeError from Django's writer.
    "bytes body": (
        lambda: mail.EmailMessage("Hi", b"bytes", to=["bob@example.org"]),
        InvalidMessage,
    ),
    "alternative added as a plain tuple": (
        lambda: with_appended("alternatives", ("<p>x</p>", "text/html")),
        InvalidMessage,
    ),
    "attachment appended without a type": (
        lambda: with_appended("attachments", ("a.bin", b"x", None)),
        InvalidMessage,
    ),
    "attachment appended without content": (
        lambda: with_appended("attachments", ("a.txt", None, "text/plain")),
        InvalidMessage,
    ),
    # Unpacked by the backend's own checks: a bare ValueError, past fail_silently.
    "attachment appended with four items": (
        lambda: with_appended("attachments", ("a.txt", "x", "text/plain", "extra")),
        InvalidMessage,
    ),
    "alternative appended with one item": (
        lambda: with_appended("alternatives", ("<p>x</p>",)),
        InvalidMessage,
    ),
    # RecursionError from the standard library's parsers, which Django runs on these: it
    # went past fail_silently, and was no InvalidMessage.
    "attached message nested deeper than the parser recurses": (
        lambda: with_attached_message("Content-Type: message/rfc822\n\n" * 2_000 + "\nhi\n"),
        InvalidMessage,
    ),
    "address header with comments nested deeper than the parser recurses": (
        lambda: mail.EmailMessage(
            "Hi", "x", to=["bob@example.org"], headers={"Reply-To": "Zoë " + "(" * 3_000}
        ),
        InvalidMessage,
    ),
}


BAD_MESSAGE_CASES = [
    pytest.param(make, error, id=name) for name, (make, error) in BAD_MESSAGES.items()
]


@pytest.mark.parametrize(("make", "error"), BAD_MESSAGE_CASES)
def test_a_message_django_cannot_serialise_safely_raises_a_typed_error(
    project: None, make: Callable[[], mail.EmailMessage], error: type[InvalidMessage]
) -> None:
    good = mail.EmailMessage("ok", "x", to=["carol@example.org"])
    with pytest.raises(error):
        EmailBackend().send_messages([good, make()])
    assert get_mailstrom().query_recent() == []


@pytest.mark.parametrize(("make", "error"), BAD_MESSAGE_CASES)
def test_fail_silently_leaves_out_only_the_message_django_cannot_serialise(
    project: None,
    make: Callable[[], mail.EmailMessage],
    error: type[InvalidMessage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = mail.EmailMessage("one", "x", to=["carol@example.org"])
    bad = make()
    last = mail.EmailMessage("two", "x", to=["dave@example.org"])
    with caplog.at_level("WARNING", logger="mailstrom.contrib.django"):
        assert EmailBackend(fail_silently=True).send_messages([first, bad, last]) == 2
    # Silent to the caller, not to the operator: the message left out leaves a line.
    [line] = [r for r in caplog.records if r.name.startswith("mailstrom.contrib.django")]
    assert line.levelname == "WARNING" and "not queued (fail_silently)" in line.getMessage()
    assert not hasattr(bad, "mailstrom_id")
    queued = {status.id for status in get_mailstrom().query_recent()}
    assert queued == {first.mailstrom_id, last.mailstrom_id}  # type: ignore[attr-defined]


def test_a_refolded_field_keeps_its_other_parameters_as_they_were(
    project: None, mx: ReceivingServer
) -> None:
    """The field written afresh is unfolded for Django's part, which refuses a line break:
    only the folds go, not the white space of a quoted value beside the long one."""
    filename = "報告書" * 40 + ".pdf"
    part = MIMEBase("application", "pdf")
    part.set_payload(b"%PDF-")
    part.add_header("Content-Disposition", "attachment", filename=filename, note="two  spaces")
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    attach_mime_base(message, part)
    assert message.send() == 1
    [received] = mx.wait_for_messages(1)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    [attachment] = parsed.iter_attachments()
    assert attachment.get_filename() == filename
    assert attachment.get_param("note", header="content-disposition") == "two  spaces"


@pytest.mark.parametrize(
    ("filename", "mimetype", "content"),
    [
        pytest.param("報告書" * 37 + ".pdf", "application/pdf", b"%PDF-", id="111 CJK, a PDF"),
        pytest.param("報告書" * 37 + ".txt", "text/plain", "Grüße", id="111 CJK, text"),
        pytest.param("report-" * 150 + ".pdf", "application/pdf", b"%PDF-", id="1,054 ASCII"),
    ],
)
def test_a_long_attachment_filename_is_sent_folded_with_rfc_2231_continuations(
    project: None, mx: ReceivingServer, filename: str, mimetype: str, content: str | bytes
) -> None:
    """Django 5.2 writes an attachment's filename parameter on one line, past 998 octets
    for a long name (``filename*=utf-8''%E5%A0%B1...``): mailstrom refused the message
    (LineTooLong), so such a file could not be sent at all."""
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    message.attach(filename, content, mimetype)
    assert message.send() == 1
    [received] = mx.wait_for_messages(1)
    assert max(len(line) for line in received.content.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    [attachment] = parsed.iter_attachments()
    assert attachment.get_filename() == filename
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_content() == content


def test_a_long_filename_is_split_with_one_percent_encoding_not_one_per_piece_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The standard library's SMTP policy split it by percent-encoding ever shorter
    prefixes of what was left: 42,613 encodings for a name of 4,000 characters (0.3 s),
    3 minutes for a message of 400 attachments named so; Django wrote it in 0.4 s."""
    encodings = 0
    real_quote = urllib.parse.quote

    def counted(*args: Any, **kwargs: Any) -> str:
        nonlocal encodings
        encodings += 1
        return real_quote(*args, **kwargs)

    monkeypatch.setattr(urllib.parse, "quote", counted)
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    message.attach("é" * 4_000 + ".pdf", b"%PDF-", "application/pdf")
    with override_settings(MAILSTROM={"store": "memory:", "worker": None}):
        assert EmailBackend().send_messages([message]) == 1
    assert encodings <= 10


@pytest.mark.parametrize(
    ("filename", "sent_as"),
    [
        ("ü\x01.txt", "ü_.txt"),  # Django writes filename*=utf-8''%C3%BC%01.txt
        ("report\x1b[2J\x7f.txt", "report_[2J_.txt"),  # Django writes them raw
        ("a\x0bb\x85c\u2028.txt", "a_b_c_.txt"),  # line breaks the email package splits at
        ("tab\there.txt", "tab\there.txt"),  # a TAB is left as Django writes it
    ],
)
def test_a_control_character_in_an_attachment_filename_is_sent_as_an_underscore(
    project: None, mx: ReceivingServer, filename: str, sent_as: str
) -> None:
    """A control character in a filename (one taken from an upload or a URL) made
    mailstrom refuse the message (ForbiddenCharacter), lost under ``fail_silently``,
    where Django writes it (RFC 2231 ``%01`` when the name is not ASCII, else raw, which
    no header may hold). It is hostile to the receiver's file system and terminal, so
    it is sent as ``_``, as mail clients and libraries save such a name (Thunderbird,
    go-mail); a CR or LF is still a header injection."""
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    message.attach(filename, b"%PDF-", "application/pdf")
    assert EmailBackend(fail_silently=True).send_messages([message]) == 1
    assert message.attachments[0][0] == filename  # the application's message is as it was
    [received] = mx.wait_for_messages(1)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    [attachment] = parsed.iter_attachments()
    assert attachment.get_filename() == sent_as
    assert attachment.get_content() == b"%PDF-"


def test_a_subject_with_a_word_past_the_line_limit_is_sent_folded(
    project: None, mx: ReceivingServer
) -> None:
    """Django 5.2 folds a subject only at white space, so one word of ~990 characters (the
    path in the subject of an error report to ADMINS for a long URL) went onto one line
    past 998 octets: mailstrom refused it (LineTooLong), and as Django's error reports
    fail silently, the report was lost. It is folded as Django 6 folds it: in encoded
    words, which a reader decodes to the same subject."""
    subject = "Internal Server Error: /" + "a/" * 600
    with override_settings(ADMINS=[("Ops", "ops@example.org")]):
        mail.mail_admins(subject, "Traceback ...")
    [received] = mx.wait_for_messages(1)
    assert max(len(line) for line in received.content.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Subject"] == "[Django] " + subject
    assert parsed.get_content().startswith("Traceback ...")  # type: ignore[attr-defined]


def test_a_subject_folded_anew_keeps_the_fields_django_folded_beside_it(
    project: None, mx: ReceivingServer
) -> None:
    """Django 5.2 folds an encoded From name or header value past 76 characters itself
    (a line break in the value it keeps), and the fields of the part whose Subject was
    written afresh were added back through Django's part, which refuses a line break: an
    error report from a ``SERVER_EMAIL`` with a long name that is not ASCII was refused
    (InvalidMessage: BadHeaderError) and, failing silently as Django's reports do, lost."""
    subject = "Internal Server Error: /" + "a/" * 600
    server_email = "Übersicht der Fehlerberichte aus der Produktion in München <errors@sender.test>"
    with override_settings(ADMINS=[("Ops", "ops@example.org")], SERVER_EMAIL=server_email):
        mail.mail_admins(subject, "Traceback ...", **silently())
    [received] = mx.wait_for_messages(1)
    # The From as Django folds it (a line of 79), the Subject as Django 6 does.
    subject_lines = re.search(rb"\r\nSubject:.*?\r\n(?=\S)", received.content, re.S)
    assert subject_lines is not None
    assert max(len(line) for line in subject_lines[0].split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Subject"] == "[Django] " + subject
    # Decoded as RFC 2047 says (policy.default puts a space between its two words).
    raw_from = email.message_from_bytes(received.content)["From"]
    assert str(make_header(decode_header(raw_from))) == server_email


@pytest.mark.parametrize("control", ["\x00", "\x08", "\x1b", "\x7f"])
def test_a_subject_holding_a_control_character_is_sent_in_encoded_words(
    project: None, mx: ReceivingServer, control: str
) -> None:
    """Django writes an ASCII subject as it is, control characters and all (one that is
    not ASCII in encoded words, which carry them): mailstrom refused it
    (ForbiddenCharacter), and the subject of Django's error report holds the request's
    path, decoded (a bot's ``/blog/%1B`` that ended in a 500), so the report of that
    error, failing silently, was lost. It is written in
    encoded words, as Django writes a subject that is not ASCII."""
    subject = f"Internal Server Error: /blog/{control}x"
    with override_settings(ADMINS=[("Ops", "ops@example.org")]):
        mail.mail_admins(subject, "Traceback ...", **silently())
    [received] = mx.wait_for_messages(1)
    assert re.search(rb"\r\nSubject: =\?utf-8\?q\?", received.content)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Subject"] == "[Django] " + subject


SUBJECT_LINE_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("line_break", SUBJECT_LINE_BREAKS)
@pytest.mark.parametrize("text", ["ValueError: bad\t{}input", "Ungültig{}Bcc: x@example.net"])
def test_a_line_break_python_splits_at_in_a_subject_is_sent_as_a_space(
    project: None, mx: ReceivingServer, line_break: str, text: str
) -> None:
    """Django's error reports (``mail_admins``, ``AdminEmailHandler``) put an exception's
    text in the subject and replace only its CR and LF, and fail silently: a VT, FF, FS,
    GS, RS, NEL, U+2028 or U+2029 in it was refused as a header injection, so the report
    was lost without a trace. Django's SMTP backend folds the subject there, which a
    reader reads as a space: it is sent with a space there, one Subject field."""
    subject = text.format(line_break)
    with override_settings(ADMINS=[("Ops", "ops@example.org")]):
        mail.mail_admins(subject, "Traceback ...", **silently())
    [received] = mx.wait_for_messages(1)
    assert received.rcpt_tos == ("ops@example.org",)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Subject"] == "[Django] " + text.format(" ")
    assert parsed["Bcc"] is None


def test_a_body_holding_a_nul_is_sent_quoted_printable(project: None, mx: ReceivingServer) -> None:
    """Django writes a text part as 7bit or 8bit data, which may not hold a NUL (RFC 2045
    §2.7, §2.8): mailstrom refused the message (ForbiddenCharacter), and Django's error
    report for a bot's ``/blog/%00`` (a 500 where the path reaches PostgreSQL, which
    refuses a NUL) holds the path in its text and HTML, so that report, failing silently,
    was lost. Such a part is written quoted-printable, which carries it as ``=00``."""
    text = "Internal Server Error: /blog/\x00x\n\nTraceback ...\n"
    html = "<p>Internal Server Error: /blog/\x00x</p>"
    with override_settings(ADMINS=[("Ops", "ops@example.org")]):
        mail.mail_admins(
            "Internal Server Error: /blog/\x00x", text, html_message=html, **silently()
        )
    [received] = mx.wait_for_messages(1)
    assert b"\0" not in received.content
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    parts = {part.get_content_type(): part for part in parsed.walk() if not part.is_multipart()}
    assert parts["text/plain"]["Content-Transfer-Encoding"] == "quoted-printable"
    # As a reader reads them: quoted-printable's line breaks are CRLF.
    assert parts["text/plain"].get_content().replace("\r\n", "\n") == text
    assert parts["text/html"].get_content().rstrip("\r\n") == html


def test_a_body_line_past_the_line_limit_is_sent_quoted_printable_in_any_charset(
    project: None, mx: ReceivingServer
) -> None:
    """Django writes a text part quoted-printable when a line passes 998 octets (its
    ticket #22561) only for UTF-8: with ``encoding = "us-ascii"`` (or ``DEFAULT_CHARSET``
    so) the line went out 7bit as it was, which its SMTP backend sends and the server
    refuses (aiosmtpd: ``500 Line too long``), and mailstrom refused (LineTooLong). Such a
    part is written quoted-printable as Django writes it in UTF-8, and arrives."""
    body = "x" * 1200 + "\nshort line\n"
    message = mail.EmailMessage("Hi", body, to=["bob@example.org"])
    message.encoding = "us-ascii"
    assert EmailBackend(fail_silently=True).send_messages([message]) == 1
    [received] = mx.wait_for_messages(1)
    assert max(len(line) for line in received.content.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content_charset() == "us-ascii"
    assert parsed.get_content().replace("\r\n", "\n") == body


def test_an_attached_message_with_a_long_line_is_sent_encoded_inside(
    project: None, mx: ReceivingServer
) -> None:
    """A message attached as ``message/rfc822`` (Django's ``attach(None, saved_mail,
    "message/rfc822")``, a forwarded mail) may not be encoded itself (RFC 2046 §5.2.1),
    and Django keeps its parts as it parsed them: a JSON body on one line past 998 octets
    made the whole send fail (LineTooLong, silently with ``fail_silently``). Such a part
    is written base64 inside it, as Django writes its own attachments, and reads the
    same; its text parts were quoted-printable already."""
    document = '{"items": [' + ", ".join(f'{{"n": {i}}}' for i in range(200)) + "]}"
    saved = (
        "From: carol@example.org\nTo: dave@example.org\nSubject: Forwarded\n"
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\n" + "x" * 1200 + "\n"
        "--b\nContent-Type: application/json\n\n" + document + "\n--b--\n"
    )
    outer = mail.EmailMessage("Fwd", "See attached.\n", to=["bob@example.org"])
    outer.attach(None, saved, "message/rfc822")  # Django parses it (message_from_string)
    assert EmailBackend(fail_silently=False).send_messages([outer]) == 1
    [received] = mx.wait_for_messages(1)
    assert max(len(line) for line in received.content.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    [attached] = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
    assert attached.get("Content-Transfer-Encoding") is None
    [forwarded] = attached.get_payload()
    assert forwarded["Subject"] == "Forwarded"
    text, json_part = forwarded.get_payload()
    assert text.get_content().rstrip("\r\n") == "x" * 1200
    assert json_part["Content-Transfer-Encoding"] == "base64"
    assert json_part.get_payload(decode=True).decode() == document


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"timeout": 5}, "timeout=5"),
        ({"username": "app", "password": "s3cret"}, "username and password"),
        ({"password": "s3cret"}, "password"),
        ({"host": "smtp.relay.example", "port": 587, "use_tls": True}, "host, port, use_tls"),
        ({"use_ssl": False, "ssl_keyfile": "/k.pem"}, "use_ssl, ssl_keyfile"),
    ],
)
def test_smtp_options_the_backend_cannot_use_are_warned_of(
    project: None, mx: ReceivingServer, options: dict[str, object], named: str
) -> None:
    """``get_connection(timeout=...)`` (``EMAIL_TIMEOUT`` for the SMTP backend) and
    ``send_mail(auth_user=..., auth_password=...)`` were accepted and ignored without a
    word: a bound on the send that was not kept, a login that never happened; and
    ``get_connection(host=..., port=..., use_tls=...)``, which sent straight to each
    recipient's MX server where the code named a relay."""
    with pytest.warns(UserWarning, match="mailstrom's EmailBackend does not use") as record:
        backend = EmailBackend(**options)  # type: ignore[arg-type]
    assert [named in str(warning.message) for warning in record] == [True]
    assert "s3cret" not in str(record[0].message)
    # The mail is still sent.
    assert backend.send_messages([mail.EmailMessage("Hi", "x", to=["bob@example.org"])]) == 1
    mx.wait_for_messages(1)
    # What Django passes when they are not given says nothing (a warning fails the test).
    EmailBackend(timeout=None, username=None, password=None)
    EmailBackend(host=None, port=None, use_tls=None, use_ssl=None)  # type: ignore[call-arg]
    EmailBackend(username="", password="")
    if not HAS_MAILERS:  # Django 6.1 deprecates send_mail's connection arguments
        with pytest.warns(UserWarning, match="username and password"):
            sent = mail.send_mail(
                "Hi", "x", None, ["ann@example.org"], auth_user="app", auth_password="s3cret"
            )
        assert sent == 1


def test_a_domain_idna_2003_writes_otherwise_is_written_as_it_is_delivered(
    project: None, mx: ReceivingServer, dns_server: LoopbackDNS
) -> None:
    """Django 5.2 writes a domain with the standard library's IDNA 2003 codec, which maps
    ``ß`` to ``ss`` and so names another domain (``faß.example`` is
    ``xn--fa-hia.example``, not ``fass.example``): mailstrom delivered to the domain given
    while To said ``fass.example``, and the Reply-To and a From given in ``headers`` sent
    the replies there. Each header names the domain the envelope goes to."""
    dns_server.mx("xn--fa-hia.example", [(10, "mx.test")])
    message = mail.EmailMessage(
        "Hi",
        "x",
        "Shop <shop@faß.example>",
        ["Bob <bob@faß.example>", "Ärger <c@faß.example>"],
        cc=["carol@example.org"],
        reply_to=["Hilfe <hilfe@faß.example>"],
        headers={"Cc": "Carol <carol@Faß.example>", "Sender": "Büro <s@faß.example>"},
    )
    assert message.send() == 1
    received = mx.wait_for_messages(2)
    assert {m.mail_from for m in received} == {"shop@xn--fa-hia.example"}
    assert sorted(r for m in received for r in m.rcpt_tos) == [
        "bob@xn--fa-hia.example",
        "c@xn--fa-hia.example",
        "carol@example.org",
    ]
    headers = email.message_from_bytes(received[0].content, policy=email.policy.default)
    assert headers["From"] == "Shop <shop@xn--fa-hia.example>"
    assert headers["To"] == "Bob <bob@xn--fa-hia.example>, Ärger <c@xn--fa-hia.example>"
    assert headers["Cc"] == "Carol <carol@xn--fa-hia.example>"
    assert headers["Reply-To"] == "Hilfe <hilfe@xn--fa-hia.example>"
    assert headers["Sender"] == "Büro <s@xn--fa-hia.example>"
    assert b"fass" not in received[0].content
    # The application's message is left as it was.
    assert message.to == ["Bob <bob@faß.example>", "Ärger <c@faß.example>"]


def test_lazy_addresses_are_sent_as_django_sends_them(project: None, mx: ReceivingServer) -> None:
    """The envelope took the lazy objects themselves: InvalidAddress("envelope_from must be
    a str, not __proxy__") for a valid address."""
    as_lazy = lazy(lambda text: text, str)
    message = mail.EmailMessage(
        "Hi", "x", as_lazy("App <app@sender.test>"), [as_lazy("Bob <bob@example.org>")]
    )
    assert message.send() == 1
    [received] = mx.wait_for_messages(1)
    assert received.mail_from == "app@sender.test"
    assert received.rcpt_tos == ("bob@example.org",)


def test_a_lazy_header_name_is_sent_as_django_sends_it(project: None, mx: ReceivingServer) -> None:
    """A header whose name is a lazy string (``gettext_lazy``, as the values may be) was
    refused: InvalidMessage("the EmailMessage cannot be read: TypeError(...__proxy__)"),
    where Django's SMTP backend writes it as its text. It is that text, and checked as any
    name is."""
    as_lazy = lazy(lambda text: text, str)
    message = mail.EmailMessage(
        "Hi", "x", to=["bob@example.org"], headers={as_lazy("X-Campaign"): as_lazy("spring")}
    )
    assert message.send() == 1
    [ours] = mx.wait_for_messages(1)
    assert b"\r\nX-Campaign: spring\r\n" in ours.content
    theirs = django_smtp_would_send(message, mx)
    assert without_volatile_parts(ours.content) == without_volatile_parts(theirs.content)
    assert isinstance(next(iter(message.extra_headers)), Promise)  # the message is as it was
    injected = mail.EmailMessage(
        "Hi", "x", to=["bob@example.org"], headers={as_lazy("X-A: v\r\nBcc: x@evil.example"): "v"}
    )
    with pytest.raises(BadHeaderError):
        injected.send()


def test_a_django_test_run_sends_to_the_outbox_and_queues_nothing(
    project: None, mx: ReceivingServer
) -> None:
    """Django's test runner replaces the backend with its in-memory one (as docs/django.md
    says): the project's tests see ``mail.outbox``, and nothing reaches the store."""
    setup_test_environment()
    try:
        assert mail.send_mail("Hi", "x", None, ["bob@example.org"]) == 1
        assert [m.to for m in mail.outbox] == [["bob@example.org"]]
    finally:
        teardown_test_environment()
    assert get_mailstrom().query_recent() == []
    assert mail.send_mail("Hi", "x", None, ["ann@example.org"]) == 1
    [received] = mx.wait_for_messages(1)
    assert received.rcpt_tos == ("ann@example.org",)


def test_messages_without_recipients_are_skipped_as_django_skips_them(project: None) -> None:
    assert mail.EmailMessage("Hi", "nobody to tell").send() == 0
    assert EmailBackend().send_messages([]) == 0


def test_status_of_a_sent_message(project: None, mx: ReceivingServer) -> None:
    message = mail.EmailMessage("Hi", "Hello", to=["bob@example.org"])
    message.send()
    mx.wait_for_messages(1)
    ms = get_mailstrom()
    status = ms.query_status(message.mailstrom_id)  # type: ignore[attr-defined]
    for _ in range(100):  # the result is recorded a moment after the server's reply
        if status.state is RecipientState.DELIVERED:
            break
        threading.Event().wait(0.05)
        status = ms.query_status(message.mailstrom_id)  # type: ignore[attr-defined]
    assert status.state is RecipientState.DELIVERED


def test_a_worker_process_started_from_a_short_lived_thread_keeps_running(
    dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path
) -> None:
    # The first send often comes from a request thread that ends right after; a worker
    # process must not die with it.
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker="process")
    with override_settings(MAILSTROM=setting):
        sender = threading.Thread(
            target=mail.send_mail, args=("one", "x", None, ["bob@example.org"])
        )
        sender.start()
        sender.join()
        mx.wait_for_messages(1)
        ms = get_mailstrom()
        assert ms.worker_mode == "process"
        threading.Event().wait(1.0)  # a stopping child would be gone by now
        assert ms.worker_status.running
        mail.send_mail("two", "x", None, ["ann@example.org"])
        mx.wait_for_messages(2)
    assert not ms.worker_status.running  # leaving the settings stopped it


def _delete_store(path: Path) -> None:
    # As `rm mail.db*` does (the holders' lock directory stays).
    for file in path.parent.glob(f"{path.name}*"):
        if file.is_file():
            file.unlink()


def _replace_store(path: Path) -> None:
    # As a restore from a backup does: another database moved over the path.
    other = path.with_name("restored.db")
    SQLiteStore(str(other)).close()
    other.replace(path)


@pytest.mark.parametrize("change", [_delete_store, _replace_store], ids=["deleted", "replaced"])
def test_a_store_file_deleted_or_replaced_under_the_process_is_opened_again(
    project: None, mx: ReceivingServer, tmp_path: Path, change: Callable[[Path], None]
) -> None:
    # The store refuses every call once its file is gone: the process kept that store,
    # so every later send raised StoreCorrupt (or lost its mail failing silently).
    assert mail.send_mail("one", "x", None, ["bob@example.org"]) == 1
    mx.wait_for_messages(1)
    change(tmp_path / "mail.db")
    assert mail.send_mail("two", "x", None, ["ann@example.org"]) == 1
    assert mail.send_mail("three", "x", None, ["carol@example.org"], **silently()) == 1
    received = mx.wait_for_messages(3)
    assert sorted(m.rcpt_tos for m in received[1:]) == [
        ("ann@example.org",),
        ("carol@example.org",),
    ]


@pytest.mark.parametrize(
    ("attribute", "entries"),
    [
        # Past max_recipients different recipients (3 here).
        ("to", [f"u{n}@faß.example" for n in range(4)]),
        ("bcc", [f"u{n}@example.org" for n in range(4)]),
        # Past max_recipients + 10,240 mailboxes in the headers Django writes, the same
        # one over and over.
        ("reply_to", ["help@example.org"] * (3 + 10_240 + 1)),
    ],
)
def test_addresses_are_counted_as_they_are_read_and_refused_before_the_rest(
    attribute: str, entries: list[str]
) -> None:
    # Every address was parsed (twice for a domain that is not ASCII) before prepare()
    # refused the message: 40,000 in to took 4 s. The entry after the limit is never read.
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"])
    setattr(message, attribute, [*entries, "not an address"])
    setting = {"store": "memory:", "worker": None, "max_recipients": 3}
    with override_settings(MAILSTROM=setting), pytest.raises(TooManyRecipients):
        EmailBackend().send_messages([message])


def test_a_header_value_past_the_field_limit_is_refused_as_given() -> None:
    # Django parsed and wrote a Cc given in headers whole before mailstrom refused the
    # field it wrote (64,000 mailboxes: 7 s); the value as given is measured first now.
    value = ",  ".join(f"u{n}@faß.example" for n in range(5_000))
    message = mail.EmailMessage("Hi", "x", to=["bob@example.org"], headers={"Cc": value})
    setting = {"store": "memory:", "worker": None}
    with override_settings(MAILSTROM=setting), pytest.raises(HeaderTooLong) as refused:
        EmailBackend().send_messages([message])
    assert refused.value.size == len(f"Cc: {value}".encode())
