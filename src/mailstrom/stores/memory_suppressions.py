"""The memory store's suppression list, and what bounces processed after delivery need:
a recipient failed late, and the messages that carry a Message-ID header."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from mailstrom.arguments import check_key, row_limit
from mailstrom.errors import StoreRefusedData
from mailstrom.status import Attempt, RecipientState
from mailstrom.stores.base import RecipientsFound, ascii_lower, check_suppressions
from mailstrom.stores.clock import aware_utc
from mailstrom.stores.memory_ends import Ends
from mailstrom.stores.memory_records import _Message, _Recipient, utc_attempt, writes
from mailstrom.suppression import MAX_TARGET, Suppression


class MemorySuppressionsMixin:
    """Kept in a dict under the store's lock; mixed into :class:`MemoryStore`."""

    _lock: threading.Lock
    _events_on: bool
    _suppressions: dict[str, Suppression]
    _suppression_order: list[str] | None
    """The targets in order, for :meth:`list_suppressions`; None once a target came or
    went, sorted again by the next listing. Sorted for each page, paging through 200,000
    entries (``suppress export``) took 10 s, each page holding the lock for 75 ms."""
    _expiries: Ends[Suppression]
    """The entries kept with an end, by it: what a prune deletes. Walking every entry
    for each batch of a prune (the worker prunes a batch a call until one is short),
    pruning 10,000 expired among 20,000 entries 100 at a time read 1.5 million."""
    _verp_key: bytes
    _by_header: dict[str, dict[str, _Message]]

    if TYPE_CHECKING:  # the store's own (memory.py) and the outbox's (memory_events.py)

        def _get(self, message_id: str) -> _Message: ...

        def _append_event(
            self, m: _Message, r: _Recipient, at: datetime, reason_class: str | None
        ) -> None: ...

    @writes
    def suppress(self, entries: Sequence[Suppression], *, keep_longer: bool = False) -> int:
        """Add or replace entries, all or none (with ``keep_longer``, not one where the
        target's entry is an operator's in force or lasts as long: see Store.suppress);
        returns how many were given. An entry whose source or time is unknown (read back
        from a row that cannot be read) is refused, as the durable stores' columns refuse
        it, rather than kept."""
        for entry in entries:
            if entry.source is None or entry.created_at is None:
                raise StoreRefusedData(
                    f"memory store refused a value: the suppression of {entry.target!r}"
                    " has no known source or time"
                )
        check_suppressions(entries)
        kept = [_in_utc(entry) for entry in entries]  # a naive time refused before any is kept
        with self._lock:
            for entry in kept:
                current = self._suppressions.get(entry.target)
                if keep_longer and current is not None and current.stands_against(entry):
                    continue
                if current is None:
                    self._suppression_order = None
                self._suppressions[entry.target] = entry
                self._expiries.added(entry.target, entry, self._suppressions)
        return len(kept)

    @writes
    def unsuppress(self, targets: Sequence[str]) -> int:
        """Remove the entries of ``targets``; returns how many existed."""
        with self._lock:
            removed = sum(self._suppressions.pop(t, None) is not None for t in set(targets))
            if removed:
                self._suppression_order = None
            return removed

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        """The entries of ``targets`` that apply at ``now``."""
        with self._lock:
            found = {t: self._suppressions.get(t) for t in targets}
        return {t: e for t, e in found.items() if e is not None and e.active(now)}

    def list_suppressions(
        self, *, now: datetime | None = None, after: str = "", limit: int = 100
    ) -> list[Suppression]:
        """Entries after ``after`` in target order (only active ones with ``now``)."""
        check_key(after, "after", limit=MAX_TARGET)
        wanted = row_limit(limit)
        entries: list[Suppression] = []
        with self._lock:
            order = self._suppression_order
            if order is None:
                order = self._suppression_order = sorted(self._suppressions)
            for i in range(bisect.bisect_right(order, after), len(order)):
                if len(entries) >= wanted:
                    break
                entry = self._suppressions[order[i]]
                if now is None or entry.active(now):
                    entries.append(entry)
        return entries

    @writes
    def prune_suppressions(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` entries expired at or before ``expired_before``, soonest
        expired first; returns how many."""
        cutoff = aware_utc(expired_before, "expired_before")
        limit = row_limit(limit)
        with self._lock:
            deleted = self._expiries.delete_ended(self._suppressions, cutoff, limit)
            if deleted:
                self._suppression_order = None
        return deleted

    @writes
    def fail_late(self, message_id: str, address: str, attempt: Attempt) -> bool:
        """Mark a recipient FAILED after the fact (see Store.fail_late)."""
        attempt, _ = utc_attempt(attempt)
        with self._lock:
            m = self._get(message_id)
            r = m.recipients.get(address)
            if r is None or r.state is not RecipientState.DELIVERED:
                return False  # only mail a server accepted can bounce after acceptance
            r.take(attempt, RecipientState.FAILED, next_attempt_at=None, uncertain=False)
            m.moved(RecipientState.DELIVERED, RecipientState.FAILED)
            if self._events_on:
                self._append_event(m, r, attempt.at, attempt.reason_class)
        return True

    def verp_key(self) -> bytes:
        """The store's VERP key (see Store.verp_key): made with the store."""
        return self._verp_key

    def recipients_by_address(
        self, message_id: str, addresses: Sequence[str] | None
    ) -> RecipientsFound:
        """The recipients of ``message_id`` named by ``addresses`` (see
        Store.recipients_by_address), without history."""
        wanted = None if addresses is None else {ascii_lower(a) for a in addresses}
        with self._lock:
            m = self._get(message_id)
            single = len(m.recipients) == 1
            chosen = [
                r
                for r in m.recipients.values()
                if wanted is None or single or ascii_lower(r.address) in wanted
            ]
            return RecipientsFound(
                message=m.snapshot(with_history=False, chosen=chosen), single=single
            )

    def message_ids_for_header(self, header_message_id: str, *, limit: int = 10) -> list[str]:
        """Ids of the messages with this Message-ID header, newest first."""
        wanted = row_limit(limit)
        if not isinstance(header_message_id, str):
            return []  # no header is stored as anything else (nor hashes, for a list)
        with self._lock:
            same = list(self._by_header.get(header_message_id, {}).values())
        same.sort(key=lambda m: (m.created_at, m.seq), reverse=True)  # the lists' order
        return [m.id for m in same[:wanted]]


def _in_utc(entry: Suppression) -> Suppression:
    """``entry`` with its times in UTC, as the SQL stores read them back; InvalidArgument
    for a naive one, as they refuse it: kept, it made every later lookup at an aware
    ``now`` raise TypeError."""
    created = entry.created_at
    expires = entry.expires_at
    utc_created = None if created is None else aware_utc(created, "created_at")
    utc_expires = None if expires is None else aware_utc(expires, "expires_at")
    if utc_created is created and utc_expires is expires:
        return entry
    return replace(entry, created_at=utc_created, expires_at=utc_expires)
