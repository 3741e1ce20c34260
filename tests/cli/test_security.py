"""Hardening of the command line: private queue files, fixed configuration, secrets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom.stores.url import default_store_path
from tests.cli.conftest import CLI

MESSAGE = b"From: a@client.test\nSubject: x\n\nbody\n"


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- 3: queue files ------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_022")
def test_send_and_sendmail_create_a_private_queue(cli: CLI) -> None:
    """Hardening #3: under umask 022 the queue mailstrom creates is 0600, not 0644."""
    cli.ok("send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x")
    assert mode(cli.cwd / "queue.db") == 0o600
    cli.env["MAILSTROM_STORE"] = "sqlite:///other.db"
    cli.ok("sendmail", "-i", "b@example.test", stdin=MESSAGE)
    assert mode(cli.cwd / "other.db") == 0o600


def test_help_prints_the_default_store(cli: CLI) -> None:
    """Hardening #3: `mailstrom --help` names the one fixed default queue path."""
    text = " ".join(cli.ok("--help").out.split())
    path = str(default_store_path(cli.env))
    assert path.startswith("/")
    assert f"(default: sqlite:///{path})" in text
    assert f"the queue is {path}" in text
    assert "mailstrom.db" not in text
