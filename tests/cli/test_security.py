"""Hardening of the command line: private queue files, fixed configuration, secrets."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom.cli.logs import JSONFormatter, KeyValueFormatter
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
    for head in (
        ["--store", "sqlite:///shell.php"], ["--config=evil.toml"], ["--traceback"],
        # Abbreviated, as argparse takes them: the value was taken for the command's
        # name, argparse ran a "sendmail" command that has no handler, and the run
        # ended in a traceback (exit 1), or "unrecognized arguments: -i ...".
        ["--sto", "sqlite:///shell.php"], ["--conf", "evil.toml"],
    ):  # fmt: skip
        for rest in (["-i", "bob@example.test"], []):
            result = cli(*head, "sendmail", *rest, stdin=MESSAGE)
            assert result.code == 64, (head, result.err)
            assert "sendmail takes no mailstrom options" in result.err
            assert "Traceback" not in result.err
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


# --- 14: secrets ---------------------------------------------------------------------------

SECRET = "hunter2-s3cret"


def test_plaintext_auth_needs_an_explicit_setting(tmp_path: Path) -> None:
    """Hardening #14: relay.tls = none with a username is a ConfigError at load time;
    relay.allow_plaintext_auth = true allows it."""
    from mailstrom.errors import ConfigError
    from mailstrom.settings import load_settings

    env = {
        "MAILSTROM_RELAY_HOST": "smtp.example.net",
        "MAILSTROM_RELAY_TLS": "none",
        "MAILSTROM_RELAY_USERNAME": "app",
        "MAILSTROM_RELAY_PASSWORD": SECRET,
    }
    with pytest.raises(ConfigError, match="cleartext") as info:
        load_settings(env=env, search=False)
    assert SECRET not in str(info.value)
    env["MAILSTROM_RELAY_ALLOW_PLAINTEXT_AUTH"] = "true"
    relay = load_settings(env=env, search=False).config.relay
    assert relay is not None
    assert relay.allow_plaintext_auth


def test_plaintext_auth_through_the_command_exits_78(cli: CLI) -> None:
    """Hardening #14: the command refuses such a configuration (exit 78)."""
    cli.env.update(
        MAILSTROM_RELAY_HOST="smtp.example.net",
        MAILSTROM_RELAY_TLS="none",
        MAILSTROM_RELAY_USERNAME="app",
        MAILSTROM_RELAY_PASSWORD=SECRET,
    )
    result = cli("worker", "--once", "--no-live")
    assert result.code == 78
    assert "allow_plaintext_auth" in result.err
    assert SECRET not in result.err


@pytest.mark.parametrize("value", ["12345678", "true", "[1, 2]", '""'])
def test_a_bad_password_value_is_not_echoed(cli: CLI, value: str) -> None:
    """Hardening #14: a password of the wrong type is reported without its value."""
    config = cli.cwd / "c.toml"
    config.write_text(f'[relay]\nhost = "smtp.example.net"\npassword = {value}\n')
    config.chmod(0o600)
    result = cli("--config", str(config), "queue")
    assert result.code == 78
    assert "relay.password" in result.err
    assert value not in result.err.replace("mailstrom", "")


def test_settings_repr_hides_secrets(tmp_path: Path) -> None:
    """Hardening #14: repr(Settings) shows neither the relay password nor a URL password."""
    from mailstrom.settings import load_settings

    env = {
        "MAILSTROM_RELAY_HOST": "smtp.example.net",
        "MAILSTROM_RELAY_USERNAME": "app",
        "MAILSTROM_RELAY_PASSWORD": SECRET,
        "MAILSTROM_STORE": f"postgresql://app:{SECRET}@db.internal/mail",
    }
    text = repr(load_settings(env=env, search=False))
    assert SECRET not in text
    assert "postgresql://app:***@db.internal/mail" in text


