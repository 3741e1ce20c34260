"""Metrics and health of a running worker (issue 11 §3): what /metrics and /healthz say
during real deliveries to a loopback receiver, and when the store goes away."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mailstrom import Config, Email, Mailstrom, RecipientState
from mailstrom.message.prepared import PreparedMessage
from mailstrom.ops.exporter import MailstromCollector
from mailstrom.ops.server import Health, HealthCheck, OpsServer
from mailstrom.runtime.metrics import QueueStatsCache
from mailstrom.runtime.worker import Worker
from mailstrom.status import MetricsSnapshot, WorkerStatus
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.dead_holders import live_workers
from mailstrom.stores.operator import Suspension
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration.test_worker_modes import _wait_until
from tests.support.delivery import Results, loopback_config
from tests.support.ops_http import healthz, scrape, value
from tests.support.waiting import eventually


def hello(to: str, n: int = 0) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject=f"n{n}", text=f"Hello {n}")


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    for domain in ("example.org", "example.net"):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


class Served:
    """A thread-mode Mailstrom on SQLite with /metrics and /healthz on an ephemeral port."""

    def __init__(self, config: Config, path: Path) -> None:
        self.results = Results()
        self.store = SQLiteStore(path)
        self.ms = Mailstrom(config, store=self.store, worker="thread", on_result=self.results)
        worker = self.ms.worker
        assert isinstance(worker, Worker)
        # The queue gauges are read fresh on every scrape here, so that a test sees them move.
        cache = QueueStatsCache(self.store, max_age=0)

        def snapshot() -> MetricsSnapshot:
            stats, at = cache.get()
            return MetricsSnapshot(worker=self.ms.worker_status, queue=stats, queue_read_at=at)

        health = HealthCheck(
            status=lambda: self.ms.worker_status, responsive=worker.responsive, store=self.store
        )
        self.server = OpsServer("127.0.0.1", 0, snapshot=snapshot, health=health)
        self.server.start()
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()
        self.ms.stop(timeout=5)
        self.store.close()


@pytest.fixture
def served(mx: Any, dns_server: LoopbackDNS, tmp_path: Path) -> Iterator[Served]:
    config = loopback_config(dns_server, mx.port, metrics_domains=("example.org",))
    s = Served(config, tmp_path / "q.db")
    s.ms.start()
    try:
        yield s
    finally:
        s.close()


def test_counters_move_by_what_was_delivered(served: Served, mx: Any) -> None:
    mx.rcpt_replies["later@example.net"] = "451 4.7.1 Greylisted, try later"
    before = scrape(served.url)
    assert value(before, "mailstrom_worker_up") == 1
    assert value(before, "mailstrom_info", version=__import__("mailstrom").__version__) == 1

    served.ms.send_email(hello("a@example.org", 1))
    served.ms.send_email(hello("b@example.org", 2))
    served.ms.send_email(hello("later@example.net", 3))
    served.results.wait_count(3)
    after = scrape(served.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mailstrom_results_total", state="delivered") == 2
    assert delta("mailstrom_results_total", state="deferred") == 1
    assert delta("mailstrom_results_total", state="failed") == 0
    # Attempts by outcome and reason class: a class when the result carries one, else none.
    delivered = {k: v for k, v in after.items() if k[0] == "mailstrom_attempts_total"}
    assert sum(v for k, v in delivered.items() if ("outcome", "delivered") in k[1]) == 2
    assert sum(v for k, v in delivered.items() if ("outcome", "temporary") in k[1]) == 1
    assert all(dict(k[1])["reason_class"] for k in delivered)
    # Only the configured domain is named; the rest is "other".
    assert delta("mailstrom_domain_results_total", domain="example.org", state="delivered") == 2
    assert delta("mailstrom_domain_results_total", domain="other", state="deferred") == 1
    assert not any(
        dict(k[1]).get("domain") == "example.net"
        for k in after
        if k[0] == "mailstrom_domain_results_total"
    )
    # Histograms: one observation per attempt; queue delay only for deliveries.
    assert delta("mailstrom_attempt_duration_seconds_count", outcome="delivered") == 2
    assert delta("mailstrom_attempt_duration_seconds_count", outcome="temporary") == 1
    assert delta("mailstrom_queue_delay_seconds_count") == 2
    assert value(after, "mailstrom_queue_delay_seconds_bucket", le="+Inf") == 2
    assert 0 < value(after, "mailstrom_queue_delay_seconds_sum") < 60
    # Queue depth from the store.
    assert value(after, "mailstrom_queue_recipients", state="delivered") == 2
    assert value(after, "mailstrom_queue_recipients", state="deferred") == 1
    assert value(after, "mailstrom_queue_pending_recipients", domain="example.net") == 1
    assert value(after, "mailstrom_queue_messages") == 3
    assert value(after, "mailstrom_store_up") == 1
    assert value(after, "mailstrom_store_errors_total") == 0
    # Nothing labelled by address, ever.
    assert not any("@" in v for k in after for _, v in k[1])


def test_library_snapshot_agrees_with_the_scrape(served: Served) -> None:
    served.ms.send_email(hello("a@example.org"))
    served.results.wait_count(1)
    snap = served.ms.metrics()
    assert snap.worker.delivered == 1
    assert snap.worker.metrics.attempts == {("delivered", "none"): 1}
    assert snap.worker.metrics.queue_delay is not None
    assert snap.worker.metrics.queue_delay.count == 1
    assert snap.queue is not None
    assert snap.queue.by_state[RecipientState.DELIVERED] == 1


def test_healthz_is_200_while_running_and_503_when_the_database_is_deleted(
    served: Served,
) -> None:
    code, body = healthz(served.url)
    assert code == 200, body
    assert body["status"] == "ok"
    assert body["worker"]["loop"] == "ok"
    assert body["store"] == {"ok": True}

    os.unlink(served.store.path)  # the store is gone: StoreCorrupt from now on

    code, body = healthz(served.url)
    assert code == 503
    assert body["status"] == "fail"
    assert "StoreCorrupt" in body["store"]["error"]
    assert "deleted" in body["store"]["error"]


def test_unknown_path_is_404(served: Served) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{served.url}/", timeout=10)
    with info.value as error:
        assert error.code == 404


@pytest.mark.parametrize("host", ["rebound.example", "rebound.example:9466", "10.0.0.1", ""])
def test_on_loopback_only_loopback_names_are_answered(served: Served, host: str) -> None:
    """DNS rebinding: a page on another site that rebinds its name to 127.0.0.1 asks
    with its own name as Host; the metrics name the domains mailed most."""
    port = served.server.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/metrics", skip_host=True)
        if host:
            conn.putheader("Host", host)
        conn.endheaders()
        refused = conn.getresponse()
        assert refused.status == 400 and b"example.org" not in refused.read()
    finally:
        conn.close()
    for name in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/healthz", headers={"Host": name})
            answer = conn.getresponse()
            assert answer.status == 200
            answer.read()
        finally:
            conn.close()


def test_process_mode_reports_the_childs_metrics(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A worker process sends its numbers with its status twice a second."""
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    config = loopback_config(dns_server, mx.port)
    with Mailstrom(config, store=store, on_result=results) as ms:
        assert ms.worker_mode == "process"
        ms.send_email(hello("a@example.org"))
        results.wait_count(1)
        # The child reports every 0.5 s: poll its reports, no event announces them.
        deadline = time.monotonic() + 10
        while ms.metrics().worker.metrics.attempts.get(("delivered", "none")) != 1:
            assert time.monotonic() < deadline, ms.metrics()
            time.sleep(0.05)
        snap = ms.metrics()
        assert snap.worker.metrics.queue_delay is not None
        assert snap.worker.metrics.queue_delay.count == 1
    store.close()


