"""The memory of addresses that could not be reached (runtime.unreachable): pure logic."""

from __future__ import annotations

from mailstrom.runtime.unreachable import UnreachableAddresses

TARGETS = [("mx1", "192.0.2.1"), ("mx1", "2001:db8::1"), ("mx2", "192.0.2.2"), ("mx3", "192.0.2.3")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_noted_address_is_down_until_its_time_is_up() -> None:
    clock = Clock()
    memory = UnreachableAddresses(60, clock=clock)
    assert not memory and not memory.down("192.0.2.1")
    memory.note("192.0.2.1")
    assert memory and memory.down("192.0.2.1") and not memory.down("192.0.2.2")
    clock.now += 59.9
    assert memory.down("192.0.2.1")
    clock.now += 0.1
    assert not memory.down("192.0.2.1")
    assert not memory  # forgotten, not only ignored


def test_a_new_failure_extends_the_wait_and_a_session_ends_it() -> None:
    clock = Clock()
    memory = UnreachableAddresses(60, clock=clock)
    memory.note("192.0.2.1")
    clock.now += 50
    memory.note("192.0.2.1")
    clock.now += 50
    assert memory.down("192.0.2.1")
    memory.clear("192.0.2.1")
    assert not memory.down("192.0.2.1")


def test_zero_remembers_nothing() -> None:
    memory = UnreachableAddresses(0)
    memory.note("192.0.2.1")
    assert not memory and not memory.down("192.0.2.1")


def test_down_addresses_go_last_each_group_in_preference_order() -> None:
    memory = UnreachableAddresses(60, clock=Clock())
    memory.note("192.0.2.1")
    memory.note("192.0.2.2")
    targets = list(TARGETS)
    memory.demote(targets)
    assert targets == [TARGETS[1], TARGETS[3], TARGETS[0], TARGETS[2]]


def test_only_the_targets_not_yet_tried_move() -> None:
    memory = UnreachableAddresses(60, clock=Clock())
    memory.note("192.0.2.1")
    targets = [("a", "192.0.2.1"), ("b", "192.0.2.1"), ("c", "192.0.2.2")]
    memory.demote(targets, 1)  # the first was just tried: the same address named again waits
    assert targets == [("a", "192.0.2.1"), ("c", "192.0.2.2"), ("b", "192.0.2.1")]


def test_when_every_address_is_down_the_order_stays() -> None:
    memory = UnreachableAddresses(60, clock=Clock())
    for _, ip in TARGETS:
        memory.note(ip)
    targets = list(TARGETS)
    memory.demote(targets)
    assert targets == TARGETS


def test_the_memory_is_bounded_dropping_the_oldest_note() -> None:
    memory = UnreachableAddresses(60, limit=3, clock=Clock())
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        memory.note(ip)
    memory.note("192.0.2.1")  # noted again: now the newest
    memory.note("192.0.2.4")
    assert [memory.down(f"192.0.2.{n}") for n in (1, 2, 3, 4)] == [True, False, True, True]
