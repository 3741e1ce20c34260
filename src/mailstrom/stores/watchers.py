"""The callbacks behind ``Store.watch``, shared by the stores that notify in-process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Watchers:
    """A thread-safe set of callbacks to call when work may have become due."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0

    def add(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register ``callback``; returns a function that unregisters it (idempotent)."""
        with self._lock:
            key = self._next
            self._next += 1
            self._callbacks[key] = callback

        def stop() -> None:
            with self._lock:
                self._callbacks.pop(key, None)

        return stop

    def notify(self) -> None:
        """Call every callback; one that raises is logged and does not stop the others.

        The change that triggered the call is already committed, so a failing watcher must
        not turn it into an error for the caller.
        """
        with self._lock:
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("store watcher %r failed", callback)
