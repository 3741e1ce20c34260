"""mailstrom.dnsclock: when a DNS lookup dnspython gave up on is asked again."""

from __future__ import annotations

from mailstrom.dnsclock import CLOCK_RETRIES, LEAST_LIFETIME, Deadline


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lookup_given_up_early_is_asked_again_in_what_is_left() -> None:
    clock = Clock()
    deadline = Deadline.after(5.0, clock=clock)
    clock.now += 1.5
    assert deadline.ask_again() == 3.5


def test_a_real_timeout_is_not_asked_again() -> None:
    clock = Clock()
    deadline = Deadline.after(5.0, clock=clock)
    clock.now += 5.0 - LEAST_LIFETIME / 2  # the clocks' drift, not time left
    assert deadline.ask_again() is None


def test_a_lookup_is_asked_again_a_bounded_number_of_times() -> None:
    # A wall clock that keeps jumping must not make a lookup loop until its deadline.
    deadline = Deadline.after(5.0, clock=Clock())
    assert [deadline.ask_again() for _ in range(CLOCK_RETRIES + 2)] == (
        [5.0] * CLOCK_RETRIES + [None, None]
    )
