"""Stores: the durable queue behind one :class:`Store` protocol.

>>> from mailstrom.stores import open_store
>>> store = open_store("sqlite:///mail.db")  # doctest: +SKIP

:class:`PostgresStore` lives in :mod:`mailstrom.stores.postgres` and is imported only when
used, so SQLite users never load the PostgreSQL driver.
"""

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports

if TYPE_CHECKING:
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

# Loaded on first use (PEP 562): importing the package costs only what is touched.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.stores.base": (
            "Lease",
            "LeasedRecipient",
            "QueueFilter",
            "RecipientResult",
            "Store",
            "WorkItem",
            "new_message_id",
        ),
        "mailstrom.stores.memory": ("MemoryStore",),
        "mailstrom.stores.sqlite": ("SQLiteStore",),
        "mailstrom.stores.url": (
            "open_store",
            "parse_store_url",
        ),
    },
)
