"""The store's connections to PostgreSQL carry TCP keepalives and a user timeout, so that
a server gone without a word (failover, partition) fails a worker's call within about a
minute instead of the kernel's two hours (stores/postgres/connect.py).

Checked on the sockets themselves, as the kernel sees them. Dropping the server's packets
to watch a connection die would need netfilter, which a test on loopback cannot count on;
what the kernel does with these options is its own, tested business.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import psycopg
import pytest

from mailstrom.stores.postgres import PostgresStore

pytestmark = pytest.mark.postgres


def tcp_options(conn: psycopg.Connection[object]) -> dict[str, int]:
    fd = os.dup(conn.pgconn.socket)
    with socket.socket(fileno=fd) as sock:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }


BOUNDED = {"keepalive": 1, "idle": 30, "interval": 10, "count": 3, "user_timeout": 60_000}


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    with PostgresStore(postgres_url, max_size=2) as s:
        yield s


def test_pooled_connections_notice_a_dead_server_within_a_minute(store: PostgresStore) -> None:
    with store._pool.connection() as conn:  # the connections every store call uses
        assert tcp_options(conn) == BOUNDED


def test_the_listen_connection_too(store: PostgresStore) -> None:
    unwatch = store.watch(lambda: None)
    try:
        listener = store._listener  # one for every watcher of the store
        assert listener is not None and listener._conn is not None
        assert tcp_options(listener._conn) == BOUNDED
    finally:
        unwatch()


def test_the_urls_own_settings_win(postgres_url: str) -> None:
    url = postgres_url + "?keepalives_idle=7&tcp_user_timeout=5000"
    with PostgresStore(url) as store, store._pool.connection() as conn:
        options = tcp_options(conn)
    assert options["idle"] == 7 and options["user_timeout"] == 5000
    assert options["count"] == 3
