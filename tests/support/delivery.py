"""Helpers for tests that run the whole delivery path against loopback peers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailstrom import Config, Timeouts
from mailstrom.config import EventLoop, uvloop_available
from mailstrom.status import RecipientState
from mailstrom.stores.base import RecipientResult
from tests.fixtures.dns_server import LoopbackDNS

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)

LOOPS = [
    EventLoop.ASYNCIO,
    pytest.param(
        EventLoop.UVLOOP,
        marks=pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed"),
    ),
]
"""Both loops a worker may run on, for ``parametrize``: "auto" takes uvloop wherever the
suite runs with it installed, and asyncio's own is what users without ``mailstrom[fast]``
get."""


def loopback_config(dns: LoopbackDNS, smtp_port: int, /, **overrides: Any) -> Config:
    """A Config delivering through the loopback DNS server to receivers on ``smtp_port``
    (loopback targets allowed, short timeouts); ``overrides`` replace any field."""
    options: dict[str, Any] = {
        "helo_name": "client.test",
        "smtp_port": smtp_port,
        "dns": dns.dns_config,
        "timeouts": FAST,
        "allow_loopback": True,
        "poll_interval": 0.5,
    }
    return Config(**(options | overrides))


class FakeClock:
    """A clock the test moves by hand; the worker reads it for every decision."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


class Results:
    """Collects results the worker has recorded; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self._results: list[RecipientResult] = []
        self._cond = threading.Condition()

    def __call__(self, result: RecipientResult) -> None:
        with self._cond:
            self._results.append(result)
            self._cond.notify_all()

    @property
    def all(self) -> list[RecipientResult]:
        with self._cond:
            return list(self._results)

    def wait_for(
        self, predicate: Callable[[list[RecipientResult]], bool], timeout: float = 15.0
    ) -> list[RecipientResult]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._results), timeout):
                raise AssertionError(f"timed out; results so far: {self._results!r}")
            return list(self._results)

    def wait_count(self, count: int, timeout: float = 15.0) -> list[RecipientResult]:
        return self.wait_for(lambda rs: len(rs) >= count, timeout)

    def wait_final(self, addresses: set[str], timeout: float = 15.0) -> list[RecipientResult]:
        """Wait until every address has a recorded result (any state)."""
        return self.wait_for(lambda rs: addresses <= {r.address for r in rs}, timeout)

    def states(self) -> dict[str, RecipientState]:
        return {r.address: r.state for r in self.all}
