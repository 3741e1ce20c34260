"""A worker whose start fails ends at once, whatever its loops had done by then."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.support.deadline import hang_guard

from mailstrom import Config
from mailstrom.runtime import worker_stopping
from mailstrom.runtime.worker import Worker
from mailstrom.stores import SQLiteStore


def test_a_worker_whose_on_started_raises_ends_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on_started`` raising (a worker child's "ready" to a parent that died) cancelled
    the clock check before it ever ran, so it never said the store loop could go on; the
    stop then waited for that loop for as long as the last records may take (30 s; for
    ever here, where that is made an hour), and ignored a first SIGTERM meanwhile."""
    monkeypatch.setattr(worker_stopping, "_FINAL_RECORD", 3600.0)
    store = SQLiteStore(tmp_path / "queue.db")
    worker = Worker(Config(), store)

    def refuse() -> None:
        raise RuntimeError("the parent is gone")

    try:
        with hang_guard(20), pytest.raises(RuntimeError, match="the parent is gone"):
            asyncio.run(worker.run(on_started=refuse))
    finally:
        store.close()
    assert not worker.status.running
