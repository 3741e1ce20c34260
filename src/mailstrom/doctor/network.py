"""The two things the doctor asks of the network itself, behind a small interface.

* Which local address this machine uses towards a host: a UDP socket ``connect()`` makes
  the kernel choose a route and a source address without sending a packet, and
  ``getsockname()`` tells it.
* Whether a TCP connection to port 25 opens and an SMTP greeting arrives: the doctor
  connects, reads the first reply, says QUIT and closes — no mail is sent.

Unit tests pass a fake :class:`Network`; the CLI uses :class:`SocketNetwork`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """What connecting to an SMTP server showed."""

    connected: bool
    greeting: str | None = None
    """The first line of the server's greeting (``220 mx.example.org ESMTP``)."""
    error: str | None = None
    timed_out: bool = False
    """No answer at all within the timeout: typical of a firewall that drops port 25."""
    seconds: float = 0.0


class Network(Protocol):
    def local_address(self, host: str, port: int, source: str | None) -> str:
        """The local address used towards ``host``; raises OSError without a route."""
        ...

    def probe(self, host: str, port: int, source: str | None, timeout: float) -> Probe: ...


class SocketNetwork:
    """:class:`Network` over real sockets."""

    def local_address(self, host: str, port: int, source: str | None) -> str:
        family = _family(host)
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            if source:
                s.bind((source, 0))
            s.connect((host, port))  # UDP: picks the route, sends nothing
            return str(s.getsockname()[0])

    def probe(self, host: str, port: int, source: str | None, timeout: float) -> Probe:
        started = time.monotonic()

        def took() -> float:
            return round(time.monotonic() - started, 3)

        try:
            sock = socket.create_connection(
                (host, port), timeout=timeout, source_address=(source, 0) if source else None
            )
        except TimeoutError:
            return Probe(
                connected=False,
                timed_out=True,
                error=f"no answer within {timeout:g} s",
                seconds=took(),
            )
        except OSError as exc:
            return Probe(connected=False, error=exc.strerror or str(exc), seconds=took())
        with sock:
            try:
                greeting = _first_line(sock, timeout)
            except TimeoutError:
                return Probe(
                    connected=True,
                    timed_out=True,
                    error=f"connected, but no greeting within {timeout:g} s",
                    seconds=took(),
                )
            except OSError as exc:
                return Probe(connected=True, error=exc.strerror or str(exc), seconds=took())
            if not greeting:  # closed (or a bare line break) before a word was said
                return Probe(
                    connected=True,
                    error="the connection was closed without a greeting",
                    seconds=took(),
                )
            # The answer is already known; a close without QUIT would change nothing.
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return Probe(connected=True, greeting=greeting, seconds=took())


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _first_line(sock: socket.socket, timeout: float) -> str:
    """The greeting's first line (a multi-line greeting's rest is of no interest), within
    ``timeout`` seconds in all: a server that sends it an octet at a time (a tarpit)
    would otherwise hold the probe for up to 4096 timeouts."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and len(data) < 4096:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
