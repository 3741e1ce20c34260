"""Running a piece of a test in a process forked from the test's."""

from __future__ import annotations

import os
from collections.abc import Callable


def in_fork(child: Callable[[], str]) -> str:
    """Run ``child`` in a forked process; what it returned, or its exception's name."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked process
        os.close(read)
        try:
            said = child()
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        os.write(write, said.encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said
