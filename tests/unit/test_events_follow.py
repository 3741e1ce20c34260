"""``mailstrom events --follow`` (cli/events.py): each look carries on after the highest id
printed, so every event is printed once, in id order, as the store makes it visible (every
store does so in id order; PostgreSQL's is tested in
tests/integration/test_events_order_postgres.py)."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime

from mailstrom.cli.events import _follow, _Patience
from mailstrom.status import DeliveryEvent, RecipientState


class _Stop(Exception):
    pass


class _Growing:
    """A store whose outbox gains two events between looks."""

    def __init__(self) -> None:
        self.top = 5
        self.afters: list[int] = []

    def read_events(self, *, after: int = 0, limit: int = 100) -> list[DeliveryEvent]:
        self.afters.append(after)
        if len(self.afters) > 3:
            raise _Stop  # as Ctrl-C ends the command
        self.top += 2
        return [_event(i) for i in range(after + 1, self.top + 1)][:limit]


def _event(i: int) -> DeliveryEvent:
    return DeliveryEvent(
        id=i,
        at=datetime(2030, 1, 1, tzinfo=UTC),
        message_id=f"m{i}",
        address=f"u{i}@example.org",
        state=RecipientState.DELIVERED,
        attempt=1,
    )


def test_each_look_prints_the_new_events_once_in_order() -> None:
    store = _Growing()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(_Stop):
        _follow(store, 5, _Patience(0), as_json=False)  # type: ignore[arg-type]
    assert [line.split()[1] for line in out.getvalue().splitlines()] == [
        f"#{i}" for i in range(6, 12)
    ]
    assert store.afters == [5, 7, 9, 11]
