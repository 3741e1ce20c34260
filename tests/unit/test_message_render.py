"""The direct renderer: encodings chosen per part, header text, boundaries."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser, Parser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstrom.message import Attachment, Email, prepare
from mailstrom.message.builder import check
from mailstrom.message.render import encode_text, render
from mailstrom.message.words import encoded_words, parameter, unstructured_field

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def parsed(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


@pytest.mark.parametrize(
    ("text", "cte"),
    [
        ("Hello\nworld\n", "7bit"),
        ("x" * 78 + "\n", "7bit"),
        ("x" * 79 + "\n", "quoted-printable"),
        ("naïve\n", "quoted-printable"),
        ("Grüße aus Köln\n", "base64"),
        ("日本語のテキスト\n" * 3, "base64"),
        ("a\0b\n", "quoted-printable"),
    ],
)
def test_transfer_encoding_is_chosen_as_the_stdlib_does(text: str, cte: str) -> None:
    assert encode_text(text)[0] == cte
    # The stdlib's own choice, for comparison.
    message = EmailMessage(policy=policy.SMTP.clone(cte_type="7bit"))
    message.set_content(text)
    if "\0" not in text:  # the stdlib would send a NUL as 7bit, which RFC 2045 forbids
        assert message["Content-Transfer-Encoding"] == cte


# Characters around every rule of the choice: escapes, white space at line ends, long
# lines (the 76/78 limits), every line break, NUL, multi-octet UTF-8.
_TEXT_PIECES = st.sampled_from(
    [*"ab =\t\r\n\0é\x85\x0b", "日本", "😀", "x" * 74, "y" * 79, " \n", "\t\r\n", "\n" * 11]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_TEXT_PIECES, max_size=60).map("".join) | st.text(max_size=300))
def test_transfer_encoding_and_content_agree_with_the_stdlib(text: str) -> None:
    """The choice (7bit, quoted-printable or base64) is the stdlib's for any text, however
    it is reached; the body decodes to the text with CRLF line ends."""
    cte, body = encode_text(text)
    part = parsed(
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {cte}"
        "\r\n\r\n".encode()
        + body
    )
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    expected = "\r\n".join(lines[:-1] if lines[-1] == "" else lines) + "\r\n"
    assert part.get_content() == expected
    assert all(len(line) <= 76 for line in body.split(b"\r\n")) or cte == "7bit"
    if "\0" not in text:  # the stdlib would send a NUL as 7bit, which RFC 2045 forbids
        message = EmailMessage(policy=policy.SMTP.clone(cte_type="7bit"))
        message.set_content(text)
        assert cte == message["Content-Transfer-Encoding"]


def _seven_bit_oracle(text: str) -> bool:
    """Whether ``text`` may be sent 7bit, by the rule itself: ASCII without NUL, and no
    run of 79 characters without a line break once CR LF and CR are LF."""
    lf = text.replace("\r\n", "\n").replace("\r", "\n")
    return lf.isascii() and "\0" not in lf and re.search("[^\n]{79}", lf) is None


@pytest.mark.parametrize(
    ("text", "cte"),
    [
        ("", "7bit"),
        ("\n", "7bit"),
        ("\r\n", "7bit"),
        ("x" * 78, "7bit"),
        ("x" * 79, "quoted-printable"),
        ("x" * 78 + "\r\n", "7bit"),
        ("x" * 78 + "\r", "7bit"),
        ("x" * 78 + "\r\r\n" + "y" * 78, "7bit"),
        ("x" * 39 + "\r" + "y" * 39 + "\n", "7bit"),
        ("a\n" * 5 + "x" * 79 + "\n" + "b\n", "quoted-printable"),
        ("a\r\n" + "x" * 79, "quoted-printable"),
        ("\n" * 3 + "x" * 78 + "\n" * 3, "7bit"),
        ("x" * 998 + "\r\n", "quoted-printable"),
        ("x" * 998, "quoted-printable"),
        ("x" * 999 + "\n", "quoted-printable"),
        (("x" * 78 + "\n") * 200, "7bit"),
        (("x" * 78 + "\r\n") * 200 + "x" * 79, "quoted-printable"),
    ],
)
def test_seven_bit_line_lengths_at_the_edges(text: str, cte: str) -> None:
    """7bit exactly when every line, CR LF, CR and LF ending it alike, has at most 78
    characters: the same choice as the rule itself, and as the stdlib's."""
    assert encode_text(text)[0] == cte
    assert (cte == "7bit") == _seven_bit_oracle(text)
    message = EmailMessage(policy=policy.SMTP.clone(cte_type="7bit"))
    message.set_content(text)
    assert message["Content-Transfer-Encoding"] == cte


