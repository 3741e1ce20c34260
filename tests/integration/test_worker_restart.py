"""A facade starts its worker process again when it dies without being asked
(client/process.py, client/supervision.py).

The killed child is a real one (SIGKILL as from the OOM killer); mail sent after its death
reaches a real loopback SMTP server through the child started in its place.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mailstrom import AsyncMailstrom, Mailstrom, RecipientState, Timeouts, WorkerStatus
from mailstrom.client import process, supervision
from mailstrom.client.process import WorkerProcess
from mailstrom.ops.exporter import MailstromCollector
from mailstrom.stores import SQLiteStore, Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration import test_worker_modes
from tests.integration.test_engine import write_lock_held
from tests.integration.test_worker_modes import _gone, _wait_until, config, hello
from tests.support.delivery import Results

mx = test_worker_modes.mx
"""A server that answers everything (the same fixture: pytest finds it by this name)."""


def _child(ms: Mailstrom | AsyncMailstrom) -> WorkerProcess:
    assert isinstance(ms.worker, WorkerProcess)
    return ms.worker


def _first_status(ms: Mailstrom | AsyncMailstrom, check: Any, timeout: float) -> WorkerStatus:
    """The first worker status that passes ``check``, polled (a snapshot; nothing to wait
    on): a restart gap lasts only a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ms.worker_status
        if check(status):
            return status
        time.sleep(0.01)
    raise AssertionError(f"no such status within {timeout} s; last: {ms.worker_status}")


def _no_restart_pending(before: set[threading.Thread]) -> bool:
    """No restart supervisor started since ``before`` is still running. Only those: one
    an earlier test left (its give-back still waiting for a store) is not this test's."""
    new = set(threading.enumerate()) - before
    return not any(t.name == "mailstrom-worker-supervisor" for t in new)


def restarts_exported(ms: Mailstrom) -> float | None:
    """``mailstrom_worker_restarts_total`` as Prometheus would scrape it from the facade."""
    registry = CollectorRegistry()
    registry.register(MailstromCollector(ms.metrics))
    return registry.get_sample_value("mailstrom_worker_restarts_total")


def _killed(status: WorkerStatus) -> bool:
    return not status.running and "SIGKILL" in (status.error or "")


def test_a_killed_worker_process_is_started_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        ms.send_email(hello("before@example.org"))
        results.wait_count(1)
        old = _child(ms).pid
        assert old is not None
        os.kill(old, signal.SIGKILL)

        gap = _first_status(ms, _killed, 15)
        assert gap.error == "worker process died (killed by SIGKILL); starting it again in 1 s"
        assert gap.dead  # health checks see the gap
        mid = ms.send_email(hello("after@example.org", 1))  # queued while none runs

        back = _first_status(ms, lambda s: s.running, 30)
        assert back.restarts == 1 and back.error is None
        assert restarts_exported(ms) == 1
        new = _child(ms).pid
        assert new is not None and new != old
        results.wait_count(2, timeout=30)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
        # The callback's counts go on across the restart: they are this process's.
        assert ms.worker_status.delivered == 2
    assert _wait_until(lambda: _gone(new), 15)
    assert [m.mail_from for m in mx.messages] == ["app@sender.test"] * 2
    died = [r for r in caplog.records if "died" in r.getMessage()]
    assert died and died[0].levelno == logging.ERROR
    assert any("started again" in r.getMessage() for r in caplog.records)
    store.close()


async def test_an_async_facade_starts_its_killed_worker_process_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    async with AsyncMailstrom(config(dns_server, mx.port), store=store) as ms:
        old = _child(ms).pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert _wait_until(lambda: _child(ms).pid not in (None, old), 30)
        mid = await ms.send_email(hello("after@example.org"))
        assert (await ms.wait(mid, timeout=30)).state is RecipientState.DELIVERED
        status = ms.worker_status
        assert status.running and status.restarts == 1
        new = _child(ms).pid
    assert new is not None and _wait_until(lambda: _gone(new), 15)
    store.close()