@pytest.mark.parametrize(
    "url",
    [
        f"sqlite://app:{SECRET}@db.internal/queue.db",
        f"redis://db.internal/0?password={SECRET}",
        f"mysql://app:{SECRET}@db.internal/mail",
    ],
)
def test_store_url_errors_do_not_print_the_password(cli: CLI, url: str) -> None:
    """Hardening #14: an invalid store URL is quoted with its password as ***."""
    cli.env["MAILSTROM_STORE"] = url
    from_env = cli("queue")
    assert from_env.code == 78
    assert SECRET not in from_env.err
    assert "***" in from_env.err
    option = cli("--store", url, "queue")
    assert option.code == 64
    assert SECRET not in option.err
    unknown = cli("queue", f"--unknown={url}")  # argparse quotes what it does not know
    assert unknown.code == 64
    assert SECRET not in unknown.err


def test_errors_that_quote_a_url_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """Hardening #14: every error line goes through the one redaction (e.g. a driver's
    message quoting the connection URL)."""
    from mailstrom.cli.exits import fail
    from mailstrom.errors import StoreError

    code = fail(StoreError(f"cannot connect to postgresql://app:{SECRET}@db.internal/mail"))
    assert code == 75
    err = capsys.readouterr().err
    assert SECRET not in err
    assert "postgresql://app:***@db.internal/mail" in err


def test_logged_exceptions_are_redacted() -> None:
    """Hardening #14: an exception logged by the worker (key=value or JSON) that quotes a
    store URL shows its password as ***."""
    url = f"postgresql://app:{SECRET}@db.internal/mail?sslpassword={SECRET}"
    try:
        raise RuntimeError(f"lost {url}")
    except RuntimeError:
        record = logging.LogRecord("mailstrom.worker", 40, "", 0, "died", (), sys.exc_info())
    for formatter in (KeyValueFormatter(), JSONFormatter()):
        line = formatter.format(record)
        assert SECRET not in line
        assert "postgresql://app:***@db.internal/mail" in line


