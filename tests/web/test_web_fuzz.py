"""Fuzzing the dashboard's HTTP boundary: whatever method, path, query string, form and
headers (Host, Origin, Cookie, Authorization) a client sends, with or without a token,
the dashboard answers deliberately (200, 303, 400, 401, 403, 404, 405 or 413, never an
exception or a 500), shows no markup it was given, redirects only to a path on this
server, quotes at most a short piece of what it was given in an error, and changes the
queue only for a POST that carries the browser's CSRF token, from this origin, by a
client allowed in.

The queue is a real SQLite store holding a message in each state (queued, deferred,
delivered, failed, held) and a suspended destination; their ids are what generated paths
and searches mostly name, so that pages and actions find them.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (150 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/web/test_web_fuzz.py``.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from mailstrom.message import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore
from mailstrom.web import create_app
from mailstrom.web.security import Guesses, session_cookie
from tests.contract.support import NOW, lease_all, message, results_for

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "150"))
TOKEN = "s3cret-token-0123"
CSRF = "the-browsers-csrf-token"
MARK = "<x-evil"
"""Markup no page may show as it was given (inputs carry it; stored messages too)."""
ANSWERS = {200, 303, 400, 401, 403, 404, 405, 413}
LOOPBACK = "127.0.0.1:8025"

DATA = (
    b"From: <x-evil>App</x-evil> <app@example.com>\r\nTo: b@two.example\r\n"
    b'Subject: "><x-evil onload=alert(1)>\r\nX-Odd: =?utf-8?q?=3Cx-evil=3E?=\r\n\r\n'
    b"<x-evil>The body</x-evil>\r\n"
)

# --- the queue ---------------------------------------------------------------------------

ROLES = ("queued", "deferred", "delivered", "failed", "held")


@dataclass(repr=False)
class Queue:
    """The store and the id of its message in each role (a cancelled one is replaced)."""

    store: SQLiteStore
    ids: dict[str, str]

    def refill(self) -> None:
        """A pending message in each pending role again, after an action made it final."""
        for role in ("queued", "held", "deferred"):
            status = self.store.status(self.ids[role])
            if status.is_final or (role == "held") != status.held:
                self.ids[role] = _seed(self.store, role)

    def snapshot(self) -> object:
        return (
            [self.store.status(mid) for mid in self.ids.values()],
            self.store.suspensions(now=NOW),
        )


def _seed(store: SQLiteStore, role: str) -> str:
    """A message in ``role``, leaving the others as they are."""
    if role not in ("deferred", "delivered", "failed"):
        return store.enqueue(_message(role), now=NOW, hold=role == "held")
    # Only the new message is due: every other pending one is held meanwhile.
    others = [m.id for m in store.query(now=NOW) if not m.is_final and not m.held]
    store.hold_many(others, True)
    mid = store.enqueue(_message(role), now=NOW)
    state = RecipientState(role)
    later = NOW + timedelta(hours=1) if state is RecipientState.DEFERRED else None
    store.record(results_for(lease_all(store), state, next_attempt_at=later))
    store.hold_many(others, False)
    return mid


def _message(role: str) -> PreparedMessage:
    return message(f"{role}@{role}.example", "b@two.example", data=DATA)


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Queue]:
    store = SQLiteStore(tmp_path_factory.mktemp("web-fuzz") / "queue.db")
    ids = {role: _seed(store, role) for role in ROLES}
    store.suspend("two.example", now=NOW)
    yield Queue(store=store, ids=ids)
    store.close()


@pytest.fixture(scope="module")
def clients(queue: Queue) -> Iterator[dict[bool, TestClient]]:
    """A client of the dashboard without a token (False) and with one (True)."""
    made = {}
    for with_token in (False, True):
        app = create_app(
            queue.store,
            clock=lambda: NOW + timedelta(minutes=1),
            token=TOKEN if with_token else None,
            cache_seconds=0,
            # Every example may guess at the token: none is refused for the ones before.
            guesses=Guesses(limit=10**9),
        )
        made[with_token] = TestClient(app, base_url=f"http://{LOOPBACK}")
        made[with_token].__enter__()
    yield made
    for client in made.values():
        client.__exit__(None, None, None)


# --- the inputs --------------------------------------------------------------------------

ODD = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "²",
        "٣",
        "1e9",
        "9" * 30,
        "nan",
        "1.5",
        "1." + "9" * 30,
        "9" * 21 + ".1",
        MARK + ">",
        '"><x-evil>',
        "' onmouseover='x",
        "javascript:alert(1)",
        "//evil.example",
        "/\\evil.example",
        "/\t/evil.example",
        "https://evil.example/",
        "\r\nSet-Cookie: x=1",
        "%0d%0a",
        "\x00",
        "a@b",
        "two.example",
        "Two.Example.",
        "bücher.example",
        "xn--bcher-kva.example",
        "[127.0.0.1]",
        "Hold: held",
        "Retry now: 1 recipient due now",
        "Suspend: suspended for 2h",
        "2h",
        "1w",
        "99999w",
        "all",
        "deferred",
        "held",
        "oldest",
        "25",
        "200",
        "100000",
        "1",
    ]
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
HUGE = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["z", "9", "<x-evil>", "é", "a."]),
    st.integers(300, 1200),
)
MARKED = st.builds(lambda a, b: a + MARK + ">" + b, TEXT, TEXT)


def _id_like(role: str, how: str) -> tuple[str, str]:
    return role, how


ID_LIKE = st.builds(
    _id_like,
    st.sampled_from(ROLES),
    st.sampled_from(["as is", "upper", "prefix", "newline", "extra"]),
)
"""A seeded message's id, as is or altered (resolved against the live queue)."""

