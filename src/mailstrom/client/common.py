"""What both facades share: turning user input into a queued message."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import datetime
from email.message import EmailMessage

from mailstrom.config import Config
from mailstrom.message import Email, PreparedMessage, prepare
from mailstrom.routing import Router
from mailstrom.runtime.worker import Worker, utc_now
from mailstrom.stores.base import RecipientResult, Store

MessageInput = Email | EmailMessage | bytes
"""What ``send_email`` accepts."""


def default_store() -> Store:
    from mailstrom.stores import SQLiteStore

    return SQLiteStore("mailstrom.db")


class FacadeBase:
    """The parts both facades share: configuration, the store, the worker, the clock."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: Store | None = None,
        router: Router | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        on_result: Callable[[RecipientResult], None] | None = None,
    ) -> None:
        """``store=None`` opens ``mailstrom.db`` (SQLite) in the working directory and
        closes it on stop; a store passed in stays open for the caller. ``on_result`` is
        called on the worker's loop with each result once recorded."""
        self.config = config or Config()
        self._owns_store = store is None
        self.store = store if store is not None else default_store()
        self._clock = clock
        self.worker = Worker(
            self.config, self.store, router=router, clock=clock, rng=rng, on_result=on_result
        )

    def _prepare(
        self,
        message: MessageInput,
        envelope_from: str | None,
        envelope_to: Sequence[str] | None,
    ) -> PreparedMessage:
        return prepare_for(
            self.config,
            message,
            envelope_from=envelope_from,
            envelope_to=envelope_to,
            now=self._clock(),
        )


def prepare_for(
    config: Config,
    message: MessageInput,
    *,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    now: datetime,
) -> PreparedMessage:
    """Validate and encode ``message`` under ``config``'s limits (what send_email queues)."""
    return prepare(
        message,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        max_size=config.max_message_size,
        max_recipients=config.max_recipients,
        now=now,
    )


Clock = Callable[[], datetime]
