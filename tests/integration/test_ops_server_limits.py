"""The /metrics and /healthz server under a flood of silent or slow connections (it may
listen on 0.0.0.0, in the process that delivers the mail): its threads stay bounded, a
scrape still gets through, a slow client is cut off at the deadline, a huge request head
is refused. Small limits through parameters keep each test well under a second."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from mailstrom.ops.guarded_http import (
    EVICTION_WAIT,
    MAX_REQUEST_HEAD,
    GuardedHTTPServer,
    GuardedRequestHandler,
)
from mailstrom.ops.server import Health, OpsServer
from mailstrom.runtime.metrics import QueueStatsCache
from mailstrom.status import MetricsSnapshot, QueueStats, WorkerStatus
from mailstrom.stores import MemoryStore
from tests.support.ops_http import healthz, scrape
from tests.support.slow_clients import connect, cut_off_after, hung_up

LIMIT = 3


def _serve(request_timeout: float) -> OpsServer:
    server = OpsServer(
        "127.0.0.1",
        0,
        snapshot=lambda: MetricsSnapshot(worker=WorkerStatus(running=True)),
        health=lambda: Health(ok=True, details={"status": "ok"}),
        max_connections=LIMIT,
        request_timeout=request_timeout,
    )
    server.start()
    return server


@pytest.fixture
def patient() -> Iterator[OpsServer]:
    """A deadline far beyond each test's run: what they see is not the deadline's doing."""
    server = _serve(request_timeout=30.0)
    yield server
    server.close()


@pytest.fixture
def hasty() -> Iterator[OpsServer]:
    server = _serve(request_timeout=0.3)
    yield server
    server.close()


def _connect(server: OpsServer) -> socket.socket:
    return connect(server.port)


def _exchange(server: OpsServer, request: bytes) -> bytes:
    """What ``server`` answers to ``request``, read until it hangs up."""
    with _connect(server) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _handlers_since(before: set[threading.Thread]) -> set[threading.Thread]:
    """The server's handler threads started since ``before`` was taken, still running
    (the stdlib names each "Thread-N (process_request_thread)"). Not every thread of the
    process: an earlier test's leftovers (a hook post, a worker's executor) may start or
    end threads meanwhile."""
    new = set(threading.enumerate()) - before
    return {thread for thread in new if "process_request_thread" in thread.name}


def test_a_flood_of_idle_connections_takes_few_threads_and_a_scrape_gets_through(
    patient: OpsServer,
) -> None:
    before = set(threading.enumerate())
    clients: list[socket.socket] = []
    most = 0
    try:
        for _ in range(20):
            clients.append(_connect(patient))
            most = max(most, len(_handlers_since(before)))
        slow = _connect(patient)
        clients.append(slow)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        # The oldest silent ones make room for the newer: they are hung up on.
        displaced = clients[: len(clients) - LIMIT]
        assert all(hung_up(sock) for sock in displaced)
        most = max(most, len(_handlers_since(before)))

        started = time.monotonic()
        with urllib.request.urlopen(f"{patient.url}/healthz", timeout=5) as answer:
            assert answer.status == 200
        # Long before any deadline (30 s; urlopen's 5 s): the room is a loaded host's.
        assert time.monotonic() - started < 4.0
        most = max(most, len(_handlers_since(before)))
    finally:
        for sock in clients:
            sock.close()
    # A displaced connection's thread may be ending while its successor's starts.
    assert most <= LIMIT + 1


def test_a_client_sending_its_request_a_byte_at_a_time_is_cut_off_at_the_deadline(
    hasty: OpsServer,
) -> None:
    """A byte every 50 ms would reset a timeout per read (0.3 s) for ever."""
    with _connect(hasty) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        cut_off = cut_off_after(sock)
    assert cut_off is not None, "still connected after 3 s"
    assert 0.25 <= cut_off < 1.5


def test_a_silent_client_is_cut_off_at_the_deadline(hasty: OpsServer) -> None:
    with _connect(hasty) as sock:
        started = time.monotonic()
        assert hung_up(sock)
        assert 0.25 <= time.monotonic() - started < 1.5


def test_a_request_head_past_the_limit_is_a_431(patient: OpsServer) -> None:
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    # Exactly the limit and not yet ended: the server reads all of it (nothing left
    # unread to turn its close into a reset) and needs more.
    head = start + b"a" * (MAX_REQUEST_HEAD - len(start))
    with _connect(patient) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 431 "), answer[:100]
    assert f"over {MAX_REQUEST_HEAD} bytes".encode() in answer


def test_a_header_folded_over_lines_is_a_400_not_echoed_into_the_answer(
    patient: OpsServer,
) -> None:
    """RFC 9112 §5.2: a server refuses obs-fold or unfolds it. The stdlib kept the line
    break in the value, prometheus-client put the Accept's version into Content-Type,
    and the answer's head carried a folded field the client had written."""
    accept = b"Accept: application/openmetrics-text; version=2.0.0\r\n\tX-Injected: yes\r\n"
    answer = _exchange(patient, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n" + accept + b"\r\n")
    head = answer.partition(b"\r\n\r\n")[0]
    assert b"X-Injected" not in head, head
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:100]


@pytest.mark.parametrize(
    "line",
    [
        b"X-A : b",  # white space before the colon: RFC 9112 §5.1 has it answered 400
        b"no field at all",
        # A multipart Content-Type, then the line that ends its parts: the body the
        # parser takes is empty, the Host behind it unseen all the same.
        b"Content-Type: multipart/mixed; boundary=x\r\n--x--",
    ],
)
def test_a_malformed_header_line_is_a_400_not_a_hiding_place_for_a_second_host(
    patient: OpsServer, line: bytes
) -> None:
    """The stdlib's parser took a malformed line and every line after it for a body:
    the Host behind it went unseen, and a request naming two hosts was answered with
    the metrics (RFC 9112 §3.2: 400), the very request the one-Host check refuses."""
    head = b"Host: 127.0.0.1\r\n" + line + b"\r\nHost: rebound.example\r\n"
    answer = _exchange(patient, b"GET /metrics HTTP/1.1\r\n" + head + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:100]
    assert b"mailstrom_worker_up" not in answer


