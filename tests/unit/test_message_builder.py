"""The Email builder: MIME structure, 7-bit bodies, attachments, extra headers."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest

from mailstrom.errors import (
    InvalidAttachment,
    InvalidHeaderValue,
    InvalidMessage,
    UnknownContentID,
)
from mailstrom.message import Attachment, Email, prepare

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
FROM = "App <app@example.com>"
TO = "bob@example.org"
BASE = {"from_": FROM, "to": TO}


def build(**parts: object) -> EmailMessage:
    email = Email(**{**BASE, **parts})  # type: ignore[arg-type]
    message = message_from_bytes(prepare(email, now=NOW).data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def crlf_free(text: str) -> str:
    return text.replace("\r\n", "\n")


def test_text_only_is_text_plain() -> None:
    message = build(text="Hello\n")
    assert message.get_content_type() == "text/plain"
    assert crlf_free(message.get_content()) == "Hello\n"
    assert message["MIME-Version"] == "1.0"


def test_no_body_at_all_is_an_empty_text_part() -> None:
    message = build()
    assert message.get_content_type() == "text/plain"
    assert message.get_content().strip() == ""


def test_html_only_is_text_html() -> None:
    message = build(html="<p>Hi</p>")
    assert message.get_content_type() == "text/html"


def test_text_and_html_is_alternative() -> None:
    message = build(text="Hi", html="<p>Hi</p>")
    assert message.get_content_type() == "multipart/alternative"
    types = [part.get_content_type() for part in message.iter_parts()]
    assert types == ["text/plain", "text/html"]


def test_attachments_make_mixed_and_keep_bytes() -> None:
    blob = bytes(range(256)) * 3
    message = build(
        text="see attached",
        attachments=[
            Attachment(filename="data.bin", content=blob),
            Attachment(filename="notes.txt", content=b"a\r\nb", content_type="text/plain"),
        ],
    )
    assert message.get_content_type() == "multipart/mixed"
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["data.bin", "notes.txt"]
    assert attachments[0].get_content() == blob
    assert attachments[0].get_content_disposition() == "attachment"
    assert attachments[1].get_content_type() == "text/plain"


def test_only_attachments_without_text() -> None:
    message = build(attachments=[Attachment(filename="a.bin", content=b"\x00\xff")])
    assert message.get_content_type() == "multipart/mixed"
    assert next(message.iter_attachments()).get_content() == b"\x00\xff"


def test_inline_attachment_goes_in_related_with_content_id() -> None:
    message = build(
        text="t",
        html='<img src="cid:logo@app">',
        attachments=[
            Attachment(filename="doc.pdf", content=b"%PDF", content_type="application/pdf"),
            Attachment(
                filename="logo.png",
                content=b"\x89PNG",
                content_type="image/png",
                inline=True,
                content_id="logo@app",
            ),
        ],
    )
    structure = [part.get_content_type() for part in message.walk()]
    assert structure == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    logo = next(p for p in message.walk() if p.get_content_type() == "image/png")
    assert logo["Content-ID"] == "<logo@app>"
    assert logo.get_content_disposition() == "inline"
    # MIME-Version belongs at the top only.
    assert sum(1 for part in message.walk() if "MIME-Version" in part) == 1


def test_non_ascii_bodies_and_names_are_7bit() -> None:
    email = Email(
        from_=FROM,
        to=TO,
        subject="Grüße, 世界",
        text="Grüße\n" + "ü" * 500 + "\n",
        html="<p>世界</p>",
        attachments=[Attachment(filename="résumé.txt", content="é".encode())],
    )
    p = prepare(email, now=NOW)
    assert p.data.isascii()
    assert (p.eightbit, p.smtputf8) == (False, False)
    message = message_from_bytes(p.data, policy=policy.default)
    assert message["Subject"] == "Grüße, 世界"
    assert next(message.iter_attachments()).get_filename() == "résumé.txt"
    assert crlf_free(message.get_body(("plain",)).get_content()) == email.text  # type: ignore[union-attr]


def test_display_names_are_encoded() -> None:
    message = build(from_="Jürgen Ö <j@example.com>", to='"Doe, Jane" <jane@example.org>')
    assert message["From"].addresses[0].display_name == "Jürgen Ö"
    assert message["To"].addresses[0].display_name == "Doe, Jane"


def test_extra_headers_and_reply_to_and_cc() -> None:
    message = build(
        cc=["c@example.org"],
        reply_to="Help <help@example.com>",
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    assert message["X-Campaign"] == "spring"
    assert message["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert message["Reply-To"] == "Help <help@example.com>"
    assert message["Cc"] == "c@example.org"


@pytest.mark.parametrize("content_type", ["nonsense", "multipart/mixed", "text/"])
def test_invalid_attachment_content_type(content_type: str) -> None:
    attachment = Attachment(filename="x", content=b"x", content_type=content_type)
    with pytest.raises(InvalidMessage, match="invalid content type"):
        prepare(Email(from_=FROM, to=TO, attachments=[attachment]))


def test_content_type_parameters_are_kept() -> None:
    attachment = Attachment(
        filename="x.csv", content=b"a,b", content_type="text/csv; charset=us-ascii"
    )
    part = next(build(text="t", attachments=[attachment]).iter_attachments())
    assert part.get_content_type() == "text/csv"
    assert part.get_param("charset") == "us-ascii"


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain; charset=utf-8; charset=iso-8859-1",
        'text/plain; Charset="utf-8"; CHARSET=koi8-r',
        "application/pdf; name=a.pdf; x=1; NAME=b.exe",
    ],
)
def test_a_content_type_naming_a_parameter_twice_is_refused(content_type: str) -> None:
    # RFC 6838 §4.3: a parameter given more than once is an error. Readers differ on
    # which one counts (the stdlib takes the first, others the last): both were sent, so
    # the text was decoded in a charset, or saved under a name, other than the one meant.
    attachment = Attachment(filename="x.txt", content=b"x", content_type=content_type)
    with pytest.raises(InvalidAttachment, match="more than once"):
        prepare(Email(from_=FROM, to=TO, attachments=[attachment]))


@pytest.mark.timeout(20)  # the fault was a hang: 40 s of CPU, growing as the square
@pytest.mark.parametrize("tail", ["", "; charset=utf-8", ";", '; name="a b"'])
def test_a_content_type_with_long_white_space_is_read_in_linear_work(tail: str) -> None:
    """An attachment's content type (often taken from an upload's Content-Type, which
    the uploader chooses) was matched by a regular expression whose runs of white space
    before and after the parameters could split a run in every way: "a/b", 60,000
    spaces and "?" took 40 s of CPU before it was refused, four times that for twice the
    spaces. The runs are matched possessively now, which reads every valid value as
    before and refuses such a one at once."""
    spaces = " " * 60_000
    for bad in (f"a/b{tail}{spaces}?", f"{spaces}a/b{tail}{spaces}?"):
        attachment = Attachment(filename="x", content=b"x", content_type=bad)
        with pytest.raises(InvalidAttachment, match="invalid content type"):
            prepare(Email(from_=FROM, to=TO, attachments=[attachment]))
    # White space around a valid value and its parameters is still taken.
    padded = Attachment(
        filename="x.csv", content=b"a,b", content_type='  text/csv ;  x = y ; z="a b" ;  '
    )
    part = next(build(text="t", attachments=[padded]).iter_attachments())
    assert part.get_content_type() == "text/csv"
    assert (part.get_param("x"), part.get_param("z")) == ("y", "a b")


@pytest.mark.parametrize("bad", ["", "has space@x", "a\r\n@b"])
def test_invalid_message_id(bad: str) -> None:
    with pytest.raises(InvalidMessage):
        prepare(Email(from_=FROM, to=TO, message_id=bad))


def test_email_is_frozen() -> None:
    email = Email(from_=FROM, to=TO)
    with pytest.raises(AttributeError):
        email.subject = "x"  # type: ignore[misc]


def test_long_list_of_encoded_names_keeps_every_address() -> None:
    # Python 3.11's own folder can swallow the comma between two such mailboxes.
    to = [f"Jürgen Müller-{i} <user{i}@example.org>" for i in range(12)]
    to.insert(3, '"Doe, Jane \\"JD\\"" <jane@example.org>')
    message = build(to=to, cc="Team: a@example.org, b@example.org;, U:;")
    names = [(a.display_name, a.addr_spec) for a in message["To"].addresses]
    assert len(names) == 13
    assert names[3] == ('Doe, Jane "JD"', "jane@example.org")
    assert names[12] == ("Jürgen Müller-11", "user11@example.org")
    assert [g.display_name for g in message["Cc"].groups] == ["Team", "U"]


@pytest.mark.parametrize("name", ["In-Reply-To", "References"])
def test_a_field_allowed_once_given_twice_in_headers_is_refused(name: str) -> None:
    """RFC 5322 §3.6 allows one In-Reply-To and one References field; keys that differ
    only in case are two fields, which Gmail refuses at the end of DATA."""
    headers = {name: "<a@example.com>", name.lower(): "<b@example.com>"}
    with pytest.raises(InvalidMessage, match=f"{name.lower()}.*twice"):
        prepare(Email(from_=FROM, to=TO, text="t", headers=headers))


@pytest.mark.parametrize("name", ["In-Reply-To", "References"])
@pytest.mark.parametrize(
    "value", ["a1b2@example.com", "<a1b2@example.com", "Re: your mail", "<a@example.com> x"]
)
def test_a_reply_field_that_holds_no_msg_ids_is_refused(name: str, value: str) -> None:
    """In-Reply-To and References are one or more msg-ids (RFC 5322 §3.6.4); a bare id
    without angle brackets (as ``message_id`` takes it) was sent as given, so no reader
    found the message it answers and the reply lost its thread."""
    with pytest.raises(InvalidHeaderValue, match=name) as caught:
        prepare(Email(from_=FROM, to=TO, text="t", headers={name: value}))
    assert caught.value.header == name


def test_reply_fields_of_msg_ids_with_comments_are_sent_as_given() -> None:
    value = ' <a@example.com>\t(first)  <"b c"@[127.0.0.1]> '
    message = build(
        text="t", headers={"In-Reply-To": "<x@example.com>", "References": value.strip()}
    )
    assert message["In-Reply-To"] == "<x@example.com>"
    assert message["References"] == value.strip()


@pytest.mark.parametrize("content_id", ["cid:logo@app", "<CID:logo@app>", " cid:logo"])
def test_a_content_id_given_as_its_cid_url_is_refused(content_id: str) -> None:
    """``content_id="cid:logo@app"``, copied from the HTML's ``src="cid:logo@app"``, was
    sent as ``Content-ID: <cid:logo@app>``, which that URL does not name (RFC 2392: the
    URL is ``cid:`` and the id): the inline image showed broken in every reader."""
    logo = Attachment(filename="logo.png", content=b"\x89PNG", inline=True, content_id=content_id)
    with pytest.raises(InvalidAttachment, match="without 'cid:'") as caught:
        build(text="t", html='<img src="cid:logo@app">', attachments=[logo])
    assert caught.value.filename == "logo.png"


def test_two_attachments_with_one_content_id_are_refused() -> None:
    """RFC 2392: a Content-ID names one part; ``cid:logo@app`` cannot refer to two."""
    logo = Attachment(filename="logo.png", content=b"\x89PNG", inline=True, content_id="logo@app")
    other = Attachment(
        filename="badge.png", content=b"\x89PNG", inline=True, content_id="<logo@app>"
    )
    with pytest.raises(InvalidAttachment, match="repeats Content-ID") as caught:
        build(text="t", html='<img src="cid:logo@app">', attachments=[logo, other])
    assert caught.value.filename == "badge.png"


@pytest.mark.parametrize(
    ("name", "value"),
    [("Resent-Date", "Mon, 1 Jan 2024 00:00:00 +0000"), ("resent-message-id", "<r@example.com>")],
)
def test_a_resent_field_without_its_block_is_refused(name: str, value: str) -> None:
    """A resent block needs Resent-Date and Resent-From (RFC 5322 §3.6.6: "the
    Resent-From: and Resent-Date: fields MUST be sent"), and ``headers`` cannot give
    Resent-From. A lone Resent-Date or Resent-Message-ID was sent as given: a block the
    RFC forbids, which readers show as a resend by nobody."""
    with pytest.raises(InvalidMessage, match=rf"(?i){name}.*RFC 5322 §3\.6\.6"):
        prepare(Email(from_=FROM, to=TO, text="t", headers={name: value}))


@pytest.mark.parametrize("filename", ["", "   ", "\t", " \xa0 "])
def test_an_attachment_with_a_blank_filename_is_refused(filename: str) -> None:
    """An empty or blank filename (``os.path.basename`` of a path ending in "/") was sent
    as ``filename=""``: readers show a nameless file ("noname", "ATT00001.bin") and save
    it without its type's extension. The filename is required, so a blank one is a
    caller's mistake, refused as other attachment faults are."""
    attachment = Attachment(filename=filename, content=b"x")
    with pytest.raises(InvalidAttachment, match="filename is blank") as caught:
        build(text="t", attachments=[attachment])
    assert caught.value.filename == filename


@pytest.mark.parametrize(
    "html",
    [
        '<img src="cid:logo@app">',
        "<p><IMG SRC = 'CID:logo@app' alt=logo></p>",
        "<img src=cid:logo@app>",
        '<a href="cid:logo%40app">logo</a>',
        '<img src="cid:other@app"><img src="cid:logo@app">',
        # A "cid:" that is no attribute's URL ahead of one that is; text whose lower-case
        # form is longer ("İ" becomes two characters), searched another way.
        '<img alt=cid:x title="see cid:y" src="cid:logo@app">',
        '<p>İstanbul</p><img src="CID:logo@app">',
    ],
)
def test_html_naming_a_content_id_no_attachment_has_is_refused(html: str) -> None:
    """``<img src="cid:logo@app">`` without an attachment of Content-ID ``logo@app``
    (forgotten, or given another id) was sent as is: every reader showed a broken image.
    A mistake of the caller's, refused with the id it names, as other bad input is."""
    other = Attachment(filename="o.png", content=b"\x89PNG", inline=True, content_id="other@app")
    with pytest.raises(UnknownContentID, match=r"'cid:logo@app'") as caught:
        build(text="t", html=html, attachments=[other])
    assert caught.value.content_id == "logo@app"
    assert isinstance(caught.value, InvalidMessage)


@pytest.mark.parametrize(
    "html",
    [
        '<img src="cid:logo@app">',
        '<img src="cid:logo%40app">',
        "<img src='cid:LOGO@APP'>",
        '<img src="cid:logo@app"><img src="cid:50%25@app">',
        '<p>write cid:nothing in text, or <a href="https://x.example/cid:y">here</a></p>',
        '<p>İ data-src=x cid:nothing</p><img src="cid:logo@app">',
    ],
)
def test_html_naming_only_attached_content_ids_is_sent(html: str) -> None:
    logo = Attachment(filename="logo.png", content=b"\x89PNG", inline=True, content_id="logo@app")
    # An id holding "%", named as written (not percent-encoded) by the HTML.
    other = Attachment(filename="o.png", content=b"\x89PNG", inline=True, content_id="50%25@app")
    message = build(text="t", html=html, attachments=[logo, other])
    assert message.get_content_type() == "multipart/alternative"


def test_an_inline_attachment_without_content_id_goes_among_the_attachments() -> None:
    """``inline=True`` without a ``content_id`` went into multipart/related, where nothing
    can refer to it (RFC 2387: its parts are there to be named by the root's cid: URLs):
    readers that show only what the HTML names hid it. It belongs in multipart/mixed,
    shown inline after the body (Content-Disposition: inline, RFC 2183)."""
    message = build(
        text="t",
        html='<img src="cid:logo@app">',
        attachments=[
            Attachment(
                filename="logo.png",
                content=b"\x89PNG",
                content_type="image/png",
                inline=True,
                content_id="logo@app",
            ),
            Attachment(
                filename="chart.png", content=b"\x89PNG1", content_type="image/png", inline=True
            ),
        ],
    )
    structure = [(part.get_content_type(), part.get_filename()) for part in message.walk()]
    assert structure == [
        ("multipart/mixed", None),
        ("multipart/alternative", None),
        ("text/plain", None),
        ("multipart/related", None),
        ("text/html", None),
        ("image/png", "logo.png"),
        ("image/png", "chart.png"),
    ]
    chart = next(p for p in message.walk() if p.get_filename() == "chart.png")
    assert chart.get_content_disposition() == "inline"
    assert "Content-ID" not in chart
    assert chart.get_content() == b"\x89PNG1"


@pytest.mark.parametrize("text", [None, "t"])
def test_an_attachment_the_html_refers_to_goes_with_the_html(text: str | None) -> None:
    """A part the HTML names by ``cid:`` but given without ``inline=True`` went in
    multipart/mixed, beside the body: readers that look for what the HTML names among
    its multipart/related parts showed a broken image. It goes in multipart/related with
    the HTML now; its Content-Disposition stays ``attachment``, as given, and an
    attachment with a Content-ID that the HTML does not name stays among the others."""
    logo = Attachment(
        filename="logo.png", content=b"\x89PNG", content_type="image/png", content_id="logo@app"
    )
    spare = Attachment(
        filename="spare.png", content=b"\x89PNG2", content_type="image/png", content_id="spare@app"
    )
    message = build(text=text, html='<img src="CID:Logo@App">', attachments=[logo, spare])
    structure = [(part.get_content_type(), part.get_filename()) for part in message.walk()]
    html = [("multipart/related", None), ("text/html", None), ("image/png", "logo.png")]
    if text is not None:
        html = [("multipart/alternative", None), ("text/plain", None), *html]
    assert structure == [("multipart/mixed", None), *html, ("image/png", "spare.png")]
    shown = next(p for p in message.walk() if p.get_filename() == "logo.png")
    assert shown["Content-ID"] == "<logo@app>"
    assert shown.get_content_disposition() == "attachment"
    assert shown.get_content() == b"\x89PNG"


def test_an_html_message_with_only_inline_parts_without_content_id_is_mixed() -> None:
    message = build(
        html="<p>see below</p>",
        attachments=[Attachment(filename="a.png", content=b"\x89PNG", inline=True)],
    )
    types = [part.get_content_type() for part in message.walk()]
    assert types == ["multipart/mixed", "text/html", "application/octet-stream"]


def _keywords(data: bytes) -> list[str]:
    """The Keywords of a message, read as RFC 5322 §3.6.5 reads them: a comma-separated
    list of phrases, each decoded on its own (RFC 2047 §5(3))."""
    head = data.partition(b"\r\n\r\n")[0].replace(b"\r\n ", b" ").decode("ascii")
    [value] = [line[9:] for line in head.split("\r\n") if line.startswith("Keywords:")]
    return [str(make_header(decode_header(item.strip()))) for item in value.split(",")]


@pytest.mark.parametrize(
    "value",
    ["Grüße, Köln, plain", "Grüße,Köln", "naïve , café ,tea", "München, " + "Straße " * 20],
)
def test_non_ascii_keywords_are_encoded_one_by_one(value: str) -> None:
    """Keywords is a comma-separated list of phrases (RFC 5322 §3.6.5). Written as
    unstructured text, "Grüße, Köln" became one encoded word holding the comma, which a
    reader splitting at commas took for one keyword; each phrase is encoded on its own
    now, and the commas stay between them."""
    expected = [item.strip() for item in value.split(",")]
    built = prepare(Email(**BASE, text="t", headers={"Keywords": value}), now=NOW)  # type: ignore[arg-type]
    assert _keywords(built.data) == expected
    message = EmailMessage()
    message["From"], message["To"], message["Keywords"] = FROM, TO, value
    message.set_content("t")
    assert _keywords(prepare(message, now=NOW).data) == expected
    assert max(map(len, built.data.split(b"\r\n"))) <= 78


@pytest.mark.parametrize("value", [", ".join(["www"] * 15), "ééé, " + ", ".join(["www"] * 10)])
def test_a_keyword_breaks_onto_the_next_line_with_its_comma(value: str) -> None:
    """The folder judged each keyword alone, then glued its comma after it, so a keyword
    that just fit made its line one longer: "Keywords: www, ... www," was 79 characters
    (RFC 5322 §2.1.1 prefers 78), and 77 with an encoded word on the line (RFC 2047 §2
    allows 76). A keyword and its comma now go onto the next line together."""
    built = prepare(Email(**BASE, text="t", headers={"Keywords": value}), now=NOW)  # type: ignore[arg-type]
    assert _keywords(built.data) == [item.strip() for item in value.split(",")]
    for line in built.data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        assert len(line) <= (76 if b"=?" in line else 78), line


def test_keywords_without_spaces_fold_after_their_commas() -> None:
    """Keywords of tags joined by bare commas had no white space to fold at: 250 of them
    (1,639 characters) were refused with LineTooLong, and any over 78 characters made one
    long line, though the same text in another field is accepted. A line now breaks
    after a comma where it must, which unfolds to a space that no keyword holds."""
    tags = [f"tag{i}" for i in range(250)]
    built = prepare(Email(**BASE, text="t", headers={"Keywords": ",".join(tags)}), now=NOW)  # type: ignore[arg-type]
    assert _keywords(built.data) == tags
    assert max(map(len, built.data.split(b"\r\n"))) <= 78
    # Only where a line breaks: elsewhere the commas stay bare.
    head = built.data.partition(b"\r\n\r\n")[0].decode("ascii")
    [field] = [f for f in head.replace("\r\n ", "\0").split("\r\n") if f.startswith("Keywords")]
    assert field.count(",\0") == field.count("\0") > 1
    assert field.replace(",\0", ",") == "Keywords: " + ",".join(tags)


def test_keywords_that_look_like_an_encoded_word_are_kept_literally() -> None:
    """Text that a reader would decode as an encoded word is encoded itself, so it reads
    back literally; split at its comma, neither half looked like one."""
    for value in ("=?utf-8?q?a,b?=", "x =?utf-8?q?a,b?= ü"):
        built = prepare(Email(**BASE, text="t", headers={"Keywords": value}), now=NOW)  # type: ignore[arg-type]
        assert message_from_bytes(built.data, policy=policy.default)["Keywords"] == value
