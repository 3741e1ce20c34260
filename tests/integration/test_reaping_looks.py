"""A worker's look for dead workers that the store fails is tried again within seconds,
not at the next interval (a minute on SQLite): on PostgreSQL the look is also the
worker's beat, and a dead worker's mail waits for the next look."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Mailstrom
from mailstrom.errors import StoreError, StoreLocked, StoreUnreachable
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import _wait_until, config, hello
from tests.support.delivery import Results

mx = test_worker_modes.mx


class FirstLookFails(SQLiteStore):
    """A SQLite store whose first look for dead holders fails as a held write lock
    makes it fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.looks: list[float] = []

    def release_dead_holders(self, alive: str | None = None) -> int:
        self.looks.append(time.monotonic())
        if len(self.looks) == 1:
            raise StoreLocked("database is locked (another process holds its write lock)")
        return super().release_dead_holders(alive)


def test_a_failed_look_is_tried_again_soon(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    store = FirstLookFails(tmp_path / "q.db")
    assert store.reap_every == 60.0
    with Mailstrom(config(dns_server, mx.port), store=store, worker="thread") as ms:
        assert _wait_until(lambda: len(store.looks) >= 2, 10)
        assert store.looks[1] - store.looks[0] < 5.0
        assert ms.worker_status.metrics.store_errors == 1  # counted as a store failure
    store.close()


class LooksFail(SQLiteStore):
    """A SQLite store whose looks for dead holders fail while ``failing`` is set, and
    whose every other call works: as a PostgreSQL role without grants on a table the
    looks alone use."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failing = True
        self.looks = 0

    def release_dead_holders(self, alive: str | None = None) -> int:
        self.looks += 1
        if self.failing:
            raise StoreError("permission denied for table lease_holders")
        return super().release_dead_holders(alive)


def test_looks_that_keep_failing_while_deliveries_work_are_said_once(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LooksFail(tmp_path / "q.db")
    results = Results()
    with (
        caplog.at_level(logging.WARNING, logger="mailstrom.worker"),
        Mailstrom(
            config(dns_server, mx.port), store=store, worker="thread", on_result=results
        ) as ms,
    ):
        for i in range(3):
            ms.send_email(hello(f"u{i}@example.org", i))
            results.wait_count(i + 1)
            assert _wait_until(lambda n=store.looks: store.looks > n, 10)  # a failed look
        status = ms.worker_status
        assert status.store_error is None  # deliveries and records work
        assert status.metrics.store_errors >= 3
        store.failing = False
        assert _wait_until(lambda: "works again" in caplog.text, 20)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if m.startswith("looking for dead workers failed")]) == 1
    assert not [m for m in said if "store working again" in m or "store failing" in m]
    assert said.count("looking for dead workers works again") == 1
    store.close()


class LooksUnreachable(SQLiteStore):
    """A SQLite store judged by beats as PostgreSQL's is (``dead_after``, a look each
    eighth of it), whose looks fail as an unreachable server's while ``cut`` is set and
    whose every other call works: the look's own connection broken, a flapping network.
    Counts the leases that hand out work while cut."""

    dead_after = 1.0
    reap_every = 0.125

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.cut = threading.Event()
        self.leased_while_cut = 0

    def release_dead_holders(self, alive: str | None = None) -> int:
        if self.cut.is_set():
            raise StoreUnreachable("PostgreSQL store: beat_holder failed: connection lost")
        return super().release_dead_holders(alive)

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        recorded, lease = super().record_and_lease(results, **kwargs)
        if lease is not None and lease.items and self.cut.is_set():
            self.leased_while_cut += 1
        return recorded, lease


def _worker(store: SQLiteStore, mx: Any, dns: LoopbackDNS, results: Results) -> Mailstrom:
    return Mailstrom(config(dns, mx.port), store=store, worker="thread", on_result=results)


def _cut_off_after_one(ms: Mailstrom, store: LooksUnreachable, results: Results) -> None:
    """One message delivered, then looks that fail for lack of a server until the worker
    says it is cut off."""
    ms.send_email(hello("before@example.org"))
    results.wait_count(1)
    store.cut.set()
    assert _wait_until(lambda: (ms.worker_status.paused or "").startswith("store: "), 10)


def test_a_worker_cut_off_leases_nothing_until_a_look_works(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # Other workers may take it for dead: work it leased now could go out twice, and
    # leasing to give it back at once would only churn. Mail waits for a look that works.
    store = LooksUnreachable(tmp_path / "q.db")
    results = Results()
    with _worker(store, mx, dns_server, results) as ms:
        _cut_off_after_one(ms, store, results)
        mid = ms.send_email(hello("during@example.org", 1))
        time.sleep(1.0)  # ample for a worker that leases to deliver it on loopback
        assert len(results.all) == 1 and store.leased_while_cut == 0
        assert store.status(mid).recipient("during@example.org").state.value == "queued"
        store.cut.clear()
        results.wait_count(2)
        assert ms.worker_status.paused is None
    store.close()


class LooksRefusedInThreads(LooksUnreachable):
    """As :class:`LooksUnreachable`, with calls run in threads as PostgreSQL's are (so the
    worker's loop goes on during a look), and looks that the server refuses while
    ``refused`` is set: a role without grants on ``lease_holders``. A refused look takes
    a while, as a round trip to a loaded server does."""

    in_process = False

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.refused = threading.Event()
        self.refusals = 0

    def release_dead_holders(self, alive: str | None = None) -> int:
        if self.refused.is_set():
            time.sleep(0.05)
            self.refusals += 1
            raise StoreError("PostgreSQL store: beat_holder failed: permission denied")
        return super().release_dead_holders(alive)


def test_a_refused_look_under_way_is_no_hung_one(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # Refused looks fail every worker's alike: nobody can be taken for dead, so nothing is
    # cut off, even when the worker's fencing check comes while a look is under way.
    store = LooksRefusedInThreads(tmp_path / "q.db")
    results = Results()
    with _worker(store, mx, dns_server, results) as ms:
        ms.send_email(hello("first@example.org"))
        results.wait_count(1)
        store.refused.set()
        # Two dead_afters of refused looks (a look under way about a third of the time,
        # checked every sixteenth of dead_after): mail goes on, the worker never pauses.
        deadline = time.monotonic() + 2 * store.dead_after
        sent = 1
        while time.monotonic() < deadline:
            ms.send_email(hello(f"r{sent}@example.org", sent))
            sent += 1
            results.wait_count(sent)
            assert ms.worker_status.paused is None
            time.sleep(0.05)
        assert store.refusals > 8
    store.close()


def test_a_look_the_server_refuses_ends_a_cut_off(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # Cut off (looks unreachable), then the server is back but refuses the looks (say it
    # came back without the grant): it answers, and it judges nobody dead, so the worker
    # leases again rather than waiting for a look that works.
    store = LooksRefusedInThreads(tmp_path / "q.db")
    results = Results()
    with _worker(store, mx, dns_server, results) as ms:
        _cut_off_after_one(ms, store, results)
        queued = ms.send_email(hello("during@example.org", 1))
        store.refused.set()
        store.cut.clear()
        results.wait_count(2)
        assert ms.worker_status.paused is None
        assert store.status(queued).recipient("during@example.org").state.value == "delivered"
    store.close()


class LooksHang(LooksRefusedInThreads):
    """As :class:`LooksRefusedInThreads`, with looks that hang while ``hang`` is set (a
    network that drops the packets without a word) until ``unhang`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hang = threading.Event()
        self.unhang = threading.Event()

    def release_dead_holders(self, alive: str | None = None) -> int:
        if self.hang.is_set():
            self.unhang.wait(10)
        return super().release_dead_holders(alive)


def test_a_look_that_hangs_cuts_the_worker_off_until_it_ends(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # No error ever comes back, so only the look's own age tells: under way for a quarter
    # of dead_after, three quarters after the last look that worked, it is cut off.
    store = LooksHang(tmp_path / "q.db")
    results = Results()
    try:
        with _worker(store, mx, dns_server, results) as ms:
            ms.send_email(hello("before@example.org"))
            results.wait_count(1)
            store.hang.set()
            assert _wait_until(lambda: (ms.worker_status.paused or "").startswith("store: "), 5)
            queued = ms.send_email(hello("during@example.org", 1))
            store.hang.clear()
            store.unhang.set()  # the look comes back, and worked
            results.wait_count(2)
            assert ms.worker_status.paused is None
            assert store.status(queued).recipient("during@example.org").state.value == "delivered"
    finally:
        store.unhang.set()
        store.close()