@pytest.mark.parametrize("content_type", [b"multipart/form-data", b"multipart/mixed; boundary=x"])
def test_well_formed_fields_that_the_parser_finds_defects_in_are_answered(
    patient: OpsServer, content_type: bytes
) -> None:
    """Every line a field: a multipart Content-Type with no body is a defect to the
    stdlib's parser, not a malformed line, and was refused as one."""
    head = b"Host: 127.0.0.1\r\nContent-Type: " + content_type + b"\r\n"
    answer = _exchange(patient, b"GET /metrics HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 "), answer[:100]


def test_close_hangs_up_on_open_connections_and_leaves_no_handler_thread() -> None:
    """A worker stopping (or a test ending) closes its server: a client half-way through
    its request must not keep a connection and a thread of a closed server until the
    request deadline (30 s here)."""
    server = _serve(request_timeout=30.0)
    before = set(threading.enumerate())
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # Accepted, with a thread of its own (not left in the listen backlog, which the
        # listening socket's close would reset anyway).
        assert _wait_for(lambda: len(_handlers_since(before)) == 1)
        handler = _handlers_since(before).pop()
        server.close()
        assert hung_up(sock)
    handler.join(5)  # ends at once; otherwise it would wait out the 30 s deadline
    assert not handler.is_alive()


class _Answering(GuardedRequestHandler):
    """Answers "ok"; ``answered`` (when set) is waited on before the answer is written,
    ``linger`` seconds slept after it (a thread not scheduled again for a while)."""

    answered: threading.Event | None = None
    linger = 0.0
    arrived: threading.Semaphore | None = None

    def do_GET(self) -> None:
        if self.arrived is not None:
            self.arrived.release()
        if self.answered is not None:
            self.answered.wait(10)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def finish(self) -> None:
        super().finish()
        time.sleep(self.linger)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[Callable[[type[_Answering]], str]]:
    """Serves a :class:`_Answering` subclass with two slots; yields its URL."""
    servers: list[GuardedHTTPServer] = []

    def serve(handler: type[_Answering]) -> str:
        server = GuardedHTTPServer(("127.0.0.1", 0), handler, max_connections=2)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_slot_held_by_an_answer_already_read_is_waited_for_not_refused(
    answering: Callable[[type[_Answering]], str],
) -> None:
    """A client that has read its answer may ask again before the thread that wrote it
    ends (on a loaded host it waits for the CPU): the next request was closed unanswered
    when every slot was held by such threads, as a scrape and a probe after it were."""

    class Lingering(_Answering):
        linger = 0.2

    url = answering(Lingering)
    for _ in range(5):
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.read() == b"ok\n"


def test_a_connection_past_every_slot_still_answering_is_closed_after_the_wait(
    answering: Callable[[type[_Answering]], str],
) -> None:
    class Held(_Answering):
        answered = threading.Event()
        arrived = threading.Semaphore(0)

    url = answering(Held)

    def ask() -> None:
        with urllib.request.urlopen(url, timeout=15) as answer:
            answer.read()

    held = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for thread in held:
            thread.start()
        for _ in held:  # both in a slot, answering
            assert Held.arrived.acquire(timeout=10)
        started = time.monotonic()
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            urllib.request.urlopen(url, timeout=5)
        assert EVICTION_WAIT * 0.9 <= time.monotonic() - started < EVICTION_WAIT + 2
    finally:
        Held.answered.set()
        for thread in held:
            thread.join(5)


class _StuckStore(MemoryStore):
    """A store whose queue count does not answer until released (a PostgreSQL server
    cut off by the network: the read waits up to TCP's own timeout, a minute)."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = threading.Event()
        self.released = threading.Event()

    def stats(self) -> QueueStats:
        self.counting.set()
        self.released.wait(60)
        return super().stats()


def test_a_store_stuck_counting_the_queue_holds_one_scrape_not_every_slot() -> None:
    """Every scrape waited for the one stuck reading the queue's counts: a few scrapes
    (Prometheus retries every 15 s) took every slot, and /healthz, which bounds its own
    store check to 3 s, was refused with them."""
    store = _StuckStore()
    cache = QueueStatsCache(store, max_age=0)

    def snapshot() -> MetricsSnapshot:
        stats, read_at = cache.get()
        return MetricsSnapshot(
            worker=WorkerStatus(running=True),
            queue=stats,
            queue_read_at=read_at,
            workers=cache.workers(),
        )

    server = OpsServer(
        "127.0.0.1",
        0,
        snapshot=snapshot,
        health=lambda: Health(ok=True, details={"status": "ok"}),
        max_connections=LIMIT,
        request_timeout=30.0,
    )
    server.start()
    stuck = threading.Thread(target=scrape, args=(server.url,))
    try:
        stuck.start()
        assert store.counting.wait(5)
        for _ in range(LIMIT):
            samples = scrape(server.url)  # without the queue's families: not read yet
            assert ("mailstrom_worker_up", ()) in samples
            # The worker's queue-delay histogram is no reading of the queue.
            queue = [n for n, _ in samples if not n.startswith("mailstrom_queue_delay_")]
            assert not any(name.startswith("mailstrom_queue_") for name in queue)
        assert healthz(server.url) == (200, {"status": "ok"})
    finally:
        store.released.set()
        stuck.join(10)
        server.close()


def _wait_for(condition: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
