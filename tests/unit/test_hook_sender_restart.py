"""The hook sender's restart after an unexpected error (runtime/hooks.py run()): the wait
before it, on a clock the test moves and sleeps that only record how long they were."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from mailstrom.config import HookConfig
from mailstrom.runtime.hooks import HookSender
from mailstrom.runtime.metrics import MetricsRecorder
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import EventBatch

RETRY_MIN, RETRY_MAX = 1.0, 8.0


class _Scripted(MemoryStore):
    """A store whose leases of outbox events go by ``script``: "fail" raises what is no
    StoreError (a bug, no thread for a store call), "idle" finds the outbox empty after
    ``ran`` of the clock: the sender working well meanwhile."""

    def __init__(self, script: list[str], clock: list[datetime], ran: timedelta) -> None:
        super().__init__()
        self.script = script
        self.clock = clock
        self.ran = ran

    def lease_events(self, *, now: datetime, limit: int, lease_for: timedelta) -> EventBatch | None:
        if self.script and self.script.pop(0) == "fail":
            raise RuntimeError("can't start new thread")
        self.clock[0] += self.ran
        return None


class _Recording(HookSender):
    """A sender whose back-off waits are only recorded, and that stops at the ``stop_at``th."""

    def __init__(self, stop_at: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at
        self.pauses: list[float] = []

    async def _sleep(self, seconds: float, until: asyncio.Event) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        if until is self._stop:  # a back-off (an idle poll waits on new events)
            self.pauses.append(seconds)
            if len(self.pauses) == self.stop_at:
                self.stop(0)


def pauses_after(script: list[str], ran: timedelta) -> list[float]:
    clock = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = _Scripted(script, clock, ran)
    hook = HookConfig(
        url="http://127.0.0.1:9/hook", secret="s" * 16, retry_min=RETRY_MIN, retry_max=RETRY_MAX
    )

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    async def run() -> list[float]:
        sender = _Recording(
            script.count("fail"),
            hook,
            store,
            store_call=call,
            clock=lambda: clock[0],
            metrics=MetricsRecorder(),
            poll_interval=0.01,
            rng=random.Random(1),
        )
        await asyncio.wait_for(sender.run(), 10)  # only catches a hang
        return sender.pauses

    return asyncio.run(run())


def test_a_sender_that_ran_well_since_its_restart_waits_the_least_after_a_new_failure() -> None:
    """The restart loop's wait doubled with each failure and never came down: three
    failures in a row, hours of sending, and the next bug waited retry_max (8 s here,
    5 min by default) before the events went again, as if it had kept failing."""
    pauses = pauses_after(["fail", "fail", "fail", "idle", "fail"], ran=timedelta(hours=2))
    assert len(pauses) == 4
    for pause, wait in zip(pauses, [1.0, 2.0, 4.0, RETRY_MIN], strict=True):
        assert 0.8 * wait <= pause <= 1.2 * wait, pauses


def test_a_sender_failing_again_soon_after_its_restart_keeps_backing_off() -> None:
    pauses = pauses_after(["fail", "fail", "fail", "idle", "fail"], ran=timedelta(seconds=1))
    assert len(pauses) == 4
    for pause, wait in zip(pauses, [1.0, 2.0, 4.0, 8.0], strict=True):
        assert 0.8 * wait <= pause <= 1.2 * wait, pauses
