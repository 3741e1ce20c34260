"""``mailstrom events`` without ``--follow`` (cli/events.py): the events are read from the
store a page at a time and each page printed before the next is read, so that a listing
of a million events holds one page, not all of them."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime

import pytest

from mailstrom.cli import events
from mailstrom.cli.events import _listed, _Patience
from mailstrom.status import DeliveryEvent, RecipientState

PAGE = 10


class _Outbox:
    """A store's event outbox: ids 1 to 100 with every seventh one pruned. Each read
    notes how many events it was asked for and how many lines were printed by then."""

    def __init__(self, out: io.StringIO) -> None:
        self.ids = [i for i in range(1, 101) if i % 7]
        self.out = out
        self.reads: list[tuple[int, int]] = []

    def last_event_id(self) -> int:
        return self.ids[-1]

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        self.reads.append((limit, len(self.out.getvalue().splitlines())))
        return [_event(i) for i in self.ids if i > after][:limit]


def _event(i: int) -> DeliveryEvent:
    return DeliveryEvent(
        id=i,
        at=datetime(2030, 1, 1, tzinfo=UTC),
        message_id=f"m{i}",
        address=f"u{i}@example.org",
        state=RecipientState.DELIVERED,
        attempt=1,
    )


@pytest.mark.parametrize(
    ("after", "limit", "expected"),
    [
        (None, 5, [i for i in range(1, 101) if i % 7][-5:]),  # the last 5: one page
        (None, 45, [i for i in range(1, 101) if i % 7][-45:]),  # the last 45
        (None, 500, [i for i in range(1, 101) if i % 7]),  # fewer there than asked for
        (20, 45, [i for i in range(21, 101) if i % 7][:45]),  # the first 45 after id 20
        (20, 500, [i for i in range(21, 101) if i % 7]),
    ],
)
def test_events_are_read_and_printed_a_page_at_a_time(
    monkeypatch: pytest.MonkeyPatch, after: int | None, limit: int, expected: list[int]
) -> None:
    # `events --after 0 --limit 1000000 --json` (exporting the outbox) read every event
    # into one list, and without --after kept the last ones all, before the first line:
    # 200,000 events of a 200-octet reply took 275 MB (31 MB for ten).
    monkeypatch.setattr(events, "_PAGE", PAGE)
    out = io.StringIO()
    store = _Outbox(out)
    with contextlib.redirect_stdout(out):
        carry_on = _listed(store, _Patience(0, waiting=False), after, limit, as_json=False)  # type: ignore[arg-type]
    printed = [int(line.split()[1][1:]) for line in out.getvalue().splitlines()]
    assert printed == expected
    assert carry_on == (printed[-1] if after is not None else store.ids[-1])
    assert max(asked for asked, _ in store.reads) <= PAGE
    # Printing began before the last read: the events were never all held at once.
    assert store.reads[-1][1] >= len(expected) - PAGE


@pytest.mark.parametrize(
    "pruned",
    [
        [11],  # one sent event, far from the oldest of the last 45
        [11, 12, 13, 15, 16],  # several
        [11, 90],  # and one of the last 45 itself: it is left out, the start stays
    ],
)
def test_a_prune_between_the_two_reads_does_not_shift_the_last_events(
    monkeypatch: pytest.MonkeyPatch, pruned: list[int]
) -> None:
    # More than a page is counted first, then read again to be printed: the second read
    # left out as many events as the first had found before the wanted ones. A prune in
    # between (it deletes the events a hook sent, which need not be the oldest) then
    # cost the oldest wanted lines, one per pruned event: 44 printed for one prune,
    # starting at #50 instead of #48.
    monkeypatch.setattr(events, "_PAGE", PAGE)
    out = io.StringIO()
    store = _Outbox(out)
    wanted = store.ids[-45:]
    counted = events._last_events_start

    def prune_once_counted(
        outbox: _Outbox, last: int, limit: int
    ) -> tuple[int, int, list[DeliveryEvent] | None]:
        found = counted(outbox, last, limit)  # type: ignore[arg-type]
        outbox.ids = [i for i in outbox.ids if i not in pruned]
        return found

    monkeypatch.setattr(events, "_last_events_start", prune_once_counted)
    with contextlib.redirect_stdout(out):
        _listed(store, _Patience(0, waiting=False), None, 45, as_json=False)  # type: ignore[arg-type]
    printed = [int(line.split()[1][1:]) for line in out.getvalue().splitlines()]
    assert printed == [i for i in wanted if i not in pruned]
