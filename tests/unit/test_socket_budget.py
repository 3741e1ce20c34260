"""Sockets counted against ``max_connections`` (and a shaping rule's) from opening to
closed: the budget's hand-off in turn, and the opener's use of it — idle and closing
connections hold their slots, a waiter makes room by closing the oldest idle one. No
socket: the opener's connections are fakes whose close the test finishes by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mailstrom import Config
from mailstrom.runtime.opener import Opener
from mailstrom.runtime.socket_budget import SocketBudget
from mailstrom.tls.requirement import PolicySource, TLSMode, TLSRequirement

PLAIN = TLSRequirement(mode=TLSMode.NONE, source=PolicySource.DEFAULT)


async def settle() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def nothing() -> None:
    pass


# --- the budget -------------------------------------------------------------------------


async def test_a_slot_given_back_goes_to_the_first_waiter() -> None:
    budget = SocketBudget(1)
    assert budget.try_take()
    order: list[str] = []

    async def wait(name: str) -> None:
        await budget.take(nothing)
        order.append(name)

    first = asyncio.create_task(wait("first"))
    second = asyncio.create_task(wait("second"))
    await settle()
    assert order == [] and budget.short == 2
    budget.give_back()
    await settle()
    assert order == ["first"] and budget.used == 1
    assert not budget.try_take()  # the slot went to the waiter, not to whoever asks next
    budget.give_back()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    budget.give_back()
    assert budget.used == 0


async def test_a_cancelled_wait_holds_no_slot() -> None:
    budget = SocketBudget(1)
    assert budget.try_take()
    waiting = asyncio.create_task(budget.take(nothing))
    await settle()
    waiting.cancel()
    await settle()
    budget.give_back()
    assert budget.used == 0
    # Handed the slot just as it was cancelled: it gives it back.
    assert budget.try_take()
    handed = asyncio.create_task(budget.take(nothing))
    await settle()
    budget.give_back()
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert budget.used == 0


# --- the opener's sockets ---------------------------------------------------------------


class FakeConnection:
    """What the opener asks of a connection; its close lasts until the test ends it."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.usable = True
        self.busy = False
        self.messages_sent = 0
        self.dane_via_next_hop = False
        self.closing = False
        self.closed = asyncio.Event()

    async def close(self) -> None:
        self.closing = True  # QUIT sent; the reply comes when the test says so
        await self.closed.wait()

    def abandon(self) -> None:
        self.closed.set()


class FakeOpener(Opener):
    def __init__(self, **config: Any) -> None:
        super().__init__(Config(helo_name="client.test", **config))
        self.opened: list[FakeConnection] = []

    async def _connect(self, host: str, ip: str, requirement: TLSRequirement) -> Any:
        conn = FakeConnection(host)
        self.opened.append(conn)
        return conn

    async def connect(self, host: str, budget: SocketBudget | None = None) -> Any:
        """Open to ``host`` and keep it idle, as a session that is done does."""
        conn = await self.open(host, "192.0.2.1", PLAIN, budget)
        self.release(self.key(host, "192.0.2.1", PLAIN, budget=budget), conn)
        return conn


async def test_idle_connections_hold_slots_and_the_oldest_makes_room() -> None:
    opener = FakeOpener(max_connections=2)
    one = await opener.connect("mx1.test")
    two = await opener.connect("mx2.test")
    assert opener.idle_count == 2 and opener.sockets.used == 2
    third = asyncio.create_task(opener.open("mx3.test", "192.0.2.1", PLAIN))
    await settle()
    # The oldest idle one is closing; the new one waits until it is closed.
    assert one.closing and not two.closing and not third.done()
    assert opener.sockets.used == 2 and len(opener.opened) == 2
    one.closed.set()
    await third
    assert opener.sockets.used == 2 and opener.idle_count == 1
    two.closed.set()
    await opener.close()


async def test_a_closing_connection_holds_its_slot_until_closed() -> None:
    opener = FakeOpener(max_connections=1)
    conn = await opener.open("mx1.test", "192.0.2.1", PLAIN)
    opener.close_later(conn)
    second = asyncio.create_task(opener.open("mx2.test", "192.0.2.1", PLAIN))
    await settle()
    assert conn.closing and not second.done()
    conn.closed.set()
    await second
    assert opener.sockets.used == 1
    await opener.close()


async def test_a_rules_budget_closes_its_own_idle_connection_only() -> None:
    opener = FakeOpener(max_connections=10)
    rule = SocketBudget(1)
    other = await opener.connect("mx.other.test")
    mine = await opener.connect("mx1.rule.test", rule)
    second = asyncio.create_task(opener.open("mx2.rule.test", "192.0.2.1", PLAIN, rule))
    await settle()
    assert mine.closing and not other.closing and not second.done()
    mine.closed.set()
    await second
    assert rule.used == 1 and opener.sockets.used == 2
    # Kept under the rule, a connection is reused under the rule alone.
    assert opener.key("mx.test", "192.0.2.1", PLAIN) != opener.key(
        "mx.test", "192.0.2.1", PLAIN, budget=rule
    )
    other.closed.set()
    await opener.close()


async def test_released_while_someone_waits_an_idle_connection_is_closed_for_them() -> None:
    opener = FakeOpener(max_connections=1)
    conn = await opener.open("mx1.test", "192.0.2.1", PLAIN)
    waiting = asyncio.create_task(opener.open("mx2.test", "192.0.2.1", PLAIN))
    await settle()
    assert not waiting.done()  # nothing idle to close: the slot is in use
    opener.release(opener.key("mx1.test", "192.0.2.1", PLAIN), conn)
    await settle()
    assert conn.closing and opener.idle_count == 0
    conn.closed.set()
    await waiting
    await opener.close()
