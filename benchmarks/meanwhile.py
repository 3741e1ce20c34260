"""How long single enqueues take while another thread works on the same store: the
shared measure of the memory store's benchmarks (memory_lease.py, memory_listing.py)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores.base import Store


@dataclass
class Meanwhile:
    """Seconds each single enqueue took (sorted), and each call of the other thread's."""

    enqueues: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)

    def ms(self) -> tuple[float, float, float]:
        """p50, p99 and max of the enqueues, in milliseconds."""
        took = self.enqueues
        p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
        return statistics.median(took) * 1000, p99 * 1000, took[-1] * 1000


def latencies(
    store: Store,
    seconds: float,
    call: Callable[[], Any] | None,
    *,
    message: Callable[[int], PreparedMessage],
    now: datetime,
) -> Meanwhile:
    """Enqueue ``message(i)`` at ``now`` one at a time, at an application's pace, for
    ``seconds`` while ``call`` (None: nothing) runs in a loop in another thread."""
    stop = threading.Event()
    found = Meanwhile()

    def loop() -> None:
        assert call is not None
        while not stop.is_set():
            t0 = time.perf_counter()
            call()
            found.calls.append(time.perf_counter() - t0)

    thread = threading.Thread(target=loop) if call is not None else None
    if thread is not None:
        thread.start()
    end = time.perf_counter() + seconds
    i = 10**9
    try:
        while time.perf_counter() < end:
            queued = message(i)
            t0 = time.perf_counter()
            store.enqueue(queued, now=now)
            found.enqueues.append(time.perf_counter() - t0)
            i += 1
            time.sleep(0.0005)  # an application's pace, not a tight loop
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    found.enqueues.sort()
    return found
