"""A worker clock that is off by a chosen amount, and a memory store whose "server" clock
is the real one: clock skew between a worker and its store without changing any host's
time.

In another process (the ``mailstrom`` command): run ``python -m tests.support.skew
ARGS...`` (the command line of ``mailstrom``) with :data:`OFFSET_VARIABLE` set to the
seconds the worker's clock is ahead (negative: behind).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from mailstrom.errors import StoreError
from mailstrom.stores import MemoryStore
from mailstrom.stores.clock import ClockReading, reading_between

OFFSET_VARIABLE = "TEST_CLOCK_OFFSET"


class SkewedClock:
    """The real time plus ``offset`` seconds; the offset may change while a worker runs
    (thread-safe: PostgreSQL stores read the clock in the worker's threads)."""

    def __init__(self, offset: float = 0.0) -> None:
        self._offset = timedelta(seconds=offset)
        self._lock = threading.Lock()

    def set(self, offset: float) -> None:
        with self._lock:
            self._offset = timedelta(seconds=offset)

    def __call__(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset


class ClockedMemoryStore(MemoryStore):
    """A :class:`MemoryStore` that measures a caller's clock against the real time, as
    :meth:`PostgresStore.measure_clock` does against the server's, counting the checks;
    ``failing`` makes each check fail as an unreachable server would."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0
        self.failing = False

    def measure_clock(self, clock: Callable[[], datetime]) -> ClockReading:
        self.checks += 1
        if self.failing:
            raise StoreError("connection to the test server lost")
        before = clock()
        server_time = datetime.now(UTC)
        return reading_between(before, server_time, clock(), server="the test server")


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Until ``condition`` holds, looking every 10 ms: a worker's clock checks run on its
    own timers, with no event to wait on. AssertionError after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def main() -> int:
    """``mailstrom`` with its worker's clock off by :data:`OFFSET_VARIABLE` seconds."""
    import mailstrom.cli.worker
    from mailstrom.cli.main import main as mailstrom_main
    from mailstrom.runtime.worker import Worker

    clock = SkewedClock(float(os.environ[OFFSET_VARIABLE]))
    # Looked up when the command makes its worker: every worker it makes gets this clock.
    mailstrom.cli.worker.Worker = functools.partial(Worker, clock=clock, check_clock=True)
    return mailstrom_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
