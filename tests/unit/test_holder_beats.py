"""When a PostgreSQL store may judge other lease holders dead (stores/postgres/holders.py):
only after its own looks ran unbroken for ``dead_after``, and only holders not seen since
that run began."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.stores.postgres.holders import BEAT_AT_LEAST_EVERY, QUIET_EVERY, HolderBeats

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    """The monotonic clock and the server's, moved together."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def monotonic(self) -> float:
        return self.seconds

    def server(self) -> datetime:
        return T0 + timedelta(seconds=self.seconds)


def test_looks_every_eighth_of_dead_after_and_a_missed_beat_is_a_break() -> None:
    beats = HolderBeats(120.0)
    assert beats.beat_every == 15.0
    assert beats.break_after == 30.0


def test_judges_only_after_an_unbroken_run_of_dead_after() -> None:
    clock = Clock()
    beats = HolderBeats(120.0, monotonic=clock.monotonic)
    while clock.seconds < 120:
        assert beats.looked(clock.server()) is None
        clock.seconds += 15
    assert clock.seconds == 120
    assert beats.looked(clock.server()) == T0  # the run's first look: unseen since, dead


def test_a_missed_beat_starts_the_run_again() -> None:
    clock = Clock()
    beats = HolderBeats(120.0, monotonic=clock.monotonic)
    for _ in range(6):
        beats.looked(clock.server())
        clock.seconds += 15
    clock.seconds += 31 - 15  # one look late by more than a beat: the server was away
    restart = clock.server()
    assert beats.looked(restart) is None
    for _ in range(7):
        clock.seconds += 15
        assert beats.looked(clock.server()) is None
    clock.seconds += 15
    assert beats.looked(clock.server()) == restart


def test_judging_off_never_judges() -> None:
    clock = Clock()
    beats = HolderBeats(None, monotonic=clock.monotonic)
    assert beats.beat_every == BEAT_AT_LEAST_EVERY  # the others judge it
    for _ in range(100):
        assert beats.looked(clock.server()) is None
        clock.seconds += QUIET_EVERY


def test_a_holder_whose_row_was_made_again_was_taken_for_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    beats = HolderBeats(120.0)
    with caplog.at_level(logging.ERROR):
        beats.beaten("0123abcd", made=True)  # the first beat makes the row: nothing to say
        beats.beaten("0123abcd", made=False)
        assert not caplog.records
        beats.beaten("0123abcd", made=True)
    [record] = caplog.records
    assert "lease holder 0123abcd) was taken for dead" in record.getMessage()


def test_a_long_run_judges_by_the_last_dead_after_not_by_its_start() -> None:
    """A worker that has looked for an hour must still find one that died a minute ago:
    the threshold moves with the clock once the run is long enough."""
    clock = Clock()
    beats = HolderBeats(120.0, monotonic=clock.monotonic)
    while clock.seconds < 3600:
        beats.looked(clock.server())
        clock.seconds += 15
    assert beats.looked(clock.server()) == clock.server() - timedelta(seconds=120)


def test_a_server_clock_stepped_forward_starts_the_run_again() -> None:
    """The server's clock stepped ahead (NTP correcting it, a VM resumed): every live
    holder's last beat reads as that much older. Judged by the new clock at once, each
    one was taken for dead, and what it was delivering was given back and went out
    twice. The step breaks the run like a missed beat: judged again once every live
    holder has beaten by the new clock."""
    clock = Clock()
    beats = HolderBeats(120.0, monotonic=clock.monotonic)
    while clock.seconds < 600:
        beats.looked(clock.server())
        clock.seconds += 15
    step = timedelta(hours=1)
    clock.seconds += 15
    stepped = clock.server() + step
    assert beats.looked(stepped) is None  # a live holder seen 15 s ago is no dead one
    for n in range(1, 8):
        clock.seconds += 15
        assert beats.looked(stepped + timedelta(seconds=15 * n)) is None
    clock.seconds += 15
    assert beats.looked(stepped + timedelta(seconds=120)) == stepped


def test_a_server_clock_stepped_back_starts_the_run_again() -> None:
    """Stepped back an hour, the run's start lay an hour ahead of the server's clock: a
    holder that died after the step waited an hour and more to be judged."""
    clock = Clock()
    beats = HolderBeats(120.0, monotonic=clock.monotonic)
    while clock.seconds < 600:
        beats.looked(clock.server())
        clock.seconds += 15
    clock.seconds += 15
    stepped = clock.server() - timedelta(hours=1)
    assert beats.looked(stepped) is None
    for n in range(1, 8):
        clock.seconds += 15
        assert beats.looked(stepped + timedelta(seconds=15 * n)) is None
    clock.seconds += 15
    assert beats.looked(stepped + timedelta(seconds=120)) == stepped


@pytest.mark.parametrize("theirs", [1200.0, 1800.0, 86400.0])
def test_a_worker_with_a_longer_dead_after_lives_for_one_with_the_default(theirs: float) -> None:
    """Workers judge each other by their own URL's dead_after. One given a longer one
    (``?dead_after=30m``, as the guide advises where duplicates cost more than a delay,
    rolled out host by host, or only in the worker's URL and not the web application's)
    beat every eighth of it: every 225 s, and a worker with the default two minutes took
    it for dead between any two of its beats and gave back what it was delivering."""
    clock = Clock()
    judge = HolderBeats(120.0, monotonic=clock.monotonic)
    holder = HolderBeats(theirs)
    seen, next_beat, next_look = clock.server(), 0.0, 0.0
    while clock.seconds < 3600:
        if clock.seconds >= next_beat:
            seen, next_beat = clock.server(), next_beat + holder.beat_every
        if clock.seconds >= next_look:
            since = judge.looked(clock.server())
            assert since is None or seen >= since, f"taken for dead at {clock.seconds} s"
            next_look += judge.beat_every
        clock.seconds += 1


@pytest.mark.parametrize("judging", [30.0, 45.0])
def test_a_worker_with_judging_off_beats_as_often_as_a_judge_needs(judging: float) -> None:
    """Was: a worker whose URL says ``dead_after=0`` (judging off, rolled out host by
    host) beat only every minute, and a worker judging with a ``dead_after`` under about
    that took it for dead between two beats, every time, and gave back what it leased
    (delivered twice). It beats at least every :data:`BEAT_AT_LEAST_EVERY` seconds, as
    a worker with a long ``dead_after`` does."""
    quiet = HolderBeats(None)
    assert quiet.beat_every <= BEAT_AT_LEAST_EVERY
    clock = Clock()
    judge = HolderBeats(judging, monotonic=clock.monotonic)
    seen = clock.server()  # the quiet worker's first beat
    next_beat = quiet.beat_every
    while clock.seconds < 10 * QUIET_EVERY:
        if clock.seconds >= next_beat:
            seen, next_beat = clock.server(), next_beat + quiet.beat_every
        dead_before = judge.looked(clock.server())
        assert dead_before is None or seen >= dead_before, clock.seconds
        clock.seconds += judge.beat_every