def test_stop_during_the_backoff_cancels_the_restart(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() does not wait out the backoff (here 30 s), and nothing is started after."""
    monkeypatch.setattr(supervision, "FIRST_DELAY", 30.0)
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)
    before = set(threading.enumerate())
    ms.start()
    old = _child(ms).pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _first_status(ms, lambda s: "starting it again in 30 s" in (s.error or ""), 15)
    began = time.monotonic()
    ms.stop()
    assert time.monotonic() - began < 5
    assert _no_restart_pending(before)
    assert _child(ms).pid is None
    assert _gone(old)
    status = ms.worker_status
    assert not status.running and status.restarts == 0
    assert status.error == (
        "worker process died (killed by SIGKILL); not started again: stop() came first"
    )
    store.close()


def test_a_worker_process_stopped_by_sigterm_stays_stopped(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """An operator's SIGTERM is meant: no restart, but the status says nothing delivers."""
    store = SQLiteStore(tmp_path / "q.db")
    before = set(threading.enumerate())
    with Mailstrom(config(dns_server, mx.port), store=store) as ms:
        pid = _child(ms).pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        status = _first_status(ms, lambda s: s.dead, 30)
        assert status.error == "worker process stopped by SIGTERM, not by this program"
        assert _wait_until(lambda: _gone(pid), 15)
        assert _no_restart_pending(before)
        assert ms.worker_status.restarts == 0 and not ms.worker_status.running
    store.close()


def test_a_killed_worker_process_is_started_again_where_sigchld_is_ignored(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """An application that ignores SIGCHLD (so that the kernel reaps its children) gets
    no exit status: waitpid() fails and Popen reports 0. A child killed by SIGKILL read
    as one that ended by itself, "without this program asking it to", and was not
    started again. A child that ends by itself says so first (its ``stopped`` frame)."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        store = SQLiteStore(tmp_path / "q.db")
        with Mailstrom(config(dns_server, mx.port), store=store) as ms:
            old = _child(ms).pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            gap = _first_status(ms, lambda s: not s.running and s.error is not None, 15)
            assert gap.error is not None and gap.error.startswith("worker process died")
            back = _first_status(ms, lambda s: s.running, 30)
            assert back.restarts == 1 and back.error is None
        store.close()
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_a_worker_process_started_from_a_thread_blocking_sigterm_still_stops_on_it(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A child inherits the signal mask of the thread that starts it (a server's thread
    that leaves signals to its main thread): with SIGTERM blocked it never saw the
    operator's SIGTERM, and went on delivering until someone sent SIGKILL."""
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config(dns_server, mx.port), store=store)

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ms.start()

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    try:
        pid = _child(ms).pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        status = _first_status(ms, lambda s: s.dead, 30)
        assert status.error == "worker process stopped by SIGTERM, not by this program"
    finally:
        ms.stop()
    store.close()


def test_a_worker_process_that_reported_a_permanent_error_is_not_started_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The database deleted under the child: it ends on StoreCorrupt and says so; a new
    child would fail the same way."""
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    before = set(threading.enumerate())
    with Mailstrom(config(dns_server, mx.port), store=store) as ms:
        pid = _child(ms).pid
        assert pid is not None
        os.unlink(path)
        ms.wake()  # the child's next store call finds the file gone
        status = _first_status(ms, lambda s: s.dead, 30)
        assert "StoreCorrupt" in (status.error or "")
        assert "deleted" in (status.error or "")
        assert _wait_until(lambda: _gone(pid), 15)
        assert _no_restart_pending(before)
        assert ms.worker_status.restarts == 0 and ms.worker_status.dead
    store.close()


# --- what a killed child had leased ----------------------------------------------------------

LONG_LEASE = timedelta(minutes=10)
"""Far longer than any wait below: only a lease given back explains a prompt delivery."""
PATIENT = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=120)
"""The child waits for the final reply well past the test's own waits (FAST's 2 s would
end the attempt, and record it, before the child is killed)."""


@pytest.fixture
def stalling_mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    """A server that takes a message's content and then does not answer, until the client
    hangs up (``stall_on = None`` lets the next attempt through)."""
    server = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


@pytest.fixture(params=["sqlite", "postgres"])
def durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store | str]:
    """The facade's store: an SQLiteStore, or a PostgreSQL URL the facade opens itself.
    On PostgreSQL nothing but the parent gives a dead child's leases back (no lock files,
    no reaper), so there only the parent's give-back explains a prompt delivery."""
    if request.param == "postgres":
        yield str(request.getfixturevalue("postgres_url"))
        return
    store = SQLiteStore(tmp_path / "q.db")
    yield store
    store.close()


