"""Which event loop the worker runs on: uvloop when installed, else asyncio's own.

uvloop (the ``mailstrom[fast]`` extra) runs the same protocol code several times faster
(benchmarks/README.md). ``Config.event_loop`` chooses: ``auto`` takes uvloop when it can be
imported, ``asyncio`` never does, ``uvloop`` insists (and :class:`~mailstrom.config.Config`
refuses it when uvloop is missing). Only loops the worker creates itself are affected;
:class:`~mailstrom.AsyncMailstrom` runs on the caller's loop, whatever it is.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mailstrom.config import EventLoop, uvloop_available

T = TypeVar("T")
P = TypeVar("P", bound=asyncio.BaseProtocol)


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for ``asyncio.Runner``; None means asyncio's default loop."""
    if kind is EventLoop.ASYNCIO or (kind is EventLoop.AUTO and not uvloop_available()):
        return None
    return _uvloop_class()


@functools.cache
def _uvloop_class() -> type[asyncio.AbstractEventLoop]:
    """uvloop's loop, with a datagram endpoint its creator gave up on closed.

    asyncio closes the endpoint when the task creating it is cancelled while it waits
    for ``connection_made``; uvloop (0.23 still) leaves it open until the loop closes.
    Every DNS query (dnspython) opens one, and a lookup is cancelled whenever its session
    is (a deadline, a stop, the last caller gone): a socket leaked now and then, and a
    ResourceWarning when the worker's loop closed.
    """
    import uvloop

    class Loop(uvloop.Loop):
        async def create_datagram_endpoint(  # type: ignore[override]
            self, protocol_factory: Callable[[], P], *args: Any, **kwargs: Any
        ) -> tuple[asyncio.DatagramTransport, P]:
            made = _Made(protocol_factory)
            try:
                transport, _ = await super().create_datagram_endpoint(made, *args, **kwargs)
            except asyncio.CancelledError:
                made.abandon()
                raise
            assert made.protocol is not None
            return transport, made.protocol  # type: ignore[return-value]

    return Loop


class _Made(asyncio.DatagramProtocol):
    """Stands for the caller's protocol until the transport is made, then hands the
    transport to it; closes the transport once the caller has given up on it."""

    def __init__(self, factory: Callable[[], P]) -> None:
        self._factory: Callable[[], asyncio.BaseProtocol] = factory
        self.protocol: asyncio.BaseProtocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._abandoned = False

    def abandon(self) -> None:
        """The caller was cancelled: close the transport, now or once it is made (the
        waiter and ``connection_made`` come in either order)."""
        self._abandoned = True
        if self._transport is not None:
            self._transport.close()

    def __call__(self) -> _Made:
        self.protocol = self._factory()
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self.protocol is not None
        self._transport = transport
        transport.set_protocol(self.protocol)
        self.protocol.connection_made(transport)
        if self._abandoned:
            transport.close()  # connection_lost follows, as asyncio's loop has it


def run(
    main: Coroutine[Any, Any, T], kind: EventLoop, *, then: Callable[[], None] | None = None
) -> T:
    """``asyncio.run(main)`` on the loop ``kind`` names; ``then`` (closing a worker's
    store) is called once ``main`` ends, before the loop's end waits for the threads of
    its default executor.

    A worker's store calls run in those threads, and one it stopped waiting for goes
    on: a PostgreSQL call waiting for a pooled connection while the server is down
    waits out the store's timeout (30 s). The loop's end, and the interpreter's exit,
    wait for every such thread, so a process outlived its worker's stop by that much
    (past a supervisor's stop timeout, and a second signal's "at once"). A store
    closed ends those waits at once."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        try:
            return runner.run(main)
        finally:
            if then is not None:
                then()
