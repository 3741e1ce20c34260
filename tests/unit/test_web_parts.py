"""The dashboard's pure parts: access rules, page cursors, search terms, the chart, header
display, and the count cache."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailstrom.loopback import is_loopback
from mailstrom.readmodel import InvalidQuery, PageCursor, QueueQuery, Search
from mailstrom.readmodel.base import ThroughputBucket, id_range, throughput_window
from mailstrom.readmodel.ttl import TTLCache
from mailstrom.web.chart import HEIGHT, throughput_chart
from mailstrom.web.headers import MAX_BODY_BYTES, header_fields, shown_body
from mailstrom.web.security import Access, csrf_matches, same_origin, session_cookie

NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack socket on it listens on 127.0.0.1
        ("[::ffff:127.1.2.3]", True),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64: 127.0.0.1 of a translator, not this host
        ("2002:7f00:1::", False),  # 6to4: the same, through a relay
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.org", False),
        ("localhost.example.org", False),
    ],
)
def test_which_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_access_with_a_token() -> None:
    access = Access("s3cret")
    assert access.required
    assert access.allows(cookie=access.session_value(), authorization=None)
    assert access.allows(cookie=None, authorization="Bearer s3cret")
    assert not access.allows(cookie=None, authorization="Bearer wrong")
    assert not access.allows(cookie="forged", authorization=None)
    assert not access.allows(cookie=None, authorization="Basic s3cret")
    assert "s3cret" not in access.session_value()
    # A new server (a new key) does not accept an old session.
    assert not Access("s3cret").allows(cookie=access.session_value(), authorization=None)
    assert not access.token_matches("x" * 5000)


@pytest.mark.parametrize(
    ("host", "scheme", "public", "name"),
    [
        ("127.0.0.1:8025", "http", None, "mailstrom_session_8025"),
        ("localhost:8026", "http", None, "mailstrom_session_8026"),
        ("[::1]:8027", "http", None, "mailstrom_session_8027"),
        ("[::1]", "http", None, "mailstrom_session_80"),
        ("dash.example.org", "https", None, "mailstrom_session_443"),
        # Behind a proxy the browser's port is the public address's, not the upstream's.
        ("127.0.0.1:8025", "http", "https://dash.example.org", "mailstrom_session_443"),
        ("127.0.0.1:8025", "http", "https://dash.example.org:8443", "mailstrom_session_8443"),
        ("[::1]:8025", "http", "http://[::1]:9000", "mailstrom_session_9000"),
        # What names no port: the scheme's own.
        (None, "http", None, "mailstrom_session_80"),
        ("example.org:99999", "http", None, "mailstrom_session_80"),
        ("example.org:0", "http", None, "mailstrom_session_80"),
        ("example.org:x", "http", None, "mailstrom_session_80"),
        ("[::1", "http", None, "mailstrom_session_80"),
    ],
)
def test_the_session_cookie_is_named_by_the_dashboards_port(
    host: str | None, scheme: str, public: str | None, name: str
) -> None:
    assert session_cookie(host, scheme, public=public) == name


@pytest.mark.parametrize("space", ["\u00a0", "\u0085", "\u3000", "\x1f"])
def test_a_bearer_token_is_trimmed_of_http_white_space_only(space: str) -> None:
    """str.strip() also took a no-break space and NEXT LINE (a header value's obs-text
    may carry both) and \\x1f: "Bearer s3cret<U+00A0>" was let in."""
    access = Access("s3cret")
    assert access.allows(cookie=None, authorization="Bearer \ts3cret ")
    assert not access.allows(cookie=None, authorization=f"Bearer s3cret{space}")
    assert not access.allows(cookie=None, authorization=f"Bearer {space}s3cret")


def test_access_without_a_token_lets_everyone_in() -> None:
    assert Access(None).allows(cookie=None, authorization=None)


def test_csrf_and_origin_checks() -> None:
    assert csrf_matches("abc", "abc")
    assert not csrf_matches("abc", "abd")
    assert not csrf_matches(None, "abc")
    assert not csrf_matches("abc", None)
    assert not csrf_matches("", "")
    assert same_origin(None, "127.0.0.1:8025", "http")
    assert same_origin("http://127.0.0.1:8025", "127.0.0.1:8025", "http")
    assert not same_origin("http://evil.example", "127.0.0.1:8025", "http")


def test_page_cursors_round_trip_and_refuse_garbage() -> None:
    cursor = PageCursor(created_at=NOW, seq=42)
    assert PageCursor.decode(cursor.encode()) == cursor
    for bad in ("", "12", "a.b", "1.-2", "9" * 60 + ".1", "1.2.3"):
        with pytest.raises(InvalidQuery):
            PageCursor.decode(bad)


def test_search_terms_are_read_by_their_shape() -> None:
    assert Search.parse("  ") is None
    # The domain as recipients' are stored, the local part as typed (it may be
    # case-sensitive).
    assert Search.parse("Bob@Example.org") == Search(address="Bob@example.org")
    assert Search.parse("Bob@Bücher.Example") == Search(address="Bob@xn--bcher-kva.example")
    assert Search.parse("01A2b3") == Search(id_prefix="01a2b3")
    assert Search.parse("Example.ORG") == Search(domain="example.org")
    # A local part as the envelope holds it: prepare() stores a role name in lower case,
    # a UTF-8 one in NFC, without needless quotes; typed as sent, it found nothing.
    assert Search.parse("Postmaster@Example.org") == Search(address="postmaster@example.org")
    assert Search.parse("Jo\u0308rg@bücher.example") == Search(
        address="J\u00f6rg@xn--bcher-kva.example"
    )
    assert Search.parse('"bob"@example.org') == Search(address="bob@example.org")
    assert id_range("ab") == ("ab" + "0" * 30, "ab" + "f" * 30)


def test_page_size_is_bounded() -> None:
    with pytest.raises(InvalidQuery):
        QueueQuery(limit=0)
    with pytest.raises(InvalidQuery):
        QueueQuery(limit=100_000)


def test_the_throughput_window_is_an_hour_of_whole_minutes() -> None:
    start, starts, end = throughput_window(NOW)
    assert len(starts) == 60
    assert starts[-1] == NOW.replace(second=0, microsecond=0)
    assert start == starts[-1] - timedelta(minutes=59)
    assert end == starts[-1] + timedelta(minutes=1)


def test_the_chart_scales_the_busiest_minute_to_full_height() -> None:
    buckets = [
        ThroughputBucket(start=NOW, delivered=6, deferred=2, failed=0),
        ThroughputBucket(start=NOW + timedelta(minutes=1), delivered=2),
        ThroughputBucket(start=NOW + timedelta(minutes=2)),
    ]
    chart = throughput_chart(buckets)
    assert (chart.peak, chart.total) == (8, 10)
    first = [b for b in chart.bars if b.x < chart.width / 3]
    assert sum(b.height for b in first) == pytest.approx(HEIGHT)
    assert {b.series for b in first} == {"delivered", "deferred"}
    assert "6 delivered" in first[0].title
    assert throughput_chart([]).bars == ()


def test_header_fields_are_unfolded_and_decoded() -> None:
    data = (
        b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n =?utf-8?q?_ouvert?=\r\n"
        b"To: a@example.org,\r\n\tb@example.org\r\nX-Bad: =?bogus?q?x?=\r\n"
        b"\r\nBody: not a header\r\n"
    )
    fields = header_fields(data)
    assert fields == [
        ("Subject", "Café ouvert"),
        ("To", "a@example.org, b@example.org"),
        ("X-Bad", "=?bogus?q?x?="),
    ]


def test_encoded_words_beside_raw_utf8_are_decoded() -> None:
    # A message with UTF-8 header fields (RFC 6532) still has encoded words where its
    # writer chose them (mailstrom does for a display name of 68 characters or more):
    # the stdlib read the raw UTF-8 as ASCII and gave up, so the page showed the words.
    data = (
        "From: =?utf-8?q?J=C3=B6rg?= =?utf-8?q?_M=C3=BCller?= <jörg@example.org>\r\n"
        "Subject: Grüße =?utf-8?b?YXVz?= K\\u00f6ln =?bogus?q?x?=\r\n\r\n"
    ).encode()
    assert header_fields(data) == [
        ("From", "Jörg Müller <jörg@example.org>"),
        ("Subject", "Grüße aus K\\u00f6ln =?bogus?q?x?="),
    ]


def test_header_fields_give_the_stdlib_one_encoded_word_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stdlib's decode_header() looks for encoded words in time quadratic in the length
    # of what it is given: a sender's Subject of 56 KB of "=?a?q?x " (folded, so any
    # message may carry it) took 2.3 s to show, in the server's event loop, which
    # answered nobody else meanwhile. It is given each word on its own now.
    import mailstrom.web.headers as headers

    given: list[str] = []
    decode_header = headers.decode_header

    def recorded(text: str) -> Any:
        given.append(text)
        return decode_header(text)

    monkeypatch.setattr(headers, "decode_header", recorded)
    hostile = "=?a?q?x " * 7000
    folded = "\r\n ".join(hostile[i : i + 896] for i in range(0, len(hostile), 896))
    data = f"Subject: {folded}\r\nX-Ok: =?utf-8?q?Caf=C3=A9?= =?utf-8?q?_ouvert?=\r\n\r\n"
    fields = header_fields(data.encode())
    assert fields[0] == ("Subject", hostile.strip())
    assert fields[1] == ("X-Ok", "Café ouvert")
    assert max(text.count("=?") for text in given) == 1, max(map(len, given))


def test_one_unknown_charset_leaves_the_other_encoded_words_decoded() -> None:
    # The whole field went to the stdlib, which gave up on all of it for one bad word.
    data = b"Subject: =?bogus?q?x?= =?utf-8?q?Caf=C3=A9?= ok\r\n\r\n"
    assert header_fields(data) == [("Subject", "=?bogus?q?x?= Café ok")]


def test_a_huge_message_is_shown_cut() -> None:
    text, cut = shown_body(b"x" * (MAX_BODY_BYTES + 10))
    assert cut and len(text) == MAX_BODY_BYTES
    assert shown_body(b"short") == ("short", False)


def test_the_cache_keeps_values_for_its_ttl() -> None:
    clock = [0.0]
    cache: TTLCache[int] = TTLCache(5.0, clock=lambda: clock[0])
    calls = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    assert cache.get("k", compute) == 1
    assert cache.get("k", compute) == 1
    clock[0] = 6.0
    assert cache.get("k", compute) == 2
    cache.clear()
    assert cache.get("k", compute) == 3
    assert TTLCache[int](0).get("k", compute) == 4  # ttl 0 keeps nothing


def test_a_value_computed_across_a_clear_is_not_kept() -> None:
    """The dashboard clears its cache after an action, so that the page it redirects to
    shows the change. A page computed meanwhile (another tab, read before the action)
    was kept after the clear, and the page after the action showed the queue as it was
    before it for the cache's whole ttl."""
    cache: TTLCache[str] = TTLCache(5.0)
    queue = ["before the action"]
    read, acted = threading.Event(), threading.Event()
    seen: list[str] = []

    def slow_page() -> str:
        value = queue[0]  # read before the action...
        read.set()
        acted.wait(5)  # ...and kept only after it
        return value

    other_tab = threading.Thread(target=lambda: seen.append(cache.get("k", slow_page)))
    other_tab.start()
    assert read.wait(5)
    queue[0] = "after the action"
    cache.clear()
    acted.set()
    other_tab.join(5)
    assert seen == ["before the action"]  # what that request saw, as it was
    assert cache.get("k", lambda: queue[0]) == "after the action"


