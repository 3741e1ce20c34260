"""Reading back a queue row that may not be what mailstrom wrote.

A row can go bad after it was written: an operator's ``UPDATE``, a bug in another version
sharing the database, a partial restore, bit rot. The stores decode each leased message
and recipient through these checks, inside one ``try`` per row, so that one bad row
raises :class:`~mailstrom.errors.UnreadableRow` for itself alone: its recipients are
failed as "queue row unreadable: ..." and every other row is delivered. A value that
passes here is one the delivery path can use as it is (no type or range error later, no
store refusing its next write). Each check is a type test and a comparison or two: the
lease is a hot path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

from mailstrom.arguments import member_of, shown
from mailstrom.errors import StoreError, UnreadableRow
from mailstrom.message.dsn import DSN
from mailstrom.status import RecipientState
from mailstrom.stores.base import LeasedRecipient, WorkItem, storable_text

UNREADABLE = "queue row unreadable"
"""How the error of a recipient failed for an unreadable row begins."""

_SURROGATE = re.compile("[\ud800-\udfff]")

MAX_ATTEMPTS = 2**31 - 2
"""The largest attempt count read back: one more still fits PostgreSQL's ``integer``
(recording an attempt adds one), far beyond any retry policy."""


def unreadable_error(exc: UnreadableRow) -> str:
    """The error recorded for a recipient failed because of ``exc``."""
    return storable_text(f"{UNREADABLE}: {exc}")


def checked_text(value: object, column: str) -> str:
    """``value`` when it is text, and text that was UTF-8 in the database: a lone
    surrogate stands for an octet that was not (SQLite's ``decode_text``), and no SMTP
    command, DNS name or store can carry it."""
    if not isinstance(value, str):
        raise UnreadableRow(f"{column} is {shown(value)}, not text")
    if not_utf8(value):
        raise UnreadableRow(f"{column} is {shown(value)}, not UTF-8")
    return value


def shown_text(value: object, column: str) -> str | None:
    """``value``, a column only shown (a Subject, a Message-ID), as text that can be
    written out: an octet that was not UTF-8 (a lone surrogate, or a BLOB's) becomes
    U+FFFD, as ``mailstrom show`` does. A lone surrogate cannot be encoded, so one such
    value failed every page and printout holding it. None stays None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise UnreadableRow(f"{column} is {shown(value)}, not text")
    if not_utf8(value):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def not_utf8(text: str) -> bool:
    """Whether ``text`` read from SQLite held octets that are not UTF-8 (lone surrogates,
    see ``sqlite_schema.decode_text``)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def checked_attempts(value: object) -> int:
    """``value`` when it is an attempt count: an integer from 0 to :data:`MAX_ATTEMPTS`
    (a negative one breaks the retry policy's arithmetic, a larger one the next record)."""
    if type(value) is not int or not 0 <= value <= MAX_ATTEMPTS:
        raise UnreadableRow(f"attempts is {shown(value)}, not a count from 0 to {MAX_ATTEMPTS}")
    return value


def checked_size(value: object) -> int:
    """``value`` when it is a message's size: an octet count. The worker sets aside a
    message whose data is not that many octets, and the views show it as a number."""
    if type(value) is not int or value < 0:
        raise UnreadableRow(f"size is {shown(value)}, not a count of octets")
    return value


def checked_data(value: object, size: object) -> bytes:
    """``value`` when it is the ``size`` octets of the message stored: empty, truncated or
    text-typed bytes would otherwise go out as the message."""
    if not isinstance(value, bytes):
        raise UnreadableRow(f"the message data is {type(value).__name__}, not bytes")
    if len(value) != size or not value:
        raise UnreadableRow(
            f"the message data is {len(value)} octets, its stored size {shown(size)}"
        )
    return value


def stored_octets(value: object) -> bytes:
    """``value``, a message's data, as the octets to show: a BLOB as it is, a TEXT (one
    changed by hand) as its octets. :class:`UnreadableRow` for anything else: a number
    was read as ``bytes(n)``, five NULs for 5 and a bare error for -1 or 4.5."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):  # octets that are not UTF-8 as they were (decode_text)
        return value.encode("utf-8", "surrogateescape")
    raise UnreadableRow(f"the message data is {type(value).__name__}, not octets")


def checked_dsn(value: object) -> DSN | None:
    """The DSN request stored as ``value`` (None for none)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and not not_utf8(value):
        try:
            return DSN.decode(value)
        except ValueError:
            pass
    raise UnreadableRow(f"dsn is {shown(value)}, not a DSN request")


def counted_state(state: object, n: object, log: logging.Logger) -> RecipientState | None:
    """The state of a count of recipients by state (queue counts, the dashboard), or None,
    with a warning, for one no version here knows: a newer version's, or a row changed by
    hand (SQLite's CHECK constraints off, PostgreSQL's dropped). Left out of the counts,
    not failing them: every scrape of the metrics and ``mailstrom queue`` read them."""
    known = member_of(RecipientState, state)
    if known is None:
        log.warning("%s recipients in the unknown state %s left out", n, shown(state))
    return known


def made_due(date_undated: Callable[[], int], log: logging.Logger) -> bool:
    """Run ``date_undated`` (a store's statement making its pending recipients without a
    due time due now; how many it changed) and say so; whether there were any. A store
    that cannot write (read-only, a role without the right) leaves them: the due times
    behind them count all the same."""
    try:
        changed = date_undated()
    except StoreError as exc:
        log.warning("pending recipients without a due time not made due: %s", exc)
        return False
    if changed:
        log.warning(
            "%d pending recipient(s) had no due time (a row changed by hand): due now", changed
        )
    return changed > 0


class MessageHead(NamedTuple):
    """A leased message's columns, decoded and checked: what every work item of the
    message carries (both stores read them into this, each from its own row shape)."""

    envelope_from: str
    created_at: datetime
    data: bytes
    smtputf8: bool
    eightbit: bool
    require_tls: bool
    expires_at: datetime | None
    priority: str
    dsn: DSN | None
    queued_at: datetime
    """When the message was enqueued (``created_at``: when it could first go)."""

    def work_item(
        self,
        *,
        message_id: str,
        lease_token: str,
        domain: str,
        recipients: tuple[LeasedRecipient, ...],
    ) -> WorkItem:
        """The work item of this message's ``recipients`` at ``domain``."""
        return WorkItem(
            message_id=message_id,
            lease_token=lease_token,
            domain=domain,
            envelope_from=self.envelope_from,
            recipients=recipients,
            data=self.data,
            smtputf8=self.smtputf8,
            eightbit=self.eightbit,
            require_tls=self.require_tls,
            expires_at=self.expires_at,
            priority=self.priority,
            dsn=self.dsn,
            queued_at=self.queued_at,
        )
