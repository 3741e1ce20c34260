"""``mailstrom events --follow`` (cli/events.py): an event that commits after one with a
higher id (PostgreSQL: ids come from a sequence at INSERT, and transactions end in any
order) is printed once it appears, even when the first read already went past it."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime

from mailstrom.cli.events import _follow
from mailstrom.status import DeliveryEvent, RecipientState


class _Stop(Exception):
    pass


class _LateCommit:
    """A reader's view: 1-99 and 101 committed, 100 commits after the first read."""

    def __init__(self) -> None:
        self.visible = {*range(1, 100), 101}
        self.reads = 0

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        self.reads += 1
        if self.reads > 3:
            raise _Stop  # as Ctrl-C ends the command
        self.visible.add(100)
        return [_event(i) for i in sorted(self.visible) if i > after][:limit]


def _event(i: int) -> DeliveryEvent:
    return DeliveryEvent(
        id=i,
        at=datetime(2030, 1, 1, tzinfo=UTC),
        message_id=f"m{i}",
        address=f"u{i}@example.org",
        state=RecipientState.DELIVERED,
        attempt=1,
    )


def test_an_event_committed_after_the_first_read_below_its_end_is_printed_once() -> None:
    store = _LateCommit()
    first = {*range(82, 100), 101}  # the first read (the last 20) printed these
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(_Stop):
        _follow(store, 81, 101, first, as_json=False, interval=0)  # type: ignore[arg-type]
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["#100"]
