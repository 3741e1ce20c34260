"""The dashboard's uvicorn server under a flood of silent or slow connections: the
excess is hung up on, an operator's request still gets through, a slow client is cut off
at the deadline, also on a kept-alive connection. uvicorn runs on a thread here with
small limits passed as parameters, so that each test takes well under a second."""

from __future__ import annotations

import http.client
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom.web.server import MAX_REQUEST_HEAD
from tests.support.slow_clients import connect, cut_off_after, hung_up
from tests.web.test_slow_readers import LIMIT, served


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[int]:
    """A deadline far beyond each test's run: what they see is not the deadline's doing."""
    with served(tmp_path, request_timeout=30.0) as server:
        yield server.port


@pytest.fixture
def hasty(tmp_path: Path) -> Iterator[int]:
    with served(tmp_path, request_timeout=0.3) as server:
        yield server.port


def _connect(port: int) -> socket.socket:
    return connect(port)


def _no_error_once_served_again(port: int, caplog: pytest.LogCaptureFixture) -> None:
    """A page served on a new connection (so the loop has run what the earlier ones
    left it: their bytes read, the app's task for them), then no ERROR logged."""
    with _connect(port) as sock:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert reply.status == 200
        reply.read()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_flood_of_idle_connections_is_hung_up_on_and_an_operator_gets_through(
    patient: int,
) -> None:
    clients = [_connect(patient) for _ in range(20)]
    try:
        slow = _connect(patient)
        clients.append(slow)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")

        started = time.monotonic()
        operator = http.client.HTTPConnection("127.0.0.1", patient, timeout=5)
        try:
            operator.request("GET", "/", headers={"Host": f"127.0.0.1:{patient}"})
            answer = operator.getresponse()
            assert answer.status == 200 and b"<html" in answer.read()
        finally:
            operator.close()
        assert time.monotonic() - started < 1.0  # long before any deadline (30 s)
        # Only LIMIT were ever kept: the operator's made room by closing the oldest.
        displaced = clients[: len(clients) + 1 - LIMIT]
        assert all(hung_up(sock) for sock in displaced)
    finally:
        for sock in clients:
            sock.close()


def test_a_client_sending_its_request_a_byte_at_a_time_is_cut_off_at_the_deadline(
    hasty: int,
) -> None:
    with _connect(hasty) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        cut_off = cut_off_after(sock)
    assert cut_off is not None, "still connected after 3 s"
    assert 0.25 <= cut_off < 1.5


def test_a_silent_client_is_cut_off_at_the_deadline(hasty: int) -> None:
    """uvicorn's keep-alive timer starts only after a first answer."""
    with _connect(hasty) as sock:
        started = time.monotonic()
        assert hung_up(sock)
        assert 0.25 <= time.monotonic() - started < 1.5


def test_the_next_request_on_a_kept_alive_connection_has_a_deadline_too(hasty: int) -> None:
    """Any byte received stops uvicorn's keep-alive timer, and nothing restarted it."""
    with _connect(hasty) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{hasty}\r\n\r\n".encode())
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 200 and not answer.will_close
        answer.read()
        sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        cut_off = cut_off_after(sock)
    assert cut_off is not None, "still connected after 3 s"
    assert cut_off < 1.5


def _answer(port: int, request: bytes) -> bytes:
    with _connect(port) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    ("target", "host", "title"),
    [
        ("http://127.0.0.1:{port}/queue?view=all&limit=25", "127.0.0.1:{port}", b"Queue"),
        ("HTTP://127.0.0.1:{port}", "127.0.0.1:{port}", b"Overview"),
        # RFC 9112 §3.2.2: the target's authority wins over the Host header.
        ("http://localhost:{port}/destinations", "elsewhere.example", b"Destinations"),
    ],
    ids=["path-and-query", "no-path", "host-header-differs"],
)
def test_a_request_target_in_absolute_form_is_served_as_its_path(
    patient: int, target: str, host: str, title: bytes
) -> None:
    """Servers must accept ``GET http://host:port/path`` (what an HTTP/1.1 client set to
    use a proxy sends): uvicorn's h11 server passed the whole URL on as the path, a 404."""
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    answer = _answer(patient, request.format(port=patient).encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"<title>" + title in answer


def test_a_request_target_in_absolute_form_naming_another_host_is_refused(patient: int) -> None:
    """Its authority is the request's host: without a token, only loopback names pass."""
    request = (
        f"GET http://rebound.example:{patient}/queue HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{patient}\r\nConnection: close\r\n\r\n"
    )
    answer = _answer(patient, request.encode())
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"answers only to localhost" in answer


@pytest.mark.parametrize("target", ["http://[::1/queue", "http://a]b/", "*"])
def test_a_request_target_neither_a_path_nor_a_url_is_no_page_not_an_error(
    patient: int, target: str
) -> None:
    """urlsplit() raises ValueError for a bracket that does not close an IPv6 address."""
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{patient}\r\nConnection: close\r\n\r\n"
    answer = _answer(patient, request.encode())
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]


