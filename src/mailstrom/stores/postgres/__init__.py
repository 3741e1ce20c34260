"""PostgreSQL store: many worker processes on many hosts share one queue.

Workers lease with ``FOR UPDATE SKIP LOCKED`` and wake on ``LISTEN/NOTIFY``; the schema is
created and upgraded by mailstrom itself (:func:`migrate`).
"""

from mailstrom.stores.postgres.migrate import migrate
from mailstrom.stores.postgres.store import PostgresStore

__all__ = ["PostgresStore", "migrate"]
