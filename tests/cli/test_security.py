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


# --- 4: configuration hijack ---------------------------------------------------------------

SENDMAIL_INJECTIONS = [
    ["-i", "--store=sqlite:///shell.php", "bob@example.test"],
    ["-i", "--store", "sqlite:///shell.php", "bob@example.test"],
    ["-t", "-i", "--config=evil.toml"],
    ["-i", "-fapp@client.test", "--config", "evil.toml", "bob@example.test"],
]


def plant_evil_config(cli: CLI) -> None:
    (cli.cwd / "evil.toml").write_text('store = "sqlite:///shell.php"\n')


def test_working_directory_config_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hardening #4: ./mailstrom.toml does not configure anything (no store, no relay)."""
    from mailstrom.settings import load_settings

    (tmp_path / "mailstrom.toml").write_text(
        'store = "sqlite:///hijack.db"\n[relay]\nhost = "attacker.example"\n'
    )
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={"XDG_CONFIG_HOME": str(tmp_path / "empty")})
    assert s.config.relay is None
    assert "hijack" not in s.store_url
    assert s.config_file != tmp_path / "mailstrom.toml"


def test_relative_xdg_config_home_is_not_the_working_directory(cli: CLI) -> None:
    """Hardening #4: a relative XDG_CONFIG_HOME does not bring the working directory back."""
    (cli.cwd / "mailstrom").mkdir()
    (cli.cwd / "mailstrom" / "config.toml").write_text("hijacked = true\n")
    cli.env["XDG_CONFIG_HOME"] = "."
    cli.ok("queue")


def test_mailstrom_ignores_a_config_file_where_it_runs(cli: CLI) -> None:
    """Hardening #4: `mailstrom` reads ./mailstrom.toml only when --config names it."""
    (cli.cwd / "mailstrom.toml").write_text("hijacked = true\n")
    cli.ok("queue")
    assert cli("--config", "mailstrom.toml", "queue").code == 78


@pytest.mark.parametrize("argv", SENDMAIL_INJECTIONS)
def test_sendmail_refuses_store_and_config(cli: CLI, argv: list[str]) -> None:
    """Hardening #4: an injected --store/--config is a usage error; nothing is written
    where it points (the PHPMailer CVE-2016-10033 pattern)."""
    plant_evil_config(cli)
    message = b"From: a@client.test\nTo: bob@example.test\nSubject: x\n\n<?php evil(); ?>\n"
    result = cli("sendmail", *argv, stdin=message)
    assert result.code == 64, result.err
    assert "unknown option --" in result.err
    assert not (cli.cwd / "shell.php").exists()
    assert cli.queue_ids() == []


def test_sendmail_refuses_mailstrom_options_before_it(cli: CLI) -> None:
    """Hardening #4: `mailstrom --store X sendmail` is refused too."""
    plant_evil_config(cli)
    for head in (["--store", "sqlite:///shell.php"], ["--config=evil.toml"], ["--traceback"]):
        result = cli(*head, "sendmail", "-i", "bob@example.test", stdin=MESSAGE)
        assert result.code == 64, (head, result.err)
        assert "sendmail takes no mailstrom options" in result.err
    assert not (cli.cwd / "shell.php").exists()
    assert cli.queue_ids() == []


def test_sendmail_symlink_refuses_store(cli: CLI) -> None:
    """Hardening #4: the `sendmail` symlink refuses --store as `mailstrom sendmail` does."""
    import subprocess
    import sys

    script = cli.cwd / "sendmail-entry.py"
    script.write_text("import sys\nfrom mailstrom.cli.main import main\nsys.exit(main())\n")
    (cli.cwd / "sendmail").symlink_to(script)
    proc = subprocess.run(
        [sys.executable, str(cli.cwd / "sendmail"), "-i", "--store=sqlite:///shell.php", "b@x"],
        input=MESSAGE,
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 64, proc.stderr
    assert not (cli.cwd / "shell.php").exists()


def test_sendmail_reads_only_fixed_configuration(cli: CLI) -> None:
    """Hardening #4: sendmail ignores the user's and the working directory's config files;
    MAILSTROM_CONFIG (the environment, set by whoever runs the program) still works."""
    tiny = "max_message_size = 10\n"  # every message is then too large (exit 65)
    (cli.cwd / "mailstrom.toml").write_text(tiny)
    (cli.cwd / ".config" / "mailstrom").mkdir(parents=True)
    (cli.cwd / ".config" / "mailstrom" / "config.toml").write_text(tiny)
    assert cli.env["XDG_CONFIG_HOME"] == str(cli.cwd / ".config")
    cli.ok("sendmail", "-i", "bob@example.test", stdin=MESSAGE)
    # The same user file configures the mailstrom command...
    too_large = cli("send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x")
    assert too_large.code == 65
    # ...and sendmail when the environment names it.
    cli.env["MAILSTROM_CONFIG"] = str(cli.cwd / ".config" / "mailstrom" / "config.toml")
    assert cli("sendmail", "-i", "bob@example.test", stdin=MESSAGE).code == 65
    assert len(cli.queue_ids()) == 1