def test_what_a_killed_worker_process_leased_is_delivered_by_the_next_one_at_once(
    stalling_mx: Any,
    dns_server: LoopbackDNS,
    durable_store: Store | str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A message in flight when the OOM killer struck: the restarted child delivers it
    within seconds, not once the dead child's lease expires (lease_for, 10 minutes)."""
    caplog.set_level(logging.INFO, "mailstrom.worker")
    mx = stalling_mx
    cfg = config(dns_server, mx.port, lease_for=LONG_LEASE, timeouts=PATIENT)
    with Mailstrom(cfg, store=durable_store, worker="process") as ms:
        mid = ms.send_email(hello("inflight@example.org"))
        mx.wait_for_received(1, timeout=15)  # its content is in: the child holds the lease
        old = _child(ms).pid
        assert old is not None
        mx.stall_on = None  # the next attempt is answered
        os.kill(old, signal.SIGKILL)

        assert _wait_until(lambda: ms.query_status(mid).state is RecipientState.DELIVERED, 15)
        (recipient,) = ms.query_status(mid).recipients
        assert recipient.attempts == 1  # the killed attempt recorded nothing, and counts none
        assert ms.worker_status.restarts == 1
    assert len(mx.received) == 2 and len(mx.messages) == 1
    assert any(
        "gave back 1 recipients the dead worker process had leased" in r.getMessage()
        for r in caplog.records
    )


def test_stop_gives_back_what_the_worker_process_it_killed_had_leased(
    stalling_mx: Any, dns_server: LoopbackDNS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that does not stop within the grace is killed: what it leased is due again
    as soon as stop() returns."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    mx = stalling_mx
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, lease_for=LONG_LEASE, timeouts=PATIENT)
    ms = Mailstrom(cfg, store=store)
    ms.start()
    mid = ms.send_email(hello("inflight@example.org"))
    mx.wait_for_received(1, timeout=15)
    pid = _child(ms).pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it cannot stop, nor give anything back, by itself
    ms.stop(timeout=0.1)
    assert _gone(pid)

    lease = store.lease(now=datetime.now(UTC), limit=10, lease_for=LONG_LEASE)
    assert lease is not None
    assert [r.address for i in lease.items for r in i.recipients] == ["inflight@example.org"]
    assert lease.items[0].message_id == mid and lease.items[0].recipients[0].attempts == 0
    store.close()


def test_stop_gives_back_what_a_worker_process_killed_while_it_stopped_had_leased(
    stalling_mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A child killed by someone else (the OOM killer, an operator's ``kill -9`` of a
    shutdown that seems stuck) while stop() waits for its drain: stop() saw it exit in
    time and gave nothing back, and what it leased waited for its lease to expire
    (lease_for, 15 minutes by default), though stop() promises it due at once."""
    mx = stalling_mx
    store = SQLiteStore(tmp_path / "q.db")
    cfg = config(dns_server, mx.port, lease_for=LONG_LEASE, timeouts=PATIENT)
    ms = Mailstrom(cfg, store=store)
    ms.start()
    mid = ms.send_email(hello("inflight@example.org"))
    mx.wait_for_received(1, timeout=15)
    worker = _child(ms)
    pid = worker.pid
    assert pid is not None
    stopping = threading.Thread(target=ms.stop, kwargs={"timeout": 60})
    stopping.start()
    assert _wait_until(lambda: worker._stopping, 10)  # it drains: the delivery stalls
    os.kill(pid, signal.SIGKILL)
    stopping.join(30)
    assert not stopping.is_alive()
    assert _gone(pid)

    lease = store.lease(now=datetime.now(UTC), limit=10, lease_for=LONG_LEASE)
    assert lease is not None
    assert [r.address for i in lease.items for r in i.recipients] == ["inflight@example.org"]
    assert lease.items[0].message_id == mid
    store.close()


def test_stop_is_bounded_while_the_dead_childs_leases_are_being_given_back(
    dns_server: LoopbackDNS, mx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child died while another process held the SQLite write lock: the give-back of
    what it leased waits for the store (busy_timeout, 30 s by default). stop() joined
    that wait unbounded, well past its documented bound (timeout + STOP_GRACE); it still
    starts no child once stop() came, whenever the give-back ends."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=4)
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    before = set(threading.enumerate())
    ms.start()
    try:
        pid = _child(ms).pid
        assert pid is not None
        with write_lock_held(path):
            os.kill(pid, signal.SIGKILL)
            assert _wait_until(lambda: _child(ms).restart_pending(), 5)
            time.sleep(0.2)  # the supervisor waits for the lock to give back
            began = time.monotonic()
            ms.stop(timeout=0.1)
            took = time.monotonic() - began
        assert took < 2.0, took
        assert _wait_until(lambda: _no_restart_pending(before), 10)
        assert _child(ms).pid is None  # no child started after stop()
    finally:
        store.close()


def test_start_after_a_stop_that_left_a_give_back_waiting_starts_one_child(
    dns_server: LoopbackDNS, mx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() returned (bounded) while the restart's give-back of the dead child's leases
    still waited for the store: that thread starts nothing once stop() came, yet the
    facade took it for a restart to come, and start() (or a with block) failed with
    "already started" for as long as the store made it wait, nothing running. Started
    now, and that thread starts no second child once its give-back ends."""
    monkeypatch.setattr(process, "STOP_GRACE", 0.3)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=4)
    ms = Mailstrom(config(dns_server, mx.port), store=store, worker="process")
    before = set(threading.enumerate())
    ms.start()
    try:
        pid = _child(ms).pid
        assert pid is not None
        with write_lock_held(path):
            os.kill(pid, signal.SIGKILL)
            assert _wait_until(lambda: _child(ms).restart_pending(), 5)
            ms.stop(timeout=0.1)
            assert not _no_restart_pending(before)  # its give-back still waits
            ms.start(timeout=30)
        new = _child(ms).pid
        assert new is not None and new != pid
        # Ended: any child it was to start, it has started by now.
        assert _wait_until(lambda: _no_restart_pending(before), 30)
        assert _child(ms).pid == new and ms.worker_status.restarts == 0
        mid = ms.send_email(hello("after@example.org"))
        assert ms.wait(mid, timeout=30).state is RecipientState.DELIVERED
    finally:
        ms.stop()
        store.close()


def _exported(ms: Mailstrom) -> dict[str, float]:
    """The counters a scrape of the facade's own registry reads."""
    registry = CollectorRegistry()
    registry.register(MailstromCollector(ms.metrics))
    delivered = {"outcome": "delivered", "reason_class": "none"}
    return {
        "attempts": registry.get_sample_value("mailstrom_attempts_total", delivered) or 0.0,
        "results": registry.get_sample_value("mailstrom_results_total", {"state": "delivered"})
        or 0.0,
        "delay": registry.get_sample_value("mailstrom_queue_delay_seconds_count") or 0.0,
    }


def test_counters_go_on_across_a_restart_of_the_worker_process(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A restarted child counts from 0, and the facade exported its numbers as they were:
    every counter of the process fell to 0 at the death, then started over, as if the
    application had restarted (and what the dead child counted was lost to Prometheus)."""
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store) as ms:
        first = ms.send_email(hello("before@example.org"))
        assert ms.wait(first, timeout=30).state is RecipientState.DELIVERED
        one = {"attempts": 1.0, "results": 1.0, "delay": 1.0}
        # The child reports twice a second: poll its reports, no event announces them.
        assert _wait_until(lambda: _exported(ms) == one, 15), _exported(ms)
        old = _child(ms).pid
        assert old is not None
        os.kill(old, signal.SIGKILL)

        _first_status(ms, _killed, 15)
        assert _exported(ms) == one  # in the gap
        _first_status(ms, lambda s: s.running, 30)
        assert _exported(ms) == one  # the new child has counted nothing yet
        second = ms.send_email(hello("after@example.org", 1))
        assert ms.wait(second, timeout=30).state is RecipientState.DELIVERED
        two = {"attempts": 2.0, "results": 2.0, "delay": 2.0}
        assert _wait_until(lambda: _exported(ms) == two, 15), _exported(ms)
        assert ms.worker_status.delivered == 2
        new = _child(ms).pid
    assert new is not None and _wait_until(lambda: _gone(new), 15)
    store.close()


def test_the_start_and_the_peak_of_leased_bytes_go_on_across_a_restart(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The counters go on across a restart, as a worker thread's do: ``started_at`` and
    ``leased_bytes_peak`` ("since the worker started") became the new child's, so the
    exported start time jumped to the restart under counters that had not started over,
    and the peak fell to 0."""
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(config(dns_server, mx.port), store=store) as ms:
        first = ms.send_email(hello("before@example.org"))
        assert ms.wait(first, timeout=30).state is RecipientState.DELIVERED
        assert _wait_until(lambda: ms.worker_status.leased_bytes_peak > 0, 15)
        before = ms.worker_status
        old = _child(ms).pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        _first_status(ms, _killed, 15)
        after = _first_status(ms, lambda s: s.running and s.holder != before.holder, 30)
    store.close()
    assert after.restarts == 1
    assert after.started_at == before.started_at
    assert after.leased_bytes_peak == before.leased_bytes_peak
