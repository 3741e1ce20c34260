"""Waiting in a test for something another thread or process makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(condition: Callable[[], object], within: float) -> bool:
    """Whether ``condition()`` came true (truthy) within ``within`` seconds, looked at
    every 10 ms."""
    deadline = time.monotonic() + within
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
