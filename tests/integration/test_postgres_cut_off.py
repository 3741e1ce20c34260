"""A worker cut off from a shared PostgreSQL queue, while another worker still reaches it.

The server is a real one; the cut is a TCP proxy between it and the cut-off worker only
(``tests.fixtures.tcp_proxy``), so the other worker's looks go on and, once the first's
beats have been missing for the store URL's ``dead_after``, take it for dead and deliver
what it leased (stores/postgres/holders.py). Before, the cut-off worker went on
delivering everything it had leased meanwhile: each of those recipients went out twice.
Now, after three quarters of ``dead_after`` without reaching the server, it starts none of
its leased work (runtime/worker_reaping.py): only the transactions already under way go
out from both workers. Looks the server refuses (no grant on ``lease_holders``) fail every
worker's alike, so nobody is taken for dead: they cut nothing off.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailstrom import Mailstrom
from mailstrom.errors import StoreError
from mailstrom.message import prepare
from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.postgres import ThrowawayPostgres
from tests.fixtures.tcp_proxy import TCPProxy
from tests.integration.test_worker_modes import hello
from tests.support.delivery import Results, loopback_config

pytestmark = pytest.mark.postgres

DEAD_AFTER = 2.0
"""Short, so that the other worker takes the cut-off one for dead within the test."""
QUEUED = [f"q{i}@example.org" for i in range(20)]
CUT = "cut.test"
OTHER = "other.test"
DEADLINE = 20.0


@pytest.fixture
def mx(smtp_server: Callable[..., Any], dns_server: LoopbackDNS) -> Any:
    server = smtp_server(starttls=False)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


@pytest.fixture
def proxy(postgres_server: ThrowawayPostgres) -> Iterator[TCPProxy]:
    with contextlib.closing(TCPProxy(("127.0.0.1", postgres_server.port))) as proxy:
        yield proxy


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)  # polling status snapshots; nothing to wait on


def _sent_by(mx: Any, helo: str) -> list[str]:
    return [to for m in mx.messages if m.helo == helo for to in m.rcpt_tos]


def _worker(
    dns: LoopbackDNS, mx: Any, helo: str, store: PostgresStore, results: Results | None = None
) -> Mailstrom:
    """A worker on ``store`` with one session to ``mx``, leasing for far longer than the
    test: only the beats can let another worker take anything over."""
    cfg = loopback_config(
        dns,
        mx.port,
        helo_name=helo,
        max_connections=1,
        max_per_destination=1,
        lease_for=timedelta(minutes=10),
    )
    return Mailstrom(cfg, store=store, worker="thread", on_result=results)


def _queue(url: str) -> None:
    with PostgresStore(url) as store:
        store.enqueue_many([prepare(hello(to)) for to in QUEUED], now=datetime.now(UTC))


def test_a_worker_cut_off_from_postgres_starts_none_of_its_leased_work(
    postgres_server: ThrowawayPostgres,
    postgres_url: str,
    proxy: TCPProxy,
    mx: Any,
    dns_server: LoopbackDNS,
) -> None:
    url = f"{postgres_url}?dead_after={DEAD_AFTER:g}s"
    direct = f"127.0.0.1:{postgres_server.port}/"
    assert direct in url
    through_proxy = url.replace(direct, f"127.0.0.1:{proxy.port}/")
    _queue(url)

    # Each transaction answered 0.5 s after its dot: the cut-off worker would need 10 s
    # for all it leases.
    mx.data_delay = 0.5
    cut = _worker(dns_server, mx, CUT, PostgresStore(through_proxy, timeout=1))
    other_results = Results()
    other: Mailstrom | None = None
    try:
        cut.start()
        mx.wait_for_received(1)  # it leased all twenty
        other = _worker(dns_server, mx, OTHER, PostgresStore(url), other_results)
        other.start()  # finds nothing to lease, and looks (and beats) from now on
        proxy.cut()

        # Within three quarters of dead_after it gives back what it has not started;
        # what was under way ends, and nothing more goes out from it.
        _until(lambda: cut.worker_status.in_flight == 0, DEADLINE, "nothing in flight")
        sent = _sent_by(mx, CUT)
        assert len(sent) < len(QUEUED) // 2, sent
        status = cut.worker_status
        assert status.running and (status.paused or "").startswith("store: not reached")
        mx.data_delay = 0

        # The other worker takes it for dead and delivers every recipient not recorded
        # before the cut: those the cut-off worker sent after it went out twice.
        _until(lambda: set(_sent_by(mx, OTHER)) | set(sent) >= set(QUEUED), DEADLINE, "all")
        assert _sent_by(mx, CUT) == sent
        copies = Counter(to for m in mx.messages for to in m.rcpt_tos)
        assert set(copies) == set(QUEUED)
        assert {to for to, n in copies.items() if n > 1} <= set(sent)
        assert max(copies.values()) <= 2

        # Back on the network, it leases again (nothing is left for it) and sends nothing.
        proxy.restore()
        _until(lambda: cut.worker_status.paused is None, DEADLINE, "leasing again")
        with PostgresStore(url) as store:
            _until(
                lambda: store.stats().by_state[RecipientState.DELIVERED] == len(QUEUED),
                DEADLINE,
                "all recorded delivered",
            )
        assert _sent_by(mx, CUT) == sent
    finally:
        proxy.restore()
        for ms in (cut, other):
            if ms is not None:
                ms.stop(timeout=10)
                ms.store.close()


class LooksRefused(PostgresStore):
    """A PostgreSQL store whose looks, after the first, fail as the server fails them
    for a role without grants on ``lease_holders``; every other call works."""

    looks = 0

    def release_dead_holders(self, alive: str | None = None) -> int:
        self.looks += 1
        if self.looks > 1:
            raise StoreError("PostgreSQL store: beat_holder failed: permission denied")
        return super().release_dead_holders(alive)


def test_looks_the_server_refuses_cut_nothing_off(
    postgres_url: str, mx: Any, dns_server: LoopbackDNS
) -> None:
    _queue(f"{postgres_url}?dead_after={DEAD_AFTER:g}s")
    store = LooksRefused(f"{postgres_url}?dead_after={DEAD_AFTER:g}s", timeout=1)
    mx.data_delay = 0.2  # 4 s for all: well past dead_after without a look that works
    results = Results()
    ms = _worker(dns_server, mx, CUT, store, results)
    try:
        ms.start()
        results.wait_final(set(QUEUED), timeout=DEADLINE)
        assert store.looks > 8
        assert ms.worker_status.paused is None
    finally:
        ms.stop(timeout=10)
        store.close()


def test_a_worker_frozen_past_dead_after_sends_none_of_what_was_taken_from_it(
    postgres_url: str, mx: Any, dns_server: LoopbackDNS
) -> None:
    # Its process frozen (SIGSTOP, a VM paused; here its loop blocked) for longer than
    # dead_after, a worker is taken for dead and another delivers what it leased. It could
    # not see that coming: when it resumed, nothing stopped it sending all that too (its
    # heartbeat comes every lease_for / 3, minutes away), and every recipient of its lease
    # went out twice, not just the transactions under way.
    url = f"{postgres_url}?dead_after={DEAD_AFTER:g}s"
    _queue(url)
    mx.data_delay = 0.5
    frozen = _worker(dns_server, mx, CUT, PostgresStore(url))
    other: Mailstrom | None = None
    try:
        frozen.start()
        mx.wait_for_received(1)  # it leased all twenty
        other = _worker(dns_server, mx, OTHER, PostgresStore(url))
        other.start()
        loop = frozen.worker._loop
        assert loop is not None
        stalled = threading.Event()

        def freeze() -> None:
            stalled.set()
            time.sleep(3 * DEAD_AFTER)

        loop.call_soon_threadsafe(freeze)
        assert stalled.wait(5)
        before = _sent_by(mx, CUT)
        mx.data_delay = 0
        # The other worker takes it for dead and delivers everything not yet recorded.
        _until(lambda: set(_sent_by(mx, OTHER)) | set(before) >= set(QUEUED), DEADLINE, "all")
        with PostgresStore(url) as store:
            _until(
                lambda: store.stats().by_state[RecipientState.DELIVERED] == len(QUEUED),
                DEADLINE,
                "all recorded delivered",
            )
        _until(lambda: frozen.worker_status.in_flight == 0, DEADLINE, "nothing in flight")
        # Once thawed, only what it had on the wire at the freeze goes out from it.
        sent = _sent_by(mx, CUT)
        assert len(sent) <= len(before) + 3, (before, sent)
        copies = Counter(to for m in mx.messages for to in m.rcpt_tos)
        assert set(copies) == set(QUEUED)
        assert max(copies.values()) <= 2
    finally:
        for ms in (frozen, other):
            if ms is not None:
                ms.stop(timeout=10)
                ms.store.close()
