"""Which event loop the worker runs on: uvloop when installed, else asyncio's own.

uvloop (the ``mailstrom[fast]`` extra) runs the same protocol code several times faster
(benchmarks/README.md). ``Config.event_loop`` chooses: ``auto`` takes uvloop when it can be
imported, ``asyncio`` never does, ``uvloop`` insists (and :class:`~mailstrom.config.Config`
refuses it when uvloop is missing). Only loops the worker creates itself are affected;
:class:`~mailstrom.AsyncMailstrom` runs on the caller's loop, whatever it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mailstrom.config import EventLoop, uvloop_available

T = TypeVar("T")


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for ``asyncio.Runner``; None means asyncio's default loop."""
    if kind is EventLoop.ASYNCIO or (kind is EventLoop.AUTO and not uvloop_available()):
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """``asyncio.run(main)`` on the loop ``kind`` names."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
