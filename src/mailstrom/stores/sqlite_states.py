"""Which SQLite messages are in some derived states: a test of a few index probes
per message, never of every recipient of it."""

from __future__ import annotations

from collections.abc import Collection

from mailstrom.status import RecipientState
from mailstrom.stores.sqlite_queue import HAS_PENDING_SQL, PENDING_SQL

_HAS_FAILED_SQL = (
    "EXISTS (SELECT 1 FROM recipients f INDEXED BY recipients_failed_message"
    " WHERE f.message_seq = m.seq AND f.state = 'failed')"
)
_HAS_DEFERRED_SQL = (
    f"EXISTS (SELECT 1 FROM recipients p WHERE p.message_seq = m.seq AND p.{PENDING_SQL}"
    " AND p.state = 'deferred')"
)
_HAS_ANY_SQL = "EXISTS (SELECT 1 FROM recipients a WHERE a.message_seq = m.seq)"


def in_states_sql(states: Collection[RecipientState]) -> str:
    """A condition on message ``m``: its derived state
    (:func:`~mailstrom.status.derive_message_state`) is one of ``states`` (some). Told
    by probes of the pending and failed indexes (and of the message's first recipient):
    worked out from every recipient, as it was, a retention walk over messages of 400
    recipients cost 100 times one over messages of one. Only a condition that admits
    one of queued and deferred reads a pending message's pending recipients, for a
    deferred one."""
    queued, deferred = RecipientState.QUEUED in states, RecipientState.DEFERRED in states
    delivered, failed = RecipientState.DELIVERED in states, RecipientState.FAILED in states
    either: list[str] = []
    if queued and deferred:
        either.append(HAS_PENDING_SQL)
    elif deferred:
        either.append(_HAS_DEFERRED_SQL)
    elif queued:
        either.append(f"({HAS_PENDING_SQL} AND NOT {_HAS_DEFERRED_SQL})")
    # No recipient pending: delivered when every one was (and there is one), else failed.
    if delivered and failed:
        either.append(f"NOT {HAS_PENDING_SQL}")
    elif delivered:
        either.append(f"(NOT {HAS_PENDING_SQL} AND NOT {_HAS_FAILED_SQL} AND {_HAS_ANY_SQL})")
    elif failed:
        either.append(f"(NOT {HAS_PENDING_SQL} AND ({_HAS_FAILED_SQL} OR NOT {_HAS_ANY_SQL}))")
    return f"({' OR '.join(either)})" if either else "0"