def test_worker_command_serves_metrics(mx: Any, dns_server: LoopbackDNS, tmp_path: Path) -> None:
    """``mailstrom worker --metrics 127.0.0.1:0`` logs where it serves, and serves there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / ".config"),
        PYTHONUNBUFFERED="1",
        MAILSTROM_STORE=f"sqlite:///{tmp_path / 'q.db'}",
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_SMTP_PORT=str(mx.port),
        MAILSTROM_DNS_NAMESERVERS=dns_server.dns_config.nameservers[0],
        MAILSTROM_DNS_PORT=str(dns_server.dns_config.port),
        MAILSTROM_ALLOW_LOOPBACK="1",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailstrom",
            "worker",
            "--no-live",
            "--log-format",
            "json",
            "--metrics",
            "127.0.0.1:0",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            found = re.search(r'"url": "(http://[^"]+)/metrics"', line)
            if found:
                url = found.group(1)
            if '"worker started"' in line:
                break
        assert url is not None
        assert value(scrape(url), "mailstrom_worker_up") == 1
        assert healthz(url)[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.postgres
def test_healthz_is_503_when_postgresql_stops(tmp_path: Path) -> None:
    """A server of its own, so that stopping it troubles no other test."""
    from mailstrom.stores.postgres import PostgresStore
    from tests.fixtures.postgres import ThrowawayPostgres

    server = ThrowawayPostgres().start()
    store: PostgresStore | None = None
    ms: Mailstrom | None = None
    ops: OpsServer | None = None
    try:
        store = PostgresStore(server.create_database(), timeout=2)
        ms = Mailstrom(Config(helo_name="client.test"), store=store, worker="thread")
        worker = ms.worker
        assert isinstance(worker, Worker)
        ms.start()
        health = HealthCheck(
            status=lambda: worker.status, responsive=worker.responsive, store=store
        )
        ops = OpsServer("127.0.0.1", 0, snapshot=ms.metrics, health=health)
        ops.start()
        code, body = healthz(ops.url)
        assert code == 200, body

        server.stop()

        code, body = healthz(ops.url)
        assert code == 503
        assert body["store"]["ok"] is False and body["store"]["error"]
        # The scrape still answers while the store is down; the queue gauges are left out.
        assert value(scrape(ops.url), "mailstrom_worker_up") == 1
    finally:
        if ops is not None:
            ops.close()
        if ms is not None:
            ms.stop(timeout=1)
        if store is not None:
            store.close()
        server.stop()


def _workers_exported(ms: Mailstrom) -> float | None:
    registry = CollectorRegistry()
    registry.register(MailstromCollector(ms.metrics))
    return registry.get_sample_value("mailstrom_workers")


def test_an_application_that_only_enqueues_sees_how_many_workers_deliver(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    config = loopback_config(dns_server, mx.port)
    path = tmp_path / "q.db"
    alone = Mailstrom(config, store=path, worker=None)
    try:
        alone.send_email(hello("bob@example.org"))
        assert alone.metrics().workers == 0  # queued, and nobody to deliver it
        assert _workers_exported(alone) == 0
    finally:
        alone.stop()
    with Mailstrom(config, store=path, worker="thread"):
        watching = Mailstrom(config, store=path, worker=None)
        try:
            assert _wait_until(
                lambda: len(live_workers(watching.store) or []) == 1, 20
            )  # its first look
            assert watching.metrics().workers == 1
            assert _workers_exported(watching) == 1
        finally:
            watching.stop()
    with Mailstrom(config, store=MemoryStore(), worker="thread") as memory:
        assert memory.metrics().workers is None  # a memory store cannot tell
        assert _workers_exported(memory) is None


def test_a_domain_named_other_counts_with_the_rest_not_as_a_second_series(
    dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """An address such as user@other has the domain "other", the label of the rest: it
    was named among the busiest domains as well, two series with one label set (Prometheus
    keeps one and drops the other)."""
    config = loopback_config(dns_server, 25)
    with Mailstrom(config, store=tmp_path / "q.db", worker=None) as ms:
        for i in range(12):  # two past the ten named: the rest has 2
            ms.send_email(hello(f"user@d{i:02}.example"))
        for i in range(3):
            ms.send_email(hello(f"user{i}@other"))
        registry = CollectorRegistry()
        registry.register(MailstromCollector(ms.metrics))
        text = generate_latest(registry).decode()
        rest = registry.get_sample_value("mailstrom_queue_pending_recipients", {"domain": "other"})
    samples = [
        sample.labels["domain"]
        for family in text_string_to_metric_families(text)
        if family.name == "mailstrom_queue_pending_recipients"
        for sample in family.samples
    ]
    assert len(samples) == len(set(samples)) == 11, samples
    assert rest == 2 + 3  # d10, d11 and the three at "other"


class _DistantStore(SQLiteStore):
    """A store whose database takes a while to answer (PostgreSQL across a network)."""

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        time.sleep(0.5)
        return super().suspensions(now=now)


def test_healthz_is_503_while_the_worker_cannot_record(tmp_path: Path) -> None:
    """The store check is a read, and reads went on while the worker's writes failed (a
    write lock held elsewhere, a full disk, a read-only database): /healthz said 200, "ok",
    for a worker that could neither lease nor record a result."""
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=0.05)
    config = Config(helo_name="client.test", poll_interval=0.05)
    with Mailstrom(config, store=store, worker="thread") as ms:
        worker = ms.worker
        assert isinstance(worker, Worker)
        health = HealthCheck(
            status=lambda: ms.worker_status, responsive=worker.responsive, store=store
        )
        server = OpsServer("127.0.0.1", 0, snapshot=ms.metrics, health=health)
        server.start()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            assert healthz(server.url)[0] == 200
            other.execute("BEGIN IMMEDIATE")  # the write lock, held
            assert eventually(lambda: ms.worker_status.store_error is not None, 10)
            code, body = healthz(server.url)
            assert code == 503, body
            assert body["status"] == "fail"
            assert "write lock" in body["store"]["worker_error"]
            other.execute("ROLLBACK")
            assert eventually(lambda: ms.worker_status.store_error is None, 10)
            assert healthz(server.url)[0] == 200
        finally:
            other.close()
            server.close()
    store.close()


def test_healthz_names_the_store_while_the_loop_waits_for_a_write_lock(tmp_path: Path) -> None:
    """An SQLite call waits on the worker's loop for a write lock held elsewhere, up to
    busy_timeout (30 s by default): /healthz said "loop": "not responding" beside a store
    that was "ok", sending the operator after a frozen worker (a worker process's parent
    knows it waits and does not kill it) rather than at whoever holds the lock."""
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=60)
    config = Config(helo_name="client.test", poll_interval=0.05)
    with Mailstrom(config, store=store, worker="thread") as ms:
        worker = ms.worker
        assert isinstance(worker, Worker)
        health = HealthCheck(
            status=lambda: ms.worker_status, responsive=worker.responsive, store=store
        )
        server = OpsServer("127.0.0.1", 0, snapshot=ms.metrics, health=health)
        server.start()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            assert healthz(server.url)[0] == 200
            other.execute("BEGIN IMMEDIATE")  # the write lock, held
            assert eventually(lambda: ms.worker_status.store_wait_since is not None, 10)
            code, body = healthz(server.url)
            assert code == 503, body
            assert body["status"] == "fail"
            assert body["worker"]["loop"] == "waiting for the store"
            since = ms.worker_status.store_wait_since
            assert since is not None
            assert body["store"]["worker_waiting_since"] == since.isoformat()
            other.execute("ROLLBACK")
            assert eventually(lambda: healthz(server.url)[0] == 200, 10)
        finally:
            other.close()
            server.close()
    store.close()


def test_health_checks_at_the_same_time_share_the_store_check(
    dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A liveness and a readiness probe arriving together: the second one failed at once,
    "a store check has not answered for over 3 s", while the first one's check, started a
    moment before, was still on its way."""
    config = loopback_config(dns_server, 25)
    path = tmp_path / "q.db"
    with Mailstrom(config, store=path, worker="thread") as ms:
        worker = ms.worker
        assert isinstance(worker, Worker)
        distant = _DistantStore(path)
        health = HealthCheck(
            status=lambda: ms.worker_status, responsive=worker.responsive, store=distant
        )
        server = OpsServer("127.0.0.1", 0, snapshot=ms.metrics, health=health)
        server.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: healthz(server.url), range(4)))
        finally:
            server.close()
            distant.close()
    assert [code for code, _ in answers] == [200] * 4, answers


