"""The dashboard's uvicorn server and clients that send requests but never read the
answers: once uvicorn's write buffer is full its writing pauses and the app's send()
waits for the client. Such a connection is dropped ``request_timeout`` after its writing
paused, and a new connection past the limit displaces it, so that an operator gets in.

The server runs on an event loop of the test's own, on a thread, so that the test can
ask the loop itself (not race it) whether a connection's writing is paused or gone."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn

from mailstrom.stores import SQLiteStore
from mailstrom.web import create_app
from mailstrom.web.server import server_for

LIMIT = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Served:
    port: int
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop

    def ask(self, question: Callable[[], T]) -> T:
        """``question()`` run on the server's loop (its state is the loop's alone)."""

        async def asked() -> T:
            return question()

        return asyncio.run_coroutine_threadsafe(asked(), self.loop).result(timeout=5)

    def peer_of(self, client: socket.socket) -> Any | None:
        """The server's protocol of ``client``'s connection, None once it is gone."""
        return self.ask(lambda: self._peer(client.getsockname()))

    def paused(self, client: socket.socket) -> bool:
        """Whether uvicorn has paused writing to ``client`` (its answers wait for it)."""

        def paused() -> bool:
            peer = self._peer(client.getsockname())
            return peer is not None and bool(peer.flow.write_paused)

        return self.ask(paused)

    def _peer(self, name: tuple[str, int]) -> Any | None:
        for protocol in self.server.server_state.connections:
            if protocol.client == name:  # type: ignore[attr-defined]
                return protocol
        return None


@contextmanager
def served(tmp_path: Path, request_timeout: float, *, token: str | None = None) -> Iterator[Served]:
    """A dashboard on 127.0.0.1 (at most :data:`LIMIT` connections; ``token``: its
    web.token) served on a loop of its own, on a thread; stopped, with its store closed,
    at the end."""
    store = SQLiteStore(tmp_path / "queue.db")
    app = create_app(store, token=token)
    server = server_for(app, max_connections=LIMIT, request_timeout=request_timeout)
    sock = socket.socket()
    # Inherited by every connection it accepts: a non-reader's answers fill the kernel's
    # buffer after a few kilobytes (autotuned, it took megabytes: seconds of rendering
    # on a loaded machine) and uvicorn's own buffer, hence its pause, soon after.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # listening: clients may connect at once
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True
    )
    thread.start()
    try:
        yield Served(sock.getsockname()[1], server, loop)
    finally:
        server.should_exit = True
        thread.join(10)
        loop.close()
        sock.close()
        store.close()


def _until(condition: Callable[[], bool], within: float) -> bool:
    """Whether ``condition()`` holds within ``within`` seconds (asked every 20 ms)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _non_reader(served: Served) -> socket.socket:
    """A client with a tiny receive window that pipelines requests and reads nothing,
    once the server's writing to it is paused (its answers are stuck)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(("127.0.0.1", served.port))
    sock.setblocking(False)
    request = f"GET /login HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n".encode()

    def stuck() -> bool:
        # BlockingIOError: the server reads no more until it has answered what it has.
        with contextlib.suppress(BlockingIOError):
            sock.send(request * 64)
        return served.paused(sock)

    if not _until(stuck, within=8.0):
        sock.close()
        raise AssertionError("the server's writing never paused: the test cannot start")
    return sock


def _operator_page(port: int) -> int:
    operator = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        operator.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        answer = operator.getresponse()
        answer.read()
        return answer.status
    finally:
        operator.close()


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Served]:
    """A deadline far beyond each test's run: what they see is not the deadline's doing."""
    with served(tmp_path, request_timeout=30.0) as server:
        yield server


@pytest.fixture
def hasty(tmp_path: Path) -> Iterator[Served]:
    with served(tmp_path, request_timeout=2.0) as server:
        yield server


def test_an_operator_displaces_connections_whose_answers_are_not_read(patient: Served) -> None:
    hogs: list[socket.socket] = []
    try:
        hogs.extend(_non_reader(patient) for _ in range(LIMIT))  # (closed if one fails)
        assert all(patient.paused(hog) for hog in hogs)
        # Every place is taken by an answer nobody reads; the newcomer closes the one
        # stalled longest instead of being hung up on.
        assert _operator_page(patient.port) == 200
        assert patient.peer_of(hogs[0]) is None
    finally:
        for hog in hogs:
            hog.close()


def test_a_connection_whose_answer_is_not_read_is_dropped_after_the_deadline(
    hasty: Served,
) -> None:
    with _non_reader(hasty) as hog:
        paused_at = time.monotonic()
        assert _until(lambda: hasty.peer_of(hog) is None, within=6.0), "still connected"
        # The deadline (2 s) runs from the pause, which came just before it was seen.
        assert time.monotonic() - paused_at >= 1.0
    assert _operator_page(hasty.port) == 200


def test_an_operator_gets_in_after_the_deadline_with_every_place_held(hasty: Served) -> None:
    hogs: list[socket.socket] = []
    try:
        hogs.extend(_non_reader(hasty) for _ in range(LIMIT))  # (closed if one fails)
        assert _until(lambda: all(hasty.peer_of(hog) is None for hog in hogs), within=6.0)
        started = time.monotonic()
        assert _operator_page(hasty.port) == 200
        assert time.monotonic() - started < 3.0
    finally:
        for hog in hogs:
            hog.close()


def _unread(served: Served, *, last: bytes = b"") -> socket.socket:
    """A client with a tiny receive window that sends requests one by one, reading no
    answer, until some of them wait in uvicorn's buffer, fewer than would pause its
    writing; then ``last`` (a last request, say)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", served.port))
    request = f"GET /login HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n".encode()

    def buffered() -> bool:
        peer = served._peer(sock.getsockname())
        return peer is not None and peer.transport.get_write_buffer_size() > 0

    for _ in range(200):
        sock.sendall(request)
        if _until(lambda: served.ask(buffered), within=0.1):
            break
    else:
        sock.close()
        raise AssertionError("no answer ever waited in the server's buffer")
    assert not served.paused(sock)
    sock.sendall(last)
    return sock


@pytest.mark.parametrize(
    "last",
    [b"", b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"],
    ids=["kept-alive", "closed-after-answer"],
)
def test_a_connection_closed_with_answers_not_read_is_gone_after_the_deadline(
    tmp_path: Path, last: bytes
) -> None:
    """Closed by the server (its deadline for the next request, uvicorn's keep-alive
    timer, a request saying "Connection: close") with answers still in uvicorn's buffer
    and too few to pause its writing, a connection whose client read nothing stayed for
    as long as the client kept it open: close() waits to send the rest, and the
    connection limit no longer counted it. Five such clients held five sockets past a
    limit of three, and more of them would run the process out of file descriptors."""
    with served(tmp_path, request_timeout=0.5) as quick:
        clients = []
        try:
            clients.extend(_unread(quick, last=last) for _ in range(LIMIT + 2))
            assert _until(
                lambda: all(quick.peer_of(client) is None for client in clients), within=6.0
            ), "still open"
            assert _operator_page(quick.port) == 200
        finally:
            for client in clients:
                client.close()
