"""Posting a TLS report (RFC 8460 §5.4) to a collector on loopback that misbehaves after
its status line: the report counts as delivered on a 2xx, whatever the body does."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import date

import pytest

from mailstrom.tlsrpt.deliver import post_report
from mailstrom.tlsrpt.report import Reporter, build_report

REPORT = build_report(
    "example.org",
    date(2030, 1, 1),
    [],
    Reporter(organization="Org", contact="postmaster@sender.test", submitter="sender.test"),
)


@pytest.fixture
def endless_collector(server_tls_context: ssl.SSLContext) -> Iterator[int]:
    """A collector that answers 202 with a body of a gigabyte it never sends: a few
    octets, then nothing until the client hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with server_tls_context.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(65536)
            tls.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 1000000000\r\n\r\nthanks")
            stop.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(10)
    listener.close()


def test_a_2xx_is_enough_and_the_body_is_not_read(
    endless_collector: int, client_tls_context: ssl.SSLContext
) -> None:
    # The POST read the answer's whole body: a collector sending one without end held
    # ``mailstrom tlsrpt --send`` and its memory (each octet restarted the read timeout);
    # this one, which stops, made a posted report a failure ("ReadTimeout").
    started = time.monotonic()
    problem = post_report(
        REPORT,
        f"https://127.0.0.1:{endless_collector}/tlsrpt",
        context=client_tls_context,
        timeout=0.5,
    )
    assert problem is None
    assert time.monotonic() - started < 0.5
