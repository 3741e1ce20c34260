"""Running a worker until SIGTERM/SIGINT: the first signal drains, a second stops at once."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from mailstrom.runtime.worker import Worker


async def run_until_signalled(
    worker: Worker, *, once: bool, drain: float, on_started: Callable[[], None] | None = None
) -> None:
    """Run ``worker``; the first SIGTERM/SIGINT stops it gracefully, a second at once."""
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logging.getLogger("mailstrom.worker").info(
                "stopping", extra={"fields": {"drain_timeout": drain}}
            )
            worker.request_stop(drain_timeout=drain)
        else:
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(worker.run(once=once, on_started=on_started))
    try:
        await task
    except asyncio.CancelledError:
        if signals < 2:
            raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
