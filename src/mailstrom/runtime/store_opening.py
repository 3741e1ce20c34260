"""Opening a worker's store while its database may not answer yet.

A worker that opens its own store (a worker process, ``mailstrom worker``) may start while
PostgreSQL restarts, or before it is up at boot. It then waits, trying again with the
backoff its store loop uses for a failing store (0.05 s doubling to 5 s), and goes on by
itself once the store opens. Each failed try is logged once, with the wait before the
next (so at most one line every 5 s in a long outage), and the opener's :attr:`error`
says what it waits for, for the worker's status.

It does not wait when waiting cannot help: :class:`~mailstrom.errors.StoreCorrupt` (a
damaged file, a schema newer than this mailstrom) and
:class:`~mailstrom.errors.StoreAccessDenied` (the database answered and refused the
role: a wrong password, an unknown role or database) are raised at once, as is anything
that is no :class:`~mailstrom.errors.StoreError` (a bad URL, a missing driver, a bug).

Each try runs in a daemon thread of its own, so :meth:`StoreOpener.stop` ends the wait at
once even while a try hangs on a host that does not answer (up to its connect timeout);
a store such a try opens after the stop is closed again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeGuard

from mailstrom.errors import StoreAccessDenied, StoreCorrupt, StoreError
from mailstrom.runtime.worker_store import _Backoff
from mailstrom.stores.base import Store
from mailstrom.stores.url import redact_url

log = logging.getLogger("mailstrom.worker")

SLOW_TRY = 2.0
"""Seconds a try may take before :attr:`StoreOpener.error` says the store has not
answered yet (a host that drops packets keeps a try for its whole connect timeout)."""

_STOP = object()
"""Put in the opener's queue by :meth:`StoreOpener.stop`."""


def worth_waiting(exc: BaseException) -> TypeGuard[StoreError]:
    """Whether a store that failed with ``exc`` (to open, or a call of an open store's)
    may work if asked again later."""
    return isinstance(exc, StoreError) and not isinstance(exc, StoreCorrupt | StoreAccessDenied)


class StoreOpener:
    """Opens a store with ``open_store``, waiting with backoff while it fails.

    >>> opener = StoreOpener(lambda: open_store(url))   # doctest: +SKIP
    >>> store = opener.open()   # None when stop() came first  # doctest: +SKIP
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        on_change: Callable[[], None] | None = None,
        slow_try: float = SLOW_TRY,
    ) -> None:
        """``on_change`` is called (on the thread of :meth:`open`) whenever
        :attr:`error` changes while waiting, for a status report."""
        self._open_store = open_store
        self._on_change = on_change
        self._slow_try = slow_try
        # A SimpleQueue, not an Event: stop() may be called from a signal handler, and
        # SimpleQueue.put is reentrant where an Event's lock is not.
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = False
        self._lock = threading.Lock()
        """Between open() giving up and a try still running: who closes its store."""
        self._abandoned = False
        self.error: str | None = None
        """Why the store is not open yet, while the opener waits for it; else None."""
        self.failures = 0
        """Failed tries so far."""

    def stop(self) -> None:
        """End :meth:`open` (it returns None); callable from any thread and from a
        signal handler."""
        self._stopped = True
        self._events.put(_STOP)

    def open(self, *, wait: bool = True) -> Store | None:
        """The store, once it opens; None when :meth:`stop` came first. Raises what
        waiting cannot mend (see the module docstring); without ``wait``, the first
        failure (one try, still ended at once by :meth:`stop`)."""
        backoff = _Backoff()
        try:
            while not self._stopped:
                outcome = self._try()
                if outcome is _STOP:
                    return None
                if isinstance(outcome, BaseException):
                    if not (wait and worth_waiting(outcome)):
                        raise outcome
                    self._failed(outcome, backoff.take())
                    continue
                if self.failures:
                    log.warning("store open after %d failed tries", self.failures)
                self._set_error(None)
                store: Store = outcome
                return store
            return None
        finally:
            self._abandon()

    def _try(self) -> Any:
        """One try in a daemon thread: its store, its exception, or _STOP."""
        threading.Thread(target=self._run_try, name="mailstrom-store-open", daemon=True).start()
        try:
            outcome = self._events.get(timeout=self._slow_try)
        except queue.Empty:
            if self.error is None:
                self._set_error(f"opening the store: no answer for {self._slow_try:g} s")
            outcome = self._events.get()
        return outcome

    def _run_try(self) -> None:
        try:
            outcome: Any = self._open_store()
        except BaseException as exc:  # handed to open(), which decides
            outcome = exc
        with self._lock:
            if self._abandoned:
                if not isinstance(outcome, BaseException):
                    outcome.close()  # opened after the stop: nobody will use it
                return
            self._events.put(outcome)

    def _failed(self, exc: StoreError, wait: float) -> None:
        self.failures += 1
        # One line per try (the tries are the backoff's steps apart): the operator sees
        # the worker wait, and why, without a line per millisecond.
        reason = redact_url(" ".join(str(exc).split()))  # one line, no password
        log.warning(
            "store cannot be opened (try %d; next in %g s): %s", self.failures, wait, reason
        )
        self._set_error(f"opening the store: {reason}")
        # Only stop() puts anything here now (no try runs); open() sees _stopped next.
        with contextlib.suppress(queue.Empty):
            self._events.get(timeout=wait)

    def _abandon(self) -> None:
        """A try still running will close the store it opens; one that already opened
        one is closed here (open() did not take it)."""
        with self._lock:
            self._abandoned = True
        while True:
            try:
                outcome = self._events.get_nowait()
            except queue.Empty:
                return
            if outcome is not _STOP and not isinstance(outcome, BaseException):
                outcome.close()

    def _set_error(self, error: str | None) -> None:
        if error != self.error:
            self.error = error
            if self._on_change is not None:
                self._on_change()
