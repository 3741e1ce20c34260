"""Make sure a test connects to nothing but this host: while :func:`loopback_only` is
active, a connect to any other address raises :class:`PermissionError` before a packet is
sent (a ``socket.connect`` audit hook, PEP 578).

It lets a test show that code refuses a private or public address without connecting,
and keeps the test on loopback when the code under test fails to refuse it."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
from collections.abc import Iterator
from typing import Any

_active = 0
_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _active or event != "socket.connect":
        return
    sock, address = args
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0]
    try:
        loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = False  # a name: connect() would resolve it, and go anywhere
    if not loopback:
        raise PermissionError(f"this test may connect to loopback only, not {host}")


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Refuse connections to anything but 127.0.0.0/8 and ::1 inside the block."""
    global _active, _installed
    if not _installed:
        sys.addaudithook(_hook)  # cannot be removed: it does nothing while inactive
        _installed = True
    _active += 1
    try:
        yield
    finally:
        _active -= 1
