"""A thread of one name that cannot be started, as when a container's pids limit is
reached: ``Thread.start`` raises "can't start new thread" for it, every other thread
starts as usual."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

REFUSAL = "can't start new thread"


def refuse_thread(monkeypatch: pytest.MonkeyPatch, name: str) -> Callable[[], None]:
    """From now on a thread named ``name`` cannot be started; the function returned
    lets it start again."""
    start = threading.Thread.start

    def refusing(thread: threading.Thread) -> None:
        if thread.name == name:
            raise RuntimeError(REFUSAL)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refusing)
    return lambda: monkeypatch.setattr(threading.Thread, "start", start)
