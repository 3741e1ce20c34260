"""Postfix's ``smtp-sink`` and ``smtp-source`` for benchmarks, and the child processes they run in.

``smtp-sink`` is Postfix's SMTP test server: it accepts everything, keeps nothing and is
written in C, so it is never the bottleneck; ``smtp-source`` is its C client, the yardstick
mailstrom's figures are compared with. Both come with the Debian package ``postfix``.

    children = Children()
    try:
        sink = PostfixSink(children, Path(tmp)).start()   # free loopback port
        subprocess.run(smtp_source_argv(sink, messages=1000, sessions=10, size=1024))
        sink.count()                                       # messages received so far
    finally:
        children.stop_all()
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "Children", "PostfixSink", "missing_tools", "smtp_source_argv"]

INSTALL_HINT = (
    "Postfix's smtp-sink and smtp-source are needed (Debian/Ubuntu: `apt-get install postfix`; "
    "choose 'No configuration' and keep the postfix service stopped; they install as "
    "/usr/sbin/smtp-sink and /usr/sbin/smtp-source)."
)


# --- processes: every child is stopped, whatever happens ---------------------------------------


class Children:
    """The processes this benchmark started; ``stop_all`` ends each one, by its own pid.

    Children run in a session of their own, so a Ctrl-C on the terminal reaches only this
    process, whose ``finally`` blocks then stop them in order.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status (None if unknown)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(
                    f"  ! pid {proc.pid} ignored SIGTERM for {grace:g} s: killed", file=sys.stderr
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc, grace=5.0)


# --- Postfix's smtp-sink ----------------------------------------------------------------------


_MESG = re.compile(rb"mesg=(\d+)\r")


class PostfixSink:
    """``smtp-sink -c`` on a free loopback port, its running counters written to a file.

    ``-c`` prints ``sess=.. quit=.. mesg=..`` and a carriage return whenever a message's
    final dot is received (and when a session ends), flushed at once. Reading the tail of
    that file tells how many messages the sink has received, without a pipe that the sink
    could block on and without a reader thread in this process taking the GIL.
    """

    def __init__(self, children: Children, directory: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._children = children
        self._counter_path = directory / "smtp-sink.counters"
        self._stderr_path = directory / "smtp-sink.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._counter: Any = None

    def start(self, timeout: float = 10.0) -> PostfixSink:
        for _ in range(5):  # a free port can be taken between probing and binding
            self.port = free_port(self.host)
            argv = [tool("smtp-sink"), "-c"]
            if os.geteuid() == 0:
                argv += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
            argv += [f"{self.host}:{self.port}", "1000"]
            with open(self._counter_path, "wb") as out, open(self._stderr_path, "wb") as err:
                self._proc = self._children.spawn(argv, stdout=out, stderr=err)
            if wait_listening(self.host, self.port, self._proc, timeout):
                self._counter = open(self._counter_path, "rb")  # noqa: SIM115 (closed in stop)
                return self
            self._children.stop(self._proc)
        raise RuntimeError(f"smtp-sink did not start: {self._stderr_path.read_text()[-500:]}")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def count(self) -> int:
        """Messages received since the sink started (its ``mesg=`` counter)."""
        f = self._counter
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0
        tail = os.pread(f.fileno(), 96, max(0, size - 96))
        found = _MESG.findall(tail)
        return int(found[-1]) if found else 0

    def wait_count(self, target: int, deadline: float, interval: float) -> bool:
        while self.count() < target:
            if time.perf_counter() >= deadline:
                return False
            time.sleep(interval)
        return True

    def stop(self) -> None:
        if self._proc is not None:
            self._children.stop(self._proc)
            self._proc = None
        if self._counter is not None:
            self._counter.close()
            self._counter = None


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.01)  # a child starting up: nothing to wait on but the port
    return False


def missing_tools() -> list[str]:
    """The Postfix test programs not found on ``PATH`` (plus /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return [t for t in ("smtp-sink", "smtp-source") if shutil.which(t, path=path) is None]


def smtp_source_argv(
    sink: PostfixSink,
    *,
    messages: int,
    sessions: int,
    size: int,
    reuse: bool = True,
    sender: str = "app@sender.test",
    recipient: str = "user@example.org",
) -> list[str]:
    """``smtp-source`` sending ``messages`` of ``size`` octets over ``sessions`` parallel
    sessions; ``reuse`` (``-d``) keeps each connection for its next message."""
    argv = [tool("smtp-source")] + (["-d"] if reuse else [])
    argv += ["-s", str(sessions), "-m", str(messages), "-l", str(size)]
    return [*argv, "-f", sender, "-t", recipient, f"{sink.host}:{sink.port}"]


def tool(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return shutil.which(name, path=path) or name
