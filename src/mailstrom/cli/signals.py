"""Running a worker until SIGTERM/SIGINT/SIGHUP: the first signal drains, a second stops
at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType

from mailstrom.runtime.worker import Worker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops a worker gracefully. SIGHUP too: a worker has no configuration to reload,
and by default SIGHUP (a closed terminal or ssh session, ``kill -HUP``) killed it in the
middle of a delivery, its leases kept and its last log lines lost."""


def handled_stop_signals() -> list[signal.Signals]:
    """:data:`STOP_SIGNALS` but those this process was started with ignored: ``nohup``
    ignores SIGHUP (the session's end must not stop the command), a shell script's ``&``
    SIGINT (Ctrl-C on the script must not reach it). Handled all the same,
    they stopped a worker that whoever started it meant to keep running; an ignored one
    stays ignored, as Python leaves an ignored SIGINT."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


class EarlyStops:
    """The stop signals that came before an event loop handles them (from
    :func:`early_stops`): counted, for :func:`run_until_signalled` to act on as if they
    came once it runs, and passed to whatever :meth:`calling` names meanwhile."""

    def __init__(self) -> None:
        self.count = 0
        self._callbacks: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def calling(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` (reentrant: from a signal handler) on each stop signal while
        in the block, and on entering it if one already came."""
        self._callbacks.append(callback)
        try:
            if self.count:
                callback()
            yield
        finally:
            self._callbacks.remove(callback)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        for callback in list(self._callbacks):
            callback()


@contextlib.contextmanager
def early_stops() -> Iterator[EarlyStops]:
    """Handle :data:`STOP_SIGNALS` from now on (the previous handlers back at the end),
    but those ignored (:func:`handled_stop_signals`).
    Until the worker's loop handled them, SIGTERM and SIGHUP took their default action:
    one while the store opened killed the process by the signal (not "stopped", exit 0),
    and the log lines it still buffered were lost."""
    stops = EarlyStops()
    previous = {sig: signal.signal(sig, stops._received) for sig in handled_stop_signals()}
    try:
        yield stops
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def run_until_signalled(
    worker: Worker,
    *,
    once: bool,
    drain: float,
    on_started: Callable[[], None] | None = None,
    early: EarlyStops | None = None,
) -> None:
    """Run ``worker``; the first of :func:`handled_stop_signals` stops it gracefully, a
    second at once. Those ``early`` counted before this took over count as the first ones."""
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
            # No drain left, for what follows the cancel too (the last records' retries
            # on a failing store). Once: a further cancel would cut short the give-back
            # the worker still does after this one (what it leased and never attempted).
            worker.request_stop(drain_timeout=0)
            task.cancel()

    # Removing the loop's handlers sets the defaults, not what was there before: put that
    # back (early_stops' handlers), or a signal during the clean-up after the loop killed
    # the process.
    previous = {sig: signal.getsignal(sig) for sig in handled_stop_signals()}
    for sig in previous:
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(worker.run(once=once, on_started=on_started))
    # Counted after the loop took over: a signal from now on is the loop's, never both.
    for _ in range(min(early.count if early is not None else 0, 2)):
        on_signal()
    try:
        await task
    except asyncio.CancelledError:
        if signals < 2:
            raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)
