"""When a facade starts its worker process again, and after how long
(client/supervision.py)."""

from __future__ import annotations

import signal

import pytest

from mailstrom.client.supervision import (
    FIRST_DELAY,
    MAX_DELAY,
    SETTLED_AFTER,
    ChildExit,
    RestartBackoff,
    describe_exit,
    judge_exit,
)


@pytest.mark.parametrize(
    ("returncode", "reported_error", "asked", "verdict"),
    [
        # Asked to stop: whatever the end looked like, nothing to do.
        (0, False, True, ChildExit.ASKED),
        (-signal.SIGKILL, False, True, ChildExit.ASKED),  # stop() killed it after the grace
        (1, True, True, ChildExit.ASKED),
        # It said why: permanent, however it ended.
        (1, True, False, ChildExit.FAILED),
        (-signal.SIGKILL, True, False, ChildExit.FAILED),
        # Stopped on purpose by somebody else.
        (0, False, False, ChildExit.STOPPED_OUTSIDE),
        (-signal.SIGTERM, False, False, ChildExit.STOPPED_OUTSIDE),
        (-signal.SIGINT, False, False, ChildExit.STOPPED_OUTSIDE),
        # Gone without a word: start it again.
        (-signal.SIGKILL, False, False, ChildExit.DIED),  # the OOM killer, kill -9
        (-signal.SIGSEGV, False, False, ChildExit.DIED),  # a crash in a C extension
        (-signal.SIGABRT, False, False, ChildExit.DIED),
        (1, False, False, ChildExit.DIED),  # an uncaught exception, no error frame
        (2, False, False, ChildExit.DIED),
    ],
)
def test_judge_exit(returncode: int, reported_error: bool, asked: bool, verdict: ChildExit) -> None:
    assert judge_exit(returncode, reported_error=reported_error, asked=asked) is verdict


def test_a_status_0_without_a_stopped_frame_is_a_death() -> None:
    # SIGCHLD ignored: the kernel reaped the child and Popen says 0, whatever killed it.
    assert judge_exit(0, reported_error=False, asked=False, said_stopped=False) is (ChildExit.DIED)
    assert judge_exit(0, reported_error=False, asked=True, said_stopped=False) is (ChildExit.ASKED)


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-200) == "killed by signal 200"  # no such signal: still said


def test_the_delay_doubles_up_to_its_cap() -> None:
    backoff = RestartBackoff()
    delays = []
    now = 0.0
    for _ in range(9):
        backoff.child_ready(now=now)
        now += 5.0  # each child runs 5 s: not long enough to count as settled
        delays.append(backoff.next_delay(now=now))
        now += delays[-1]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert (FIRST_DELAY, MAX_DELAY) == (1.0, 60.0)


def test_a_child_that_never_came_up_keeps_the_delay_growing() -> None:
    backoff = RestartBackoff()
    assert [backoff.next_delay(now=t) for t in (0.0, 100.0, 200.0)] == [1.0, 2.0, 4.0]


def test_the_delay_starts_over_after_a_child_ran_long_enough() -> None:
    backoff = RestartBackoff()
    for now in (0.0, 1.0, 3.0):
        backoff.next_delay(now=now)  # three deaths in a row: 1, 2, 4
    backoff.child_ready(now=10.0)
    backoff.child_ready(now=50.0)  # a later "ready" of the same child changes nothing
    assert backoff.next_delay(now=10.0 + SETTLED_AFTER) == FIRST_DELAY
    backoff.child_ready(now=100.0)
    assert backoff.next_delay(now=100.0 + SETTLED_AFTER - 0.5) == 2.0  # just short of it


def test_a_ready_is_forgotten_with_its_child() -> None:
    """Only the child that just died counts: an old child's long run does not reset the
    delay of a later one that never came up."""
    backoff = RestartBackoff()
    backoff.child_ready(now=0.0)
    assert backoff.next_delay(now=1.0) == 1.0
    assert backoff.next_delay(now=500.0) == 2.0
