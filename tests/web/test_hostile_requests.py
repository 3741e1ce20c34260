"""What the dashboard's fuzzing (``test_web_fuzz.py``) found, one request each: input a
client controls that made a 500, a redirect or a log line out of the client's text, or an
error page quoting all of it."""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mailstrom.stores import SQLiteStore, Store
from mailstrom.web import create_app
from tests.contract.support import NOW, message


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "queue.db")
    yield opened
    opened.close()


def _client(
    store: Store, token: str | None = None, hosts: tuple[str, ...] = ()
) -> Iterator[TestClient]:
    app = create_app(store, clock=lambda: NOW, token=token, hosts=hosts)
    with TestClient(app, base_url="http://127.0.0.1:8025") as client:
        yield client


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    yield from _client(store)


@pytest.mark.parametrize(
    "cookie", [b"mailstrom_session_8025=\xe9t\xe9", b"mailstrom_session_8025=\x80"]
)
def test_a_session_cookie_with_latin_1_octets_is_refused_not_a_crash(
    store: Store, cookie: bytes
) -> None:
    """hmac.compare_digest raised TypeError for a str with non-ASCII characters."""
    for client in _client(store, token="s3cret-s3cret-s3cret"):
        page = client.get("/queue", headers={"Cookie": cookie}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login?")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/queue?after=1." + "9" * 19, "not a page cursor"),  # past a 64-bit integer
        ("/queue?after=1.%C2%B2", "not a page cursor"),  # "²" is a digit to str.isdigit
        ("/queue?limit=%C2%B2%C2%B2", "page size must be one of"),
        ("/destinations?offset=" + "9" * 30, "offset must be a number from 0 to"),
        ("/destinations?offset=%D9%A3", "offset must be a number from 0 to"),
    ],
)
def test_numbers_past_what_a_store_holds_are_a_clear_400(
    client: TestClient, path: str, problem: str
) -> None:
    """SQLite raised OverflowError for a cursor's seq or an offset past 2**63 (a 500)."""
    page = client.get(path)
    assert page.status_code == 400 and problem in page.text


def test_an_error_quotes_a_short_piece_of_a_long_value(client: TestClient) -> None:
    page = client.get("/queue", params={"age": "z" * 5000})
    assert page.status_code == 400 and "not a duration" in page.text
    assert "z" * 100 not in page.text  # all 5,000 were on the page


def test_a_trailing_slash_is_not_a_redirect_to_the_host_header(store: Store) -> None:
    """Starlette answered "/queue/" with a 307 to http://<Host header>/queue."""
    for client in _client(store, token="s3cret-s3cret-s3cret", hosts=("evil.example",)):
        page = client.get(
            "/queue/",
            headers={"Host": "evil.example", "Authorization": "Bearer s3cret-s3cret-s3cret"},
            follow_redirects=False,
        )
        assert page.status_code == 404 and "location" not in page.headers


def test_a_malformed_host_header_is_a_deliberate_answer(store: Store) -> None:
    """Starlette before 1.1 raised ValueError building request.url from Host "[::1" (a
    500); later versions use the socket's address instead, and the request goes on."""
    for client in _client(store, token="s3cret-s3cret-s3cret"):
        page = client.get(
            "/queue",
            headers={"Host": "[::1", "Authorization": "Bearer s3cret-s3cret-s3cret"},
            follow_redirects=False,
        )
        assert page.status_code in (200, 400), page.status_code


def test_a_message_id_with_a_final_line_break_is_no_message(
    client: TestClient, store: Store
) -> None:
    mid = store.enqueue(message("a@one.example"), now=NOW)
    for path in (f"/message/{mid}%0A", f"/action/hold/{mid}%0A"):
        assert client.get(path).status_code == 404


