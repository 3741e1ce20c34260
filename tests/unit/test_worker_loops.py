"""The worker's event loops: a UDP endpoint (a DNS query's socket) whose creator is
cancelled while it is being made is closed, on uvloop as on asyncio's own loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from mailstrom.config import EventLoop, uvloop_available
from mailstrom.runtime.loops import run

LOOPS = [
    EventLoop.ASYNCIO,
    pytest.param(
        EventLoop.UVLOOP,
        marks=pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed"),
    ),
]


class _Remembered(asyncio.DatagramProtocol):
    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self.made = made
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@pytest.fixture
def listener() -> tuple[str, int]:
    """A loopback UDP port to aim at (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-first", "made-first"])
def test_an_endpoint_given_up_while_made_is_closed(
    kind: EventLoop, cancel_first: bool, listener: tuple[str, int]
) -> None:
    """uvloop left it open until the loop closed (a socket per cancelled DNS query, and
    a ResourceWarning then): asyncio closes it. The cancel may land before or after the
    transport's connection_made."""
    made: list[asyncio.BaseTransport] = []
    protocols: list[_Remembered] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        creating: asyncio.Task[object] | None = None

        def factory() -> _Remembered:
            # Called just before the wait for connection_made, which is scheduled after it.
            assert creating is not None
            if cancel_first:
                loop.call_soon(creating.cancel)
            else:
                loop.call_soon(loop.call_soon, creating.cancel)
            protocol = _Remembered(made)
            protocols.append(protocol)
            return protocol

        creating = loop.create_task(loop.create_datagram_endpoint(factory, remote_addr=listener))
        with pytest.raises(asyncio.CancelledError):
            await creating
        for _ in range(3):
            await asyncio.sleep(0)  # connection_made, then connection_lost, run
        try:
            assert [t.is_closing() for t in made] == [True]
            assert protocols[0].lost
        finally:
            for transport in made:
                transport.close()  # else uvloop's close hangs on it, a warning turned error

    run(main(), kind)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_endpoint_made_belongs_to_the_callers_protocol(
    kind: EventLoop, listener: tuple[str, int]
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        made: list[asyncio.BaseTransport] = []
        received: list[bytes] = []

        class Echoed(_Remembered):
            def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
                received.append(data)

        transport, protocol = await loop.create_datagram_endpoint(
            lambda: Echoed(made), local_addr=("127.0.0.1", 0)
        )
        try:
            assert isinstance(protocol, Echoed)
            assert transport.get_protocol() is protocol and made == [transport]
            transport.sendto(b"ping", transport.get_extra_info("sockname"))
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [b"ping"]
        finally:
            transport.close()
        await asyncio.sleep(0)
        assert protocol.lost

    run(main(), kind)


@pytest.mark.parametrize("kind", LOOPS)
def test_then_is_called_before_the_loop_waits_for_its_threads(kind: EventLoop) -> None:
    """A call the coroutine ran in a thread and stopped waiting for (a worker's store
    call, waiting for a pooled connection while PostgreSQL is down) holds the loop's
    end, which waits for the default executor's threads. ``then`` (closing the store,
    which ends such a wait) is called before: without it this run took 30 s."""
    released = threading.Event()

    async def main() -> None:
        call = asyncio.ensure_future(asyncio.to_thread(released.wait, 30))
        await asyncio.sleep(0)  # the thread is started
        call.cancel()

    began = time.monotonic()
    run(main(), kind, then=released.set)
    assert released.is_set()
    assert time.monotonic() - began < 10