VALUE = st.one_of(ODD, TEXT, MARKED, HUGE, ID_LIKE)
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["²", "٣", "1_000", " 5", "+5", "0x10", "1e3", "9" * 4400]),
)
CURSORS = st.one_of(
    st.builds("{}.{}".format, NUMBERS, NUMBERS),
    st.builds("{}.{}".format, st.integers(0, 2**62), st.integers(0, 2**62)),
)
DURATIONS = st.builds("{}{}".format, NUMBERS, st.sampled_from(["", "s", "m", "h", "d", "w", "ms"]))
PER_KEY = {
    "view": st.sampled_from(
        ["pending", "all", "queued", "deferred", "delivered", "failed", "held"]
    ),
    "order": st.sampled_from(["newest", "oldest", "NEWEST"]),
    "limit": st.one_of(st.sampled_from(["25", "50", "100", "200"]), NUMBERS),
    "domain": st.sampled_from(["two.example", "queued.example", "Two.Example.", "bücher.example"]),
    "age": DURATIONS,
    "q": st.one_of(ID_LIKE, st.sampled_from(["b@two.example", "two.example", "%", "_", "0"])),
    "after": CURSORS,
    "offset": NUMBERS,
    "done": st.sampled_from(["Hold: held", "Cancel: 1 recipient cancelled", "Hold: held\n"]),
    "body": st.sampled_from(["1", "0", "1 "]),
    "next": st.sampled_from(["/queue", "//evil.example", "/\\evil.example", "/\t/evil"]),
}
QUERY_KEYS = st.sampled_from(sorted(PER_KEY))
QUERY = st.one_of(
    st.dictionaries(st.one_of(QUERY_KEYS, TEXT), VALUE, max_size=6),
    QUERY_KEYS.flatmap(lambda k: st.dictionaries(st.just(k), st.one_of(PER_KEY[k], VALUE))),
    st.fixed_dictionaries({}, optional={k: st.one_of(v, VALUE) for k, v in PER_KEY.items()}),
)
PAGES = st.sampled_from(
    [
        *("/", "/queue", "/message/{}", "/destinations", "/action/{}/{}", "/login", "/logout"),
        *("/static/{}", "/{}", "/message/", "/action/{}", "/queue/{}"),
    ]
)
ACTION_NAMES = st.one_of(
    st.sampled_from(["retry", "hold", "release", "cancel", "suspend", "resume"]), TEXT, ODD
)
SEGMENT = st.one_of(ID_LIKE, ODD, TEXT, MARKED, HUGE)
HEADER_BYTES = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)
HOSTS = st.one_of(
    st.sampled_from(
        [LOOPBACK, "localhost", "LOCALHOST.:80", "[::1]:8025", "[::1", "evil.example", "", ":"]
    ),
    HEADER_BYTES,
)
ORIGINS = st.one_of(
    st.none(),
    st.sampled_from([f"http://{LOOPBACK}", "http://evil.example", "null", ""]),
    HEADER_BYTES,
)
COOKIE_VALUES = st.one_of(st.none(), st.just(CSRF), st.just(""), HEADER_BYTES)
AUTHORIZATION = st.one_of(
    st.none(),
    st.sampled_from([f"Bearer {TOKEN}", f"bearer  {TOKEN} ", "Bearer", "Basic eA==", TOKEN]),
    HEADER_BYTES.map(lambda b: b"Bearer " + b),
)
FORM = st.dictionaries(
    st.one_of(st.sampled_from(["csrf", "for", "token", "next"]), TEXT),
    st.one_of(st.just(CSRF), st.just(TOKEN), ODD, TEXT, MARKED),
    max_size=10,
)


