"""Running a worker until SIGTERM/SIGINT/SIGHUP: the first signal drains, a second stops
at once."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from mailstrom.runtime.worker import Worker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops a worker gracefully. SIGHUP too: a worker has no configuration to reload,
and by default SIGHUP (a closed terminal or ssh session, ``kill -HUP``) killed it in the
middle of a delivery, its leases kept and its last log lines lost."""


async def run_until_signalled(
    worker: Worker, *, once: bool, drain: float, on_started: Callable[[], None] | None = None
) -> None:
    """Run ``worker``; the first of :data:`STOP_SIGNALS` stops it gracefully, a second at
    once."""
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
        elif signals == 2:
            # Once: a further cancel would cut short the give-back the worker still
            # does after this one (what it leased and never attempted).
            task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(worker.run(once=once, on_started=on_started))
    try:
        await task
    except asyncio.CancelledError:
        if signals < 2:
            raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
