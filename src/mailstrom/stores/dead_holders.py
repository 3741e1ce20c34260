"""Giving back the leases of worker processes that died: a capability some stores have.

A worker's lease tokens carry its holder (:func:`~mailstrom.stores.base.new_holder`), and
:meth:`Store.release_holder` gives back all of one holder's leases, but only whoever
knows that the holder is dead can call it. A facade's parent process knows when its
worker child dies; a ``mailstrom worker`` run by systemd, or one of several on a host,
has no such parent. A store that can tell which holders died gives their leases back by
itself: it implements :class:`DeadHolderReaper`, and every worker of it calls
:meth:`~DeadHolderReaper.release_dead_holders` at start and then every minute, so a
killed worker's mail is delivered by the next one within seconds instead of after
``Config.lease_for``.

SQLite does (a lock file per holder, held with ``flock`` while the holder's process
lives: :mod:`mailstrom.stores.sqlite_holders`). PostgreSQL does not: its workers may run
on other hosts, whose processes no lock file here can watch, and their leases expire
as before. The worker asks with ``isinstance(store, DeadHolderReaper)``, so the
:class:`~mailstrom.stores.base.Store` protocol, which every store and every test double
implements, does not grow.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class DeadHolderReaper(Protocol):
    """A store that can tell which lease holders' processes died (SQLite)."""

    def release_dead_holders(self) -> int:
        """Give back, due at once and without counting an attempt, what every dead holder
        (other than this store's own) still leases; returns how many recipients. Trouble
        with the files that tell is logged, never raised;
        :class:`~mailstrom.errors.StoreError` when the store fails."""
        ...
