"""The dashboard's actions: what each does to the queue, and how it is asked for.

Each action has a confirmation page (GET) and a form that performs it (POST, CSRF-checked).
Message actions call the same store operations as ``mailstrom retry/hold/release/cancel``;
destination actions those of ``mailstrom suspend/resume``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from mailstrom.errors import MailstromError, StoreError, UnknownMessage
from mailstrom.readmodel.base import ReadModel
from mailstrom.status import MessageStatus
from mailstrom.stores.base import Store
from mailstrom.stores.operator import normalize_domain

log = logging.getLogger("mailstrom.web")


def status_of(model: ReadModel, message_id: str) -> MessageStatus:
    """What an action says of a message: its whole state and ``held``, read from its
    recipients counted by state with one recipient's status made, none of its attempts.
    Every recipient's was made, per click: 100,000 for a message to 100,000; and the
    store's ``status()`` reads each one's whole history besides."""
    return model.message_status(message_id, attempts=0, recipients=1).status


class InvalidTarget(MailstromError, ValueError):
    """What an action was asked to apply to is not a message id or a domain name."""


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
    run: Callable[[Store, ReadModel, str, datetime, timedelta | None], str]
    """Perform it on (store, its read model, message id or domain, now, chosen duration);
    returns what happened."""
    danger: bool = False
    durations: Mapping[str, tuple[str, timedelta | None]] = field(default_factory=dict)
    """The confirmation form's choice of how long (form value → label, duration); empty:
    the action takes none."""
    stored: bool = False
    """A destination action on a name as stored (:func:`stored_domain`), not only one a
    recipient's domain can be (:func:`destination_domain`)."""

    def target_of(self, text: str) -> str:
        """``text`` as the destination this action applies to (:class:`InvalidTarget`
        otherwise)."""
        return stored_domain(text) if self.stored else destination_domain(text)


SUSPEND_FOR: Mapping[str, tuple[str, timedelta | None]] = {
    "": ("until resumed", None),
    "1h": ("for 1 hour", timedelta(hours=1)),
    "2h": ("for 2 hours", timedelta(hours=2)),
    "24h": ("for 24 hours", timedelta(hours=24)),
}
"""How long the dashboard suspends a destination (the first is the default)."""

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def destination_domain(text: str) -> str:
    """``text`` as the domain a destination action applies to: lower case, no trailing
    dot, at most 253 octets, letter-digit-hyphen labels (an internationalised name in its
    A-label form, as recipients' domains are stored). :class:`InvalidTarget` otherwise."""
    try:
        domain = normalize_domain(text[:300])
    except ValueError:
        raise InvalidTarget(f"not a domain name: {text[:80]!r}") from None
    if len(domain) > 253 or not all(_LABEL.match(x) for x in domain.split(".")):
        raise InvalidTarget(f"not a domain name: {text[:80]!r}")
    return domain


def stored_domain(text: str) -> str:
    """``text`` as a suspended destination may be stored: as :func:`destination_domain`,
    or a name an earlier version suspended that no recipient's domain can be
    (``*.example.org``), which can still be resumed, as ``mailstrom resume`` takes it.
    :class:`InvalidTarget` otherwise."""
    try:
        return destination_domain(text)
    except InvalidTarget:
        pass
    try:
        return normalize_domain(text[:300], stored=True)
    except ValueError:
        raise InvalidTarget(f"not a domain name: {text[:80]!r}") from None


