"""The one :class:`~mailstrom.Mailstrom` a Django process sends through.

It is made on first use, from ``settings.MAILSTROM`` (:mod:`.conf`): the store opened, and
the worker started where the ``worker`` key says. Nothing is started at import or at
``django.setup()``, so ``manage.py migrate``, a shell or the autoreloader's watching
process never starts a worker; the first ``send_mail`` (or ``get_mailstrom()``) does.

Lifetimes, and why:

- **Started on a thread of its own at the first send**, which does not wait for it: the
  backend queues into the store whatever the worker's state. A worker that cannot start
  (no interpreter for a worker process, no thread left, a crash in ``start()``) is
  logged once per reason and tried again on that thread, after 1 s and then less often
  (up to a minute apart), until it starts; ``worker_status`` says why meanwhile. The
  worker (a thread, or a child process) does not depend on the thread that started it.
- **Stopped at exit** by :mod:`atexit` (in-flight deliveries get up to
  :data:`STOP_TIMEOUT` seconds, the rest goes back to the queue). The autoreloader of
  ``runserver`` restarts its serving process by exiting it, so each reload stops the
  worker, and the new process starts one on its first send.
- **Forgotten in a forked child.** After ``os.fork()`` (gunicorn, uWSGI, multiprocessing)
  the parent's facade belongs to the parent: the child never uses, stops or closes it
  (its worker thread did not survive the fork; its worker process and store connections
  are the parent's), and makes its own on its first send.
- **Remade when the setting changes** (``override_settings(MAILSTROM=...)`` in tests),
  and when its store refuses every call (its file deleted or replaced: :func:`discard`).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from mailstrom.client import Mailstrom
from mailstrom.client.common import AlreadyStarted
from mailstrom.client.supervision import RestartBackoff
from mailstrom.contrib.django.conf import SETTING, DjangoSettings, load
from mailstrom.errors import ConfigError, InvalidStoreURL, WorkerError
from mailstrom.status import WorkerStatus
from mailstrom.stores.url import open_store

log = logging.getLogger("mailstrom.django")

STOP_TIMEOUT = 30.0
"""Seconds in-flight deliveries get when the process exits (as ``mailstrom worker
--drain-timeout``); what does not finish is given back to the queue, due at once."""


class _Facade(Mailstrom):
    """The facade, whose ``worker_status`` also says why its worker could not start
    when the worker's own status does not (a thread that could not be started)."""

    start_error: str | None = None
    """Why the last attempt to start the worker failed; None once one succeeded."""

    @property
    def worker_status(self) -> WorkerStatus:
        status = super().worker_status
        failed = self.start_error
        if failed is None or status.running or status.error is not None:
            return status
        return dataclasses.replace(status, error=f"the worker did not start: {failed}")


class _Running:
    """A facade, its store, and the thread that starts its worker."""

    def __init__(self, conf: DjangoSettings) -> None:
        try:
            self.store = open_store(conf.settings.store_url)
        except (ConfigError, InvalidStoreURL) as exc:
            # A configuration error that load() could not see: it must not be a
            # MailstromError, which fail_silently swallows (every message lost).
            raise ImproperlyConfigured(f"{SETTING}: store: {exc}") from exc
        try:
            self.ms = _Facade(conf.settings.config, store=self.store, worker=conf.worker)
        except BaseException:
            self.store.close()
            raise
        self._halt = threading.Event()
        self._attempt = threading.Lock()
        """Held by a start attempt: stop() waits for it, and no attempt follows stop()."""
        self.to_start = self.ms.worker is not None
        """Whether the thread that starts the worker is still to be started."""
        self._said_no_thread = False

    def start_in_background(self) -> None:
        """Start the worker on a thread of its own, so that no send waits for it (a
        worker process's start takes up to 30 s); one that fails is tried again there."""
        starter = threading.Thread(
            target=self._keep_starting, name="mailstrom-django-start", daemon=True
        )
        try:
            starter.start()
        except RuntimeError as exc:
            # No thread left (a pids limit): the next send tries again; mail is queued.
            if not self._said_no_thread:
                log.error("the mailstrom worker cannot be started yet: %s", exc)
                self._said_no_thread = True
            return
        self.to_start = False

    def _keep_starting(self) -> None:
        """Start the worker; after a failure, log it (once per reason) and try again
        after a backoff (1 s, doubling up to a minute) until it starts or stop()."""
        backoff = RestartBackoff()
        said: str | None = None
        while True:
            with self._attempt:
                if self._halt.is_set():
                    return
                try:
                    self.ms.start()
                except AlreadyStarted:
                    return
                except Exception as exc:
                    reason, unexpected = str(exc) or type(exc).__name__, exc
                    self.ms.start_error = reason
                else:
                    self.ms.start_error = None
                    if said is not None:
                        log.warning("the mailstrom worker started; the queued mail goes out")
                    return
            delay = backoff.next_delay(now=time.monotonic())
            if reason != said:
                log.error(
                    "the mailstrom worker did not start: %s; mail is still queued, and is "
                    "delivered once a worker runs (trying again in %g s, then less often)",
                    reason,
                    delay,
                    exc_info=None if isinstance(unexpected, WorkerError) else unexpected,
                )
                said = reason
            if self._halt.wait(delay):
                return

    def stop(self, timeout: float | None) -> None:
        self._halt.set()
        with self._attempt:  # a start under way ends first (within its own bound)
            try:
                self.ms.stop(timeout)
            except Exception:
                log.exception("stopping the mailstrom worker failed")
            # The store was handed to the facade, so closing it is ours to do.
            self.store.close()


