"""The dashboard's routes through Starlette's test client (no browser): what each page
shows, the action flow, CSRF and token checks, and bad input."""

from __future__ import annotations

import html
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from mailstrom.domains import a_label
from mailstrom.errors import StoreError
from mailstrom.loopback import names_loopback
from mailstrom.readmodel.memory import MemoryReadModel
from mailstrom.status import Attempt, RecipientState, RecipientStatus
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from mailstrom.stores.dead_holders import HolderInfo
from mailstrom.web import create_app
from mailstrom.web.app import MAX_SHOWN_ATTEMPTS, MAX_SHOWN_THROTTLES, SHOWN_RECIPIENTS
from mailstrom.web.security import GUESS_WINDOW, MAX_GUESSES, Guesses
from tests.contract.support import LEASE_FOR, NOW, lease_all, message, results_for
from tests.web.test_slow_readers import served

DATA = (
    b"From: App <app@example.com>\r\nTo: a@one.example\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n\r\nThe secret body.\r\n"
)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def ids(store: Store) -> dict[str, str]:
    """A deferred message (a@one delivered, b@two deferred) and a queued one."""
    deferred = store.enqueue(message("a@one.example", "b@two.example", data=DATA), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=["a@one.example"]))
    store.record(
        results_for(
            lease,
            RecipientState.DEFERRED,
            next_attempt_at=NOW + timedelta(hours=1),
            only=["b@two.example"],
        )
    )
    queued = store.enqueue(message("c@three.example"), now=NOW + timedelta(seconds=1))
    return {"deferred": deferred, "queued": queued}


def _client(store: Store, *, now: datetime = NOW, **options: object) -> Iterator[TestClient]:
    app = create_app(store, clock=lambda: now + timedelta(minutes=1), **options)  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1:8025") as client:
        yield client


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    yield from _client(store)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


def test_overview_shows_counts_and_the_deferred_destination(
    client: TestClient, ids: dict[str, str]
) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert re.search(r'id="count-deferred">1<', page.text)
    assert re.search(r'id="count-delivered">1<', page.text)
    assert re.search(r'id="count-queued">1<', page.text)
    assert ids["deferred"] in page.text  # the oldest pending message
    assert "two.example" in page.text
    assert "451 4.0.0 line one" in page.text
    assert "<svg" in page.text and "bar-deferred" in page.text


def test_a_suspended_destination_is_marked_among_the_most_deferred(
    client: TestClient, ids: dict[str, str]
) -> None:
    table = re.compile(r'<table id="top-deferred">.*?</table>', re.S)
    before = table.search(client.get("/").text)
    assert before is not None and "two.example" in before.group(0)
    assert "suspended" not in before.group(0)
    client.get(_suspend(client, "two.example", "2h"))
    after = table.search(client.get("/").text)
    assert after is not None
    assert re.search(
        r">two\.example</a> <a class=\"tag suspended\"[^>]*>suspended<", after.group(0)
    )


def test_queue_lists_pending_mail_and_filters(client: TestClient, ids: dict[str, str]) -> None:
    page = client.get("/queue")
    assert ids["deferred"] in page.text and ids["queued"] in page.text
    only = client.get("/queue", params={"view": "deferred"}).text
    assert ids["deferred"] in only and ids["queued"] not in only
    found = client.get("/queue", params={"view": "all", "q": "c@three.example"}).text
    assert ids["queued"] in found and ids["deferred"] not in found
    assert "No messages match" in client.get("/queue", params={"domain": "none.example"}).text


def test_the_queue_shows_why_a_failed_message_failed(client: TestClient, store: Store) -> None:
    # Delivered to its second recipient after the first was refused: the last attempt is
    # the 250, which explains nothing beside "failed".
    failed = store.enqueue(message("a@one.example", "b@two.example"), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.FAILED, only=["a@one.example"]))
    store.record(results_for(lease, RecipientState.DELIVERED, only=["b@two.example"]))
    page = client.get("/queue", params={"view": "failed"}).text
    row = re.search(rf"<tr>\s*<td><a href=\"/message/{failed}\".*?</tr>", page, re.S)
    assert row is not None, page
    reply = re.search(r'<td class="reply"><span class="text">(.*?)</span>', row.group(0), re.S)
    assert reply is not None and reply.group(1).startswith("550"), row.group(0)


def test_the_queue_page_shows_the_first_recipient_and_how_many_more(
    client: TestClient, store: Store
) -> None:
    mid = store.enqueue(message("first@many.example", "b@many.example", "c@x.example"), now=NOW)
    page = client.get("/queue", params={"view": "all"}).text
    row = re.search(rf"<tr>\s*<td><a href=\"/message/{mid}\".*?</tr>", page, re.S)
    assert row is not None, page
    assert "<td>first@many.example +2</td>" in row.group(0), row.group(0)


def test_queue_pages_follow_the_next_link(client: TestClient, store: Store) -> None:
    made = [
        store.enqueue(message(f"r{i}@many.example"), now=NOW + timedelta(seconds=i))
        for i in range(30)
    ]
    first = client.get("/queue", params={"limit": "25", "order": "oldest"}).text
    assert made[0] in first and made[24] in first and made[25] not in first
    link = re.search(r'href="([^"]+)" rel="next"', first)
    assert link is not None
    second = client.get(link.group(1).replace("&amp;", "&")).text
    assert made[25] in second and made[29] in second and made[24] not in second
    assert 'rel="next"' not in second and "First page" in second


def test_message_page_shows_recipients_attempts_and_headers_not_the_body(
    client: TestClient, ids: dict[str, str]
) -> None:
    page = client.get(f"/message/{ids['deferred']}").text
    assert "b@two.example" in page and "deferred" in page
    assert "mx1.example.org" in page and "127.0.0.7" in page and "TLSv1.3" in page
    assert "Café" in page  # the Subject header, decoded
    assert "The secret body" not in page
    shown = client.get(f"/message/{ids['deferred']}", params={"body": "1"}).text
    assert "The secret body" in shown


