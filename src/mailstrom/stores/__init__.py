"""Stores: the durable queue behind one :class:`Store` protocol.

>>> from mailstrom.stores import open_store
>>> store = open_store("sqlite:///mail.db")  # doctest: +SKIP

:class:`PostgresStore` lives in :mod:`mailstrom.stores.postgres` and is imported only when
used, so SQLite users never load the PostgreSQL driver.
"""

from mailstrom.stores.base import (
    Lease,
    LeasedRecipient,
    QueueFilter,
    RecipientResult,
    Store,
    WorkItem,
    new_message_id,
)
from mailstrom.stores.memory import MemoryStore
from mailstrom.stores.sqlite import SQLiteStore
from mailstrom.stores.url import open_store, parse_store_url

__all__ = [
    "Lease",
    "LeasedRecipient",
    "MemoryStore",
    "QueueFilter",
    "RecipientResult",
    "SQLiteStore",
    "Store",
    "WorkItem",
    "new_message_id",
    "open_store",
    "parse_store_url",
]
