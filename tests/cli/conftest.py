"""Running the real ``mailstrom`` command in a subprocess against loopback fixtures.

The ``mail_env`` fixture starts one aiosmtpd receiver (``mx.test`` on 127.0.0.1) and the
dnslib DNS server with ``example.test`` → MX ``mx.test``, and ``cli`` runs
``python -m mailstrom`` with ``MAILSTROM_*`` variables pointing at them and at a SQLite store
in the test's own directory. Nothing from the developer's environment leaks in: other
``MAILSTROM_*`` variables are dropped and HOME/XDG_CONFIG_HOME point into the test directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer

DOMAIN = "example.test"
OTHER_DOMAIN = "other.test"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@dataclass
class CLI:
    """Runs ``python -m mailstrom`` (or ``python -m <module>``, a wrapper of the test's
    taking the same arguments) in ``cwd`` with ``env``."""

    cwd: Path
    env: dict[str, str]
    module: str = "mailstrom"

    def __call__(self, *args: str, stdin: bytes | None = None, timeout: float = 60) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", self.module, *args],
            cwd=self.cwd,
            env=self.env,
            input=stdin if stdin is not None else b"",
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    def ok(self, *args: str, stdin: bytes | None = None) -> Result:
        """Run and require exit 0 (showing stderr if not)."""
        result = self(*args, stdin=stdin)
        assert result.code == 0, f"exit {result.code}: {result.err}"
        return result

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", self.module, *args],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def gone_reader(
        self, *args: str, stream: str, stdin: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run with ``stream`` ("stdout" or "stderr") a pipe whose reader has gone (a
        restarted logger, a ``head`` that exited): each write to it fails with EPIPE. The
        other stream is captured."""
        read, write = os.pipe()
        os.close(read)
        other = "stderr" if stream == "stdout" else "stdout"
        try:
            return subprocess.run(
                [sys.executable, "-m", self.module, *args],
                cwd=self.cwd,
                env=self.env,
                input=stdin,
                timeout=timeout,
                check=False,
                **{stream: write, other: subprocess.PIPE},  # type: ignore[arg-type]
            )
        finally:
            os.close(write)

    def queue_ids(self) -> list[str]:
        return [m["id"] for m in self.ok("queue", "--json", "--state", "any").json()]


def ended(
    proc: subprocess.Popen[bytes],
    sig: signal.Signals = signal.SIGTERM,
    *,
    timeout: float = 30,
) -> tuple[int, str]:
    """Send ``sig`` to a worker process still running, wait ``timeout`` seconds for it to
    end (killed if it has not) and return its exit code and what it wrote to stderr."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err.decode()


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONUNBUFFERED="1")
    # The package under test, wherever pytest was started.
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


@dataclass
class MailEnv:
    cli: CLI
    mx: ReceivingServer
    dns: LoopbackDNS
    workdir: Path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def cli(workdir: Path) -> CLI:
    """The command with only a store configured (no network needed)."""
    env = clean_env(workdir)
    env["MAILSTROM_STORE"] = "sqlite:///queue.db"
    env["MAILSTROM_HELO_NAME"] = "client.test"
    return CLI(cwd=workdir, env=env)


@pytest.fixture
def mail_env(
    cli: CLI,
    workdir: Path,
    tls_ca: trustme.CA,
    dns_server: LoopbackDNS,
    smtp_server: Callable[..., ReceivingServer],
) -> MailEnv:
    """``cli`` wired to a receiver for ``example.test`` and ``other.test`` via loopback DNS."""
    mx = smtp_server()
    for domain in (DOMAIN, OTHER_DOMAIN):
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", "127.0.0.1")
    ca = workdir / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca))
    cli.env.update(
        MAILSTROM_ALLOW_LOOPBACK="1",  # the fixtures' receivers are on 127.0.0.x
        MAILSTROM_SMTP_PORT=str(mx.port),
        MAILSTROM_DNS_NAMESERVERS="127.0.0.1",
        MAILSTROM_DNS_PORT=str(dns_server.port),
        MAILSTROM_DNS_TIMEOUT="2",
        MAILSTROM_TLS_CA=str(ca),
        MAILSTROM_TIMEOUTS_CONNECT="5",
        MAILSTROM_TIMEOUTS_COMMAND="10",
    )
    return MailEnv(cli=cli, mx=mx, dns=dns_server, workdir=workdir)