class _Opening:
    """An opening of the store under way, which the other sends wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        """Why it failed, raised in each send that waited for it."""


_lock = threading.Lock()
_running: _Running | None = None
_opening: _Opening | None = None
_generation = 0
"""Counted up by each shutdown: a facade opened meanwhile, perhaps with the settings of
before, is stopped rather than kept."""
_inherited: list[_Running] = []
"""Facades a forked child got from its parent: kept, never used, so that no finaliser
closes a store connection the parent still uses (SQLite forbids using one across fork)."""


def get_mailstrom() -> Mailstrom:
    """The process's facade, made on first use (see the module docstring).

    Use it to ask about what the backend queued::

        from mailstrom.contrib.django import get_mailstrom

        status = get_mailstrom().query_status(message.mailstrom_id)

    Raises :class:`~django.core.exceptions.ImproperlyConfigured` for a bad
    ``settings.MAILSTROM`` (a store URL the store refuses included), and mailstrom's
    errors when the store cannot be opened (nothing is kept then; the next call tries
    again, and the calls that waited for that opening raise its error). The worker is
    started on a thread of its own, and whether it starts does not change what is
    queued: a failure is logged, tried again with a backoff, and in
    ``get_mailstrom().worker_status``.

    One thread opens the store, outside the lock, and the others wait for it: opened
    under the lock, each send opened it in turn when it could not be opened (a
    PostgreSQL server down behind its 10 s connect_timeout, an SQLite file locked 30 s),
    so the tenth of ten error reports sent at once waited 100 s.
    """
    global _running, _opening
    while True:
        with _lock:
            running, opening, generation = _running, _opening, _generation
            if running is not None:
                if running.to_start:
                    running.start_in_background()
                return running.ms
            mine = opening is None
            if opening is None:
                opening = _opening = _Opening()
        if not mine:
            opening.done.wait()
            if opening.error is not None:
                raise opening.error
            continue  # take what it opened
        try:
            running = _Running(load(getattr(settings, SETTING, None)))
        except BaseException as exc:
            opening.error = exc
            raise
        finally:
            with _lock:
                _opening = None
                kept = running is not None and generation == _generation
                if kept:
                    _running = running
            opening.done.set()
        if not kept:
            running.stop(0)  # a shutdown came meanwhile; its worker was never started


def shutdown(timeout: float | None = STOP_TIMEOUT) -> None:
    """Stop the process's worker, letting deliveries in flight finish within ``timeout``
    seconds, and close its store. The next send starts afresh. Called at exit."""
    global _running, _generation
    with _lock:
        running, _running = _running, None
        _generation += 1
    if running is not None:
        running.stop(timeout)


def discard(ms: Mailstrom) -> None:
    """Stop ``ms`` and close its store, if it is still the process's facade, so that the
    next :func:`get_mailstrom` opens the store afresh. For a store that refuses every
    call (:class:`~mailstrom.errors.StoreCorrupt`: its file deleted or replaced, a newer
    mailstrom's schema), which a web process kept refusing until it was restarted. In
    flight deliveries are not waited for: their results cannot be recorded in that store.
    It is closed under the lock, before another thread's send can open the next one, so
    that no connection of this process keeps a deleted ``-shm`` file's index mapped
    beside the new one's."""
    global _running
    with _lock:
        running = _running
        if running is None or running.ms is not ms:
            return  # another send discarded it already
        _running = None
        running.stop(0)


def _forget_after_fork() -> None:
    global _lock, _running, _opening, _generation
    # The lock may have been held by a thread that does not exist in the child, and an
    # opening under way was another thread's, which would never tell the child's sends.
    _lock = threading.Lock()
    if _running is not None:
        _inherited.append(_running)
    _running = _opening = None
    _generation += 1


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        shutdown()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)
setting_changed.connect(_on_setting_changed, dispatch_uid="mailstrom.contrib.django.shared")
