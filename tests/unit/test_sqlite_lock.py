"""The polling wait for an SQLite store's ``flock`` (stores/sqlite_lock.py): how it
sleeps, and that it leaves the thread as it found it."""

from __future__ import annotations

import ctypes
import sys
import threading

import pytest

from mailstrom.stores.sqlite_lock import _PR_GET_TIMERSLACK, _PreciseSleeps

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="timer slack is Linux's")


def timer_slack() -> int:
    return int(ctypes.CDLL(None).prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0))


@linux_only
def test_a_wait_cuts_the_threads_timer_slack_and_gives_it_back() -> None:
    """Linux lengthens each sleep by the thread's timer slack (50 µs by default): a
    waiter polling every 20 µs would look every 70. The wait cuts it to 1 ns and puts the
    thread's own back, so an application thread that waited keeps its timers as they were."""
    seen: dict[str, int] = {}

    def thread() -> None:
        seen["before"] = timer_slack()
        with _PreciseSleeps().held():
            seen["during"] = timer_slack()
        seen["after"] = timer_slack()

    runner = threading.Thread(target=thread)
    runner.start()
    runner.join()
    assert seen["during"] == 1
    assert seen["after"] == seen["before"] > 1


def test_without_prctl_a_wait_sleeps_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    precise = _PreciseSleeps()
    with precise.held():
        pass
    assert precise._prctl is None
