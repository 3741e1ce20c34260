"""A worker that writes no events, on a store whose event outbox other workers fill.

Whether a worker writes an event for each result it records is its own configuration
(``Config.outbox``: a hook, or ``events``), not the store's. A second ``mailstrom worker``
started without them on a store whose first one posts webhooks delivers too, and its
results never reach the endpoint nor ``mailstrom events``: holes nobody sees. So a
worker without an outbox looks once, at its start, for an event written within
:data:`RECENT`, and says in a warning what it will not write.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from mailstrom.errors import StoreError
from mailstrom.runtime.shaper import StoreCall
from mailstrom.stores.base import Store

log = logging.getLogger("mailstrom.worker")

RECENT = timedelta(days=1)
"""How new the newest event must be to count as written by a worker that runs: older
ones may be left from a configuration given up since (they stay until pruned)."""


async def warn_if_others_write_events(
    store: Store, *, store_call: StoreCall, now: datetime
) -> None:
    """Warn when ``store``'s newest event was written within :data:`RECENT` of ``now``. A
    store that fails the look is not worth failing a start for: nothing is said."""
    try:
        last = await store_call(store.last_event_id)
        newest = await store_call(store.read_events, after=last - 1, limit=1) if last else []
    except StoreError as exc:
        log.debug("could not look at the event outbox: %s", exc)
        return
    if not newest or newest[0].at < now - RECENT:
        return
    log.warning(
        "the store's event outbox is written by another worker (its newest event is from "
        "%s), but this worker's configuration has neither a hook nor events: the results "
        "it records will be missing from the webhooks and from `mailstrom events`; "
        "configure every worker alike",
        newest[0].at.isoformat(timespec="seconds"),
    )