def test_page_cursors_stop_at_what_a_store_holds() -> None:
    assert PageCursor.decode(f"1.{2**63 - 1}").seq == 2**63 - 1
    for bad in (f"1.{2**63}", "1.²", "².1", "1.٣", " 1.2", "1.2\n"):
        with pytest.raises(InvalidQuery):
            PageCursor.decode(bad)


def test_access_and_csrf_compare_any_text_a_client_sends() -> None:
    access = Access("tøken")
    assert not access.allows(cookie="\xe9t\xe9", authorization=None)
    assert not access.allows(cookie=None, authorization="Bearer \xe9")
    assert access.allows(cookie=None, authorization="Bearer tøken")
    assert not csrf_matches("\xe9", "\xe8")
    assert csrf_matches("\xe9", "\xe9")


def test_ended_sessions_are_remembered_up_to_a_bound_then_every_session_ends() -> None:
    """Logging out ends a session at the server; the ids kept for that are bounded (a
    client with the token could log in and out for ever): past the bound a new key ends
    every session, which then need not be remembered."""
    from mailstrom.web.security import MAX_REVOKED

    access = Access("s3cret-s3cret-s3cret")
    kept = access.session_value()
    ended = access.session_value()
    access.end_session(ended)
    assert not access.allows(cookie=ended, authorization=None)
    assert access.allows(cookie=kept, authorization=None)
    access.end_session("forged.value")  # not a session: nothing to remember
    for _ in range(MAX_REVOKED - 1):
        access.end_session(access.session_value())
    assert access.allows(cookie=kept, authorization=None)
    assert len(access._revoked) == MAX_REVOKED
    access.end_session(access.session_value())
    assert not access.allows(cookie=kept, authorization=None)  # a new key
    assert not access._revoked
