"""The memory store's MTA-STS policy cache, TLS session counters (schema version 9) and
TLS report claims (version 17 of SQLite, 18 of PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import date, datetime
from operator import attrgetter

from mailstrom.arguments import row_limit
from mailstrom.mtasts.policy import CachedPolicy
from mailstrom.stores.base import check_report_key
from mailstrom.stores.clock import aware_utc, kept_time
from mailstrom.stores.memory_ends import Ends
from mailstrom.stores.memory_records import writes
from mailstrom.tlsrpt.sessions import TLSSessions


class MemoryTLSMixin:
    """Kept in dicts under their own lock; mixed into :class:`MemoryStore`."""

    _tls_lock: threading.Lock
    _mta_sts: dict[str, CachedPolicy]
    _mta_sts_ends: Ends[CachedPolicy]
    """The policies by their expiry, for pruning."""
    _tls_sessions: dict[tuple[str, ...], TLSSessions]
    _tls_report_claims: dict[str, datetime]

    def _init_tls(self) -> None:
        self._tls_lock = threading.Lock()
        self._mta_sts = {}
        # The entries of replaced policies (a refresh each day for a year's max_age)
        # would stay until their old expiry: a few beyond twice the policies kept.
        self._mta_sts_ends = Ends(attrgetter("expires_at"), slack=64)
        self._tls_sessions = {}
        self._tls_report_claims = {}

    def mta_sts_policy(self, domain: str) -> CachedPolicy | None:
        """The cached MTA-STS policy of ``domain`` (expired or not), or None."""
        with self._tls_lock:
            return self._mta_sts.get(domain.lower())

    @writes
    def save_mta_sts_policy(self, cached: CachedPolicy) -> None:
        """Cache ``cached`` for its domain, replacing what was there."""
        domain = cached.domain.lower()
        with self._tls_lock:
            self._mta_sts[domain] = cached
            self._mta_sts_ends.added(domain, cached, self._mta_sts)

    @writes
    def prune_mta_sts_policies(self, *, expired_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` policies expired at or before ``expired_before``,
        soonest expired first; returns how many. Reads only the heap's expired end (and
        the entries of policies replaced since), not every policy kept, batch after
        batch."""
        cutoff = aware_utc(expired_before, "expired_before")
        limit = row_limit(limit)
        with self._tls_lock:
            return self._mta_sts_ends.delete_ended(self._mta_sts, cutoff, limit)

    @writes
    def add_tls_sessions(self, sessions: Sequence[TLSSessions]) -> None:
        """Add ``sessions`` to the day's counters."""
        with self._tls_lock:
            for s in sessions:
                key = s.key()
                old = self._tls_sessions.get(key)
                self._tls_sessions[key] = (
                    s if old is None else replace(old, count=old.count + s.count)
                )

    def tls_sessions(self, day: date) -> list[TLSSessions]:
        """Every counter of ``day``."""
        with self._tls_lock:
            return [s for s in self._tls_sessions.values() if s.day == day]

    @writes
    def prune_tls_sessions(self, *, before: date) -> int:
        """Delete the counters of days before ``before``; returns how many."""
        with self._tls_lock:
            doomed = [k for k, s in self._tls_sessions.items() if s.day < before]
            for key in doomed:
                del self._tls_sessions[key]
        return len(doomed)

    @writes
    def claim_tls_report(self, key: str, *, now: datetime, until: datetime) -> bool:
        """Take ``key`` until ``until`` unless another holds it past ``now``."""
        check_report_key(key)
        now, until = aware_utc(now, "now"), kept_time(until, "until")
        with self._tls_lock:
            claims = self._tls_report_claims
            for ended in [k for k, held in claims.items() if held <= now]:
                del claims[ended]
            if key in claims:
                return False
            claims[key] = until
            return True

    @writes
    def hold_tls_report(self, key: str, *, until: datetime) -> None:
        """Hold ``key`` until ``until``."""
        check_report_key(key)
        until = kept_time(until, "until")
        with self._tls_lock:
            self._tls_report_claims[key] = until
