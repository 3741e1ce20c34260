"""``mailstrom worker`` started while PostgreSQL is down (issue #8): it waits for the
server and delivers once it is up, stops at once on SIGTERM meanwhile, and exits 78 at
once when the database refuses the role. ``--once`` does not wait (exit 75). The facade's
worker process: tests/integration/test_postgres_down_at_start.py."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from tests.cli.conftest import CLI, MailEnv, ended
from tests.fixtures.postgres import ThrowawayPostgres

pytestmark = pytest.mark.postgres


def worker_waiting(cli: CLI, url: str) -> subprocess.Popen[bytes]:
    """``mailstrom worker`` started while the store is down, once it said it waits."""
    proc = cli.popen("worker", "--no-live", "--store", url)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert "store cannot be opened (try 1; next in 0.05 s)" in line, line
    return proc


def test_the_worker_command_waits_for_postgresql(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    """It exited 75 at once; now it waits, and delivers what was queued once the server
    is up."""
    url = own_postgres.create_database()
    mail_env.cli.ok(
        "send", "--store", url, "--from", "a@client.test", "--to", "bob@example.test", "--text", "x"
    )
    own_postgres.take_down()
    proc = worker_waiting(mail_env.cli, url)
    own_postgres.bring_up()
    mail_env.mx.wait_for_messages(1, timeout=8)
    code, err = ended(proc, timeout=5)
    assert code == 0, err
    assert "store open after" in err and "worker started" in err


def test_the_worker_command_stops_while_waiting(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    url = own_postgres.create_database()
    own_postgres.take_down()
    proc = worker_waiting(mail_env.cli, url)
    code, err = ended(proc, timeout=5)
    assert code == 0, err
    assert "worker stopped before its store opened" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_the_worker_command_once_stops_on_a_signal_while_its_store_opens(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv, sig: signal.Signals
) -> None:
    """--once opened its store with no signal handled: a SIGTERM or SIGHUP while the
    opening waited (here for a lock an operator holds on schema_version) killed the
    worker by the signal instead of stopping it (exit 0), its buffered log lines lost."""
    url = own_postgres.create_database()
    mail_env.cli.ok("db", "migrate", "--store", url)
    with (
        psycopg.connect(url) as holder,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        holder.execute("LOCK TABLE schema_version IN ACCESS EXCLUSIVE MODE")
        proc = mail_env.cli.popen("worker", "--once", "--no-live", "--store", url)
        try:
            while not _waits_for_a_lock(watcher):
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.01)  # polling the server's view of its sessions
            proc.send_signal(sig)
            holder.rollback()  # the lock let go: nothing holds the worker now
            err = proc.communicate(timeout=30)[1].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert "worker stopped before its store opened" in err


def _waits_for_a_lock(conn: psycopg.Connection[tuple[int]]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return row is not None and row[0] > 0


def test_the_worker_command_once_does_not_wait(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    """--once (cron) exits 75 at once: the next run tries again."""
    url = own_postgres.create_database()
    own_postgres.take_down()
    result = mail_env.cli("worker", "--once", "--no-live", "--store", url, timeout=20)
    assert result.code == 75, result.err


def test_the_worker_command_exits_78_when_refused(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    url = own_postgres.create_database().replace("postgres@", "nobody@")
    result = mail_env.cli("worker", "--no-live", "--store", url, timeout=20)
    assert result.code == 78, result.err
    assert 'role "nobody" does not exist' in result.err


def test_the_worker_command_exits_78_for_a_role_granted_nothing(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    """The server let the role in, and its first read was refused ("permission denied for
    table schema_version"): the worker waited for a grant for ever."""
    url = own_postgres.create_database()
    assert mail_env.cli("db", "migrate", "--store", url, timeout=20).code == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE ROLE ungranted LOGIN")
    result = mail_env.cli(
        "worker", "--no-live", "--store", url.replace("postgres@", "ungranted@"), timeout=20
    )
    assert result.code == 78, result.err
    assert "permission denied for table schema_version" in result.err


def test_a_running_worker_logs_its_drivers_warnings_in_its_own_format(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    """PostgreSQL going down under a running `worker --log-format json`: psycopg's pool
    logs warnings of its own ("discarding closed connection", "error connecting in
    'mailstrom': ...\\n\\tIs the server running ..."), which reached Python's last-resort
    handler and stderr as bare text, a line and a tab-indented half line each, among the
    JSON lines: a collector parsing them dropped or choked on them. Every line is JSON."""
    url = own_postgres.create_database()
    proc = mail_env.cli.popen("worker", "--no-live", "--log-format", "json", "--store", url)
    lines = _StderrLines(proc)
    try:
        lines.wait_for("worker started")
        own_postgres.take_down()
        lines.wait_for("error connecting in 'mailstrom'")
        own_postgres.bring_up()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        seen = lines.all()
        assert proc.stdout is not None
        proc.stdout.close()
    records = [json.loads(line) for line in seen if line.strip()]  # each line is JSON
    pool = [r for r in records if r["logger"] == "psycopg.pool"]
    assert pool and all(r["level"] == "warning" for r in pool), records
    assert any("error connecting in 'mailstrom'" in r["event"] for r in pool)


class _StderrLines:
    """The lines a process writes on stderr, read by a thread of their own."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self._stream:
            self._lines.put(raw.decode())
        self._lines.put(None)

    def wait_for(self, text: str, limit: float = 30.0) -> None:
        """Return once a line holding ``text`` came (at most ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self._seen.append(line)
            if text in line:
                return
        raise AssertionError(f"no line with {text!r}: {''.join(self._seen)}")

    def all(self) -> list[str]:
        """Every line, once the process has ended."""
        self._reader.join(timeout=10)
        self._stream.close()
        while (line := self._lines.get_nowait() if not self._lines.empty() else None) is not None:
            self._seen.append(line)
        return self._seen


def test_a_worker_stopped_while_postgresql_is_down_exits_without_waiting_out_the_pool(
    own_postgres: ThrowawayPostgres, mail_env: MailEnv
) -> None:
    """PostgreSQL going down under a running worker, then SIGTERM: the worker stopped in
    a few seconds, but the process did not exit. Its store calls run in threads, and
    those it had left waiting for a pooled connection (a lease, a beat) went on waiting,
    for the store's whole timeout (30 s), and the event loop's end and the interpreter's
    exit wait for every such thread: past a supervisor's stop timeout (the guide's
    ``TimeoutStopSec=45`` with ``--drain-timeout`` 30), and a second signal, "stop at
    once", did not hurry it. The store is closed as soon as the worker has stopped, which
    ends those waits at once."""
    url = own_postgres.create_database()
    mail_env.cli.env["MAILSTROM_POLL_INTERVAL"] = "0.2"  # a lease waits on the pool soon
    proc = mail_env.cli.popen(
        "worker", "--no-live", "--log-format", "json", "--drain-timeout", "0", "--store", url
    )
    lines = _StderrLines(proc)
    try:
        lines.wait_for("worker started")
        own_postgres.take_down()
        lines.wait_for("error connecting in 'mailstrom'")  # a call waits for a connection
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.all()
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0
    # The stop's own bounded waits: the last write (2 s), marking the holder stopped (2 s).
    assert took < 15, f"exited {took:.1f} s after SIGTERM"
