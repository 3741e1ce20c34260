"""Header lines at the 998-octet edge: long display names, whitespace, old dates.

Every header line the renderer writes is at most 998 octets (RFC 5322 §2.1.1) for any
valid input, and the stdlib reads back the text that was given.
"""

from __future__ import annotations

from datetime import datetime
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstrom.message import Email, prepare

MAX_LINE = 998


def parsed(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def header_lines(data: bytes) -> list[bytes]:
    return data.partition(b"\r\n\r\n")[0].split(b"\r\n")


def field(data: bytes, name: str) -> str:
    """The value of field ``name`` unfolded as RFC 5322 §2.2.3 says (CRLF removed)."""
    for line in data.partition(b"\r\n\r\n")[0].replace(b"\r\n ", b" ").split(b"\r\n"):
        if line.startswith(name.encode() + b":"):
            return line[len(name) + 1 :].decode("utf-8").strip()
    raise AssertionError(f"no {name} field")


def check_display_name(data: bytes, field_name: str, read: str, name: str) -> None:
    """``read`` (the stdlib's reading of the display name) is ``name``; when the name had
    to be written as encoded words, the RFC 2047 §6.2 reading of the written phrase is
    ``name`` and the stdlib's is too but for the spaces it keeps between two encoded words
    (its reader of phrases does not drop them, as RFC 2047 §6.2 says to)."""
    value = field(data, field_name)
    written = value.partition(":")[0] if value.endswith(";") else value.rpartition(" <")[0]
    if "=?" not in written:
        assert read == name
        return
    assert str(make_header(decode_header(written.removesuffix(" ")))) == name
    assert read.replace(" ", "") == name.replace(" ", "")


def test_long_plain_display_name_is_folded() -> None:
    name = " ".join(["Word"] * 250)  # 1249 characters, a plain RFC 5322 phrase
    data = prepare(Email(from_=f"{name} <a@example.com>", to="b@example.org", text="x")).data
    assert max(map(len, header_lines(data))) <= MAX_LINE
    assert parsed(data)["From"].addresses[0].display_name == name


def test_long_plain_group_name_and_long_atom_are_folded() -> None:
    group = " ".join(["Team"] * 250)
    atom = "A" * 1200  # no line can hold it: encoded words can
    data = prepare(
        Email(from_=f"{atom} <a@example.com>", to=f"{group}: b@example.org;", text="x")
    ).data
    assert max(map(len, header_lines(data))) <= MAX_LINE
    message = parsed(data)
    check_display_name(data, "From", message["From"].addresses[0].display_name, atom)
    assert message["To"].groups[0].display_name == group


def test_date_before_1970_is_not_confused_with_the_epoch() -> None:
    epoch = Email(from_="a@example.com", to="b@example.org", text="x", date=datetime(1970, 1, 1))
    before = Email(
        from_="a@example.com",
        to="b@example.org",
        text="x",
        date=datetime(1969, 12, 31, 23, 59, 59, 500000),
    )
    prepare(epoch)  # its Date is remembered for the next message in the same second
    written = parsed(prepare(before).data)["Date"].datetime.replace(tzinfo=None)
    assert written == datetime(1969, 12, 31, 23, 59, 59)


def test_subject_with_long_word_and_trailing_space() -> None:
    for subject in ("x" * 989 + " ", "a" + " " * 1000 + "b", "a" + " " * 3000 + "b" + " " * 2000):
        data = prepare(
            Email(from_="a@example.com", to="b@example.org", subject=subject, text="x")
        ).data
        assert max(map(len, header_lines(data))) <= MAX_LINE
        assert parsed(data)["Subject"] == subject


SPACE = st.text(" \t", min_size=1, max_size=1).flatmap(
    lambda char: st.sampled_from([1, 2, 77, 78, 79, 900, 989, 998, 999, 1500, 2500]).map(
        lambda size: char * size
    )
) | st.text(" \t", min_size=1, max_size=30)
ATOM = st.one_of(
    st.text("abcXYZ019!#-", min_size=1, max_size=12),
    st.sampled_from([80, 900, 919, 920, 921, 960, 985, 989, 990, 995, 996, 997, 1200]).map(
        lambda size: "w" * size
    ),
)
WORD = ATOM | st.sampled_from(["Grüße", "日本語", "a=?b?q?c?=d", "x" * 40])


def spaced(words: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Words with whitespace runs of random (sometimes very long) lengths between and
    around them."""
    return st.builds(
        lambda head, pairs, tail: head + "".join(s + w for w, s in pairs)[1:] + tail,
        st.just(""),
        st.lists(st.tuples(words, SPACE), min_size=1, max_size=5),
        st.one_of(st.just(""), SPACE),
    ).map(lambda text: text.lstrip(" \t"))


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(subject=spaced(WORD), utf8=st.booleans())
def test_every_subject_line_fits_and_reads_back(subject: str, utf8: bool) -> None:
    # Leading whitespace is not generated: the stdlib strips it from a field's first line.
    sender = "ä@example.com" if utf8 else "a@example.com"  # SMTPUTF8: raw UTF-8 headers
    data = prepare(Email(from_=sender, to="b@example.org", subject=subject, text="x")).data
    assert max(map(len, header_lines(data))) <= MAX_LINE
    assert parsed(data)["Subject"] == subject


@SETTINGS
@given(words=st.lists(ATOM, min_size=1, max_size=6), group=st.booleans())
def test_every_display_name_line_fits_and_reads_back(words: list[str], group: bool) -> None:
    # A display name is a phrase: its words are separated by single spaces, which is
    # what the stdlib's reader normalises any whitespace run between them to.
    name = " ".join(words)
    to = f"{name}: b@example.org;" if group else f"{name} <b@example.org>"
    data = prepare(Email(from_="a@example.com", to=to, text="x")).data
    assert max(map(len, header_lines(data))) <= MAX_LINE
    message = parsed(data)
    read = (
        message["To"].groups[0].display_name if group else message["To"].addresses[0].display_name
    )
    check_display_name(data, "To", read, name)


def test_lines_with_encoded_words_end_by_76_characters() -> None:
    """RFC 2047 §2: a full 75-character word after "Subject: " made an 84-character line;
    the first word is now cut to the room left, and every word still reads back."""
    subject = ("Grüße aus Köln und überall, wo die Sonne scheint " * 4).strip()
    name = "Jürgen Übermütig-Schönfeld von und zu Österreich-Ungarn, Großherzog"
    data = prepare(
        Email(
            from_="app@example.org",
            to=[f'"{name}" <j@example.org>'],
            subject=subject,
            text="hi",
            headers={"X-Long-Field-Name-That-Eats-The-Line": ("Ärger " * 20).strip()},
        )
    ).data
    lines = [line for line in header_lines(data) if b"=?" in line]
    assert lines and max(map(len, lines)) <= 76, lines
    message = parsed(data)
    assert message["Subject"] == subject
    # The stdlib's reader of display names keeps the space between two encoded words
    # (RFC 2047 §6.2 drops it), so a space of the name ending a word reads back doubled.
    assert " ".join(message["To"].addresses[0].display_name.split()) == name
    assert message["X-Long-Field-Name-That-Eats-The-Line"] == ("Ärger " * 20).strip()


def test_white_space_ending_a_field_after_an_encoded_word_keeps_its_line_short() -> None:
    """White space that ends a field cannot fold away from the word before it (RFC 5322
    §3.2.5): after an encoded word it stayed on the word's line, 79 characters and more
    for "ü" and 52 spaces, past RFC 2047 §2's 76. It is encoded with the word now, and
    reads back as given."""
    cases = [
        ("a@example.org", "Subject", "ü" + " " * 52),
        ("a@example.org", "X-Note", "plain words then Grüße" + "\t  " * 30),
        ("a@example.org", "X-Note", "ü" + " " * 2000),  # more than a line holds
        ("jörg@example.org", "Subject", "=?utf-8?q?a?=" + " " * 70),  # UTF-8 headers
    ]
    for sender, name, value in cases:
        if name == "Subject":
            email = Email(from_=sender, to="b@example.org", text="x", subject=value)
        else:
            email = Email(from_=sender, to="b@example.org", text="x", headers={name: value})
        data = prepare(email).data
        lines = [line for line in header_lines(data) if b"=?" in line]
        assert lines and max(map(len, lines)) <= 76, lines
        assert max(map(len, header_lines(data))) <= MAX_LINE
        assert parsed(data)[name] == value, (name, value)


def test_a_word_that_fits_once_re_encoded_is_not_left_too_long() -> None:
    """A 75-character Q word after white space that starts a folded line was left as it
    was (a line of 77 characters and more, past RFC 2047 §2's 76) when the room left
    took it re-encoded as one B word: one word was taken for "no split possible"."""
    for spaces in (2, 10):
        subject = "=?" + " " * spaces + "<_日本=<)é_??" + "z" * 300
        data = prepare(Email(from_="a@example.org", to="b@example.org", subject=subject)).data
        lines = [line for line in header_lines(data) if b"=?utf-8?" in line]
        assert lines and max(map(len, lines)) <= 76, lines
        assert parsed(data)["Subject"] == subject