_LINE_PIECES = st.sampled_from(["x" * 39, "x" * 40, "x", "\n", "\r", "\r\n", "é", "\0"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINE_PIECES, max_size=40).map("".join))
def test_seven_bit_is_chosen_by_the_rule(text: str) -> None:
    assert (encode_text(text)[0] == "7bit") == _seven_bit_oracle(text)


def test_the_choice_is_the_stdlibs_where_the_two_encodings_are_close() -> None:
    """Quoted-printable and base64 of equal length, or nearly, in short and long lines."""
    for escaped, plain, width in itertools.product(range(0, 60, 3), range(0, 200, 7), (1, 5)):
        line = "é" * escaped + "a" * plain
        text = "\n".join([line] * width) + " \n"
        message = EmailMessage(policy=policy.SMTP.clone(cte_type="7bit"))
        message.set_content(text)
        assert encode_text(text)[0] == message["Content-Transfer-Encoding"], (escaped, plain)


def test_only_cr_and_lf_end_lines_in_a_text_body() -> None:
    body = "form\x0cfeed, tab\tvertical\x0btab, nel\x85 and\u2028separator\n"
    message = parsed(prepare(Email(from_="a@example.com", to="b@example.org", text=body)).data)
    assert message.get_content() == body.replace("\n", "\r\n")


def test_long_plain_words_in_headers_are_not_encoded() -> None:
    """A long URL in List-Unsubscribe must stay a URL: RFC 2047 words are not allowed in
    structured headers, and the line limit is 998, not 78."""
    url = "<https://example.com/unsubscribe?token=" + "x" * 300 + ">"
    field = unstructured_field("List-Unsubscribe", f"{url}, <mailto:u@example.com>", utf8=False)
    assert field.startswith(f"List-Unsubscribe: {url},\r\n <mailto:u@example.com>")
    assert "=?" not in field
    # Only a word that cannot fit in 998 octets is encoded, so that it can be split.
    assert unstructured_field("X-A", "y" * 2000, utf8=False).startswith("X-A: =?utf-8?q?")


def test_text_that_looks_encoded_reaches_the_reader_literally() -> None:
    subject = "Literal =?utf-8?q?=41?= here, and a=?b too"
    message = parsed(
        prepare(Email(from_="a@example.com", to="b@example.org", subject=subject)).data
    )
    assert message["Subject"] == subject


@pytest.mark.parametrize(
    "subject",
    [
        "=?utf-8?q?a b?=",
        "Sale: =?utf-8?q?50% off?= today",
        "=?us-ascii?q?Evil Corp?=",
        "x =?utf-8?b?aGk gaGk=?= y",
        "=?a =?b?q?c d?=",
    ],
)
@pytest.mark.parametrize("field", ["Subject", "X-Note", "Keywords"])
def test_text_that_looks_encoded_across_a_space_reaches_the_reader_literally(
    subject: str, field: str
) -> None:
    """Readers take an encoded word from "=?" to the first "?=" after it, white space
    inside included (the stdlib does): written as is, "=?utf-8?q?a b?=" was read as "a b"."""
    email = (
        Email(from_="a@example.com", to="b@example.org", subject=subject)
        if field == "Subject"
        else Email(from_="a@example.com", to="b@example.org", headers={field: subject})
    )
    assert parsed(prepare(email).data)[field] == subject


