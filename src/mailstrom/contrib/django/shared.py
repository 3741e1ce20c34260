"""The one :class:`~mailstrom.Mailstrom` a Django process sends through.

It is made on first use, from ``settings.MAILSTROM`` (:mod:`.conf`): the store opened, and
the worker started where the ``worker`` key says. Nothing is started at import or at
``django.setup()``, so ``manage.py migrate``, a shell or the autoreloader's watching
process never starts a worker; the first ``send_mail`` does.

Lifetimes, and why:

- **Started by whichever thread sends first**, often a request thread that ends a moment
  later: the worker (a thread, or a child process) does not depend on it.
- **Stopped at exit** by :mod:`atexit` (in-flight deliveries get up to
  :data:`STOP_TIMEOUT` seconds, the rest goes back to the queue). The autoreloader of
  ``runserver`` restarts its serving process by exiting it, so each reload stops the
  worker, and the new process starts one on its first send.
- **Forgotten in a forked child.** After ``os.fork()`` (gunicorn, uWSGI, multiprocessing)
  the parent's facade belongs to the parent: the child never uses, stops or closes it
  (its worker thread did not survive the fork; its worker process and store connections
  are the parent's), and makes its own on its first send.
- **Remade when the setting changes** (``override_settings(MAILSTROM=...)`` in tests).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from mailstrom.client import Mailstrom
from mailstrom.contrib.django.conf import SETTING, DjangoSettings, load
from mailstrom.errors import ConfigError, InvalidStoreURL
from mailstrom.stores.url import open_store

log = logging.getLogger("mailstrom.django")

STOP_TIMEOUT = 30.0
"""Seconds in-flight deliveries get when the process exits (as ``mailstrom worker
--drain-timeout``); what does not finish is given back to the queue, due at once."""


class _Running:
    """A started facade and its store."""

    def __init__(self, conf: DjangoSettings) -> None:
        try:
            self.store = open_store(conf.settings.store_url)
        except (ConfigError, InvalidStoreURL) as exc:
            # A configuration error that load() could not see: it must not be a
            # MailstromError, which fail_silently swallows (every message lost).
            raise ImproperlyConfigured(f"{SETTING}: store: {exc}") from exc
        try:
            self.ms = Mailstrom(conf.settings.config, store=self.store, worker=conf.worker)
        except BaseException:
            self.store.close()
            raise

    def start(self) -> None:
        """Start the worker (if any); raise what stopped it."""
        try:
            self.ms.start()
        except BaseException:
            self.store.close()
            raise

    def stop(self, timeout: float | None) -> None:
        try:
            self.ms.stop(timeout)
        except Exception:
            log.exception("stopping the mailstrom worker failed")
        # The store was handed to the facade, so closing it is ours to do.
        self.store.close()


_lock = threading.Lock()
_running: _Running | None = None
_inherited: list[_Running] = []
"""Facades a forked child got from its parent: kept, never used, so that no finaliser
closes a store connection the parent still uses (SQLite forbids using one across fork)."""


def get_mailstrom() -> Mailstrom:
    """The process's facade, made and started on first use (see the module docstring).

    Use it to ask about what the backend queued::

        from mailstrom.contrib.django import get_mailstrom

        status = get_mailstrom().query_status(message.mailstrom_id)

    Raises :class:`~django.core.exceptions.ImproperlyConfigured` for a bad
    ``settings.MAILSTROM`` (a store URL the store refuses included), and mailstrom's
    errors when the store cannot be opened or the worker does not start (nothing is kept
    then; the next call tries again).
    """
    global _running
    with _lock:
        if _running is None:
            running = _Running(load(getattr(settings, SETTING, None)))
            running.start()
            _running = running
        return _running.ms


def shutdown(timeout: float | None = STOP_TIMEOUT) -> None:
    """Stop the process's worker, letting deliveries in flight finish within ``timeout``
    seconds, and close its store. The next send starts afresh. Called at exit."""
    global _running
    with _lock:
        running, _running = _running, None
    if running is not None:
        running.stop(timeout)


def _forget_after_fork() -> None:
    global _lock, _running
    # The lock may have been held by a thread that does not exist in the child.
    _lock = threading.Lock()
    if _running is not None:
        _inherited.append(_running)
    _running = None


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        shutdown()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)
setting_changed.connect(_on_setting_changed, dispatch_uid="mailstrom.contrib.django.shared")
