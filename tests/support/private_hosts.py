"""Running Python with an /etc/hosts of the test's own, in a mount namespace that ends
with the process: how a name that resolves to IPv6 only (Debian's ``::1
ip6-localhost``) is tested without touching the machine's file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def private_mounts() -> bool:
    """Whether this process may make a mount namespace (unshare(1) and mount(8))."""
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and shutil.which("mount") is not None


def run_with_hosts(hosts: Path, code: str) -> subprocess.CompletedProcess[bytes]:
    """``python -c code`` with ``hosts`` bind-mounted on /etc/hosts."""
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"),
            *(str(hosts), sys.executable, "-c", code),
        ],
        env=os.environ.copy(),
        capture_output=True,
        check=False,
        timeout=60,
    )
