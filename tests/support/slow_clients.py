"""Clients that are slow on purpose, for the tests of the servers mailstrom runs (the
metrics server and the dashboard): does a server hang up on them, and when."""

from __future__ import annotations

import select
import socket
import time


def connect(port: int) -> socket.socket:
    """A plain connection to ``port`` on 127.0.0.1, reads waiting up to 5 s."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def hung_up(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (waits up to the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def cut_off_after(sock: socket.socket, limit: float = 3.0) -> float | None:
    """Send a header byte every 50 ms until the server hangs up: after how long (None
    if it has not after ``limit`` seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            sock.sendall(b"a")
            if select.select([sock], [], [], 0.05)[0] and sock.recv(100) == b"":
                return time.monotonic() - started
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None