@pytest.mark.parametrize(("file_mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_a_readable_config_file_with_a_password_is_warned_about(
    cli: CLI, file_mode: int, warned: bool
) -> None:
    """Hardening #14: a config file holding a password that others can access gets a
    warning on stderr, as ssh does for private keys; the command still runs."""
    config = cli.cwd / "c.toml"
    config.write_text(
        f'[relay]\nhost = "smtp.example.net"\nusername = "app"\npassword = "{SECRET}"\n'
    )
    config.chmod(file_mode)
    result = cli("--config", str(config), "queue")
    assert result.code == 0, result.err
    assert SECRET not in result.err
    if warned:
        assert result.err_lines == [
            f"mailstrom: warning: {config} holds a password and other users can access it "
            f"(mode {file_mode:04o}); chmod 600 it, or give the password in the environment "
            "(MAILSTROM_RELAY_PASSWORD)"
        ]
    else:
        assert result.err == ""


def test_a_config_file_warning_shows_control_characters_as_escapes(cli: CLI) -> None:
    """The warning quoted the file's path as it was: a name holding an ESC sequence or
    a line break cleared or recoloured the terminal, or forged a line of its own, where
    every error quoting the same path shows them as escapes."""
    config = cli.cwd / "c\x1b[2J\nmailstrom: all fine\u202e.toml"
    config.write_text(
        f'[relay]\nhost = "smtp.example.net"\nusername = "app"\npassword = "{SECRET}"\n'
    )
    config.chmod(0o644)
    result = cli("--config", str(config), "queue")
    assert result.code == 0, result.err
    shown = str(config).replace("\x1b", "\\x1b").replace("\n", "\\x0a").replace("\u202e", "\\u202e")
    assert result.err_lines == [
        f"mailstrom: warning: {shown} holds a password and other users can access it "
        "(mode 0644); chmod 600 it, or give the password in the environment "
        "(MAILSTROM_RELAY_PASSWORD)"
    ]


def test_a_readable_config_file_without_a_password_is_fine(cli: CLI) -> None:
    """Hardening #14: no warning for a world-readable file with no secret in it."""
    config = cli.cwd / "c.toml"
    config.write_text('helo_name = "client.test"\nstore = "sqlite:///queue.db"\n')
    config.chmod(0o644)
    assert cli("--config", str(config), "queue").err == ""


def test_a_store_url_password_in_a_readable_file_is_warned_about(cli: CLI) -> None:
    """Hardening #14: a password inside the store URL counts as a password in the file."""
    config = cli.cwd / "c.toml"
    config.write_text(f'store = "postgresql://app:{SECRET}@db.internal/mail"\n')
    config.chmod(0o604)
    result = cli("--config", str(config), "queue")  # MAILSTROM_STORE still wins
    assert result.code == 0, result.err
    assert result.err_lines[0].startswith(f"mailstrom: warning: {config} holds a password")
    assert SECRET not in result.err


@pytest.mark.parametrize(("file_mode", "warned"), [(0o666, True), (0o602, True), (0o664, False)])
def test_a_config_file_anyone_can_write_is_warned_about(
    cli: CLI, file_mode: int, warned: bool
) -> None:
    """Whoever can write the config file chooses the store and the relay (the reason a
    file in the working directory is never read), yet a file any user could change was
    read without a word; ssh refuses such a file, ``postfix check`` warns of one."""
    config = cli.cwd / "c.toml"
    config.write_text('helo_name = "client.test"\n')
    config.chmod(file_mode)
    result = cli("--config", str(config), "queue")
    assert result.code == 0, result.err
    if not warned:  # a group's write bit: an administrators' group, or umask 002's own
        assert result.err == ""
        return
    assert result.err_lines == [
        f"mailstrom: warning: {config} can be changed by any user (mode {file_mode:04o}), "
        "who could then choose the store and the relay; chmod o-w it"
    ]


_SEED = "YRx8cpQlwYMiqUa0L7U2w7veO+9bUHb1DVTFrsLNEU4="
"""An Ed25519 private key's seed in base64, as a secret store or dkimpy's dknewkey holds it."""


@pytest.mark.parametrize("form", ["base64", "pem"])
@pytest.mark.parametrize("prefix", ["", "example.org:"])  # alone, or the selector missing
def test_a_dkim_key_in_a_malformed_entry_is_not_shown(cli: CLI, form: str, prefix: str) -> None:
    """MAILSTROM_DKIM_KEYS set to the private key itself, or with a field missing: the
    error quoted the entry, the whole of an Ed25519 seed, a PEM key's start and end."""
    from tests.support.dkim import ED25519, pem

    key = _SEED if form == "base64" else pem(ED25519).decode()
    cli.env["MAILSTROM_DKIM_KEYS"] = prefix + key
    result = cli("queue")
    assert result.code == 78, result.err
    assert "expected domain:selector:path" in result.err
    assert "not shown" in result.err
    material = [line for line in key.splitlines() if line and "-----" not in line]
    assert material and all(line[-12:] not in result.err for line in material)


def test_a_single_dkim_keys_table_is_not_quoted(cli: CLI) -> None:
    """``[dkim.keys]`` written for ``[[dkim.keys]]``: the error quoted the table, its
    private_key with it, which may be the key itself."""
    config = cli.cwd / "c.toml"
    config.write_text(
        f'[dkim.keys]\ndomain = "example.org"\nselector = "s1"\nprivate_key = "{_SEED}"\n'
    )
    config.chmod(0o600)
    result = cli("--config", str(config), "queue")
    assert result.code == 78, result.err
    assert "expected [[dkim.keys]] tables, got one [dkim.keys] table" in result.err
    assert _SEED not in result.err


@pytest.mark.parametrize(
    "host", [f"app:{SECRET}@smtp.example.net", f"app:{SECRET} x@smtp.example.net"]
)
def test_credentials_written_into_the_relay_host_are_not_shown(cli: CLI, host: str) -> None:
    """``user:password@host``, as some tools take a relay: refused (the credentials go
    in relay.username and relay.password), with the password quoted in the error."""
    cli.env["MAILSTROM_RELAY_HOST"] = host
    result = cli("queue")
    assert result.code == 78, result.err
    assert "relay.host" in result.err
    assert "'***@smtp.example.net'" in result.err
    assert SECRET not in result.err
