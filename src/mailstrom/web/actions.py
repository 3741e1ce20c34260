"""The dashboard's actions: what each does to the queue, and how it is asked for.

Each action has a confirmation page (GET) and a form that performs it (POST, CSRF-checked).
Message actions call the same store operations as ``mailstrom retry/hold/release/cancel``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from mailstrom.stores.base import Store


class Target(StrEnum):
    """What an action applies to."""

    MESSAGE = "message"
    DESTINATION = "destination"


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    name: str
    target: Target
    label: str
    """The button's text."""
    question: str
    """The confirmation page's question; ``{target}`` names what it applies to."""
    run: Callable[[Store, str, datetime], str]
    """Perform it on (store, message id or domain, now); returns what happened."""
    danger: bool = False


def _retry(store: Store, message_id: str, now: datetime) -> str:
    n = store.retry(message_id, now=now)
    return f"{n} recipient{'' if n == 1 else 's'} due now"


def _hold(store: Store, message_id: str, now: datetime) -> str:
    store.set_held(message_id, True)
    return "held"


def _release(store: Store, message_id: str, now: datetime) -> str:
    store.set_held(message_id, False)
    return "released"


def _cancel(store: Store, message_id: str, now: datetime) -> str:
    n = store.cancel(message_id, now=now)
    return f"{n} recipient{'' if n == 1 else 's'} cancelled"


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action(
            name="retry",
            target=Target.MESSAGE,
            label="Retry now",
            question="Make the pending recipients of message {target} due now?",
            run=_retry,
        ),
        Action(
            name="hold",
            target=Target.MESSAGE,
            label="Hold",
            question="Hold message {target}? It is not delivered until released.",
            run=_hold,
        ),
        Action(
            name="release",
            target=Target.MESSAGE,
            label="Release",
            question="Release message {target} for delivery?",
            run=_release,
        ),
        Action(
            name="cancel",
            target=Target.MESSAGE,
            label="Cancel",
            question="Cancel message {target}? Its pending recipients fail as cancelled; "
            "this cannot be undone.",
            run=_cancel,
            danger=True,
        ),
        # SUSPEND/RESUME (issue 14): destination actions go here once the store can
        # suspend a destination (the opscli branch). Add
        #   Action(name="suspend", target=Target.DESTINATION, ...) and "resume",
        # and the Destinations page shows their buttons and a "suspended" column (see
        # templates/destinations.html, marked the same way).
    )
}