def test_it_serves_on_an_ipv6_loopback_address() -> None:
    """parse_listen takes "[::1]:9466", but the server was the stdlib's IPv4 one: it could
    not bind ("Address family for hostname not supported"), and `worker --metrics` exited 78."""
    server = OpsServer(
        "::1",
        0,
        snapshot=lambda: MetricsSnapshot(worker=WorkerStatus(running=True)),
        health=lambda: Health(ok=True, details={"status": "ok"}),
    )
    server.start()
    try:
        assert server.url == f"http://[::1]:{server.port}"
        assert healthz(server.url) == (200, {"status": "ok"})
        # Still a loopback server: a rebound name is refused.
        conn = http.client.HTTPConnection("::1", server.port, timeout=10)
        try:
            conn.request("GET", "/healthz", headers={"Host": "rebound.example"})
            assert conn.getresponse().status == 400
        finally:
            conn.close()
    finally:
        server.close()


def test_a_name_that_resolves_to_loopback_is_a_loopback_server() -> None:
    """The Host check was decided by the text of the address, so "LOCALHOST" (or the
    machine's own name, which Debian maps to 127.0.1.1) listened on loopback without it,
    and a page that rebinds its name to 127.0.0.1 read the metrics."""
    server = OpsServer(
        "LOCALHOST",
        0,
        snapshot=lambda: MetricsSnapshot(worker=WorkerStatus(running=True)),
        health=lambda: Health(ok=True, details={"status": "ok"}),
    )
    server.start()
    try:
        assert server.url == f"http://127.0.0.1:{server.port}"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Host": "rebound.example"})
            refused = conn.getresponse()
            assert refused.status == 400, refused.read()
        finally:
            conn.close()
        assert healthz(server.url) == (200, {"status": "ok"})
    finally:
        server.close()


