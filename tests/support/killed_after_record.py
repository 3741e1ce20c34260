"""The ``mailstrom`` command, killed (SIGKILL, as the OOM killer would) just after a write
of its store recorded a result for a chosen recipient: the record is committed, and
nothing the worker does after it happens.

Run ``python -m tests.support.killed_after_record ARGS...`` (the command line of
``mailstrom``) with :data:`ADDRESS_VARIABLE` naming the recipient. The durable stores'
``record`` and ``record_and_lease`` are wrapped before the command starts; the first
write that returns that recipient among the recorded kills the process.
"""

from __future__ import annotations

import os
import runpy
import signal
from collections.abc import Callable
from typing import Any

from mailstrom.stores.base import RecipientResult
from mailstrom.stores.postgres.store import PostgresStore
from mailstrom.stores.sqlite import SQLiteStore

ADDRESS_VARIABLE = "TEST_KILL_AFTER_RECORDING"


def _die_if_recorded(recorded: list[RecipientResult], address: str) -> None:
    if any(r.address == address for r in recorded):
        os.kill(os.getpid(), signal.SIGKILL)


def _wrapped_record(record: Callable[..., Any], address: str) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorded = record(self, *args, **kwargs)
        _die_if_recorded(recorded, address)
        return recorded

    return wrapper


def _wrapped_record_and_lease(record: Callable[..., Any], address: str) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorded, lease = record(self, *args, **kwargs)
        _die_if_recorded(recorded, address)
        return recorded, lease

    return wrapper


def run() -> None:
    address = os.environ[ADDRESS_VARIABLE]
    for store in (SQLiteStore, PostgresStore):
        store.record = _wrapped_record(store.record, address)  # type: ignore[method-assign]
        store.record_and_lease = _wrapped_record_and_lease(  # type: ignore[method-assign]
            store.record_and_lease, address
        )
    runpy.run_module("mailstrom", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run()