@pytest.mark.parametrize("subject", ["=??q?=41", "Total =?utf-8?q?=20 off"])
def test_text_the_stdlib_reads_as_an_unclosed_encoded_word_reaches_it_literally(
    subject: str,
) -> None:
    """The stdlib takes a "?=" followed by two hex digits for an =XX of the word's text
    and reads on to the next "?=" or the end: "=??q?=41", never closed, was read as "A"."""
    email = Email(from_="a@example.com", to="b@example.org", subject=subject)
    assert parsed(prepare(email).data)["Subject"] == subject


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text("abcdefghijklmnopqrstuvwxyzéü€", min_size=1, max_size=9), min_size=2, max_size=40
    ),
    st.sampled_from([", ", ","]),
)
def test_keyword_lines_keep_their_limits(words: list[str], comma: str) -> None:
    """A Keywords list of short words folds to lines of at most 78 characters, and of at
    most 76 where one holds an encoded word (RFC 2047 §2): a comma glued after a keyword
    that just fit made its line one longer, and bare commas left no place to fold."""
    folded = unstructured_field("Keywords", comma.join(words), utf8=False)
    for line in folded.split("\r\n"):
        assert len(line) <= (76 if "=?" in line else 78), line


class _PlusTwo(tzinfo):
    """UTC+2 written as the datetime docs teach (dateutil's and pytz's zones are such
    Python classes); ``meanwhile`` runs once inside ``utcoffset()``, where a thread
    switch can fall, as another thread that took the interpreter there would."""

    def __init__(self) -> None:
        self.meanwhile: Callable[[], object] | None = None

    def utcoffset(self, dt: datetime | None) -> timedelta:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return timedelta(hours=2)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)


def test_a_date_remembered_meanwhile_is_not_another_messages() -> None:
    """The renderer remembers the last Date it formatted, and read it twice: a message
    prepared by another thread between the reads (a switch inside a Python zone's
    utcoffset(), as the two are compared) gave this one its Date. Two threads preparing
    messages of two dates, one in such a zone, wrote 28 wrong Dates in 100,000."""
    first = _PlusTwo()
    when = datetime(2024, 5, 6, 9, 8, 9, tzinfo=first)

    def date_of(given: datetime) -> str | None:
        data = prepare(Email(from_="a@example.com", to="b@example.org", date=given)).data
        return parsed(data)["Date"]

    assert date_of(when) == "Mon, 06 May 2024 09:08:09 +0200"
    first.meanwhile = lambda: date_of(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC))
    # The same time in another zone object: compared with the remembered one, whose
    # utcoffset() prepares the other message.
    assert date_of(when.replace(tzinfo=_PlusTwo())) == "Mon, 06 May 2024 09:08:09 +0200"
    assert first.meanwhile is None  # it did run in between


def test_encoded_words_never_split_a_character() -> None:
    for word in encoded_words("😀é" * 100):
        assert len(word) <= 75
        assert word.startswith("=?utf-8?")


@pytest.mark.parametrize(
    "name",
    [
        "Jörg Müller-Lüdenscheidt von und zu Großbritannien",
        "Zoë Ünïcødé Nummer 0 aus Köln am Rhein und noch mehr Text",
    ],
)
def test_a_long_encoded_name_is_split_between_its_words(name: str) -> None:
    """RFC 2047 decoders drop the space between two encoded words, but the stdlib's
    reader of display names keeps it: a name split inside a word read as "Großbri
    tannien". A word now ends after a space where it can, so such a reader shows at worst
    two spaces; a decoder that follows RFC 2047 reads the name exactly either way."""
    words = encoded_words(name)
    assert len(words) > 1
    assert all(word.endswith("_?=") for word in words[:-1])
    data = prepare(Email(from_=f'"{name}" <a@example.com>', to="b@example.org")).data
    shown = parsed(data)["From"].addresses[0].display_name
    assert shown.split() == name.split()


