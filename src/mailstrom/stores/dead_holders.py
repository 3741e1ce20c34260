"""Giving back the leases of workers that died: a capability some stores have.

A worker's lease tokens carry its holder (:func:`~mailstrom.stores.base.new_holder`), and
:meth:`Store.release_holder` gives back all of one holder's leases, but only whoever
knows that the holder is dead can call it. A facade's parent process knows when its
worker child dies; a ``mailstrom worker`` run by systemd, or one of several on a host,
has no such parent. A store that can tell which holders died gives their leases back by
itself: it implements :class:`DeadHolderReaper`, and every worker of it calls
:meth:`~DeadHolderReaper.release_dead_holders` with its own holder at start and then
every :attr:`~DeadHolderReaper.reap_every` seconds, so a killed worker's mail is
delivered by another one soon instead of after ``Config.lease_for``.

- SQLite: a lock file per holder, held with ``flock`` while the holder's process lives
  (:mod:`mailstrom.stores.sqlite_holders`); a dead holder is found at the next look, every
  minute.
- PostgreSQL, whose workers may run on other hosts: each worker's look also says that it
  lives (a row per holder, stamped with the server's clock), and a holder not seen for the
  store URL's ``dead_after`` (2 minutes) is dead (:mod:`mailstrom.stores.postgres.holders`).

The memory store is not one (its worker lives and dies with the process that holds it).
The worker asks with ``isinstance(store, DeadHolderReaper)``, so the
:class:`~mailstrom.stores.base.Store` protocol, which every store and every test double
implements, does not grow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from mailstrom.errors import StoreError


@dataclass(frozen=True, slots=True, kw_only=True)
class HolderInfo:
    """A lease holder that lives: a worker of the store (:meth:`DeadHolderReaper.live_holders`)."""

    holder: str
    host: str | None
    """The host its process runs on (None where the store cannot tell)."""
    pid: int | None
    """Its process id on that host (None where the store cannot tell)."""
    started_at: datetime | None
    """When it first said it lives (None where the store cannot tell)."""
    seen_at: datetime | None
    """When it last said so (PostgreSQL: its last beat, by the server's clock); None where
    being alive is seen at this moment (SQLite: its lock is held)."""
    leased: int
    """How many recipients it leases now."""


_NEVER = datetime.max.replace(tzinfo=UTC)


def oldest_first(info: HolderInfo) -> tuple[datetime, str]:
    """The order of :meth:`DeadHolderReaper.live_holders`: by start, unknown starts last."""
    return (info.started_at or _NEVER, info.holder)


@runtime_checkable
class DeadHolderReaper(Protocol):
    """A store that can tell which lease holders live and which died (SQLite,
    PostgreSQL)."""

    @property
    def reap_every(self) -> float:
        """Seconds between two looks of a worker."""
        ...

    @property
    def dead_after(self) -> float | None:
        """Seconds after the start of a holder's last look that worked (its beat) from
        which other workers may take it for dead, though it lives but cannot reach the
        store; None where a live holder is never taken for dead (SQLite: its lock is
        held while its process lives)."""
        ...

    def release_dead_holders(self, alive: str | None = None) -> int:
        """Give back, due at once and without counting an attempt, what every dead holder
        (other than ``alive``, the caller's own, and this store's) still leases; returns
        how many recipients. A store that judges by beats records that ``alive`` lives.
        Trouble with files that tell is logged, never raised;
        :class:`~mailstrom.errors.StoreError` when the store fails."""
        ...

    def live_holders(self, *, leases: bool = True) -> list[HolderInfo]:
        """The lease holders that live now (its workers), oldest first: SQLite, those
        whose lock file is locked; PostgreSQL, those seen within ``dead_after``. A worker
        appears from its first look (at its start). ``leases=False`` leaves
        :attr:`HolderInfo.leased` 0 and saves counting them (SQLite walks the pending
        recipients). Reads only; :class:`~mailstrom.errors.StoreError` when the store
        fails."""
        ...


def live_workers(store: object, *, log: logging.Logger | None = None) -> list[HolderInfo] | None:
    """The workers running on ``store`` without their lease counts (cheap: see
    :meth:`DeadHolderReaper.live_holders`), for whoever only asks who is there (the
    metrics, the dashboard, the command line's notes); None when the store cannot tell
    (memory) or failed to, which ``log`` is told as a warning (the metrics and the notes
    have their own ways to say that the store fails)."""
    if not isinstance(store, DeadHolderReaper):
        return None
    try:
        return store.live_holders(leases=False)
    except StoreError as exc:
        if log is not None:
            log.warning("cannot tell which workers run: %s", exc)
        return None
