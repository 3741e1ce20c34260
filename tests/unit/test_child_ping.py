"""The worker process's control thread answers its parent's pings while the event loop
waits in a store call, with a status snapshot first: a snapshot that cannot be read
beside the loop (which may have left the call meanwhile) must never cost the pong, or
the parent kills a child that only waited."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mailstrom.runtime import child
from mailstrom.status import WorkerStatus


class _Sent:
    def __init__(self) -> None:
        self.frames: list[tuple[str, object]] = []

    def send(self, kind: str, payload: object = None) -> None:
        self.frames.append((kind, payload))


class _WaitingWorker:
    """A worker whose loop is in a store call; its status fails to read when ``broken``."""

    in_store_call = True

    def __init__(self, *, broken: bool) -> None:
        self.broken = broken

    @property
    def status(self) -> WorkerStatus:
        if self.broken:
            raise RuntimeError("dictionary changed size during iteration")
        return WorkerStatus(running=True)


def _ping(worker: _WaitingWorker) -> list[str]:
    sent = _Sent()
    control = child._Control(cast(Any, None), cast(Any, sent))
    loop = asyncio.new_event_loop()
    try:
        control.loop = loop
        control.attach(cast(Any, worker))
        control.ping()
    finally:
        loop.close()
    return [kind for kind, _ in sent.frames]


def test_a_ping_during_a_store_call_sends_a_status_then_the_pong() -> None:
    assert _ping(_WaitingWorker(broken=False)) == ["status", "pong"]


def test_a_status_that_cannot_be_read_beside_the_loop_still_leaves_the_pong() -> None:
    assert _ping(_WaitingWorker(broken=True)) == ["pong"]
