"""Stop signals before the worker's event loop handles them (mailstrom.cli.signals): each
is remembered and acted on once the loop runs, and after the loop they are handled again
rather than left to their default action."""

from __future__ import annotations

import asyncio
import signal

from mailstrom.cli.signals import early_stops, run_until_signalled
from mailstrom.config import Config
from mailstrom.runtime.worker import Worker
from mailstrom.stores.memory import MemoryStore


def test_a_signal_before_the_loop_stops_the_worker_once_it_runs() -> None:
    """A SIGTERM after the store opened and before the loop's handlers were installed
    was never acted on: the worker ran on (or, unhandled, the process died of it)."""
    store = MemoryStore()
    worker = Worker(Config(helo_name="client.test"), store)
    with early_stops() as early:
        signal.raise_signal(signal.SIGTERM)
        assert early.count == 1
        # A guard against hanging, not a measure: a stopped worker returns at once.
        asyncio.run(
            asyncio.wait_for(run_until_signalled(worker, once=False, drain=0, early=early), 30)
        )
        # The loop's handlers gone, the early ones are back: not the default action.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        signal.raise_signal(signal.SIGHUP)
        assert early.count == 2
    store.close()


def test_the_previous_handlers_are_back_after_early_stops() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with early_stops():
        pass
    assert {sig: signal.getsignal(sig) for sig in before} == before