@pytest.mark.parametrize(
    "head",
    [
        b"Host: 127.0.0.1\r\nHost: rebound.example\r\n",  # two: which one names the server?
        b"",  # HTTP/1.1 without a Host
    ],
)
def test_a_request_without_exactly_one_host_is_a_400(served: Served, head: bytes) -> None:
    """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host, and
    to any request with more than one. The loopback check read the first Host only (and a
    proxy in front may route by another), so two of them were answered with the metrics."""
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + head + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]
    assert b"example.org" not in answer


def test_workers_are_left_out_with_the_queue_counts_when_the_store_does_not_answer(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    # The worker count is read with the queue counts: once the SQLite file is gone the
    # counts fail, and a 0 beside them would tell an alert that no worker runs.
    path = tmp_path / "q.db"
    ms = Mailstrom(loopback_config(dns_server, mx.port), store=path, worker=None)
    try:
        ms.send_email(hello("bob@example.org"))
        os.unlink(path)  # the store is gone: its reads fail from now on
        registry = CollectorRegistry()
        registry.register(MailstromCollector(ms.metrics))
        families = {
            f.name for f in text_string_to_metric_families(generate_latest(registry).decode())
        }
        assert "mailstrom_queue_recipients" not in families  # the store did not answer
        assert "mailstrom_workers" not in families
        assert "mailstrom_worker_up" in families  # the scrape itself answered
    finally:
        ms.stop()


class _CountingStore(SQLiteStore):
    """An SQLite store that counts, per thread name, the thousands of SQLite VM steps its
    statements take: what a query costs, without timing it."""

    def __init__(self, path: Path) -> None:
        self.steps: dict[str, int] = {}
        super().__init__(path)

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()

        def step() -> int:
            name = threading.current_thread().name
            self.steps[name] = self.steps.get(name, 0) + 1
            return 0

        conn.set_progress_handler(step, 1000)
        return conn


def test_a_health_check_costs_the_same_whatever_the_queue_holds(
    dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The store check asked for the next due time, which walks the due index past every
    recipient of a suspended domain (and, on PostgreSQL, of a held message): with a big
    destination suspended, each probe, every second, scanned its whole backlog, and at a
    million recipients took near the 3 s that fail the check."""
    store = _CountingStore(tmp_path / "q.db")
    now = datetime.now(UTC)
    store.suspend("big.test", now=now)
    body = b"Subject: x\r\n\r\nx\r\n"
    for part in range(4):
        store.enqueue_many(
            [
                PreparedMessage(
                    data=body,
                    envelope_from="app@sender.test",
                    recipients=(f"a{i}@big.test", f"b{i}@big.test"),
                )
                for i in range(part * 2500, (part + 1) * 2500)
            ],
            now=now,
        )
    config = loopback_config(dns_server, 25)
    with Mailstrom(config, store=store, worker="thread") as ms:
        worker = ms.worker
        assert isinstance(worker, Worker)
        health = HealthCheck(
            status=lambda: ms.worker_status, responsive=worker.responsive, store=store
        )
        server = OpsServer("127.0.0.1", 0, snapshot=ms.metrics, health=health)
        server.start()
        try:
            for _ in range(3):
                code, answer = healthz(server.url)
                assert code == 200, answer
        finally:
            server.close()
    store.close()
    # Three checks of a store holding 20,000 suspended recipients: a few thousand steps
    # read the suspensions; walking the backlog takes hundreds of thousands.
    assert store.steps.get("mailstrom-health", 0) < 30, store.steps
