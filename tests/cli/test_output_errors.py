"""Standard output that cannot be written (a full disk under ``> file``): the command's
own error and exit code, never an "internal error"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cli.conftest import CLI

FULL = "/dev/full"
"""A device every write to fails with ENOSPC, as a file on a full disk does."""

pytestmark = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full")


def to_full_disk(cli: CLI, *args: str) -> subprocess.CompletedProcess[str]:
    with open(FULL, "w") as out:
        return subprocess.run(
            [sys.executable, "-m", "mailstrom", *args],
            cwd=cli.cwd,
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )


def test_a_full_disk_under_the_output_is_exit_73_not_an_internal_error(cli: CLI) -> None:
    mid = cli.ok("send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x")
    error = "mailstrom: cannot write standard output: No space left on device"
    # `hold --all > log` on a full disk: the hold is done, the report cannot be written.
    for args in (["hold", "--all"], ["queue", "--json", "--held"], ["workers"]):
        ran = to_full_disk(cli, *args)
        assert ran.returncode == 73, (args, ran.stderr)
        assert error in ran.stderr.splitlines(), (args, ran.stderr)
        assert "internal error" not in ran.stderr
    assert [m["id"] for m in cli.ok("queue", "--held", "--json").json()] == [mid.out.strip()]
