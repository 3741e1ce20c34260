"""What both facades share: turning user input into a queued message."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from email.message import EmailMessage

from mailstrom.config import Config
from mailstrom.message import Email, PreparedMessage, prepare
from mailstrom.stores.base import Store

MessageInput = Email | EmailMessage | bytes
"""What ``send_email`` accepts."""


def default_store() -> Store:
    from mailstrom.stores import SQLiteStore

    return SQLiteStore("mailstrom.db")


def prepare_for(
    config: Config,
    message: MessageInput,
    *,
    envelope_from: str | None,
    envelope_to: Sequence[str] | None,
    now: datetime,
) -> PreparedMessage:
    return prepare(
        message,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        max_size=config.max_message_size,
        now=now,
    )


Clock = Callable[[], datetime]
