"""Memory stores that let a test see or steer the worker's leases (a real store underneath,
not a mock: only what happens around ``record_and_lease`` changes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from mailstrom.stores import Lease, MemoryStore, RecipientResult

AfterLease = Callable[[datetime, int, Lease | None], None]
"""Called after each ``record_and_lease`` with its ``now``, ``limit`` and the lease made."""


class LeaseWatchingStore(MemoryStore):
    """A :class:`MemoryStore` calling ``after_lease`` after every lease it makes or refuses
    (also when the lease raised: then with None). ``in_process=False`` makes the worker
    call it in a thread, as it calls PostgreSQL."""

    def __init__(self, after_lease: AfterLease, *, in_process: bool = True) -> None:
        super().__init__()
        self._after_lease = after_lease
        self.in_process = in_process

    def record_and_lease(
        self,
        results: Sequence[RecipientResult],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        **kwargs: Any,
    ) -> tuple[list[RecipientResult], Lease | None]:
        lease: Lease | None = None
        try:
            recorded, lease = super().record_and_lease(
                results, now=now, limit=limit, lease_for=lease_for, **kwargs
            )
        finally:
            self._after_lease(now, limit, lease)
        return recorded, lease
