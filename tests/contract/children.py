"""Child processes that lease and then sleep until killed: the holders whose death the
dead-holder tests watch (``children`` fixture in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .support import NOW

SRC = Path(__file__).parents[2] / "src"
LEASE_AND_SLEEP = textwrap.dedent(
    """
    import sys, time
    from datetime import datetime, timedelta
    from mailstrom.stores import open_store

    url, now, holder, limit, beat = sys.argv[1:]
    store = open_store(url)
    if beat == "beat":
        store.release_dead_holders(holder)  # a worker's first look: it says it lives
    lease = store.lease(
        now=datetime.fromisoformat(now), limit=int(limit),
        lease_for=timedelta(minutes=10), holder=holder,
    )
    print("leased", sum(len(i.recipients) for i in lease.items), flush=True)
    time.sleep(120)
    """
)


def lease_in_child(
    children: list[subprocess.Popen[str]], url: str, holder: str, limit: int, *, beat: bool
) -> subprocess.Popen[str]:
    """A process that opens the store at ``url``, looks for dead holders first when
    ``beat`` (as a worker does at its start), leases ``limit`` recipients under ``holder``
    and sleeps; it has leased when this returns."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    args = [url, NOW.isoformat(), holder, str(limit), "beat" if beat else "no"]
    child = subprocess.Popen(
        [sys.executable, "-c", LEASE_AND_SLEEP, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=path),
    )
    children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().split() == ["leased", str(limit)]
    return child
