"""Worker processes (``mailstrom worker``) sharing one store, for multi-process tests.

Each worker logs JSON lines that a thread reads as they come, so a test can wait on what
the workers log (``Fleet.wait_until``) and check what each recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailstrom.message.prepared import PreparedMessage
from tests.fixtures.dns_server import LoopbackDNS

SRC = Path(__file__).parents[2] / "src"

LONG_LEASE = "10m"


class WorkerProcess:
    """One ``mailstrom worker`` process whose JSON log lines a thread reads as they come."""

    def __init__(
        self, name: str, env: dict[str, str], lease_for: str, activity: threading.Condition
    ) -> None:
        self.name = name
        self.helo = f"{name}.test"
        self._activity = activity
        self._lines: list[str] = []
        self._started = threading.Event()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailstrom",
                "worker",
                "--no-live",
                # The log is what a killed worker had recorded: every line, at once.
                "--no-log-buffer",
                "--log-format",
                "json",
                "--drain-timeout",
                "20",
            ],
            env={**env, "MAILSTROM_HELO_NAME": self.helo, "MAILSTROM_LEASE_FOR": lease_for},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._activity:
                self._lines.append(line)
                if '"worker started"' in line:
                    self._started.set()
                self._activity.notify_all()
        with self._activity:
            self._activity.notify_all()

    def wait_started(self, timeout: float) -> None:
        if not self._started.wait(timeout):
            raise AssertionError(f"{self.name} did not start:\n{self.log()}")

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._activity:
            lines = list(self._lines)
        found = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def recorded_delivered(self) -> set[str]:
        """Recipients this worker logged as delivered (it logs only after recording)."""
        return {e["rcpt"] for e in self.events("attempt") if e.get("state") == "delivered"}

    def log(self) -> str:
        with self._activity:
            return "".join(self._lines[-15:])

    def finish(self, timeout: float) -> int:
        """Wait for the process to exit and its log to be read; its exit status."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


class Fleet:
    """Worker processes sharing one store, and a way to wait on what they log."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.activity = threading.Condition()
        self.workers: list[WorkerProcess] = []

    def start(self, count: int, *, lease_for: str = LONG_LEASE) -> list[WorkerProcess]:
        started = [
            WorkerProcess(f"w{len(self.workers) + i}", self.env, lease_for, self.activity)
            for i in range(count)
        ]
        self.workers += started
        for worker in started:
            worker.wait_started(timeout=30)
        return started

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Re-check ``check`` whenever a worker logs something (and at least every
        0.25 s, for changes no log line announces) until it holds or time runs out."""
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                logs = "\n".join(f"--- {w.name}\n{w.log()}" for w in self.workers)
                raise AssertionError(f"timed out waiting until {what}\n{logs}")
            with self.activity:
                self.activity.wait(min(left, 0.25))

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.finish(timeout=10)


def numbered_recipient(i: int, domains: Sequence[str]) -> str:
    """The ``i``-th test recipient, spread over ``domains``."""
    return f"user{i:04d}@{domains[i % len(domains)]}"


def numbered_message(i: int, domains: Sequence[str]) -> PreparedMessage:
    """A small one-recipient message to :func:`numbered_recipient`."""
    address = numbered_recipient(i, domains)
    return PreparedMessage(
        data=(
            f"From: app@example.com\r\nTo: {address}\r\nSubject: number {i}\r\n"
            f"Message-ID: <{i}@example.com>\r\n\r\nHello number {i}.\r\n"
        ).encode(),
        envelope_from="app@example.com",
        recipients=(address,),
        subject=f"number {i}",
    )


def fleet_env(
    store_url: str, *, smtp_port: int, dns: LoopbackDNS, home: Path, **settings: str
) -> dict[str, str]:
    """The environment of worker processes on ``store_url`` delivering to a loopback
    receiver through the loopback DNS server; ``settings`` are more ``MAILSTROM_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
        MAILSTROM_STORE=store_url,
        MAILSTROM_SMTP_PORT=str(smtp_port),
        MAILSTROM_ALLOW_LOOPBACK="1",
        MAILSTROM_DNS_NAMESERVERS=dns.address,
        MAILSTROM_DNS_PORT=str(dns.port),
        MAILSTROM_DNS_TIMEOUT="5",
        MAILSTROM_TIMEOUTS_CONNECT="10",
        MAILSTROM_TIMEOUTS_COMMAND="20",
    )
    env.update({f"MAILSTROM_{key.upper()}": value for key, value in settings.items()})
    return env
