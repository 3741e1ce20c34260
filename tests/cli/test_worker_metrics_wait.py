"""``mailstrom worker --metrics`` answers while the worker waits for its store: /healthz
503 saying so, /metrics with ``mailstrom_store_waiting 1``, instead of "connection
refused" until the database is up. A bad --metrics address fails at once, not once the
store opened. The wait itself: tests/cli/test_worker_store_down.py."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import threading
import time
from typing import IO, Any

import pytest

from tests.cli.conftest import CLI
from tests.fixtures.postgres import ThrowawayPostgres, _free_port
from tests.support.ops_http import healthz, scrape

PASSWORD = "s3cret-pw"


class StderrLines:
    """A process's stderr lines as they come, read on a thread: a test waits for a line
    with a deadline instead of blocking for ever on a process that never writes it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._lines.put(line.decode())
        self._lines.put("")  # end of file

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout:g} s; stderr so far: {self.seen}")
            self.seen.append(line)
            if text in line:
                return line
            assert line, f"exited without logging {text!r}: {self.seen}"

    def rest(self) -> str:
        """Everything after the process exited (the reader reaches end of file)."""
        self._thread.join(5)
        while not self._lines.empty():
            self.seen.append(self._lines.get())
        return "".join(self.seen)


class WorkerProcess:
    """``mailstrom worker --metrics 127.0.0.1:0`` on ``url`` (and ``options``), once it
    said where it serves."""

    def __init__(self, cli: CLI, url: str, *options: str) -> None:
        self.proc = cli.popen(
            "worker",
            "--no-live",
            "--log-format",
            "json",
            "--store",
            url,
            "--metrics",
            "127.0.0.1:0",
            *options,
        )
        assert self.proc.stderr is not None
        self.stderr = StderrLines(self.proc.stderr)
        try:
            line = self.stderr.wait_for('"serving metrics"')
        except BaseException:
            self.stopped()  # no process left behind by a failing test
            raise
        found = re.search(r'"url": "(http://[^"]+)/metrics"', line)
        assert found is not None
        self.url = found.group(1)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        return healthz(self.url)

    def metrics(self) -> dict[str, float]:
        """The samples without labels, by name."""
        return {name: sample for (name, labels), sample in scrape(self.url).items() if not labels}

    def stopped(self, timeout: float = 5) -> tuple[int, str]:
        """SIGTERM; the exit code (within ``timeout`` seconds) and the whole of stderr."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        err = self.stderr.rest()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode, err


def unreachable_url() -> str:
    """A PostgreSQL store on a loopback port nothing listens on (with a password)."""
    return f"postgresql://mailstrom:{PASSWORD}@127.0.0.1:{_free_port()}/mail"


def test_health_and_metrics_answer_while_the_store_does_not(cli: CLI) -> None:
    worker = WorkerProcess(cli, unreachable_url())
    try:
        # The second try's line: the opener logs a failure just before it reports it.
        worker.stderr.wait_for("store cannot be opened (try 2;")
        code, body = worker.healthz()
        assert code == 503, body
        assert body["status"] == "waiting"
        assert body["reason"] == "the worker waits for its store to open"
        assert body["worker"]["running"] is False
        assert body["store"]["ok"] is False
        assert body["store"]["failed_tries"] >= 2
        assert "Connection refused" in body["store"]["error"], body
        assert PASSWORD not in json.dumps(body)

        samples = worker.metrics()
        assert samples["mailstrom_worker_up"] == 0
        assert samples["mailstrom_store_up"] == 0
        assert samples["mailstrom_store_waiting"] == 1
        assert samples["mailstrom_store_open_failures_total"] >= 1
        # The queue's counts need the store: left out, not made up.
        assert "mailstrom_queue_messages" not in samples
    finally:
        code, err = worker.stopped()
    assert code == 0, err
    assert "worker stopped before its store opened" in err
    assert PASSWORD not in err


def test_a_bad_metrics_address_fails_before_the_store_wait(cli: CLI) -> None:
    """It was reported only once the store opened: never, while the database is down."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = cli(
            "worker", "--no-live", "--store", unreachable_url(), "--metrics", f"127.0.0.1:{port}",
            timeout=10,
        )  # fmt: skip
    assert result.code == 78, result.err
    assert f"--metrics 127.0.0.1:{port}: cannot listen" in result.err
    assert "store cannot be opened" not in result.err


def test_once_still_does_not_wait(cli: CLI) -> None:
    """--once (cron) exits 75 at once, metrics or not: the next run tries again."""
    result = cli(
        "worker", "--once", "--no-live", "--store", unreachable_url(), "--metrics", "127.0.0.1:0",
        timeout=20,
    )  # fmt: skip
    assert result.code == 75, result.err


@pytest.mark.postgres
def test_health_turns_ok_once_the_store_is_up(own_postgres: ThrowawayPostgres, cli: CLI) -> None:
    url = own_postgres.create_database()
    own_postgres.take_down()
    worker = WorkerProcess(cli, url)
    try:
        worker.stderr.wait_for("store cannot be opened (try 1;")
        assert worker.healthz()[0] == 503
        own_postgres.bring_up()
        worker.stderr.wait_for('"worker started"')
        code, body = worker.healthz()
        assert code == 200, body
        assert body["status"] == "ok" and body["store"] == {"ok": True}
        samples = worker.metrics()
        assert samples["mailstrom_worker_up"] == 1
        assert samples["mailstrom_store_waiting"] == 0
        assert samples["mailstrom_store_open_failures_total"] >= 1
        assert "mailstrom_queue_messages" in samples
    finally:
        code, err = worker.stopped()
    assert code == 0, err
