"""A worker without an event outbox says at its start that another worker fills the
store's (runtime/outbox_others.py): the results it records will be missing there."""

from __future__ import annotations

import asyncio
import logging
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from tests.contract.support import NOW, lease_all, message, results_for

from mailstrom.config import Config
from mailstrom.runtime.worker import Worker
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore

WARNING = "the store's event outbox is written by another worker"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A queue whose event outbox a worker with a hook filled: one event, at NOW."""
    path = tmp_path / "queue.db"
    with closing(SQLiteStore(path)) as hooked:
        hooked.enable_events()
        hooked.enqueue(message("ann@example.org"), now=NOW)
        hooked.record(results_for(lease_all(hooked), RecipientState.DELIVERED))
        assert hooked.last_event_id() == 1
    return path


def start_once(path: Path, config: Config, now: datetime) -> None:
    """A worker of its own on ``path`` (as a second `mailstrom worker` is), started and
    run until nothing is due."""
    with closing(SQLiteStore(path)) as store:
        asyncio.run(Worker(config, store, clock=lambda: now).run(once=True))


def test_a_worker_without_events_warns_when_another_writes_them(
    database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
        start_once(database, Config(), NOW + timedelta(hours=3))
    [said] = [m for m in caplog.messages if WARNING in m]
    assert "newest event is from 2030-01-02T03:04:05+00:00" in said
    assert "configure every worker alike" in said


@pytest.mark.parametrize(
    ("config", "later"),
    [
        (Config(), timedelta(days=2)),  # old events: a configuration given up since
        (Config(events=True), timedelta(0)),  # this worker writes them too
    ],
)
def test_no_warning_for_old_events_or_a_worker_that_writes_its_own(
    database: Path, caplog: pytest.LogCaptureFixture, config: Config, later: timedelta
) -> None:
    with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
        start_once(database, config, NOW + later)
    assert not [m for m in caplog.messages if WARNING in m]


def test_no_warning_on_a_store_without_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mailstrom.worker"):
        start_once(tmp_path / "queue.db", Config(), NOW)
    assert not [m for m in caplog.messages if WARNING in m]