def test_a_held_message_page_shows_no_next_attempt(
    store: Store, client: TestClient, ids: dict[str, str]
) -> None:
    """No worker leases a held message, but its page showed the deferred recipient's next
    attempt, as the command line's views did."""
    due = (NOW + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    assert due in client.get(f"/message/{ids['deferred']}").text
    store.set_held(ids["deferred"], True)
    assert due not in client.get(f"/message/{ids['deferred']}").text
    store.set_held(ids["deferred"], False)
    assert due in client.get(f"/message/{ids['deferred']}").text


def test_a_message_page_shows_a_suspended_destinations_end_as_its_next_attempt(
    store: Store, client: TestClient, ids: dict[str, str]
) -> None:
    """No worker attempts a recipient at a suspended domain before the suspension ends,
    but the page showed its own retry time."""
    due = (NOW + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    end = (NOW + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S")
    store.suspend("two.example", now=NOW)
    page = client.get(f"/message/{ids['deferred']}").text
    assert due not in page and end not in page
    store.suspend("two.example", now=NOW, until=NOW + timedelta(hours=3))
    with TestClient(create_app(store, clock=lambda: NOW), base_url="http://127.0.0.1:8025") as c:
        page = c.get(f"/message/{ids['deferred']}").text  # a fresh app: nothing cached
    assert end in page and due not in page


def test_a_message_page_shows_a_throttled_destinations_pause(
    any_store: Store,
) -> None:
    """A recipient a worker gave back because its destination throttled (421 4.7.28)
    waits, queued and unattempted, for the pause's end. `mailstrom status` says so (a
    "throttled until" line, the pause's end as its next retry); the page showed it
    queued with no next attempt and no reply, as if nothing held it back."""
    # Pauses are read by the real clock (status()): one made at NOW, years ahead of
    # it, would be taken for a clock since set back (policy.throttle.pause_runs).
    now = datetime.now(UTC)
    mid = any_store.enqueue(message("b@two.example"), now=now)
    lease = lease_all(any_store, now=now)
    pause = any_store.throttle(
        "two.example",
        now=now,
        reply="421 4.7.28 Our system has detected an unusual rate",
        first=timedelta(hours=1),
        maximum=timedelta(hours=4),
    )
    any_store.postpone(lease.items, until=pause.until, destination="two.example")
    for client in _client(any_store, now=now):
        page = client.get(f"/message/{mid}").text
    row = re.search(r'<table id="recipients">.*?</table>', page, re.S)
    assert row is not None
    assert pause.until.strftime("%Y-%m-%d %H:%M:%S") in row.group(0)
    assert "throttled until" in row.group(0) and "421 4.7.28 Our system" in row.group(0)


def test_the_destinations_page_lists_the_throttled_destinations(any_store: Store) -> None:
    """A throttling reply pauses a destination for every worker (here "*.google.com",
    the rule every Gmail and Google Workspace domain shares): the destinations page
    listed suspensions only, and a backlog waiting out a pause looked stuck, with a
    Suspend button and no word of the pause, its end or the reply that started it."""
    any_store.enqueue(message("b@two.example"), now=NOW)
    pause = any_store.throttle(
        "*.google.com",
        now=NOW,
        reply="421 4.7.28 Our system has detected an unusual rate",
        first=timedelta(hours=1),
        maximum=timedelta(hours=4),
    )
    any_store.throttle(
        "ended.example",
        now=NOW - timedelta(hours=3),
        reply="421 slow down",
        first=timedelta(hours=1),
        maximum=timedelta(hours=4),
    )  # over before the dashboard's time: not listed
    for client in _client(any_store):
        page = client.get("/destinations").text
    section = re.search(r'<section id="throttled".*?</section>', page, re.S)
    assert section is not None, page
    assert "*.google.com" in section.group(0)
    assert pause.until.strftime("%Y-%m-%d %H:%M:%S") in section.group(0)
    assert "421 4.7.28 Our system" in section.group(0)
    assert "ended.example" not in page


def test_a_retried_throttled_recipient_shows_the_pauses_end_as_its_next_attempt(
    any_store: Store,
) -> None:
    """A retry makes a throttled recipient due now, but the worker gives it back, due at
    its destination's pause's end (the retry says so): the page showed the retry's time
    as its next attempt beside "throttled until" a later time."""
    # Pauses are read by the real clock (status()): one made at NOW, years ahead of
    # it, would be taken for a clock since set back (policy.throttle.pause_runs).
    now = datetime.now(UTC)
    mid = any_store.enqueue(message("b@two.example"), now=now)
    lease = lease_all(any_store, now=now)
    pause = any_store.throttle(
        "two.example",
        now=now,
        reply="421 4.7.28 Our system has detected an unusual rate",
        first=timedelta(hours=1),
        maximum=timedelta(hours=4),
    )
    any_store.postpone(lease.items, until=pause.until, destination="two.example")
    retried = now + timedelta(minutes=1)
    any_store.retry(mid, now=retried)
    assert any_store.status(mid).recipients[0].throttle == pause
    for client in _client(any_store, now=now):
        page = client.get(f"/message/{mid}").text
    row = re.search(r'<table id="recipients">.*?</table>', page, re.S)
    assert row is not None
    assert retried.strftime("%Y-%m-%d %H:%M:%S") not in row.group(0)
    assert pause.until.strftime("%Y-%m-%d %H:%M:%S") in row.group(0)


def test_bidi_controls_a_message_holds_are_shown_as_escapes(store: Store) -> None:
    # U+202E made "invoice\u202efdp.exe" read "invoiceexe.pdf" in the page (CVE-2021-42574)
    # as it does in a terminal, where every view escapes it.
    data = (
        "From: App <app@example.com>\r\nTo: a@one.example\r\n"
        "Subject: invoice\u202efdp.exe \u2067x\u2069\r\n\r\nbody \u200fz\r\n"
    ).encode()
    subject = "invoice\u202efdp.exe \u2067x\u2069"
    mid = store.enqueue(message("a@one.example", data=data, subject=subject), now=NOW)
    for client in _client(store):
        page = client.get(f"/message/{mid}").text
        raw = client.get(f"/message/{mid}", params={"body": "1"}).text
        queue = client.get("/queue").text
    for shown in (page, raw):
        assert "invoice\\u202efdp.exe \\u2067x\\u2069" in shown
        assert not any(c in shown for c in "\u202e\u2067\u2069\u200f")
    assert "body \\u200fz" in raw
    assert "invoice\\u202efdp.exe" in queue and "\u202e" not in queue


def test_an_action_is_confirmed_then_posted_then_logged(
    client: TestClient, store: Store, ids: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    mid = ids["queued"]
    confirm = client.get(f"/action/hold/{mid}")
    assert "Hold message" in confirm.text
    assert not store.status(mid).held  # looking at the question changes nothing
    with caplog.at_level(logging.INFO, logger="mailstrom.web"):
        done = client.post(
            f"/action/hold/{mid}", data={"csrf": _csrf(confirm.text)}, follow_redirects=False
        )
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/message/{mid}?done=")
    assert store.status(mid).held
    assert any(f"hold {mid} by" in r.getMessage() for r in caplog.records)
    after = client.get(done.headers["location"]).text
    assert "Hold: held" in after and f"/action/release/{mid}" in after


def test_holding_a_finished_message_does_not_say_held(client: TestClient, store: Store) -> None:
    """A message that finished between its page and the click (its Hold button shown
    while it was pending, or a form posted again) is not held (set_held leaves a finished
    message as it is), and its status says so; the notice said "Hold: held" all the same."""
    mid = store.enqueue(message("a@one.example"), now=NOW)
    confirm = client.get(f"/action/hold/{mid}")
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    done = client.post(
        f"/action/hold/{mid}", data={"csrf": _csrf(confirm.text)}, follow_redirects=False
    )
    assert done.status_code == 303
    assert not store.status(mid).held
    after = client.get(done.headers["location"]).text
    assert "Hold: held" not in after
    assert "Hold: not held as it has finished" in after
    assert f"/action/release/{mid}" not in after


def test_releasing_a_message_that_finished_while_held_does_not_say_released(
    client: TestClient, store: Store
) -> None:
    """Held while its delivery was in flight, the message finished between its page
    (which offered Release while it was held and pending) and the click: nothing waited
    for the release, and the message is not held. The notice said "Release: released"."""
    mid = store.enqueue(message("a@one.example"), now=NOW)
    lease = lease_all(store)
    store.set_held(mid, True)
    confirm = client.get(f"/action/release/{mid}")
    assert "Release message" in confirm.text
    store.record(results_for(lease, RecipientState.DELIVERED))
    done = client.post(
        f"/action/release/{mid}", data={"csrf": _csrf(confirm.text)}, follow_redirects=False
    )
    assert done.status_code == 303
    assert not store.status(mid).held
    after = client.get(done.headers["location"]).text
    assert "Release: released" not in after
    assert "Release: not held as it has finished" in after


@pytest.mark.parametrize(
    ("action", "held_before", "said"),
    [("release", True, "was not held"), ("hold", False, "already held")],
)
def test_a_hold_or_release_another_operator_made_first_says_it_changed_nothing(
    client: TestClient, store: Store, action: str, held_before: bool, said: str
) -> None:
    """Two operators on the same page click Release (or Hold): the first releases the
    message, the second's click changes nothing, and its notice said "Release: released"
    all the same, as though it had."""
    mid = store.enqueue(message("a@one.example"), now=NOW)
    store.set_held(mid, held_before)
    confirm = client.get(f"/action/{action}/{mid}")
    store.set_held(mid, not held_before)  # the other operator's click
    done = client.post(
        f"/action/{action}/{mid}", data={"csrf": _csrf(confirm.text)}, follow_redirects=False
    )
    assert done.status_code == 303
    assert store.status(mid).held is not held_before
    after = client.get(done.headers["location"]).text
    label = action.capitalize()
    assert f"{label}: {said}" in after, after


def test_a_post_without_the_csrf_token_changes_nothing(
    client: TestClient, store: Store, ids: dict[str, str]
) -> None:
    mid = ids["queued"]
    client.get("/")  # the browser has its CSRF cookie
    for data in ({}, {"csrf": "forged"}):
        refused = client.post(f"/action/cancel/{mid}", data=data)
        assert refused.status_code == 403
    assert store.status(mid).state is RecipientState.QUEUED


def test_a_post_from_another_origin_is_refused(
    client: TestClient, store: Store, ids: dict[str, str]
) -> None:
    mid = ids["queued"]
    token = _csrf(client.get(f"/action/cancel/{mid}").text)
    refused = client.post(
        f"/action/cancel/{mid}", data={"csrf": token}, headers={"Origin": "http://evil.example"}
    )
    assert refused.status_code == 403
    assert store.status(mid).state is RecipientState.QUEUED


@pytest.mark.parametrize("cookie", ["", "x" * 2000])
def test_a_csrf_cookie_not_made_here_is_replaced_not_kept_for_ever(
    client: TestClient, store: Store, ids: dict[str, str], cookie: str
) -> None:
    """A cookie the dashboard did not make (empty, past the length a form's token may
    have, another app's on the same host: cookies ignore the port) was put in every form
    and never replaced, so each form failed as expired however often it was reloaded."""
    mid = ids["queued"]
    client.cookies.set("mailstrom_csrf", cookie)
    confirm = client.get(f"/action/hold/{mid}")
    token = _csrf(confirm.text)
    assert token != cookie and re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    done = client.post(f"/action/hold/{mid}", data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303
    assert store.status(mid).held


def test_without_a_token_a_rebound_name_gets_nothing(store: Store, ids: dict[str, str]) -> None:
    """DNS rebinding: a page on evil.example rebinds its name to 127.0.0.1, and its
    requests reach the dashboard as same-origin ones (Host: evil.example:8025), able to
    read pages and forms, CSRF token included. Without a token only loopback names are
    answered, so neither the queue nor an action is reachable that way."""
    mid = ids["queued"]
    app = create_app(store, clock=lambda: NOW + timedelta(minutes=1))
    with TestClient(app, base_url="http://evil.example:8025") as rebound:
        for path in ("/", "/queue", f"/message/{mid}", f"/action/cancel/{mid}"):
            page = rebound.get(path)
            assert page.status_code == 400
            assert mid not in page.text and "csrf" not in page.text
        origin = {"Origin": "http://evil.example:8025"}
        refused = rebound.post(f"/action/cancel/{mid}", data={"csrf": "x"}, headers=origin)
        assert refused.status_code == 400
    assert store.status(mid).state is RecipientState.QUEUED


@pytest.mark.parametrize("peer", ["192.0.2.7", "2001:db8::7", "::ffff:192.0.2.7"])
def test_without_a_token_a_client_from_elsewhere_gets_nothing(
    store: Store, ids: dict[str, str], peer: str
) -> None:
    """The Host check stops a page that rebinds its name, not a client that names the
    dashboard as it likes: an application serving ``create_app(store)`` (no token) on
    a public address, as the guide shows it mounted, answered anyone on the network who
    sent ``Host: 127.0.0.1``, the queue and its actions included (no Origin, the CSRF
    cookie its own). Without a token only a client on this host is answered."""
    mid = ids["queued"]

    def app() -> Any:  # one each: a client's end closes its app's read model
        return create_app(store, clock=lambda: NOW + timedelta(minutes=1))

    with TestClient(app(), base_url="http://127.0.0.1:8025", client=(peer, 4000)) as remote:
        for path in ("/", "/queue", f"/message/{mid}", f"/action/cancel/{mid}", "/login"):
            page = remote.get(path)
            assert page.status_code == 403, (path, page.status_code)
            assert mid not in page.text and "csrf" not in page.text
            assert "mailstrom_csrf" not in page.headers.get("set-cookie", "")
        remote.cookies.set("mailstrom_csrf", "c" * 43)
        refused = remote.post(f"/action/cancel/{mid}", data={"csrf": "c" * 43})
        assert refused.status_code == 403
    assert store.status(mid).state is RecipientState.QUEUED
    # A client on this host (any 127/8 or ::1 address, or no address at all: a Unix
    # socket) is served as before; with a token, anyone who gives it.
    for local in ("127.0.0.2", "::1", "::ffff:127.0.0.1", "testclient"):
        with TestClient(app(), base_url="http://127.0.0.1:8025", client=(local, 1)) as client:
            assert client.get(f"/message/{mid}").status_code == 200, local
    with_token = create_app(store, token="s3cret-token-0123")
    with TestClient(with_token, base_url="http://127.0.0.1:8025", client=(peer, 1)) as client:
        bearer = {"Authorization": "Bearer s3cret-token-0123"}
        assert client.get(f"/message/{mid}", headers=bearer).status_code == 200


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8025", "localhost:8025", "LOCALHOST", "localhost.:80", "[::1]:8025"]
)
def test_without_a_token_loopback_names_are_served(
    client: TestClient, ids: dict[str, str], host: str
) -> None:
    assert client.get("/", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8025", "127.0.0.1.evil.example", "[::1", "", "0.0.0.0"]
)
def test_names_loopback_refuses_every_other_host(host: str) -> None:
    assert not names_loopback(host)


def test_with_a_token_a_rebound_name_cannot_spend_the_tries_at_the_token(
    store: Store, ids: dict[str, str]
) -> None:
    """DNS rebinding with a token: the rebound page cannot read the pages, but its
    bearer tokens and logins counted as wrong guesses from the operator's own address
    (127.0.0.1, the browser's), and 10 of them locked the operator out for 10 minutes.
    A name the dashboard does not answer to is refused before its token is looked at."""
    app = create_app(store, clock=lambda: NOW + timedelta(minutes=1), token="s3cret-token-0123")
    browser = ("127.0.0.1", 50000)
    with TestClient(app, base_url="http://evil.example:8025", client=browser) as rebound:
        for n in range(MAX_GUESSES + 1):
            tried = rebound.get(
                "/", headers={"Authorization": f"Bearer try{n}"}, follow_redirects=False
            )
            assert tried.status_code == 400, (n, tried.status_code)
        login = rebound.get("/login")
        assert login.status_code == 400 and "csrf" not in login.text
        operator = TestClient(app, base_url="http://127.0.0.1:8025", client=browser)
        bearer = {"Authorization": "Bearer s3cret-token-0123"}
        assert operator.get("/", headers=bearer).status_code == 200


@pytest.mark.parametrize(
    ("base_url", "options", "status"),
    [
        ("https://mail.example.com", {}, 400),
        ("https://mail.example.com", {"hosts": ["Mail.Example.COM."]}, 200),
        ("https://mail.example.com", {"public_origin": "https://mail.example.com"}, 200),
        ("http://localhost:8025", {}, 200),
        ("http://192.0.2.7:8025", {}, 200),  # an address: no other site's name
        ("http://[2001:db8::7]:8025", {}, 200),
    ],
)
def test_with_a_token_the_names_it_has_are_served(
    store: Store, ids: dict[str, str], base_url: str, options: dict[str, Any], status: int
) -> None:
    """A name must be one the dashboard was given (a proxy passing its public name needs
    it as ``hosts`` or ``public_origin``); an address or a loopback name always is."""
    app = create_app(
        store, clock=lambda: NOW + timedelta(minutes=1), token="s3cret-token-0123", **options
    )
    with TestClient(app, base_url=base_url) as client:
        page = client.get("/", headers={"Authorization": "Bearer s3cret-token-0123"})
        assert page.status_code == status


def test_with_a_token_every_page_needs_it(store: Store, ids: dict[str, str]) -> None:
    for client in _client(store, token="s3cret-token-0123"):
        for path in ("/", "/queue", f"/message/{ids['queued']}", "/destinations"):
            page = client.get(path, follow_redirects=False)
            assert page.status_code == 303
            assert page.headers["location"].startswith("/login?next=")
        assert client.post(f"/action/retry/{ids['queued']}").status_code in (401, 403)
        assert client.get("/static/style.css").status_code == 200
        login = client.get("/login")
        wrong = client.post("/login", data={"csrf": _csrf(login.text), "token": "guess"})
        assert wrong.status_code == 401 and "not the token" in wrong.text
        right = client.post(
            "/login",
            data={"csrf": _csrf(login.text), "token": "s3cret-token-0123", "next": "/queue"},
            follow_redirects=False,
        )
        assert right.status_code == 303 and right.headers["location"] == "/queue"
        assert client.get("/queue").status_code == 200
        assert "s3cret-token-0123" not in right.headers.get("set-cookie", "")


def test_a_head_request_without_a_session_is_answered_as_its_get(
    store: Store, ids: dict[str, str]
) -> None:
    """RFC 9110 §9.3.2: HEAD is GET without the content. A page's GET without a session
    is a 303 to the login form, its HEAD was a 401 (a monitor probing the page with HEAD
    saw it refused, and a browser would not be sent to log in)."""
    for client in _client(store, token="s3cret-token-0123"):
        for path in ("/", "/queue?view=held", f"/action/hold/{ids['queued']}"):
            get = client.get(path, follow_redirects=False)
            head = client.head(path, follow_redirects=False)
            assert (head.status_code, head.headers.get("location")) == (
                get.status_code,
                get.headers["location"],
            )
            assert head.content == b""


def test_two_dashboards_on_one_host_keep_their_own_sessions(
    store: Store, ids: dict[str, str]
) -> None:
    """Cookies ignore the port (RFC 6265 §8.5): two dashboards on one host (one per
    store, at ports 8025 and 8026) shared the one session cookie name, so logging into
    the second replaced the first's session (logging the browser out of it), and logging
    out of one logged it out of both."""
    first = create_app(store, clock=lambda: NOW, token="s3cret-token-0123")
    second = create_app(MemoryStore(), clock=lambda: NOW, token="other-token-01234")
    with (
        TestClient(first, base_url="http://127.0.0.1:8025") as one,
        TestClient(second, base_url="http://127.0.0.1:8026") as two,
    ):
        two.cookies.jar = one.cookies.jar  # one browser: its cookies go to either port
        for client, token in ((one, "s3cret-token-0123"), (two, "other-token-01234")):
            login = client.get("/login")
            done = client.post(
                "/login", data={"csrf": _csrf(login.text), "token": token}, follow_redirects=False
            )
            assert done.status_code == 303
            cookie = SimpleCookie(done.headers["set-cookie"])
            (session,) = cookie.values()
            assert session["httponly"] and session["samesite"] == "strict"
        assert one.get("/queue", follow_redirects=False).status_code == 200
        assert two.get("/queue", follow_redirects=False).status_code == 200
        out = two.post("/logout", data={"csrf": _csrf(two.get("/").text)}, follow_redirects=False)
        assert out.status_code == 303
        assert two.get("/queue", follow_redirects=False).status_code == 303
        assert one.get("/queue", follow_redirects=False).status_code == 200


def test_logging_out_ends_the_session_for_a_copy_of_its_cookie_too(store: Store) -> None:
    """The session cookie was the same value for every login, valid until the server
    restarted: logging out only asked the browser to forget it, and a copy (taken from
    a shared machine, a proxy's log) kept working. Now each login has a session of its
    own, which logging out ends at the server, and another login's is left alone."""
    for browser in _client(store, token="s3cret-token-0123"):
        other = TestClient(browser.app, base_url="http://127.0.0.1:8025")
        for client in (browser, other):
            login = client.get("/login")
            done = client.post(
                "/login",
                data={"csrf": _csrf(login.text), "token": "s3cret-token-0123"},
                follow_redirects=False,
            )
            assert done.status_code == 303
        name = "mailstrom_session_8025"
        copied = browser.cookies[name]
        assert copied != other.cookies[name]  # a session each
        out = browser.post("/logout", data={"csrf": _csrf(browser.get("/").text)})
        assert out.status_code == 200  # the login form, followed to
        thief = TestClient(browser.app, base_url="http://127.0.0.1:8025")
        thief.cookies.set(name, copied)
        assert thief.get("/queue", follow_redirects=False).status_code == 303
        assert other.get("/queue", follow_redirects=False).status_code == 200


def test_a_401_names_the_scheme_that_would_let_the_client_in(
    store: Store, ids: dict[str, str]
) -> None:
    """RFC 9110 §15.5.2: a 401 "MUST send a WWW-Authenticate header field"; a client
    (curl, a script) is then told to give a bearer token. Neither 401 had one."""
    for client in _client(store, token="s3cret-token-0123"):
        unauthenticated = client.post(f"/action/retry/{ids['queued']}", content=b"")
        login = client.get("/login")
        wrong = client.post("/login", data={"csrf": _csrf(login.text), "token": "guess"})
        for answer in (unauthenticated, wrong):
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"].startswith("Bearer ")


def test_a_bearer_token_works_without_a_session(store: Store, ids: dict[str, str]) -> None:
    for client in _client(store, token="s3cret-token-0123"):
        ok = client.get("/", headers={"Authorization": "Bearer s3cret-token-0123"})
        assert ok.status_code == 200
        bad = client.get("/", headers={"Authorization": "Bearer nope"}, follow_redirects=False)
        assert bad.status_code == 303


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_bearer_token_with_non_ascii_characters_lets_a_script_in(
    tmp_path: Path, encoding: str
) -> None:
    """The server hands header octets on as Latin-1, and curl (as browsers and most
    clients) sends a token typed with a "ü" in UTF-8: it never matched, each try counted
    as a wrong guess, and the script was locked out. (A real server: Starlette's test
    client re-encodes header values.) Python's requests sends Latin-1, which still works."""
    token = "grüne wiese im mai"
    with served(tmp_path, request_timeout=30.0, token=token) as server:
        url = f"http://127.0.0.1:{server.port}/queue"
        for given in (token, "grüne wiese im max"):
            header = b"Bearer " + given.encode(encoding)
            answer = httpx.get(url, headers={"Authorization": header}, follow_redirects=False)
            assert answer.status_code == (200 if given == token else 303), given


def test_login_only_follows_paths_on_this_server(store: Store) -> None:
    for client in _client(store, token="t0ken-t0ken-t0ken"):
        form = client.get("/login", params={"next": "https://evil.example/"})
        assert 'name="next" value="/"' in form.text
        right = client.post(
            "/login",
            data={
                "csrf": _csrf(form.text),
                "token": "t0ken-t0ken-t0ken",
                "next": "//evil.example/",
            },
            follow_redirects=False,
        )
        assert right.headers["location"] == "/"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/queue?view=everything", 400),
        ("/queue?age=soon", 400),
        ("/queue?age=%E3%80%802h", 400),  # U+3000, which str.strip() took, then 2h
        ("/queue?age=2h%C2%A0", 400),  # a no-break space after it
        ("/queue?after=garbage", 400),
        ("/queue?limit=100000", 400),
        ("/message/" + "0" * 32, 404),
        ("/message/not-an-id", 404),
        ("/action/explode/" + "0" * 32, 404),
        # A confirmation asked "Cancel message 000…?" of a message that is not there,
        # and only the posted form then said so.
        ("/action/cancel/" + "0" * 32, 404),
        ("/action/retry/" + "0" * 32, 404),
        ("/destinations?offset=x", 400),
        ("/nowhere", 404),
    ],
)
def test_bad_input_gets_a_clear_page(client: TestClient, path: str, status: int) -> None:
    page = client.get(path)
    assert page.status_code == status
    assert 'id="problem"' in page.text


def test_a_message_page_lists_its_recipients_a_page_at_a_time(
    client: TestClient, store: Store
) -> None:
    """The page of a message listed every recipient: one to 1,000 was 819 KB. It lists
    SHOWN_RECIPIENTS, says how many there are, and links to the next page; the last page
    has no next link, and the message's state is the whole message's on every page."""
    addresses = [f"r{i}@d.example" for i in range(SHOWN_RECIPIENTS + 1)]
    mid = store.enqueue(message(*addresses), now=NOW)
    lease = lease_all(store)
    store.record(results_for(lease, RecipientState.DELIVERED, only=addresses[:-1]))
    first = client.get(f"/message/{mid}")
    assert first.status_code == 200
    table = first.text.partition("<h2>Attempts</h2>")[0]
    assert table.count("@d.example</td>") == SHOWN_RECIPIENTS
    assert f"Recipients ({SHOWN_RECIPIENTS + 1})" in first.text
    assert 'id="message-state">queued<' in first.text  # its last recipient's lease
    found = re.search(r'href="(/message/[0-9a-f]{32}\?after=[0-9]+)" rel="next"', first.text)
    assert found is not None
    last = client.get(html.unescape(found[1]))
    assert last.status_code == 200
    table = last.text.partition("<h2>Attempts</h2>")[0]
    assert re.findall(r"<td>(r[0-9]+@d\.example)</td>", table) == addresses[-1:]
    assert 'rel="next"' not in last.text
    assert 'id="message-state">queued<' in last.text


@pytest.mark.parametrize("after", ["", "x", "-1", "1.5", "\u00b2", "1" * 13, "0x10"])
def test_a_recipient_page_that_is_no_position_is_refused(
    client: TestClient, ids: dict[str, str], after: str
) -> None:
    page = client.get(f"/message/{ids['deferred']}", params={"after": after})
    assert page.status_code == 400
    assert 'id="problem"' in page.text


def test_pages_carry_security_headers(client: TestClient) -> None:
    headers = client.get("/").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert "samesite=strict" in headers["set-cookie"].lower()
    assert "httponly" in headers["set-cookie"].lower()


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/queue", {"GET", "HEAD"}),
        ("DELETE", "/", {"GET", "HEAD"}),
        ("GET", "/logout", {"POST"}),
        # Two routes share these paths, one per method: the Allow header names both.
        ("PUT", "/action/hold/" + "0" * 32, {"GET", "HEAD", "POST"}),
        ("DELETE", "/login", {"GET", "HEAD", "POST"}),
    ],
)
def test_a_method_a_page_does_not_take_is_a_405_saying_which_it_takes(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    """RFC 9110 §15.5.6: a 405 "MUST generate an Allow header field". Starlette's has it;
    the dashboard's own error page, made in its place, left it out."""
    page = client.request(method, path, content=b"")
    assert page.status_code == 405
    assert 'id="problem"' in page.text
    assert {m.strip() for m in page.headers["allow"].split(",")} == allowed


class _BrokenStatus(MemoryReadModel):
    """A read model whose message_status() fails in a way no read model promises (a bug,
    a driver's error)."""

    def message_status(self, message_id: str, *, attempts: int, **page: Any) -> Any:
        raise RuntimeError("a fault nobody foresaw")


def test_an_unexpected_error_is_a_page_with_the_security_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception past the dashboard's checks reached Starlette's own 500 page, made
    outside the middleware that adds the headers: a bare "Internal Server Error" with no
    Content-Security-Policy, X-Frame-Options nor no-store."""
    store = MemoryStore()
    app = create_app(store, read_model=_BrokenStatus(store), clock=lambda: NOW)
    with TestClient(app, base_url="http://127.0.0.1:8025", raise_server_exceptions=False) as c:
        page = c.get("/message/" + "a" * 32)
    assert page.status_code == 500
    assert 'id="problem"' in page.text
    assert "a fault nobody foresaw" not in page.text  # details go to the log, not the page
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("host", "method", "headers", "status"),
    [
        ("evil.example:8025", "GET", {}, 400),  # a rebound name
        ("127.0.0.1:8025", "POST", {"Content-Length": "99999"}, 413),
        ("127.0.0.1:8025", "POST", {"Origin": "http://evil.example"}, 403),
    ],
)
def test_refusals_carry_the_security_headers_too(
    store: Store, host: str, method: str, headers: dict[str, str], status: int
) -> None:
    """The guard's early refusals (a Host that is not loopback, a body too large, another
    site's POST) returned before the headers were added: a page answered without them may
    be framed, sniffed or cached."""
    for client in _client(store):
        refused = client.request(
            method, "/action/hold/" + "0" * 32, headers={"Host": host, **headers}, content=b"x"
        )
        assert refused.status_code == status, refused.text
        page = client.get("/")
        for name in _SECURITY_HEADER_NAMES:
            assert refused.headers.get(name) == page.headers[name], name


_SECURITY_HEADER_NAMES = {
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "x-frame-options",
    "cache-control",
}


def test_destinations_list_pending_domains(client: TestClient, ids: dict[str, str]) -> None:
    page = client.get("/destinations").text
    assert "two.example" in page and "three.example" in page
    assert "one.example" not in page  # nothing pending there
    only = client.get("/destinations", params={"domain": "THREE.example"}).text
    assert "three.example" in only and "two.example" not in only


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    from mailstrom.stores import open_store

    if request.param == "memory":
        opened: Store = MemoryStore()
    elif request.param == "sqlite":
        opened = open_store(f"sqlite:///{tmp_path / 'queue.db'}")
    else:
        opened = open_store(request.getfixturevalue("postgres_url"))
    try:
        yield opened
    finally:
        opened.close()


def test_every_store_serves_every_page_and_action(any_store: Store) -> None:
    """The same pages and the same action over memory, SQLite and PostgreSQL."""
    mid = any_store.enqueue(message("b@two.example", data=DATA), now=NOW)
    lease = lease_all(any_store)
    any_store.record(
        results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW + timedelta(hours=1))
    )
    for client in _client(any_store):
        assert re.search(r'id="count-deferred">1<', client.get("/").text)
        assert mid in client.get("/queue", params={"view": "deferred"}).text
        assert "Café" in client.get(f"/message/{mid}").text
        assert "two.example" in client.get("/destinations").text
        token = _csrf(client.get(f"/action/cancel/{mid}").text)
        done = client.post(f"/action/cancel/{mid}", data={"csrf": token})
        assert "Cancel: 1 recipient cancelled" in done.text
        assert re.search(r'id="count-failed">1<', client.get("/").text)
    assert any_store.status(mid).state is RecipientState.FAILED


@pytest.mark.parametrize(
    "path",
    [
        "/queue?q=one%00.example",
        "/queue?q=b%00@two.example",
        "/queue?q=ab%00",
        "/queue?domain=two%00.example",
        "/destinations?domain=two%00.example",
    ],
)
def test_a_nul_in_a_filter_is_a_400_on_every_store(any_store: Store, path: str) -> None:
    """PostgreSQL refuses a NUL in any text: the page was a 503, "the queue cannot be read
    right now", where the other stores found nothing."""
    for client in _client(any_store):
        page = client.get(path)
        assert page.status_code == 400, page.text
        assert 'id="problem"' in page.text


def test_a_large_form_is_refused_before_it_is_read(store: Store) -> None:
    for client in _client(store, token="t0ken-t0ken-t0ken"):
        login = client.get("/login")
        big = client.post("/login", data={"csrf": _csrf(login.text), "token": "x" * 20_000})
        assert big.status_code == 413


def test_the_notice_after_an_action_cannot_be_made_up(
    client: TestClient, ids: dict[str, str]
) -> None:
    page = client.get(f"/message/{ids['queued']}", params={"done": "Hold: held"}).text
    assert 'id="done">Hold: held<' in page
    for made_up in ("Your account is closed", "Hold: call +1 555 0100 now!", "Explode: done"):
        page = client.get(f"/message/{ids['queued']}", params={"done": made_up}).text
        assert 'id="done"' not in page


@pytest.mark.parametrize(
    "made_up",
    [
        "Retry now: \u0663 recipients due now",  # ARABIC-INDIC THREE
        "Retry now: \uff13\uff10 recipients due now",  # FULLWIDTH THIRTY
        "Hold: held\n",
    ],
)
def test_the_notice_after_an_action_has_ascii_digits(
    client: TestClient, ids: dict[str, str], made_up: str
) -> None:
    """A str pattern's \\d took other scripts' digits (a link could show any number),
    and its "$" a final line break."""
    shown = client.get(
        f"/message/{ids['queued']}", params={"done": "Retry now: 3 recipients due now"}
    )
    assert 'id="done">Retry now: 3 recipients due now<' in shown.text
    page = client.get(f"/message/{ids['queued']}", params={"done": made_up})
    assert 'id="done"' not in page.text


def _suspend(client: TestClient, domain: str, duration: str) -> str:
    confirm = client.get(f"/action/suspend/{domain}")
    assert confirm.status_code == 200 and "Suspend delivery to" in confirm.text
    assert 'name="for"' in confirm.text and "for 2 hours" in confirm.text
    done = client.post(
        f"/action/suspend/{domain}",
        data={"csrf": _csrf(confirm.text), "for": duration},
        follow_redirects=False,
    )
    assert done.status_code == 303
    location: str = done.headers["location"]
    assert location.startswith(f"/destinations?domain={a_label(domain)}&done=")
    return location


def test_a_destination_is_suspended_then_resumed_on_every_store(
    any_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    any_store.enqueue(message("b@two.example", "c@three.example"), now=NOW)
    now = NOW + timedelta(minutes=1)  # the dashboard's clock
    for client in _client(any_store):
        with caplog.at_level(logging.INFO, logger="mailstrom.web"):
            after = client.get(_suspend(client, "Two.Example", "2h")).text
        assert 'id="done">Suspend: suspended for 2h<' in after
        assert re.search(r"suspended</span> until \d{4}-\d\d-\d\d \d\d:\d\d UTC", after)
        assert "/action/resume/two.example" in after
        assert [(s.domain, s.until) for s in any_store.suspensions(now=now)] == [
            ("two.example", now + timedelta(hours=2))
        ]
        assert any("suspend two.example by" in r.getMessage() for r in caplog.records)
        # The other destination is still delivered to and offers a suspend button.
        listing = client.get("/destinations").text
        assert "/action/suspend/three.example" in listing
        assert "/action/suspend/two.example" not in listing
        overview = client.get("/").text
        assert re.search(
            r'id="suspended">Suspended destinations \(1\):\s*<a[^>]*>two\.example', overview
        )

        # Until resumed, for a domain with nothing pending (typed into the filter).
        idle = client.get("/destinations", params={"domain": "idle.example"}).text
        assert "/action/suspend/idle.example" in idle
        client.get(_suspend(client, "idle.example", ""))
        assert {s.domain: s.until for s in any_store.suspensions(now=now)} == {
            "idle.example": None,
            "two.example": now + timedelta(hours=2),
        }

        confirm = client.get("/action/resume/two.example")
        assert (
            "Resume delivery to two.example?" in confirm.text and 'name="for"' not in confirm.text
        )
        done = client.post("/action/resume/two.example", data={"csrf": _csrf(confirm.text)})
        assert 'id="done">Resume: resumed<' in done.text
        assert "/action/suspend/two.example" in done.text
    assert [s.domain for s in any_store.suspensions(now=now)] == ["idle.example"]


def test_suspend_needs_the_csrf_token_and_an_offered_duration(
    client: TestClient, store: Store, ids: dict[str, str]
) -> None:
    confirm = client.get("/action/suspend/two.example")
    for data in ({}, {"csrf": "forged", "for": "1h"}):
        refused = client.post("/action/suspend/two.example", data=data)
        assert refused.status_code == 403 and 'id="problem"' in refused.text
    odd = client.post(
        "/action/suspend/two.example", data={"csrf": _csrf(confirm.text), "for": "999y"}
    )
    assert odd.status_code == 400 and "offered durations" in odd.text
    assert store.suspensions(now=NOW) == []
    store.suspend("two.example", now=NOW)
    refused = client.post("/action/resume/two.example", data={"csrf": "forged"})
    assert refused.status_code == 403
    assert [s.domain for s in store.suspensions(now=NOW)] == ["two.example"]


@pytest.mark.parametrize(
    "target",
    [
        "not a domain",
        "bang!.example",
        "-leading.example",
        "trailing-.example",
        "a..example",
        "x" * 64 + ".example",
        ".".join(["abcdefghi"] * 30),  # 299 octets
        "user@example.org",
        "%5B127.0.0.1%5D",
    ],
)
def test_a_bad_domain_gets_a_clear_page(client: TestClient, store: Store, target: str) -> None:
    for page in (
        client.get(f"/action/suspend/{target}"),
        client.post(f"/action/suspend/{target}", data={"csrf": "x"}),
    ):
        assert page.status_code == 400
        assert 'id="problem"' in page.text and "not a domain name" in page.text
    assert store.suspensions(now=NOW) == []


def test_an_internationalised_name_finds_and_suspends_its_destination(store: Store) -> None:
    # Recipients' domains are stored as A-labels: a U-label filter found nothing, and a
    # suspension keyed by it was listed but never held any mail back.
    store.enqueue(message("b@xn--bcher-kva.example"), now=NOW)  # as prepare() stores it
    for client in _client(store):
        found = client.get("/queue", params={"domain": "Bücher.example"}).text
        assert "No messages match" not in found and "xn--bcher-kva.example" in found
        listing = client.get("/destinations", params={"domain": "bücher.example"}).text
        assert "/action/suspend/xn--bcher-kva.example" in listing
        client.get(_suspend(client, "bücher.example", ""))
    assert [s.domain for s in store.suspensions(now=NOW)] == ["xn--bcher-kva.example"]
    assert store.lease(now=NOW + timedelta(minutes=1), limit=10, lease_for=LEASE_FOR) is None


def test_a_suspension_an_earlier_version_stored_can_be_resumed(store: Store) -> None:
    """An earlier version suspended names no recipient's domain has (``*.example.test``,
    the notation a throttled destination is shown in); `mailstrom resume` still ends one,
    but the dashboard listed it with a Resume button whose page was a 400 "not a domain
    name", so it could not be ended there. Suspending such a name is still refused."""
    store.suspend("*.example.test", now=NOW)
    for client in _client(store):
        page = client.get("/destinations").text
        offered = re.findall(r'href="(/action/resume/[^"]+)"', page)
        assert offered == ["/action/resume/%2A.example.test"]
        confirm = client.get(offered[0])
        assert confirm.status_code == 200, confirm.text
        assert "Resume delivery to *.example.test?" in confirm.text
        done = client.post(offered[0], data={"csrf": _csrf(confirm.text)})
        assert done.status_code == 200 and 'id="done">Resume: resumed<' in done.text
        assert store.suspensions(now=NOW) == []
        refused = client.get("/action/suspend/%2A.example.test")
        assert refused.status_code == 400 and "not a domain name" in refused.text


@pytest.mark.parametrize("name", ["a%41.example.test", "x?y.example.test", "p#q.example.test"])
def test_a_stored_suspension_with_url_syntax_in_its_name_is_the_one_resumed(
    tmp_path: Path, name: str
) -> None:
    """The confirmation form posted to its target as written into the URL path: a stored
    name holding ``%41``, ``?`` or ``#`` was posted as ``aa.example.test``, ``x`` or
    ``p``, which "was not suspended", and the suspension stayed. (A real server:
    Starlette's test client decodes a path twice.)"""
    with served(tmp_path, request_timeout=30.0) as server:
        writer = SQLiteStore(tmp_path / "queue.db")
        try:
            writer.suspend(name, now=NOW)
            with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
                page = client.get("/destinations").text
                offered = re.findall(r'href="(/action/resume/[^"]+)"', page)
                confirm = client.get(offered[0])
                assert f"Resume delivery to {name}?" in confirm.text
                found = re.search(r'<form method="post" action="([^"]+)"', confirm.text)
                assert found is not None
                done = client.post(
                    html.unescape(found[1]),
                    data={"csrf": _csrf(confirm.text)},
                    headers={"Origin": f"http://127.0.0.1:{server.port}"},
                    follow_redirects=True,
                )
                assert 'id="done">Resume: resumed<' in done.text
            assert writer.suspensions(now=NOW) == []
        finally:
            writer.close()


def test_every_action_the_destinations_page_offers_can_be_confirmed(store: Store) -> None:
    # Mail to an address literal is a destination of its own, which nothing can suspend
    # (suspensions are by domain name): its Suspend button led to a 400 "not a domain
    # name: '[192.0.2.1]'" page every time.
    store.enqueue(message("b@[192.0.2.1]"), now=NOW)
    store.enqueue(message("c@three.example"), now=NOW)
    for client in _client(store):
        page = client.get("/destinations").text
        assert "[192.0.2.1]" in page and "three.example" in page
        offered = re.findall(r'href="(/action/[^"]+)"', page)
        assert offered == ["/action/suspend/three.example"]
        for link in offered:
            assert client.get(link).status_code == 200, link


def test_domain_names_are_lower_cased_and_may_be_internationalised() -> None:
    from mailstrom.web.actions import InvalidTarget, destination_domain

    assert destination_domain("Mail.Example.ORG.") == "mail.example.org"
    assert destination_domain("bücher.example") == "xn--bcher-kva.example"  # as stored
    with pytest.raises(InvalidTarget):
        destination_domain("bad label.example")


def test_the_overview_says_which_workers_run_and_when_none_does(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        for client in _client(store):
            page = client.get("/").text
            assert 'id="no-workers"' in page and "No worker is running on this store" in page
        store.release_dead_holders("0123abcd0123abcd")  # a worker's first look: it runs
        for client in _client(store):
            page = client.get("/").text
            assert 'id="no-workers"' not in page
            found = re.search(r'<p class="summary" id="workers">(.*?)</p>', page, re.S)
            assert found is not None, page
            assert "1 worker running:" in found.group(1)
            assert f"{socket.gethostname()} pid {os.getpid()}" in found.group(1)
            assert "lease holder 0123abcd0123abcd, since " in found.group(1)
    finally:
        store.close()


def test_a_store_that_cannot_tell_shows_no_workers_line(client: TestClient) -> None:
    page = client.get("/").text  # a memory store
    assert 'id="workers"' not in page and 'id="no-workers"' not in page


def test_a_failed_look_for_the_workers_shows_no_workers_line_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(SQLiteStore):
        def live_holders(self, *, leases: bool = True) -> list[HolderInfo]:
            raise StoreError("SQLite store: the holders directory is unreadable")

    store = Failing(tmp_path / "queue.db")
    try:
        for client in _client(store):
            with caplog.at_level(logging.WARNING, logger="mailstrom.web"):
                page = client.get("/").text
            assert 'id="workers"' not in page and 'id="no-workers"' not in page
            assert (
                "cannot tell which workers run: SQLite store: the holders directory is "
                "unreadable" in caplog.messages
            )
    finally:
        store.close()


def test_wrong_tokens_from_one_address_are_refused_for_a_while(store: Store) -> None:
    # Nothing bounded the tries at the token: a short one on a public address could be
    # guessed at the speed of the network, through the form or as a bearer token.
    for client in _client(store, token="s3cret-token-0123"):
        login = client.get("/login")
        csrf = _csrf(login.text)
        for n in range(MAX_GUESSES // 2):
            wrong = client.post("/login", data={"csrf": csrf, "token": f"guess{n}"})
            assert wrong.status_code == 401
            bearer = client.get(
                "/", headers={"Authorization": f"Bearer try{n}"}, follow_redirects=False
            )
            assert bearer.status_code == 303
        # Even the right token now waits, by either way.
        blocked = client.post("/login", data={"csrf": csrf, "token": "s3cret-token-0123"})
        assert blocked.status_code == 429
        assert 0 < int(blocked.headers["retry-after"]) <= GUESS_WINDOW
        bearer = client.get("/", headers={"Authorization": "Bearer s3cret-token-0123"})
        assert bearer.status_code == 429


def test_failed_tries_are_forgotten_after_the_window() -> None:
    now = [0.0]
    guesses = Guesses(limit=3, window=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert guesses.wait("192.0.2.1") == 0
        guesses.failed("192.0.2.1")
        now[0] += 1
    assert guesses.wait("192.0.2.1") == pytest.approx(57.0)
    assert guesses.wait("192.0.2.2") == 0  # another address may still try
    now[0] = 60.5  # the first try is over a minute old: one more may come
    assert guesses.wait("192.0.2.1") == 0
    guesses.failed("192.0.2.1")
    assert guesses.wait("192.0.2.1") == pytest.approx(0.5)  # until the second is old
    now[0] = 1000
    assert guesses.wait("192.0.2.1") == 0
    assert not guesses._failed  # nothing kept of an address whose tries are all old


def test_failed_tries_from_one_ipv6_network_count_together() -> None:
    """An IPv6 client holds a /64 at least (a home line, a cloud host): counted by full
    address, it took 10 tries at the token from each of 2**64 addresses, and the 10,000
    remembered made room for them. Its /64 is one client, as its IPv4-mapped form is
    the IPv4 address."""
    guesses = Guesses(limit=3, window=60.0, clock=lambda: 0.0)
    for client in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"):
        guesses.failed(client)
    assert guesses.wait("2001:db8:1:2::99") > 0
    assert guesses.wait("2001:db8:1:3::1") == 0  # another /64 may still try
    for _ in range(3):
        guesses.failed("::ffff:192.0.2.7")
    assert guesses.wait("192.0.2.7") > 0


def test_the_login_form_counts_an_ipv6_network_as_one_client(store: Store) -> None:
    app = create_app(store, token="s3cret-token-0123")
    for n in range(MAX_GUESSES + 1):
        peer = (f"2001:db8::{n + 1:x}", 50000)
        with TestClient(app, base_url="http://127.0.0.1:8025", client=peer) as client:
            login = client.get("/login")
            tried = client.post("/login", data={"csrf": _csrf(login.text), "token": f"g{n}"})
            assert tried.status_code == (401 if n < MAX_GUESSES else 429)


def test_a_proxys_basic_credentials_are_no_try_at_the_token(store: Store) -> None:
    """A proxy asking for HTTP Basic credentials passes them on with every request. They
    counted as a wrong token: a few pages opened before logging in locked the login out
    for everyone behind the proxy, and once it was, every page of a browser logged in was
    429 too, though a browser logged in keeps its session."""
    basic = {"Authorization": "Basic b3BzOnMzY3JldA=="}  # ops:s3cret, the proxy's
    for client in _client(store, token="s3cret-token-0123"):
        for _ in range(MAX_GUESSES + 1):
            page = client.get("/queue", headers=basic, follow_redirects=False)
            assert page.status_code == 303 and page.headers["location"].startswith("/login")
        login = client.get("/login", headers=basic)
        done = client.post(
            "/login",
            data={"csrf": _csrf(login.text), "token": "s3cret-token-0123"},
            headers=basic,
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert client.get("/queue", headers=basic).status_code == 200


def test_a_browser_logged_in_keeps_its_session_while_its_address_guesses(
    store: Store,
) -> None:
    """Behind a proxy every client has its address: another's wrong bearer tokens made
    the pages of a browser logged in 429 whenever it sent any Authorization header."""
    for client in _client(store, token="s3cret-token-0123"):
        login = client.get("/login")
        client.post("/login", data={"csrf": _csrf(login.text), "token": "s3cret-token-0123"})
        other = TestClient(client.app, base_url="http://127.0.0.1:8025")  # no session
        for n in range(MAX_GUESSES):
            other.get("/", headers={"Authorization": f"Bearer try{n}"}, follow_redirects=False)
        assert other.get("/", headers={"Authorization": "Bearer try"}).status_code == 429
        assert client.get("/", headers={"Authorization": "Bearer try"}).status_code == 200


def test_a_token_longer_than_a_request_may_give_is_a_value_error(store: Store) -> None:
    with pytest.raises(ValueError, match="1024"):
        create_app(store, token="x" * 1025)
    for client in _client(store, token="x" * 1024):  # the longest: it can log in
        login = client.get("/login")
        done = client.post(
            "/login", data={"csrf": _csrf(login.text), "token": "x" * 1024}, follow_redirects=False
        )
        assert done.status_code == 303


@pytest.mark.parametrize(
    "token",
    ["s3cret-s3cret-s3 ", "\ts3cret-s3cret-s3", "s3cret-s3\ncret-s3", "s3cret-s3cret-s3\x7f"],
)
def test_a_token_a_header_cannot_carry_is_a_value_error(store: Store, token: str) -> None:
    """A header value cannot begin or end with white space (the server drops it) nor hold
    a control character: a script's `Authorization: Bearer` could never give such a
    token, and each try counted as a wrong guess."""
    with pytest.raises(ValueError, match="token"):
        create_app(store, token=token)


def test_retrying_a_held_message_says_it_waits_to_be_released(
    client: TestClient, store: Store, ids: dict[str, str]
) -> None:
    """Was "Retry now: 1 recipient due now" for a held message, which no worker leases
    until it is released."""
    mid = ids["deferred"]
    store.set_held(mid, True)
    token = _csrf(client.get(f"/action/retry/{mid}").text)
    done = client.post(f"/action/retry/{mid}", data={"csrf": token})
    assert 'id="done">Retry now: 1 recipient due once released<' in done.text
    assert store.status(mid).held


def test_retrying_mail_to_a_suspended_destination_says_it_waits_for_it(
    client: TestClient, store: Store, ids: dict[str, str]
) -> None:
    """Was "Retry now: 3 recipients due now" with two of them at a suspended destination,
    which no worker leases until it is resumed (as `mailstrom retry` says since 1e5c3df)."""
    mixed = store.enqueue(message("x@one.example", "y@two.example", "z@two.example"), now=NOW)
    store.suspend("two.example", now=NOW)
    for mid, notice in (
        (mixed, "1 recipient due now, 2 due once resumed"),
        (ids["deferred"], "1 recipient due once resumed"),
        (ids["queued"], "1 recipient due now"),
    ):
        token = _csrf(client.get(f"/action/retry/{mid}").text)
        done = client.post(f"/action/retry/{mid}", data={"csrf": token})
        assert f'id="done">Retry now: {notice}<' in done.text
    store.set_held(mixed, True)  # held first: it waits to be released
    token = _csrf(client.get(f"/action/retry/{mixed}").text)
    done = client.post(f"/action/retry/{mixed}", data={"csrf": token})
    assert 'id="done">Retry now: 3 recipients due once released<' in done.text


def test_retrying_mail_to_a_throttled_destination_says_it_waits_for_the_pause(
    any_store: Store,
) -> None:
    """Was "Retry now: 2 recipients due now" with one of them at a destination paused
    after a throttling reply (421 4.7.28): the worker leases it and gives it back, due at
    the pause's end, as `mailstrom retry` says ("at a throttled destination, due once its
    pause ends") and the message's page shows ("throttled until")."""
    # Pauses are read by the real clock (status()): one made at NOW, years ahead of
    # it, would be taken for a clock since set back (policy.throttle.pause_runs).
    now = datetime.now(UTC)
    mid = any_store.enqueue(message("x@one.example", "y@two.example"), now=now)
    other = any_store.enqueue(message("z@two.example", "w@three.example"), now=now)
    lease = lease_all(any_store, now=now)
    pause = any_store.throttle(
        "two.example",
        now=now,
        reply="421 4.7.28 Our system has detected an unusual rate",
        first=timedelta(hours=1),
        maximum=timedelta(hours=4),
    )
    at_two = [item for item in lease.items if item.domain == "two.example"]
    any_store.postpone(at_two, until=pause.until, destination="two.example")
    any_store.record(
        results_for(
            lease,
            RecipientState.DEFERRED,
            next_attempt_at=now + timedelta(hours=1),
            only=["x@one.example", "w@three.example"],
        )
    )
    any_store.suspend("three.example", now=now)
    for client in _client(any_store, now=now):
        for target, notice in (
            (mid, "1 recipient due now, 1 due once the pause ends"),
            (other, "1 recipient due once resumed, 1 due once the pause ends"),
        ):
            token = _csrf(client.get(f"/action/retry/{target}").text)
            done = client.post(f"/action/retry/{target}", data={"csrf": token})
            assert f'id="done">Retry now: {notice}<' in done.text
        any_store.suspend("one.example", now=now)
        token = _csrf(client.get(f"/action/retry/{mid}").text)
        done = client.post(f"/action/retry/{mid}", data={"csrf": token})
        assert 'id="done">Retry now: 1 recipient due once resumed, 1 due once the pause ends<' in (
            done.text
        )


def test_an_action_on_a_message_makes_no_status_per_recipient(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confirmation pages and Retry, Hold and Release made a RecipientStatus for
    every recipient of the message (100,000 per click for a message to 100,000), to read
    its state, whether it is held, and how many recipients wait for a suspended
    destination. They read counts: a few statuses per click, however many recipients."""
    addresses = [f"r{i}@d{i % 4}.example" for i in range(200)]
    mid = any_store.enqueue(message(*addresses), now=NOW)
    any_store.suspend("d1.example", now=NOW)
    built = 0
    make = RecipientStatus.__init__

    def counted(self: RecipientStatus, *args: Any, **kwargs: Any) -> None:
        nonlocal built
        built += 1
        make(self, *args, **kwargs)

    for client in _client(any_store):
        monkeypatch.setattr(RecipientStatus, "__init__", counted)
        clicks = 0
        for name, notice in (
            ("retry", "150 recipients due now, 50 due once resumed"),
            ("release", "was not held"),
            ("hold", "held"),
            ("hold", "already held"),
            ("retry", "200 recipients due once released"),
            ("release", "released"),
        ):
            token = _csrf(client.get(f"/action/{name}/{mid}").text)
            # Not on to the message's page, which shows a page of its recipients.
            done = client.post(
                f"/action/{name}/{mid}", data={"csrf": token}, follow_redirects=False
            )
            assert urllib.parse.unquote(done.headers["location"]).endswith(f": {notice}")
            clicks += 1
        monkeypatch.undo()
        assert built <= 4 * clicks  # was 200 and more per click


def test_a_suspension_from_a_clock_in_a_zone_with_summer_time_lasts_its_length(
    store: MemoryStore,
) -> None:
    """Was: the dashboard's clock in a zone with summer time (``ZoneInfo``) had a
    suspension's length added on its wall clock: 01:50 CET plus two hours is 03:50 CEST,
    one hour on, so a destination suspended for 2h was delivered to again after one."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    store.enqueue(message("b@two.example"), now=NOW)
    now = datetime(2026, 3, 29, 1, 50, tzinfo=ZoneInfo("Europe/Berlin"))  # 00:50 UTC
    app = create_app(store, clock=lambda: now)
    with TestClient(app, base_url="http://127.0.0.1:8025") as client:
        client.get(_suspend(client, "two.example", "2h"))
    [suspension] = store.suspensions(now=now)
    assert suspension.until == datetime(2026, 3, 29, 2, 50, tzinfo=UTC)


class _StatusFailsAfterRetry(MemoryStore):
    """A store whose first read of a status after a retry (its read model's) fails, as
    one whose connection drops (or a lock times out) between the two calls does."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next_read = False

    def retry(self, message_id: str, **kwargs: Any) -> int:
        done = super().retry(message_id, **kwargs)
        self.fail_next_read = True
        return done


class _FailingAfterRetry(MemoryReadModel):
    def __init__(self, store: _StatusFailsAfterRetry) -> None:
        super().__init__(store)
        self.store = store

    def message_status(self, message_id: str, *, attempts: int, **page: Any) -> Any:
        if self.store.fail_next_read:
            self.store.fail_next_read = False
            raise StoreError("the connection was lost")
        return super().message_status(message_id, attempts=attempts, **page)


def test_a_retry_done_whose_outcome_cannot_be_read_says_it_was_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retry was made, and the read of the message's status after it failed: the
    page was a 503 "The queue cannot be read right now", and the user believed the retry
    had failed, and tried again, or gave up on it. It says the recipients were made due."""
    store = _StatusFailsAfterRetry()
    mid = store.enqueue(message("a@one.example"), now=NOW)
    lease = lease_all(store)
    store.record(
        results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW + timedelta(hours=1))
    )
    for client in _client(store, read_model=_FailingAfterRetry(store)):
        token = _csrf(client.get(f"/action/retry/{mid}").text)
        with caplog.at_level(logging.WARNING, logger="mailstrom.web"):
            done = client.post(f"/action/retry/{mid}", data={"csrf": token})
        assert done.status_code == 200, done.text
        assert 'id="done">Retry now: 1 recipient made due<' in done.text
    assert store.status(mid).recipients[0].next_attempt_at == NOW + timedelta(minutes=1)
    assert any("the connection was lost" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["upper", "mixed"])
def test_a_message_id_in_upper_case_finds_its_message(
    client: TestClient, store: Store, ids: dict[str, str], case: str
) -> None:
    """Ids are hex, taken in any case by ``query_status`` and ``mailstrom status``; the
    dashboard answered 404 "no such message" to an id copied in upper case (as some tools
    and people write hex)."""
    mid = ids["queued"]
    typed = mid.upper() if case == "upper" else mid[:16].upper() + mid[16:]
    page = client.get(f"/message/{typed}")
    assert page.status_code == 200, page.text
    assert f"/action/hold/{mid}" in page.text
    confirm = client.get(f"/action/hold/{typed}")
    assert confirm.status_code == 200, confirm.text
    done = client.post(
        f"/action/hold/{typed}", data={"csrf": _csrf(confirm.text)}, follow_redirects=False
    )
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/message/{mid}?done=")
    assert store.status(mid).held


def test_a_message_page_shows_a_bounded_number_of_attempts(
    client: TestClient, store: Store
) -> None:
    """Every attempt of every recipient was a row of the page: a message to 1,000
    recipients deferred 30 times each was 9.3 MB of HTML, rendered in 2.4 s in the
    server's event loop (every other request waiting meanwhile). Each recipient now shows
    its latest attempts, as many as a page-wide budget leaves it, and how many are not
    shown."""
    recipients = [f"user{i}@d{i % 7}.example" for i in range(100)]
    mid = store.enqueue(message(*recipients), now=NOW)
    tries = 8
    for k in range(tries):
        at = NOW + timedelta(hours=k)
        store.record(
            results_for(
                lease_all(store, now=at),
                RecipientState.DEFERRED,
                at=at,
                next_attempt_at=at + timedelta(minutes=30),
            )
        )
    page = client.get(f"/message/{mid}").text
    attempts = page.partition("<h2>Attempts</h2>")[2].partition("<h2>Headers</h2>")[0]
    rows = attempts.count('<td class="num">')  # one per attempt shown (its seconds)
    assert tries * len(recipients) > MAX_SHOWN_ATTEMPTS  # the budget is what bounds it
    assert 0 < rows <= MAX_SHOWN_ATTEMPTS
    each = MAX_SHOWN_ATTEMPTS // len(recipients)
    assert rows == each * len(recipients)  # the budget is shared alike
    last = (NOW + timedelta(hours=tries - 1)).strftime("%Y-%m-%d %H:%M:%S")
    assert attempts.count(f"<td>{last}</td>") == len(recipients)  # each one's latest
    hidden = tries - each
    assert attempts.count(f"{hidden} earlier attempts not shown") == len(recipients)


def test_the_destinations_page_lists_a_bounded_number_of_throttled_destinations(
    client: TestClient, store: Store
) -> None:
    """Every destination a throttling reply paused was an item of the page, its reply
    with it: recipients at 5,000 subdomains of one hostile domain, each answering "421
    rate limited", made a page of 3.4 MB. It lists the ones whose pause ends soonest and
    says how many more there are."""
    count = MAX_SHOWN_THROTTLES + 7
    for i in range(count):
        store.throttle(
            f"a{i}.evil.example",
            now=NOW + timedelta(seconds=i),
            reply="421 4.7.28 rate limited",
            first=timedelta(hours=1),
            maximum=timedelta(hours=4),
        )
    page = client.get("/destinations").text
    section = re.search(r'<section id="throttled".*?</section>', page, re.S)
    assert section is not None, page
    assert section.group(0).count('class="tag throttled"') == MAX_SHOWN_THROTTLES
    assert "<strong>a0.evil.example</strong>" in section.group(0)  # the soonest end
    assert f"<strong>a{count - 1}.evil.example</strong>" not in section.group(0)
    assert "7 more" in section.group(0) and "mailstrom queue --throttled" in section.group(0)


def test_the_attempts_budget_is_shared_among_the_recipients_of_the_page(
    client: TestClient, store: Store
) -> None:
    """Past MAX_SHOWN_ATTEMPTS recipients, those the budget left no row said how many
    attempts they have; a page lists SHOWN_RECIPIENTS now, fewer than the budget, and
    the budget is shared among those only: each shows its attempt."""
    recipients = [f"user{i}@d{i % 7}.example" for i in range(MAX_SHOWN_ATTEMPTS + 20)]
    mid = store.enqueue(message(*recipients), now=NOW)
    store.record(
        results_for(
            lease_all(store), RecipientState.DEFERRED, next_attempt_at=NOW + timedelta(hours=1)
        )
    )
    page = client.get(f"/message/{mid}").text
    attempts = page.partition("<h2>Attempts</h2>")[2].partition("<h2>Headers</h2>")[0]
    assert SHOWN_RECIPIENTS < MAX_SHOWN_ATTEMPTS
    assert attempts.count('<td class="num">') == SHOWN_RECIPIENTS
    assert "not shown" not in attempts
    assert "No attempt yet" not in attempts


def test_a_recipient_whose_share_exceeds_its_history_shows_all_of_it(
    client: TestClient, store: Store
) -> None:
    """A recipient's share of the attempts budget was taken from the end of its history
    as ``history[len - share:]``: with a share larger than its history but not twice as
    large, that start was negative and counted from the end, so 100 recipients of 3
    attempts each (a share of 5) showed 2 of them, with "1 earlier attempt not shown"."""
    recipients = [f"user{i}@d{i % 7}.example" for i in range(100)]
    mid = store.enqueue(message(*recipients), now=NOW)
    tries = 3
    for k in range(tries):
        at = NOW + timedelta(hours=k)
        store.record(
            results_for(
                lease_all(store, now=at),
                RecipientState.DEFERRED,
                at=at,
                next_attempt_at=at + timedelta(minutes=30),
            )
        )
    assert tries < MAX_SHOWN_ATTEMPTS // len(recipients) < 2 * tries
    page = client.get(f"/message/{mid}").text
    attempts = page.partition("<h2>Attempts</h2>")[2].partition("<h2>Headers</h2>")[0]
    assert attempts.count('<td class="num">') == tries * len(recipients)
    assert "not shown" not in attempts


def test_the_actions_on_a_message_read_none_of_its_attempts(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An action's confirmation page read the message's whole status (every attempt of
    every recipient) to learn that it exists, and retry, hold and release read it again
    to say what became of it: on SQLite, 0.5 s for a message to 1,000 recipients tried
    30 times each, 30,000 attempts made for a page that shows none. They read its
    recipients only, and say what they said."""
    recipients = [f"user{i}@d{i % 3}.example" for i in range(40)]
    mid = any_store.enqueue(message(*recipients), now=NOW)
    for k in range(5):
        at = NOW + timedelta(hours=k)
        any_store.record(
            results_for(
                lease_all(any_store, now=at),
                RecipientState.DEFERRED,
                at=at,
                next_attempt_at=at + timedelta(minutes=30),
            )
        )
    any_store.suspend("d1.example", now=NOW)
    made = 0
    make = Attempt.__init__

    def counted(self: Attempt, **fields: Any) -> None:
        nonlocal made
        made += 1
        make(self, **fields)

    said = []
    for client in _client(any_store, now=NOW + timedelta(hours=5)):
        for action in ("retry", "hold", "release", "retry", "cancel"):
            with monkeypatch.context() as patch:
                patch.setattr(Attempt, "__init__", counted)
                token = _csrf(client.get(f"/action/{action}/{mid}").text)
                done = client.post(
                    f"/action/{action}/{mid}", data={"csrf": token}, follow_redirects=False
                )
            assert done.status_code == 303, done.text
            said.append(urllib.parse.unquote(done.headers["location"].partition("done=")[2]))
    assert made == 0
    assert said == [
        "Retry now: 27 recipients due now, 13 due once resumed",
        "Hold: held",
        "Release: released",
        "Retry now: 27 recipients due now, 13 due once resumed",
        "Cancel: 40 recipients cancelled",
    ]
