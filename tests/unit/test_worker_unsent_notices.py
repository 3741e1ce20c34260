"""Bounce messages a worker keeps while its store takes none are bounded in number."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from mailstrom import Config
from mailstrom.runtime import worker_screening
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore


def test_the_newest_unsent_notices_are_kept_up_to_the_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_screening, "MAX_UNSENT_NOTICES", 2)
    worker = Worker(Config(), MemoryStore())
    notices: list[Any] = ["first", "second", "third"]  # stand-ins: only counted here
    with caplog.at_level(logging.ERROR, logger="mailstrom"):
        worker._keep_unsent(notices)
    assert worker._unsent_notices == ["second", "third"]
    assert "1 bounce messages dropped" in caplog.text
