"""Waiting in a test for something another thread or process makes true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


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


async def logged(caplog: pytest.LogCaptureFixture, text: str, within: float) -> bool:
    """Whether a record holding ``text`` is logged within ``within`` seconds, looked at
    every 10 ms without holding up the running loop."""
    until = asyncio.get_running_loop().time() + within
    while not any(text in r.getMessage() for r in caplog.records):
        if asyncio.get_running_loop().time() > until:
            return False
        await asyncio.sleep(0.01)
    return True