@dataclass(frozen=True)
class Request:
    with_token: bool
    method: str
    page: str
    segments: tuple[Any, ...]
    query: dict[Any, Any]
    host: str | bytes | None
    origin: str | bytes | None
    csrf_cookie: str | bytes | None
    session_cookie: str | bytes | None
    authorization: str | bytes | None
    form: dict[str, str]
    raw_body: bytes | None


REQUESTS = st.builds(
    Request,
    with_token=st.booleans(),
    method=st.sampled_from(["GET", "GET", "POST", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"]),
    page=PAGES,
    segments=st.tuples(st.one_of(ACTION_NAMES, SEGMENT), SEGMENT),
    query=QUERY,
    host=st.one_of(st.none(), st.none(), HOSTS),
    origin=ORIGINS,
    csrf_cookie=COOKIE_VALUES,
    session_cookie=st.one_of(COOKIE_VALUES, st.just("session")),
    authorization=AUTHORIZATION,
    form=FORM,
    raw_body=st.one_of(st.none(), st.none(), st.binary(max_size=300)),
)


def _resolve(value: Any, queue: Queue) -> str:
    """An input as text, a seeded message's id taken from the live queue."""
    if not isinstance(value, tuple):
        return str(value)
    role, how = value
    mid = queue.ids[role]
    return {
        "as is": mid,
        "upper": mid.upper(),
        "prefix": mid[:6],
        "newline": mid + "\n",
        "extra": mid + "0",
    }[how]


def _url(request: Request, queue: Queue) -> str:
    first, second = (_resolve(s, queue) for s in request.segments)
    if request.page == "/action/{}/{}":
        path = f"/action/{urllib.parse.quote(first, safe='')}/{urllib.parse.quote(second, safe='')}"
    else:
        path = request.page.format(urllib.parse.quote(second, safe=""))
    query = {_resolve(k, queue): _resolve(v, queue) for k, v in request.query.items()}
    url = path + ("?" + urllib.parse.urlencode(query) if query else "")
    assume(len(url) < 60_000)  # the test client's limit (a server's is about 8 KB)
    return url


def _headers(request: Request, client: TestClient) -> dict[str, str | bytes]:
    headers: dict[str, str | bytes] = {}
    if request.host is not None:
        headers["Host"] = request.host
    if request.origin is not None:
        headers["Origin"] = request.origin
    if request.authorization is not None:
        headers["Authorization"] = request.authorization
    cookies = []
    if request.csrf_cookie is not None:
        cookies.append(b"mailstrom_csrf=" + _bytes(request.csrf_cookie))
    session = request.session_cookie
    if session == "session":
        app: Any = client.app
        session = _session_value(app)
    if session is not None:
        # Named by the port of the Host the request gives (the test client's by default).
        host = LOOPBACK if request.host is None else request.host
        name = session_cookie(host if isinstance(host, str) else host.decode("latin-1"), "http")
        cookies.append(name.encode() + b"=" + _bytes(session))
    if cookies:
        headers["Cookie"] = b"; ".join(cookies)
    return headers


def _session_value(app: Any) -> str | None:
    """The session cookie a login gives (None for a dashboard without a token)."""
    return getattr(app, "fuzz_session", None)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _send(client: TestClient, request: Request, queue: Queue) -> Any:
    client.cookies.clear()  # only the cookies this example sends
    url = _url(request, queue)
    headers = _headers(request, client)
    if request.method != "POST":
        return client.request(request.method, url, headers=headers, follow_redirects=False)
    if request.raw_body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return client.post(url, content=request.raw_body, headers=headers, follow_redirects=False)
    form = {k: _resolve(v, queue) for k, v in request.form.items()}
    return client.post(url, data=form, headers=headers, follow_redirects=False)


# --- the properties ----------------------------------------------------------------------

_JAVASCRIPT_URL = re.compile(r"""(?:href|action|src)\s*=\s*["']?\s*javascript:""", re.I)
_PROBLEM = re.compile(r'id="problem">(.*?)</p>', re.S)


def _check_location(location: str) -> None:
    """Only a path on this server, as a browser reads it (it drops tabs and line breaks
    and takes a backslash for a slash)."""
    assert location.isascii() and location.isprintable(), location
    as_read = re.sub(r"[\t\n\r]", "", location).replace("\\", "/")
    assert as_read.startswith("/") and not as_read.startswith("//"), location
    parts = urllib.parse.urlsplit(as_read)
    assert not parts.scheme and not parts.netloc, location


def _check_page(text: str) -> None:
    assert MARK not in text, "markup from the input or a message shown unescaped"
    assert not _JAVASCRIPT_URL.search(text)
    for problem in _PROBLEM.findall(text):
        assert len(problem) < 500, f"an error quotes too much: {problem[:80]!r}..."


def _allowed_to_act(request: Request, url: str, client: TestClient) -> bool:
    """Whether this request may change the queue at all."""
    if request.method != "POST" or not url.startswith("/action/") or request.raw_body:
        return False
    posted = request.form.get("csrf")
    if request.csrf_cookie != CSRF or posted != CSRF:
        return False
    host = request.host if request.host is not None else LOOPBACK
    if request.origin is not None and request.origin != f"http://{host}":
        return False
    if not request.with_token:
        return host in (LOOPBACK, "localhost", "LOCALHOST.:80", "[::1]:8025")
    return request.session_cookie == "session" or request.authorization in (
        f"Bearer {TOKEN}",
        f"bearer  {TOKEN} ",
    )


@contextmanager
def _logged() -> Iterator[list[logging.LogRecord]]:
    """The records the dashboard logs meanwhile."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("mailstrom.web")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def logged_in(clients: dict[bool, TestClient]) -> None:
    """The session cookie of the dashboard with a token, for examples that send it."""
    client = clients[True]
    client.cookies.clear()
    client.cookies.set("mailstrom_csrf", CSRF)
    done = client.post(
        "/login", data={"csrf": CSRF, "token": TOKEN, "next": "/"}, follow_redirects=False
    )
    assert done.status_code == 303
    app: Any = client.app
    app.fuzz_session = done.cookies["mailstrom_session_8025"]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=REQUESTS)
def test_every_request_gets_a_deliberate_answer(
    queue: Queue, clients: dict[bool, TestClient], logged_in: None, request: Request
) -> None:
    client = clients[request.with_token]
    before = queue.snapshot()
    url = _url(request, queue)
    with _logged() as records:
        response = _send(client, request, queue)
    for line in (r.getMessage() for r in records):
        # A path, Origin or Host is logged as a quoted piece: no forged lines, no floods.
        assert line.isprintable() and len(line) < 1000, line[:300]
    event(f"{request.method} {request.page} → {response.status_code}")

    assert response.status_code in ANSWERS, (response.status_code, response.text[:300])
    if "location" in response.headers:
        _check_location(response.headers["location"])
    if response.headers.get("content-type", "").startswith("text/html"):
        _check_page(response.text)
    assert len(response.content) < 400_000

    if queue.snapshot() != before:
        assert _allowed_to_act(request, url, client), "the queue changed without a valid form"
        assert response.status_code == 303
        event("an action was taken")
        queue.refill()


def test_the_generators_reach_the_seeded_messages(
    queue: Queue, clients: dict[bool, TestClient]
) -> None:
    """The fixtures work: a seeded message's page and an action on it are reachable, so
    the fuzz examples that name them exercise the real pages."""
    client = clients[False]
    client.cookies.clear()
    mid = queue.ids["deferred"]
    page = client.get(f"/message/{mid}", params={"body": "1"})
    assert page.status_code == 200 and "&lt;x-evil&gt;The body" in page.text
    client.cookies.clear()
    done = client.post(
        f"/action/retry/{mid}",
        data={"csrf": CSRF},
        headers={"Cookie": f"mailstrom_csrf={CSRF}"},
        follow_redirects=False,
    )
    assert done.status_code == 303


# Most requests above are refused at the door (a Host, a token, an Origin); these reach
# the pages and the actions themselves.

PAGE_REQUESTS = st.builds(
    Request,
    with_token=st.booleans(),
    method=st.sampled_from(["GET", "HEAD"]),
    page=st.sampled_from(["/queue", "/queue", "/destinations", "/message/{}", "/action/{}/{}"]),
    segments=st.tuples(
        st.one_of(st.sampled_from(["retry", "hold", "cancel", "suspend", "resume"]), SEGMENT),
        st.one_of(ID_LIKE, ID_LIKE, SEGMENT),
    ),
    query=QUERY,
    host=st.none(),
    origin=st.none(),
    csrf_cookie=st.one_of(st.none(), st.just(CSRF)),
    session_cookie=st.just("session"),
    authorization=st.none(),
    form=st.just({}),
    raw_body=st.none(),
)

ACTION_REQUESTS = st.builds(
    Request,
    with_token=st.booleans(),
    method=st.just("POST"),
    page=st.just("/action/{}/{}"),
    segments=st.tuples(
        st.one_of(
            st.sampled_from(["retry", "hold", "release", "cancel", "suspend", "resume"]), TEXT
        ),
        st.one_of(ID_LIKE, ID_LIKE, ODD, SEGMENT),
    ),
    query=st.one_of(st.just({}), QUERY),
    host=st.one_of(st.none(), st.none(), st.none(), HOSTS),
    origin=st.one_of(st.none(), st.just(f"http://{LOOPBACK}"), ORIGINS),
    csrf_cookie=st.one_of(st.just(CSRF), st.just(CSRF), COOKIE_VALUES),
    session_cookie=st.one_of(st.just("session"), st.just("session"), COOKIE_VALUES),
    authorization=st.one_of(st.none(), AUTHORIZATION),
    form=st.fixed_dictionaries(
        {},
        optional={
            "csrf": st.one_of(st.just(CSRF), st.just(CSRF), TEXT),
            "for": st.one_of(st.sampled_from(["", "1h", "2h", "24h", "3h", "1H"]), TEXT),
            "next": ODD,
        },
    ),
    raw_body=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=300)),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=st.one_of(PAGE_REQUESTS, ACTION_REQUESTS))
def test_pages_and_actions_answer_any_query_path_and_form(
    queue: Queue, clients: dict[bool, TestClient], logged_in: None, request: Request
) -> None:
    test_every_request_gets_a_deliberate_answer.hypothesis.inner_test(  # type: ignore[attr-defined]
        queue, clients, logged_in, request
    )
