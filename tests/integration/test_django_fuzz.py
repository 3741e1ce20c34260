"""Fuzzing the Django email backend with what an application builds from its users' data:
subjects, names and addresses with line breaks or junk, extra headers with odd names and
values, attachments with odd filenames, types and contents (None, bytes, lazy strings),
alternatives with odd types, bytes bodies, odd encodings, and attributes an application
set after construction.

Whatever the messages hold, ``send_messages`` returns how many it queued and raises only
mailstrom's typed errors (:class:`~mailstrom.MailstromError`); with ``fail_silently`` it
raises nothing, and queues exactly the messages it counts. No queued message carries a
header line that came from the application's text (the generators put ``X-Injected:``
after a line break in header-bound text only).

The backend queues in a memory store without a worker: nothing is delivered.
``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (200 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/integration/test_django_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from email.mime.base import MIMEBase
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.django_project import configure

configure()

from django.core import mail  # noqa: E402  (Django must be configured first)
from django.test import override_settings  # noqa: E402
from django.utils.functional import lazy  # noqa: E402

from mailstrom.contrib.django import EmailBackend, get_mailstrom  # noqa: E402
from mailstrom.errors import MailstromError  # noqa: E402
from tests.support.django import attach_mime_base  # noqa: E402

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "200"))
INJECTED = "X-Injected: 1"
_INJECTED_LINE = re.compile(rb"(?im)^x-injected:")


@pytest.fixture(scope="module", autouse=True)
def project() -> Iterator[None]:
    with override_settings(MAILSTROM={"store": "memory:", "worker": None}):
        yield


# --- the inputs --------------------------------------------------------------------------

lazy_str = lazy(lambda text: text, str)

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
BREAKS = st.sampled_from(["\r\n", "\n", "\r", "\r\n ", "\n\t", "\x0b", "\x0c", "\x85", "\u2028"])
INJECTION = st.builds(lambda a, br, b: f"{a}{br}{INJECTED}{br}{b}", TEXT, BREAKS, TEXT)
"""Text bound for a header, carrying a header line of its own after a line break."""
ODD = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\udc80",  # a lone surrogate, as surrogateescape leaves undecodable bytes
        "=?utf-8?q?x?=",
        "é" * 200,
        "x" * 1200,
        '"',
        "<>",
        "\t",
    ]
)
HEADER_TEXT = st.one_of(TEXT, ODD, INJECTION)


def _lazy_or_plain(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, strategy.map(lazy_str))


LOCAL = st.one_of(st.sampled_from(["bob", "a.b+c", "ñoño", '"q x"', "x" * 70]), TEXT)
DOMAIN = st.one_of(
    st.sampled_from(["example.org", "bücher.example", "[127.0.0.1]", "localhost", "x" * 64]),
    TEXT,
)
ADDRESS = st.one_of(
    st.builds("{}@{}".format, LOCAL, DOMAIN),
    st.builds("{} <{}@{}>".format, HEADER_TEXT, LOCAL, DOMAIN),
    st.builds('"{}" <{}@example.org>'.format, HEADER_TEXT, LOCAL),
    st.sampled_from(["bob@example.org", "Bob <bob@example.org>", "undisclosed-recipients:;"]),
    HEADER_TEXT,
)
GOOD_ADDRESS = st.sampled_from(
    ["bob@example.org", "Carol <carol@example.net>", "Ñoño Müller <nono@bücher.example>"]
)
GOOD_ADDRESSES = st.lists(GOOD_ADDRESS, max_size=2)
ADDRESSES = st.one_of(
    GOOD_ADDRESSES, GOOD_ADDRESSES, st.lists(_lazy_or_plain(ADDRESS), min_size=1, max_size=3)
)
SUBJECT = st.one_of(
    st.sampled_from(["Hello", "Grüße — ✓", "Re: [x] 50% off"]),
    st.sampled_from(["Hello", "Grüße — ✓"]).map(lazy_str),
    _lazy_or_plain(HEADER_TEXT),
    st.none(),
)
BODY = st.one_of(
    st.sampled_from(["Hello", "Grüße\n", ""]),
    _lazy_or_plain(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)),
    st.binary(max_size=100),
    st.sampled_from(["\udc80", "x" * 2000, "a\r\n.\r\nb", "é\n" * 50, None]),
)
MIMETYPE = st.one_of(
    st.none(),
    st.sampled_from(["text/plain", "application/pdf", "text/html"]),
    st.sampled_from(
        [
            "text/plain",
            "text/html",
            "text/x-odd",
            "application/pdf",
            "message/rfc822",
            "multipart/mixed",
            "image/png",
            "text/plain; charset=no-such",
            "nonsense",
            "/",
            "text/",
            "a/b/c",
        ]
    ),
    HEADER_TEXT,
    st.builds("{}/{}".format, TEXT, HEADER_TEXT),
)
FILENAME = st.one_of(
    st.none(),
    st.sampled_from(["a.txt", "report.pdf", "page.html"]),
    st.sampled_from(["a.txt", "ä ö.pdf", 'q"uote.txt', "x" * 300 + ".txt", "../../etc/passwd"]),
    HEADER_TEXT,
)
CONTENT = st.one_of(
    st.none(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=100),
    st.binary(max_size=100),
    st.sampled_from(["\udc80", b"\xff\xfe", "x" * 3000]),
    st.text(max_size=20).map(lazy_str),
)
ATTACHMENT = st.tuples(st.sampled_from(["attach", "append", "mime"]), FILENAME, CONTENT, MIMETYPE)
ALTERNATIVE = st.tuples(CONTENT, MIMETYPE)
HEADER_NAME = st.one_of(
    st.sampled_from(
        ["X-Tag", "Reply-To", "To", "From", "Subject", "Bcc", "Message-ID", "Date", "X-Ä"]
    ),
    st.sampled_from(["X-Tag", "List-Unsubscribe", "X-Priority"]),
    HEADER_TEXT,
)
HEADER_VALUE = st.one_of(
    _lazy_or_plain(HEADER_TEXT),
    st.integers(),
    st.none(),
    st.sampled_from(["<id@example.org>", "Mon, 1 Jan 2024 00:00:00 +0000"]),
)
ENCODING = st.sampled_from([None, "utf-8", "latin-1", "us-ascii", "utf-16", "no-such"])


SANE_HEADERS = st.sampled_from([{}, {"X-Tag": "v"}, {"List-Unsubscribe": "<mailto:u@example.org>"}])


@st.composite
def messages(draw: st.DrawFn, *, odd_envelope: bool) -> mail.EmailMessage:
    """A message as an application builds it, sometimes changed after construction; with
    ``odd_envelope`` False its subject, addresses and headers are sane, so that it gets as
    far as its parts (body, attachments, alternatives, encoding)."""
    kind = draw(st.sampled_from([mail.EmailMessage, mail.EmailMultiAlternatives]))
    if odd_envelope:
        envelope = {
            "subject": draw(SUBJECT),
            "from_email": draw(
                st.one_of(
                    st.none(), GOOD_ADDRESS, GOOD_ADDRESS.map(lazy_str), _lazy_or_plain(ADDRESS)
                )
            ),
            "to": draw(st.one_of(st.lists(GOOD_ADDRESS, min_size=1, max_size=2), ADDRESSES)),
            "cc": draw(st.one_of(st.just([]), ADDRESSES)),
            "bcc": draw(st.one_of(st.just([]), ADDRESSES)),
            "reply_to": draw(st.one_of(st.just([]), ADDRESSES)),
            "headers": draw(
                st.one_of(st.just({}), st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=3))
            ),
        }
    else:
        envelope = {
            "subject": draw(st.sampled_from(["Hello", "Grüße — ✓"])),
            "from_email": draw(st.one_of(st.none(), GOOD_ADDRESS)),
            "to": draw(st.lists(GOOD_ADDRESS, min_size=1, max_size=2)),
            "cc": draw(GOOD_ADDRESSES),
            "bcc": draw(GOOD_ADDRESSES),
            "reply_to": draw(GOOD_ADDRESSES),
            "headers": draw(SANE_HEADERS),
        }
    body = draw(BODY)
    message = kind(body=body, **envelope)
    recipe: dict[str, Any] = {"kind": kind.__name__, "body": body, **envelope}
    message.encoding = recipe["encoding"] = draw(ENCODING)
    if draw(st.booleans()):
        message.content_subtype = recipe["content_subtype"] = draw(
            st.sampled_from(["html", "x-odd", "plain"])
        )
    recipe["attachments"] = draw(st.lists(ATTACHMENT, max_size=2))
    for how, filename, content, mimetype in recipe["attachments"]:
        _attach(message, how, filename, content, mimetype)
    if isinstance(message, mail.EmailMultiAlternatives):
        recipe["alternatives"] = draw(st.lists(ALTERNATIVE, max_size=2))
        message.alternatives.extend(recipe["alternatives"])
    message.recipe = recipe  # type: ignore[attr-defined]  # for a failing example's note
    return message


def _attach(
    message: mail.EmailMessage, how: str, filename: Any, content: Any, mimetype: Any
) -> None:
    if how == "append":  # as an application may fill the list itself
        message.attachments.append((filename, content, mimetype))
    elif how == "mime":
        part = MIMEBase("application", "octet-stream")
        part.set_payload(content if isinstance(content, bytes | str) else b"")
        if filename is not None:
            try:
                part.add_header("Content-Disposition", "attachment", filename=str(filename))
            except (ValueError, TypeError):
                return  # the standard library refused it to the application
        attach_mime_base(message, part)
    else:
        # Django may refuse it to the application, before any send.
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message.attach(filename, content, mimetype)


# --- the property ------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batch=st.lists(
        st.one_of(messages(odd_envelope=True), messages(odd_envelope=False)),
        min_size=1,
        max_size=3,
    ),
    fail_silently=st.booleans(),
)
def test_send_messages_counts_what_it_queued_and_raises_only_typed_errors(
    batch: list[mail.EmailMessage], fail_silently: bool
) -> None:
    for message in batch:
        note(repr(message.recipe))  # type: ignore[attr-defined]
    backend = EmailBackend(fail_silently=fail_silently)
    refused: MailstromError | None = None
    try:
        sent = backend.send_messages(batch)
    except MailstromError as exc:
        refused = exc
    if refused is not None:
        assert not fail_silently, f"fail_silently raised {refused!r}"
        event(f"refused: {type(refused).__name__}")
        assert not any(hasattr(m, "mailstrom_id") for m in batch)  # all or nothing
        return
    queued = [m for m in batch if hasattr(m, "mailstrom_id")]
    assert sent == len(queued)
    event(f"queued {sent} of {len(batch)}")
    store = get_mailstrom().store
    for message in queued:
        data = store.message_data(message.mailstrom_id)  # type: ignore[attr-defined]
        assert not _INJECTED_LINE.search(data), data[:2000]
