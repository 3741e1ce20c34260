"""A worker's look for dead workers that the store fails is tried again within seconds,
not at the next interval (a minute on SQLite): on PostgreSQL the look is also the
worker's beat, and a dead worker's mail waits for the next look."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mailstrom import Mailstrom
from mailstrom.errors import StoreLocked
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import _wait_until, config

mx = test_worker_modes.mx


class FirstLookFails(SQLiteStore):
    """A SQLite store whose first look for dead holders fails as a held write lock
    makes it fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.looks: list[float] = []

    def release_dead_holders(self, alive: str | None = None) -> int:
        self.looks.append(time.monotonic())
        if len(self.looks) == 1:
            raise StoreLocked("database is locked (another process holds its write lock)")
        return super().release_dead_holders(alive)


def test_a_failed_look_is_tried_again_soon(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    store = FirstLookFails(tmp_path / "q.db")
    assert store.reap_every == 60.0
    with Mailstrom(config(dns_server, mx.port), store=store, worker="thread") as ms:
        assert _wait_until(lambda: len(store.looks) >= 2, 10)
        assert store.looks[1] - store.looks[0] < 5.0
        assert ms.worker_status.metrics.store_errors == 1  # counted as any store failure
    store.close()
