"""Another process that writes an SQLite store and is stopped (SIGSTOP, as Ctrl-Z or
``docker pause`` would) while it holds the writers' ``flock`` of ``<database>-lock``, and
with ``in_transaction`` SQLite's write lock too, as a mailstrom writer stopped in the
middle of a write does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sqlite3, sys
    fd = os.open(sys.argv[1] + "-lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if sys.argv[2] == "in-transaction":
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


@contextmanager
def stopped_writer(path: Path, *, in_transaction: bool = True) -> Iterator[None]:
    """The writer holds its locks of the database at ``path``, stopped, until the block
    ends; then it is continued and goes away."""
    where = "in-transaction" if in_transaction else "between-transactions"
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline() == "locked\n"
            os.kill(holder.pid, signal.SIGSTOP)
            yield
        finally:
            os.kill(holder.pid, signal.SIGCONT)
            holder.stdin.write("\n")
            holder.stdin.flush()
