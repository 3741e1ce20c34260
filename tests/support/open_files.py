"""What files this process holds open: a store left open shows up here (Linux's /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def open_files_under(directory: Path) -> list[str]:
    """The files this process holds open in ``directory`` or below (SQLite's database,
    WAL, shared memory and lock files): what a store left open leaves there."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith(f"{directory}{os.sep}"):
            found.append(target)
    return found


def open_sockets(pid: int | str = "self") -> int:
    """How many sockets process ``pid`` (this one by default) holds open (Linux's /proc):
    a connection nobody closed stays counted here until the garbage collector finds it."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since the listing (the listing's own, or the process's)
            continue
        count += target.startswith("socket:")
    return count
