"""The dashboard's read model: paged, indexed queries over a store (see
:mod:`mailstrom.readmodel.base`).

>>> from mailstrom.readmodel import open_read_model
>>> model = open_read_model(store)  # doctest: +SKIP
>>> model.queue_page(QueueQuery(view=QueueView.DEFERRED), now=now)  # doctest: +SKIP
"""

from __future__ import annotations

from mailstrom.readmodel.base import (
    Destination,
    InvalidQuery,
    MessageDetail,
    MessageSummary,
    OldestPending,
    Overview,
    PageCursor,
    QueuePage,
    QueueQuery,
    QueueView,
    ReadModel,
    Search,
    SortOrder,
    ThroughputBucket,
)
from mailstrom.stores.base import Store

__all__ = [
    "Destination",
    "InvalidQuery",
    "MessageDetail",
    "MessageSummary",
    "OldestPending",
    "Overview",
    "PageCursor",
    "QueuePage",
    "QueueQuery",
    "QueueView",
    "ReadModel",
    "Search",
    "SortOrder",
    "ThroughputBucket",
    "open_read_model",
]


def open_read_model(store: Store, *, cache_seconds: float = 5.0) -> ReadModel:
    """The read model for ``store``'s kind, reading the same data (its own connections).

    Raises TypeError for a store this version has no read model for.
    """
    from mailstrom.stores.memory import MemoryStore
    from mailstrom.stores.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        from mailstrom.readmodel.sqlite import SQLiteReadModel

        return SQLiteReadModel(
            store.path, cache_seconds=cache_seconds, busy_timeout=store.busy_timeout
        )
    if isinstance(store, MemoryStore):
        from mailstrom.readmodel.memory import MemoryReadModel

        return MemoryReadModel(store)
    try:
        from mailstrom.stores.postgres import PostgresStore
    except ImportError:  # psycopg not installed: it cannot be a PostgreSQL store
        PostgresStore = None  # type: ignore[assignment,misc]
    if PostgresStore is not None and isinstance(store, PostgresStore):
        from mailstrom.readmodel.postgres import PostgresReadModel

        return PostgresReadModel(store.url)
    raise TypeError(f"no dashboard read model for {type(store).__name__}")