def _retry(
    store: Store, model: ReadModel, message_id: str, now: datetime, _: timedelta | None
) -> str:
    """Make the message's pending recipients due, and say, as ``mailstrom retry`` does,
    which go now: no worker leases a held message's until it is released, nor those at a
    destination suspended now until it is resumed; those whose destination is paused
    after a throttling reply (their status shows the pause) a worker leases and gives
    back, due at the pause's end. The retry is done once ``store.retry`` returns: when
    the reads that sort its recipients fail after it, it says so much (the page was the
    503 of a queue that cannot be read, and the user took the retry for failed)."""
    n = store.retry(message_id, now=now)
    try:
        held = status_of(model, message_id).held
        suspended = {s.domain for s in store.suspensions(now=now)}
        # Counted in the store, after the retry: no worker takes these meanwhile, so
        # none has gone.
        paused, throttled = model.waiting(message_id, at=suspended) if not held else (0, 0)
    except (StoreError, UnknownMessage) as exc:
        log.warning("retry %s: done, but what became of it cannot be read: %s", message_id, exc)
        return f"{_recipients(n)} made due"
    if held:
        return f"{_recipients(n)} due once released"
    paused = min(paused, n)
    throttled = min(throttled, n - paused)
    groups = [
        (count, when)
        for count, when in (
            (n - paused - throttled, "due now"),
            (paused, "due once resumed"),
            (throttled, "due once the pause ends"),
        )
        if count
    ] or [(0, "due now")]
    (first, when), *rest = groups
    return f"{_recipients(first)} {when}" + "".join(f", {k} {w}" for k, w in rest)


def _recipients(n: int) -> str:
    return f"{n} recipient{'' if n == 1 else 's'}"


def _finished(model: ReadModel, message_id: str, action: str) -> bool | None:
    """Whether the message has finished (no recipient pending), read after ``action`` on
    it; None when that cannot be read (the action is done all the same, as for a retry).
    UnknownMessage when there is no such message."""
    try:
        return status_of(model, message_id).state.is_final
    except StoreError as exc:
        log.warning(
            "%s %s: done, but what became of it cannot be read: %s", action, message_id, exc
        )
        return None


def _hold(
    store: Store, model: ReadModel, message_id: str, now: datetime, _: timedelta | None
) -> str:
    """Hold the message, and say whether this click held it: one that finished meanwhile
    (its page offered the hold while it was pending) is left as it is, not held, and one
    another operator held meanwhile was held already."""
    if store.hold_many([message_id], True):
        return "held"
    finished = _finished(model, message_id, "hold")  # UnknownMessage: it is gone
    if finished is None:
        return "already held or finished"
    return "not held as it has finished" if finished else "already held"


def _release(
    store: Store, model: ReadModel, message_id: str, now: datetime, _: timedelta | None
) -> str:
    """Release the message, and say whether this click released it: one that finished
    while held (its delivery in flight, its page offering the release meanwhile) is not
    held, and nothing of it is delivered; one another operator released meanwhile was
    not held any more (the notice said "released" of a click that changed nothing)."""
    if store.hold_many([message_id], False):
        return "released"
    finished = _finished(model, message_id, "release")  # UnknownMessage: it is gone
    if finished is None:
        return "not held or finished"
    return "not held as it has finished" if finished else "was not held"


def _cancel(
    store: Store, _model: ReadModel, message_id: str, now: datetime, _: timedelta | None
) -> str:
    n = store.cancel(message_id, now=now)
    return f"{_recipients(n)} cancelled"


def _suspend(
    store: Store, _model: ReadModel, domain: str, now: datetime, duration: timedelta | None
) -> str:
    if duration is None:
        store.suspend(domain, now=now)
        return "suspended until resumed"
    store.suspend(domain, now=now, until=now + duration)
    return f"suspended for {duration // timedelta(hours=1)}h"


def _resume(
    store: Store, _model: ReadModel, domain: str, now: datetime, _: timedelta | None
) -> str:
    return "resumed" if store.resume(domain, now=now) else "was not suspended"


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
        Action(
            name="suspend",
            target=Target.DESTINATION,
            label="Suspend",
            question="Suspend delivery to {target}? Its mail stays queued, unattempted, "
            "until it is resumed or the time below ends.",
            run=_suspend,
            durations=SUSPEND_FOR,
        ),
        Action(
            name="resume",
            target=Target.DESTINATION,
            label="Resume",
            question="Resume delivery to {target}? Its mail is attempted as scheduled.",
            run=_resume,
            stored=True,
        ),
    )
}
