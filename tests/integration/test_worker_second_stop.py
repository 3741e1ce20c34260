"""A second stop while the first still drains (``Worker.request_stop`` called twice): the
shortest deadline asked for wins at once, a longer one never extends it. Against a real
SQLite store and a loopback SMTP server that holds the final dot."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom import AsyncMailstrom, Mailstrom
from mailstrom.message import prepare
from mailstrom.runtime.worker import Worker
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration.test_engine import hello
from tests.integration.test_worker_stop_give_back import _until
from tests.integration.test_worker_store_error import PATIENT
from tests.support.delivery import loopback_config

LONG = 300.0
"""The first stop's drain: far past every bound of the test."""

SLACK = 4.0
"""Seconds past the shorter drain a stop may take (the last write's grace, a loaded
machine): far short of ``LONG``."""


async def _stalled_worker(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, store: SQLiteStore
) -> tuple[Worker, asyncio.Task[None], str]:
    """A worker with one delivery in flight, held at its final dot by the server."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    mid = store.enqueue(prepare(hello("u@example.org")), now=datetime.now(UTC))
    worker = Worker(loopback_config(dns_server, mx.port, timeouts=PATIENT), store)
    run = asyncio.create_task(worker.run())
    assert await _until(lambda: mx.received, 10)
    return worker, run, mid


def _leased(store: SQLiteStore) -> int:
    return sum(holder.leased for holder in store.live_holders())


async def test_a_second_shorter_stop_cuts_the_drain_short(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """First a stop that lets the delivery finish (a long drain), then, impatient, one
    of 0.5 s: the drain already waiting went on with the first timeout, and the worker
    held its leases as long."""
    store = SQLiteStore(tmp_path / "q.db")
    try:
        worker, run, mid = await _stalled_worker(smtp_server, dns_server, store)
        worker.request_stop(drain_timeout=LONG)
        await asyncio.sleep(0.2)  # the drain is waiting
        began = time.monotonic()
        worker.request_stop(drain_timeout=0.5)
        await asyncio.wait_for(asyncio.shield(run), 0.5 + SLACK)
        took = time.monotonic() - began
        assert not store.status(mid).is_final
        assert _leased(store) == 0  # given back, due at once
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        store.close()
    assert took < 0.5 + SLACK, took


async def test_a_second_longer_stop_does_not_extend_the_first(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A stop of 0.5 s, then one with a long drain and one with none (as long as it
    takes): the first bound stands."""
    store = SQLiteStore(tmp_path / "q.db")
    try:
        worker, run, mid = await _stalled_worker(smtp_server, dns_server, store)
        began = time.monotonic()
        worker.request_stop(drain_timeout=0.5)
        worker.request_stop(drain_timeout=LONG)
        worker.request_stop(drain_timeout=None)
        await asyncio.wait_for(asyncio.shield(run), 0.5 + SLACK)
        took = time.monotonic() - began
        assert not store.status(mid).is_final
        assert _leased(store) == 0
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        store.close()
    assert took < 0.5 + SLACK, took


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_second_stop_of_the_facade_reaches_the_worker(
    mode: str, smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """``Mailstrom.stop()`` with a long drain on one thread, then ``stop(0.5)`` on
    another: the second waited for the first's lock, the worker never heard of it, and
    both returned after the first's bound."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = SQLiteStore(tmp_path / "q.db")
    config = loopback_config(dns_server, mx.port, timeouts=PATIENT)
    ms = Mailstrom(config, store=store, worker=mode)  # type: ignore[arg-type]
    first = threading.Thread(target=ms.stop, args=(LONG,), daemon=True)
    try:
        ms.start()
        mid = ms.send_email(hello("u@example.org"))
        deadline = time.monotonic() + 10
        while not mx.received and time.monotonic() < deadline:
            time.sleep(0.02)  # a snapshot of the server: nothing to wait on
        assert mx.received
        first.start()
        time.sleep(0.3)  # the first stop is draining
        began = time.monotonic()
        ms.stop(0.5)
        took = time.monotonic() - began
        first.join(SLACK)
        assert not first.is_alive()
        assert not store.status(mid).is_final
        assert _leased(store) == 0
    finally:
        if first.is_alive():
            ms.stop(0)
        store.close()
    assert took < 0.5 + SLACK, took


async def test_a_second_stop_of_the_async_facade_reaches_the_worker_task(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The same for ``AsyncMailstrom`` with its worker in a task: the second ``stop()``
    waited for the first's lock."""
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = SQLiteStore(tmp_path / "q.db")
    ms = AsyncMailstrom(
        loopback_config(dns_server, mx.port, timeouts=PATIENT), store=store, worker="task"
    )
    first: asyncio.Task[None] | None = None
    try:
        await ms.start()
        mid = await ms.send_email(hello("u@example.org"))
        assert await _until(lambda: mx.received, 10)
        first = asyncio.create_task(ms.stop(LONG))
        await asyncio.sleep(0.3)  # the first stop is draining
        began = time.monotonic()
        await asyncio.wait_for(ms.stop(0.5), 0.5 + SLACK)
        took = time.monotonic() - began
        await asyncio.wait_for(first, SLACK)
        assert not store.status(mid).is_final
        assert _leased(store) == 0
    finally:
        if first is not None and not first.done():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        store.close()
    assert took < 0.5 + SLACK, took
