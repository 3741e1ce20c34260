"""A hook request that does not end (a name lookup nothing can interrupt) neither holds
the hook sender nor the closing of the worker's loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mailstrom.runtime import hooks


def test_a_request_that_never_ends_holds_neither_the_sender_nor_the_loop_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def stuck(*args: object) -> str | None:
        release.wait(10)
        return None

    monkeypatch.setattr(hooks, "post", stuck)
    monkeypatch.setattr(hooks, "POST_GRACE", 0.05)
    start = time.monotonic()
    try:
        # asyncio.Runner closes the loop as the worker's does: waiting for its default
        # executor's threads, which the request must not be one of.
        with asyncio.Runner() as runner:
            failure = runner.run(hooks.post_off_loop("http://hook.test/", b"{}", {}, 0.1))
        took = time.monotonic() - start
    finally:
        release.set()
    assert failure == "no answer within 0.15 s"
    assert took < 1.0


def test_the_requests_answer_and_errors_reach_the_sender(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hooks, "post", lambda *args: "HTTP 503 Service Unavailable")
    answer = asyncio.run(hooks.post_off_loop("http://hook.test/", b"{}", {}, 1.0))
    assert answer == "HTTP 503 Service Unavailable"

    def broken(*args: object) -> str | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(hooks, "post", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(hooks.post_off_loop("http://hook.test/", b"{}", {}, 1.0))
