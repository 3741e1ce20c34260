"""Recipients set aside (schema version 20): the transactions that bring them back.

A pending recipient is aside (``recipients.aside``) while its destination has a row in
``suspensions`` or its message is held; the due indexes leave such rows out, so that no
lease or ``next_due`` walks past a suspended backlog or a held message, on every call.
Setting the flag only ever costs speed when it is missed (the lease still filters by
suspensions and ``messages.held``); clearing it must miss nothing, or a recipient waits
for good. So each end of a suspension (``resume``, or a timed one found ended) runs two
statements in one transaction: the first locks the suspension's row ``FOR UPDATE``,
which waits for every enqueue and release that read it ``FOR KEY SHARE`` (and so set
their rows aside) to commit; the second, with a snapshot taken after that, deletes the
row and brings the recipients back. An enqueue or release that comes later waits for the
row and finds it gone. See queries.sql: ``lock_suspension``, ``lock_ended``,
``end_suspensions``, ``lock_suspensions_of``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg


def resume(
    conn: psycopg.Connection[Any], queries: Mapping[str, bytes], domain: str, now: datetime
) -> bool:
    """End the suspension of ``domain`` inside the transaction open on ``conn``; whether
    it was in force at ``now``."""
    row = conn.execute(queries["lock_suspension"], {"domain": domain, "now": now}).fetchone()
    if row is None:
        return False
    found = bool(row[0])
    conn.execute(queries["end_suspensions"], {"domains": [domain], "wake": found})
    return found


def end_ended(conn: psycopg.Connection[Any], queries: Mapping[str, bytes], now: datetime) -> None:
    """End the timed suspensions that have ended by ``now`` inside the transaction open
    on ``conn``: their recipients are back in the due indexes, their rows gone."""
    domains = [d for (d,) in conn.execute(queries["lock_ended"], {"now": now}).fetchall()]
    if domains:
        conn.execute(queries["end_suspensions"], {"domains": domains, "wake": False})


def lock_for_release(
    conn: psycopg.Connection[Any], queries: Mapping[str, bytes], ids: Sequence[str]
) -> None:
    """Lock the suspensions of the messages' destinations ``FOR KEY SHARE`` inside the
    transaction open on ``conn``, before the release's own statement."""
    conn.execute(queries["lock_suspensions_of"], {"ids": list(ids)})