def test_log_lines_quote_what_the_client_sent(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A line break in a path (``%0A``) wrote a forged line into the log."""
    app = create_app(store, clock=lambda: NOW)
    with (
        TestClient(app, base_url="http://evil.example") as client,
        caplog.at_level(logging.WARNING, logger="mailstrom.web"),
    ):
        client.get("/x%0A2030-01-01 admin logged in")
    with (
        TestClient(app, base_url="http://127.0.0.1") as client,
        caplog.at_level(logging.WARNING, logger="mailstrom.web"),
    ):
        client.post("/x%0Aforged", headers={"Origin": "http://evil.example/" + "o" * 500})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("\n" not in line and len(line) < 300 for line in lines), lines


def _post_login(app: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> list[dict[str, Any]]:
    """One POST /login through the ASGI interface with these headers; what was sent back."""
    sent: list[dict[str, Any]] = []
    received: list[int] = []

    async def receive() -> dict[str, Any]:
        received.append(len(body))
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/login",
        "raw_path": b"/login",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert not received, "the body was read"
    return sent


@pytest.mark.parametrize("encoding", [b"chunked", b"gzip, chunked"])
def test_a_body_framed_by_transfer_encoding_is_refused_whatever_its_length_says(
    store: Store, encoding: bytes
) -> None:
    """With Transfer-Encoding the server frames the body by it and ignores Content-Length
    (RFC 9112 §6.1): a short length would let any size through to the login form."""
    app = create_app(store, token="t0ken-t0ken-t0ken", clock=lambda: NOW)
    sent = _post_login(
        app, [(b"content-length", b"10"), (b"transfer-encoding", encoding)], b"x" * 100_000
    )
    assert sent[0]["status"] == 413


def test_an_empty_token_is_refused(store: Store) -> None:
    # Required, it would be matched by an empty one: "Authorization: Bearer " let in.
    with pytest.raises(ValueError, match="empty"):
        create_app(store, token="")


def test_a_content_length_that_is_not_ascii_digits_is_refused(store: Store) -> None:
    """A server passes on any Content-Length it is given (uvicorn checks it; others may
    not): "²" is a digit to str.isdigit, and int() raised ValueError (a 500)."""
    app = create_app(store, clock=lambda: NOW)
    sent = _post_login(app, [(b"content-length", b"\xb2")], b"csrf=x")
    assert sent[0]["status"] == 413


@pytest.mark.parametrize(
    "field",
    [
        b"X-Campaign: =?utf-8?b?A?=",  # base64 that does not decode: HeaderParseError
        "X-Campaign: =?x\u00e9?q?abc?=".encode(),  # a charset name not in ASCII: CharsetError
        # Raw UTF-8 beside it: each word is decoded where it stands, and this one is none
        # (it recursed without end: a RecursionError, a 500).
        "X-Campaign: caf\u00e9 =?x\u00e9?q?abc?= =?utf-8?b?A?=".encode(),
    ],
)
def test_a_header_field_with_a_broken_encoded_word_is_shown_as_written(
    store: Store, client: TestClient, field: bytes
) -> None:
    """The message's page decodes encoded-words for display; the stdlib's own errors for a
    malformed one (no ValueError) made the page a 500."""
    data = b"Subject: Hello\r\n" + field + b"\r\n\r\nHi there.\r\n"
    mid = store.enqueue(message("a@one.example", data=data), now=NOW)
    page = client.get(f"/message/{mid}")
    assert page.status_code == 200
    assert html.escape(field.decode().partition(": ")[2], quote=False) in page.text


class _Reads:
    """A read model that keeps the size of each message it handed out."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def message_data(self, message_id: str, **options: Any) -> bytes:
        data: bytes = self.model.message_data(message_id, **options)
        self.sizes.append(len(data))
        return data


def test_a_large_message_is_read_only_as_far_as_its_page_shows_it(tmp_path: Path) -> None:
    """The message's page shows the header section (64 KiB at most) and, asked for, the
    first 1 MiB of the message; it read the whole message from the store each time, all
    of a 50 MB one, for a page that showed a part of it."""
    from mailstrom.readmodel import open_read_model
    from mailstrom.web.headers import MAX_BODY_BYTES, MAX_HEADER_BYTES

    store = SQLiteStore(tmp_path / "q.db")
    line = b"x" * 998 + b"\r\n"
    data = b"Subject: Big\r\n\r\n" + line * (6 * 1024 * 1024 // len(line))
    mid = store.enqueue(message("a@one.example", data=data), now=NOW)
    reads = _Reads(open_read_model(store))
    try:
        app = create_app(store, read_model=reads, clock=lambda: NOW)  # type: ignore[arg-type]
        with TestClient(app, base_url="http://127.0.0.1:8025") as client:
            page = client.get(f"/message/{mid}")
            assert page.status_code == 200 and "Big" in page.text
            assert f"{len(data):,} bytes" in page.text
            raw = client.get(f"/message/{mid}", params={"body": "1"})
            assert raw.status_code == 200 and "Subject: Big" in raw.text
            assert "Only the first megabyte is shown" in raw.text
        assert reads.sizes[0] <= MAX_HEADER_BYTES
        assert MAX_BODY_BYTES <= reads.sizes[1] <= MAX_BODY_BYTES + 1
    finally:
        reads.model.close()
        store.close()


def test_the_queue_page_shows_the_start_of_a_long_subject(store: Store) -> None:
    """A Subject field may be 64 KiB (what ``prepare()`` takes): the queue's page of 200
    such messages showed every subject whole, 12.7 MB of HTML. It shows the start of each;
    the message's own page shows it whole."""
    subject = "\u202e" + "s" * 60_000
    ids = [store.enqueue(message("a@one.example", subject=subject), now=NOW) for _ in range(200)]
    for client in _client(store):
        page = client.get("/queue", params={"limit": "200"})
        whole = client.get(f"/message/{ids[0]}").text
    assert page.status_code == 200
    assert page.text.count("<tr>") == 201  # every message listed, under the heading row
    assert len(page.content) < 1_000_000
    assert page.text.count("\\u202e" + "s" * 100) == 200  # its start, escaped as ever
    assert "s" * 1_000 not in page.text
    assert "\\u202e" + "s" * 60_000 in whole
