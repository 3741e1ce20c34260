"""Where an application thread's ``send_email`` time goes, stage by stage (``e2e.py --split``).

The end-to-end rows are bound by the application thread: each ``send_email`` prepares the
message and commits it durably before it returns. This wraps the stages of that path on
the SQLite store, for the application threads only (a worker thread in the same process
is not counted), and reports wall-clock µs per message for each:

* ``prepare``: validation, encoding, signing (``FacadeBase._prepare``);
* ``write lock wait``: waiting for the store's write lock, the in-process mutex and the
  other processes' ``flock`` (here: the worker's lease and record transactions);
* ``BEGIN IMMEDIATE`` and ``INSERT`` (the statements of the enqueue);
* ``COMMIT``: the rest of the transaction, that is the WAL write and its fsync;
* ``wake-up``: telling watchers and worker processes (``SQLiteStore._notify``);
* ``other``: what is left of ``send_email`` (group commit bookkeeping, calls).

The wrappers cost a few µs per stage; compare stages with each other, not with the
unwrapped rows of the table.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from mailstrom.client.common import FacadeBase
from mailstrom.stores import sqlite as sqlite_store

STAGES = (
    "prepare",
    "write lock wait",
    "BEGIN IMMEDIATE",
    "INSERT",
    "COMMIT (WAL write + fsync)",
    "wake-up",
    "other",
)


class StageTimes:
    """Wall-clock seconds per call of each wrapped stage, from application threads."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.calls: defaultdict[str, list[float]] = defaultdict(list)

    def counted(self) -> bool:
        return threading.current_thread().name.startswith(self.prefix)

    def add(self, name: str, seconds: float) -> None:
        self.calls[name].append(seconds)

    def per_message(self) -> dict[str, float]:
        """Mean µs per ``send_email`` of each stage; COMMIT and other by difference."""
        sent = len(self.calls["send_email"]) or 1

        def total(name: str) -> float:
            return sum(self.calls[name]) * 1e6 / sent

        commit = total("transaction") - total("BEGIN IMMEDIATE") - total("INSERT")
        known = ("prepare", "write lock wait", "transaction", "wake-up")
        return {
            "prepare": total("prepare"),
            "write lock wait": total("write lock wait"),
            "BEGIN IMMEDIATE": total("BEGIN IMMEDIATE"),
            "INSERT": total("INSERT"),
            "COMMIT (WAL write + fsync)": commit,
            "wake-up": total("wake-up"),
            "other": total("send_email") - sum(total(k) for k in known),
        }

    def quantiles(self, name: str) -> tuple[float, float] | None:
        """p50 and p90 of one call of a directly timed stage, in µs."""
        values = self.calls.get(name)
        if not values or len(values) < 10:
            return None
        cuts = statistics.quantiles(values, n=10)
        return cuts[4] * 1e6, cuts[8] * 1e6


def _timed(times: StageTimes, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not times.counted():
            return fn(*args, **kwargs)
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.add(name, time.perf_counter() - began)

    return wrapper


@contextlib.contextmanager
def instrumented(prefix: str = "app-") -> Iterator[StageTimes]:
    """Wrap the stages for threads whose name starts with ``prefix``; undone on exit."""
    times = StageTimes(prefix)
    store_cls = sqlite_store.SQLiteStore
    exclusive = store_cls._exclusive

    @contextlib.contextmanager
    def timed_exclusive(self: Any, deadline: float) -> Iterator[None]:
        began = time.perf_counter()
        with exclusive(self, deadline):
            if times.counted():
                times.add("write lock wait", time.perf_counter() - began)
            yield

    begin = _timed(times, "BEGIN IMMEDIATE", store_cls._begin_immediate)
    patches: list[tuple[Any, str, Any]] = [
        (FacadeBase, "_queue", _timed(times, "send_email", FacadeBase._queue)),
        (FacadeBase, "_prepare", _timed(times, "prepare", FacadeBase._prepare)),
        (store_cls, "_exclusive", timed_exclusive),
        (store_cls, "_begin_immediate", begin),
        (store_cls, "_commit_requests", _timed(times, "transaction", store_cls._commit_requests)),
        (store_cls, "_notify", _timed(times, "wake-up", store_cls._notify)),
        (sqlite_store, "insert_messages", _timed(times, "INSERT", sqlite_store.insert_messages)),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield times
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
