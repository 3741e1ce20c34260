"""The test guard that keeps a test's connections on this host refuses before sending."""

from __future__ import annotations

import socket

import pytest
from tests.support.loopback_only import loopback_only


@pytest.mark.parametrize(
    ("family", "address"),
    [(socket.AF_INET, ("10.0.0.5", 9)), (socket.AF_INET6, ("fd00::1", 9, 0, 0))],
)
def test_a_connect_off_this_host_is_refused_inside_the_block(
    family: socket.AddressFamily, address: tuple[object, ...]
) -> None:
    with (
        socket.socket(family, socket.SOCK_STREAM) as sock,
        loopback_only(),
        pytest.raises(PermissionError, match="loopback only"),
    ):
        sock.connect(address)


def test_loopback_is_let_through() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        loopback_only(),
        socket.create_connection(server.getsockname()[:2], timeout=5),
    ):
        pass
