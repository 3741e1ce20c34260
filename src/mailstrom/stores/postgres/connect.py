"""How mailstrom's connections to PostgreSQL are bounded in time.

libpq's defaults wait without end: no connect timeout, and TCP keepalive only after the
kernel's idle time (two hours on Linux). A server that goes away without closing its
connections (a failover to a standby, a network partition, a host that died) would leave
a worker blocked in a query, and the LISTEN connection silently deaf, for that long. With
these settings such a connection fails within about a minute instead, and the worker's
usual handling of a failing store (retry with backoff, reconnect) takes over:

* ``keepalives_idle=30``, ``keepalives_interval=10``, ``keepalives_count=3``: an idle
  connection whose peer stopped answering is declared dead after about 60 s;
* ``tcp_user_timeout=60000`` (libpq 12 and later): so is one whose sent data has gone
  unacknowledged for 60 s;
* ``connect_timeout=10``.

A slow query is not affected: the server's kernel acknowledges the query and answers the
probes while the server works. A parameter given in the store's URL (or
``PGCONNECT_TIMEOUT`` in the environment) wins over these.
"""

from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

KEEPALIVE = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
TCP_USER_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT = 10


def connection_options(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> dict[str, str]:
    """The parameters to add to ``url`` when connecting (those it does not set itself)."""
    options = dict(KEEPALIVE)
    if psycopg.pq.version() >= 120000:
        options["tcp_user_timeout"] = str(TCP_USER_TIMEOUT_MS)
    if "PGCONNECT_TIMEOUT" not in os.environ:
        options["connect_timeout"] = str(max(1, round(connect_timeout)))
    given = conninfo_to_dict(url)
    return {key: value for key, value in options.items() if key not in given}


def bounded(url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> str:
    """``url`` as a connection string with :func:`connection_options` added."""
    return make_conninfo(url, **connection_options(url, connect_timeout=connect_timeout))