@pytest.mark.parametrize(
    ("name", "address"),
    [
        (
            "Support, Example Corp. (EMEA region) - orders, returns, billing and shipping",
            "s@example.org",
        ),
        (
            'The "Quoted" Team, Dept. of A\\B: customer care, orders, returns and billing',
            "s@example.org",
        ),
        # With UTF-8 header fields the name is written raw (RFC 6532).
        ("Jörg Müller-Lüdenscheidt, Abteilung für Kundenbetreuung (Köln am Rhein)", "jörg@x.org"),
        (" lead and trail, " + "x " * 40, "s@example.org"),
    ],
)
def test_a_long_printable_name_is_a_folded_quoted_string(name: str, address: str) -> None:
    """A printable name too long for one line went out as RFC 2047 words (B-encoded
    ASCII), which the stdlib's reader of display names reads with a space added at every
    word break. It is now a quoted string folded at its own spaces (RFC 5322 §3.2.4
    allows FWS inside one), which every reader unfolds to the name exactly."""
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    data = prepare(Email(from_="a@example.com", to=f"{quoted} <{address}>", text="x")).data
    head = data.partition(b"\r\n\r\n")[0]
    message = Parser(policy=policy.default).parsestr(data.decode("utf-8"))
    [shown] = message["To"].addresses
    assert (shown.display_name, shown.addr_spec) == (name, address)
    assert b"=?" not in head
    assert all(len(line) <= 78 for line in head.decode("utf-8").split("\r\n"))


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("Doe\tJane", "jane@example.org"),
        ("Sales team,\tEMEA (orders)", "sales@example.org"),
        ("Jörg\tMüller", "jörg@example.org"),
    ],
)
def test_a_tab_in_a_display_name_reaches_the_reader(name: str, address: str) -> None:
    """A tab (pasted from a spreadsheet, say) made the name RFC 2047 words, which the
    stdlib's reader decodes with the tab turned into a space; a quoted string may hold
    it (RFC 5322 §3.2.4), and every reader keeps it there."""
    quoted = '"' + name.replace('"', '\\"') + '"'
    data = prepare(Email(from_="a@example.com", to=f"{quoted} <{address}>", text="x")).data
    [shown] = Parser(policy=policy.default).parsestr(data.decode("utf-8"))["To"].addresses
    assert (shown.display_name, shown.addr_spec) == (name, address)


def test_long_non_ascii_filename_uses_rfc_2231_sections() -> None:
    name = "Résumé " * 20 + ".pdf"
    pieces = parameter("filename", name)
    assert len(pieces) > 1 and all(len(piece) < 78 for piece in pieces)
    data = prepare(
        Email(
            from_="a@example.com",
            to="b@example.org",
            attachments=[Attachment(filename=name, content=b"%PDF")],
        )
    ).data
    assert next(parsed(data).iter_attachments()).get_filename() == name


@pytest.mark.parametrize("name", ["filename", "x-a-parameter-with-a-long-name", "n" * 40])
@pytest.mark.parametrize("value", ["報" * 200, "v" * 1200, "é" * 3])
def test_a_parameter_s_pieces_fit_a_line_whatever_its_name(name: str, value: str) -> None:
    """A piece's line (a leading space, the piece, its ";") within 78 octets: the sections
    held 60 octets of value whatever the name, so a 30-character name made 97-octet
    lines (the Django backend splits parameters Django writes with any name)."""
    pieces = parameter(name, value)
    assert all(len(f" {piece};") <= 78 for piece in pieces)
    header = "Content-Type: application/x-test;" + ";".join(f"\r\n {p}" for p in pieces)
    parsed = Parser(policy=policy.default).parsestr(header + "\r\n\r\nx")
    assert parsed.get_param(name) == value