@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD, 60_000])
def test_a_request_head_past_the_limit_is_refused_even_in_one_piece(
    patient: int, size: int
) -> None:
    """h11 bounds only a head still incomplete: one that arrived in a single read (up to
    64 KiB on loopback) was answered, past the documented MAX_REQUEST_HEAD."""
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    with _connect(patient) as sock:
        sock.sendall(head)
        answer = sock.recv(100)
    assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_a_request_head_within_the_limit_is_answered(patient: int) -> None:
    filler = b"a" * (MAX_REQUEST_HEAD - 200)
    with _connect(patient) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + filler + b"\r\n\r\n")
        answer = sock.recv(100)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBroken header\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["too-large", "malformed-field", "malformed-line"],
)
def test_uvicorns_own_refusal_carries_the_security_headers(patient: int, head: bytes) -> None:
    """uvicorn answers a request h11 cannot parse itself, the app never seeing it: that
    page (a 400 shown in the browser) had none of the headers every other answer has."""
    with _connect(patient) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head_part = answer.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert head_part.startswith("http/1.1 400 "), answer
    assert "content-security-policy: default-src 'none'" in head_part, head_part
    assert "x-frame-options: deny" in head_part, head_part
    assert "x-content-type-options: nosniff" in head_part, head_part
    assert "cache-control: no-store" in head_part, head_part


def test_a_client_cut_off_while_sending_a_form_is_no_error_in_the_log(
    hasty: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A form whose body stops coming (a slow client cut off at the deadline, a browser
    closed mid-post) made the app's form read raise ClientDisconnect, which reached
    uvicorn as "Exception in ASGI application" and a traceback at ERROR level: noise for
    what clients do, and a 500 page rendered for nobody."""
    caplog.set_level(logging.DEBUG)
    with _connect(hasty) as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\ncsrf=abc"
        )
        while sock.recv(4096):  # whatever it says, until it hangs up
            pass
    _no_error_once_served_again(hasty, caplog)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n", 413),
        (b"GET /login HTTP/1.1\r\n", 200),
    ],
    ids=["form", "page"],
)
def test_a_malformed_body_after_the_answer_closes_the_connection_without_an_error(
    patient: int, caplog: pytest.LogCaptureFixture, head: bytes, status: int
) -> None:
    """A chunked form is refused (413) and a page answered before their bodies are read;
    a malformed chunk sent after that made uvicorn answer a 400 on a connection whose
    answer had gone out, which h11 refuses: "Fatal error: protocol.data_received() call
    failed" and a traceback at ERROR level, for each connection a client opened so."""
    caplog.set_level(logging.DEBUG)
    with _connect(patient) as sock:
        sock.sendall(head + b"Host: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = sock.recv(4096)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        sock.sendall(b"zz\r\n")  # no chunk size
        while sock.recv(4096):  # the rest of the answer, until it hangs up
            pass
    _no_error_once_served_again(patient, caplog)


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ],
    ids=["h2c", "websocket"],
)
def test_a_request_to_switch_protocols_is_served_without_warnings(
    patient: int, caplog: pytest.LogCaptureFixture, upgrade: bytes
) -> None:
    """``curl --http2`` asks every plain-HTTP request to switch to h2c; uvicorn logged two
    warnings for each, the second telling to install a WebSocket library, which the
    dashboard does without on purpose. The request is served over HTTP/1.1, as RFC 9110
    §7.8 lets a server do, and the log says nothing of it."""
    caplog.set_level(logging.DEBUG)
    request = b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n" + upgrade + b"\r\n"
    with _connect(patient) as sock:
        sock.sendall(request)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 200
        answer.read()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, [r.getMessage() for r in warnings]


def test_a_malformed_body_in_the_requests_own_packet_is_no_error_in_the_log(
    patient: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Head and a malformed chunk in one packet: uvicorn answers 400 at once, before the
    app, already started on the request, answers it (413 for a chunked form); h11
    refused that second answer, and uvicorn logged "Exception in ASGI application" with
    a traceback at ERROR level, as often as a client sent these 70 octets."""
    caplog.set_level(logging.DEBUG)
    with _connect(patient) as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    _no_error_once_served_again(patient, caplog)


def test_a_head_request_with_a_malformed_body_gets_a_400_head_without_an_error(
    patient: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer to HEAD has no content (RFC 9110 §9.3.2), and h11 refuses the text of
    uvicorn's 400 for it ("Too much data for declared Content-Length"), which escaped as
    "Fatal error: protocol.data_received() call failed" with a traceback at ERROR level
    and no answer at all."""
    caplog.set_level(logging.DEBUG)
    with _connect(patient) as sock:
        sock.sendall(
            b"HEAD /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert answer.endswith(b"\r\n\r\n"), answer  # the head alone
    _no_error_once_served_again(patient, caplog)
