"""The results of records whose answer never came: written again, the store may find them
recorded already.

A record's COMMIT can happen while its answer is lost (a network cut, a failover, the
server's restart right after it): the call fails (``StoreUnreachable``), and the caller
keeps its results and writes them again, as it must. The ``record`` statement changes a
recipient only under the lease that holds it, and the first write has cleared that lease:
so the second found nothing to record and the caller read its results as taken over (no
``on_result``, no bounce notice). A result this store object wrote in a call that failed
is therefore marked when written again, and the statement then also counts it recorded if
the recipient holds that very attempt already (see ``record`` in ``queries.sql``).

Only those: a result recorded once and written again after a call that worked stays
ignored, as every store ignores it.

A lease's answer can be lost the same way, its recipients then leased under a token
nobody knows until ``lease_for`` runs out (the look for dead holders gives back only a
dead worker's). The tokens of leases that failed are kept, and the next lease of this
store object gives their recipients back first (again at later leases while the failed
statement may still be running on the server: see :class:`UnansweredLeases`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime

Key = tuple[str, str, str]
"""A result's (message_id, address, lease_token)."""

KEEP_AT_MOST = 100_000
"""Keys (and lease tokens) kept at most, the oldest forgotten first: a caller that never
writes its results again, or a server down for days, must not grow them for ever. (A
lease token forgotten costs its recipients no more than ``lease_for``.)"""


class UnansweredRecords:
    """The keys of results written in record calls that failed, until written again."""

    def __init__(self) -> None:
        self._keys: dict[Key, None] = {}
        self._lock = threading.Lock()

    def marks(self, keys: Iterable[Key]) -> list[bool]:
        """For each key, whether a failed call wrote it."""
        with self._lock:
            return [key in self._keys for key in keys]

    def failed(self, keys: Iterable[Key]) -> None:
        """A call writing ``keys`` failed: it may have committed them all the same."""
        with self._lock:
            for key in keys:
                self._keys[key] = None
            while len(self._keys) > KEEP_AT_MOST:
                del self._keys[next(iter(self._keys))]

    def answered(self, keys: Iterable[Key]) -> None:
        """A call writing ``keys`` worked: what it said of them is the last word."""
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)


class UnansweredLeases:
    """The tokens of leases whose call failed: their recipients may be leased all the
    same, under a token no caller knows.

    Each token is kept with the server processes (backend pids) its statements ran on
    and when its lease expires. Its statement may still run there, its client gone (it
    waits for a table's lock, or is slow): a give-back then finds nothing yet, and the
    lease commits after it. So a token is forgotten only once a give-back began after
    none of its processes was running a statement any more, or once
    its lease expired anyway."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[tuple[int, ...], datetime]] = {}
        self._lock = threading.Lock()

    def failed(self, token: str, *, backends: Iterable[int], expires_at: datetime) -> None:
        with self._lock:
            self._tokens[token] = (tuple(backends), expires_at)
            while len(self._tokens) > KEEP_AT_MOST:
                del self._tokens[next(iter(self._tokens))]

    def pending(self, now: datetime) -> dict[str, tuple[int, ...]]:
        """The tokens to give back, each with its backends; those whose lease expired
        by ``now`` are forgotten (nothing is leased under them any more)."""
        with self._lock:
            for token, (_, expires_at) in list(self._tokens.items()):
                if expires_at <= now:
                    del self._tokens[token]
            return {token: backends for token, (backends, _) in self._tokens.items()}

    def given_back(self, tokens: Iterable[str]) -> None:
        with self._lock:
            for token in tokens:
                self._tokens.pop(token, None)
