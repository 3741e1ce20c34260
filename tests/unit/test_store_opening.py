"""StoreOpener: a worker's store opened while its database may not answer yet (issue #8)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from mailstrom.errors import ConfigError, StoreAccessDenied, StoreCorrupt, StoreError
from mailstrom.runtime.store_opening import StoreOpener
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import Store


class Flaky:
    """Fails ``failures`` times with ``error``, then opens a MemoryStore."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or StoreError("connection refused")
        self.tries = 0

    def __call__(self) -> Store:
        self.tries += 1
        if self.tries <= self.failures:
            raise self.error
        return MemoryStore()


def test_a_store_that_fails_for_a_while_is_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[str | None] = []
    opener = StoreOpener(Flaky(3), on_change=lambda: errors.append(opener.error))
    with caplog.at_level(logging.WARNING, "mailstrom.worker"):
        store = opener.open()
    assert isinstance(store, MemoryStore)
    assert opener.failures == 3 and opener.error is None
    # The status heard of the wait, and of its end.
    assert errors == ["opening the store: connection refused", None]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "store cannot be opened (try 1; next in 0.05 s): connection refused",
        "store cannot be opened (try 2; next in 0.1 s): connection refused",
        "store cannot be opened (try 3; next in 0.2 s): connection refused",
        "store open after 3 failed tries",
    ]


@pytest.mark.parametrize(
    "error",
    [StoreCorrupt("damaged"), StoreAccessDenied("password"), ConfigError("no driver")],
)
def test_what_waiting_cannot_mend_is_raised_at_once(error: Exception) -> None:
    opening = Flaky(10, error)
    with pytest.raises(type(error)):
        StoreOpener(opening).open()
    assert opening.tries == 1


def test_stop_ends_the_wait_between_tries() -> None:
    opener = StoreOpener(Flaky(1000))
    threading.Timer(0.3, opener.stop).start()
    began = time.monotonic()
    assert opener.open() is None
    assert time.monotonic() - began < 1.0


def test_stop_ends_a_try_that_hangs_and_its_late_store_is_closed() -> None:
    """A host that drops packets holds a try for its connect timeout: stop() does not
    wait for it, and the store it opens afterwards is closed."""
    release = threading.Event()
    closed = threading.Event()

    class Late(MemoryStore):
        def close(self) -> None:
            closed.set()

    def hangs() -> Store:
        release.wait(5)
        return Late()

    errors: list[str | None] = []
    opener = StoreOpener(hangs, on_change=lambda: errors.append(opener.error), slow_try=0.05)
    threading.Timer(0.2, opener.stop).start()
    assert opener.open() is None
    assert errors == ["opening the store: no answer for 0.05 s"]
    release.set()
    assert closed.wait(2)


def test_passwords_are_not_logged_nor_reported(caplog: pytest.LogCaptureFixture) -> None:
    opener = StoreOpener(Flaky(1, StoreError("cannot reach postgresql://app:s3cret@db/mail")))
    with caplog.at_level(logging.WARNING, "mailstrom.worker"):
        opener.open()
    assert "s3cret" not in caplog.text
    assert "postgresql://app:***@db/mail" in caplog.text