def test_a_boundary_found_in_the_content_is_not_used() -> None:
    email = Email(
        from_="a@example.com", to="b@example.org", text="--=_taken\nmore\n", html="<p>x</p>"
    )
    boundaries = iter(["=_taken", "=_free"])
    data = render(
        check(email), date=NOW, message_id="<m@x>", utf8=False, boundary=lambda: next(boundaries)
    )
    assert b'boundary="=_free"' in data
    assert parsed(data).get_body(("plain",)).get_content() == "--=_taken\r\nmore\r\n"  # type: ignore[union-attr]


def test_boundaries_differ_between_messages() -> None:
    email = Email(from_="a@example.com", to="b@example.org", text="t", html="<p>h</p>")
    found = {parsed(prepare(email).data).get_boundary() for _ in range(20)}
    assert len(found) == 20


def test_related_part_names_its_root_type() -> None:
    """RFC 2387 §3.1: multipart/related carries the type of its root part."""
    email = Email(
        from_="a@example.com",
        to="b@example.org",
        html='<img src="cid:i@x">',
        attachments=[
            Attachment(filename="i.png", content=b"\x89PNG", inline=True, content_id="i@x")
        ],
    )
    related = parsed(prepare(email).data)
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "text/html"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_same_input_same_bytes_except_ids(count: int) -> None:
    """Rendering is a function of the input: only the Message-ID and boundaries vary."""
    email = Email(
        from_="Ann <a@example.com>",
        to=[f"user{i}@example.org" for i in range(count)],
        subject="s",
        text="t",
        message_id="<fixed@example.com>",
    )
    outputs = {prepare(email, now=NOW).data for _ in range(3)}
    assert len(outputs) == 1


def test_distinct_addresses_validate_each_domain_once() -> None:
    """The domain verdict is cached: new local parts at a known domain skip email-validator."""
    from mailstrom.message import addrspec

    addrspec._domain.cache_clear()
    serial = itertools.count()
    for _ in range(50):
        prepare(Email(from_=f"s{next(serial)}@shop.example", to=f"c{next(serial)}@shop.example"))
    assert addrspec._domain.cache_info().misses == 1


def test_naive_now_is_taken_as_utc() -> None:
    email = Email(from_="a@example.com", to="b@example.org")
    data = prepare(email, now=datetime(2024, 5, 6, 7, 8, 9)).data
    assert parsed(data)["Date"].datetime == NOW


@pytest.mark.parametrize(
    ("content_type", "content", "charset"),
    [
        ("text/plain", "Grüße aus Köln\n".encode(), "utf-8"),
        ("text/csv", "name,city\nZoë,Zürich\n".encode(), "utf-8"),
        ("text/plain", b"plain ASCII\n", None),  # US-ASCII, the default, is right
        ("text/plain", "Grüße\n".encode("latin-1"), None),  # not UTF-8: nothing guessed
        ("text/plain; charset=iso-8859-1", "Grüße\n".encode("latin-1"), "iso-8859-1"),
        ("application/octet-stream", "Grüße\n".encode(), None),
    ],
)
def test_a_text_attachment_given_as_utf8_bytes_says_its_charset(
    content_type: str, content: bytes, charset: str | None
) -> None:
    # Without a charset parameter text is US-ASCII (RFC 2046 §4.1.2): a UTF-8 attachment
    # was shown as "Gr����e" by readers and by get_content() of the received copy.
    email = Email(
        from_="a@example.com",
        to="b@example.org",
        text="See the file.",
        attachments=[Attachment(filename="f.txt", content=content, content_type=content_type)],
    )
    part = next(parsed(prepare(email, now=NOW).data).iter_attachments())
    assert part.get_param("charset") == charset
    assert part.get_payload(decode=True) == content
    assert str(part["Content-Type"]).count("charset") == (charset is not None)
    if charset is not None:
        assert part.get_content() == content.decode(charset)
