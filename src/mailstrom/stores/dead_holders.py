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

from typing import Protocol, runtime_checkable


@runtime_checkable
class DeadHolderReaper(Protocol):
    """A store that can tell which lease holders died (SQLite, PostgreSQL)."""

    @property
    def reap_every(self) -> float:
        """Seconds between two looks of a worker."""
        ...

    def release_dead_holders(self, alive: str | None = None) -> int:
        """Give back, due at once and without counting an attempt, what every dead holder
        (other than ``alive``, the caller's own, and this store's) still leases; returns
        how many recipients. A store that judges by beats records that ``alive`` lives.
        Trouble with files that tell is logged, never raised;
        :class:`~mailstrom.errors.StoreError` when the store fails."""
        ...
