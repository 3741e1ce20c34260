"""Hardening #12 (command line): every bad option value is a usage error with a plain reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings
from tests.cli.conftest import CLI
from tests.cli.test_errors import assert_one_line_error

SEND = ["send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["queue", "--limit", "100000000000000000000"], "argument --limit: expected a whole"),
        (["queue", "--limit", "1e20"], "argument --limit: expected a whole number"),
        (["queue", "--limit", "0"], "argument --limit: expected a whole number"),
        (["queue", "--older-than", "9999999d"], "argument --older-than: not a duration"),
        (["queue", "--older-than", "99999999999d"], "argument --older-than: not a duration"),
        (["purge", "--delivered-before", "9999999d"], "not a duration of at most 100 years"),
        ([*SEND, "--wait", "--timeout", "nan"], "argument --timeout: expected a number"),
        ([*SEND, "--wait", "--timeout", "-5"], "argument --timeout: expected a number"),
        ([*SEND, "--wait", "--timeout", "1e999"], "argument --timeout: expected a number"),
        (["worker", "--once", "--no-live", "--drain-timeout", "nan"], "--drain-timeout"),
        (
            ["--smtp-port", "x", "queue"],
            "argument --smtp-port: expected an integer in ASCII digits, got 'x'",
        ),
        (["queue", "--smtp-port", "70000"], "argument --smtp-port: not a port number: 70000"),
        (["--dns-server", "127.0.0.1:99999", "queue"], "argument --dns-server: not a port"),
        (["--dns-server", "1.1.1.1:53", "--dns-server", "1.1.1.2:54", "queue"], "same port"),
        (["--helo-name", "two words", "queue"], "argument --helo-name: expected a host name"),
        (["--helo-name", "mail@evil.com", "queue"], "argument --helo-name: expected a host"),
        (["--store", "mysql://x/y", "queue"], "argument --store: unknown store URL"),
        (["--tls-ca", "/no/such/ca.pem", "queue"], "argument --tls-ca: no such file"),
        # An empty filter ("$D" unset) was no filter: cancel and purge acted on everything.
        (["cancel", "--domain", "", "--older-than", "0s"], "argument --domain: expected a"),
        (["purge", "--domain", " ", "--finished-before", "0s"], "argument --domain: expected"),
        (["purge", "--tag", "", "--finished-before", "0s"], "argument --tag: expected a tag"),
        # What the store refuses to compare was an internal error (70).
        (["queue", "--domain", "a" * 300], "argument --domain: expected a domain of at most"),
        (["cancel", "--domain", "ex\udcffample.org"], "argument --domain: expected a domain"),
        (["retry", "--tag", "t" * 300], "argument --tag: expected a tag of at most 255"),
        # Numbers that overflowed where used: after queueing (70), in sleep (70), in SQLite (75).
        ([*SEND, "--wait", "--timeout", "1e20"], "argument --timeout: expected a number"),
        (["events", "--follow", "--interval", "1e10"], "argument --interval: expected a num"),
        (["events", "--after", "99999999999999999999"], "argument --after: expected an event"),
        (["--store", "postgresql://u@db:99999/mail", "queue"], "argument --store: malformed"),
        # "--config $CFG" with CFG unset read ~/.config/mailstrom/config.toml instead.
        (["--config", "", "queue"], "argument --config: expected a configuration file"),
        # An empty value ("$AUDIT" unset) was dropped without a word: the message went
        # without its Bcc, its Cc or its HTML part, with the server's default NOTIFY.
        ([*SEND, "--bcc", ""], "argument --bcc: expected an address, got ''"),
        ([*SEND, "--cc", ""], "argument --cc: expected an address, got ''"),
        ([*SEND, "--reply-to", ""], "argument --reply-to: expected an address, got ''"),
        ([*SEND, "--html-file", ""], "argument --html-file: expected a file name, got ''"),
        ([*SEND, "--attach", ""], "argument --attach: expected a file name, got ''"),
        ([*SEND, "--notify", ""], "argument --notify: expected never, or success, failure"),
        (
            ["dkim", "keygen", "--domain", "example.org", "--selector", "s", "--out", ""],
            "argument --out: expected a file name, got ''",
        ),
        # "[::1]5353": the port was dropped, and port 53 queried.
        (["--dns-server", "[::1]5353", "queue"], "argument --dns-server: expected [HOST]:PORT"),
        (["queue", "--dns-server", "[::1]x"], "argument --dns-server: expected [HOST]:PORT"),
    ],
)
def test_bad_option_values_are_usage_errors(cli: CLI, args: list[str], reason: str) -> None:
    """Hardening #12: a bad option value exits 64 with a plain reason: never 70 with an
    OverflowError, a traceback, 78 (that is for configuration files), or a silent run."""
    send_id = cli.ok(*SEND).out.strip()  # a store with a message: limits reach SQLite
    result = cli(*args)
    assert result.code == 64, result.err
    assert "Traceback" not in result.err
    assert "internal error" not in result.err
    assert result.err_lines[-1].startswith("mailstrom: "), result.err
    assert reason in result.err_lines[-1]
    assert cli.queue_ids() == [send_id]  # nothing queued, changed or purged


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        # A file that holds no CA certificate: only its existence was checked, and the
        # settings loader then refused it as a configuration error (78) naming tls_ca.
        (["--tls-ca", "notes.txt", "queue"], "argument --tls-ca: cannot load 'notes.txt'"),
        # The worker's own options were checked only as settings: 78, named as settings.
        (["worker", "--once", "--no-live", "--metrics", "x:y"], "argument --metrics: expected"),
        (["worker", "--once", "--no-live", "--metrics", ""], "argument --metrics: expected"),
        (["worker", "--once", "--no-live", "--hook", "ftp://x"], "argument --hook: expected"),
        (["worker", "--once", "--no-live", "--hook", ""], "argument --hook: expected"),
        # An empty value ("$CONTACT" unset) fell back to the setting or the default without
        # a word, though the setting refuses an empty one (78).
        (["tlsrpt", "--contact", ""], "argument --contact: expected a non-empty string"),
        (["tlsrpt", "--organization", ""], "argument --organization: expected a non-empty"),
        (["tlsrpt", "--from", ""], "argument --from: expected a non-empty string"),
        (["tlsrpt", "--out", ""], "argument --out: expected a directory, got ''"),
    ],
)
def test_bad_option_values_checked_as_settings_are_usage_errors(
    cli: CLI, args: list[str], reason: str
) -> None:
    """docs/cli.md: a bad value given as an option is a usage error naming the option
    (exit 64); 78 is for the file and the environment."""
    (cli.cwd / "notes.txt").write_text("not a certificate\n")
    cli.env["MAILSTROM_HOOK_SECRET"] = "s3cret-s3cret-s3cret"
    result = cli(*args, timeout=30)
    assert result.code == 64, result.err
    assert result.err_lines[-1].startswith("mailstrom: "), result.err
    assert reason in result.err_lines[-1]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[retry]\nmax_age = "99999999999d"\n', "retry.max_age"),
        ("[retry]\nmin_delay = inf\n", "retry.min_delay"),
        ('[retry]\nmin_delay = "0s"\n', "retry.min_delay"),  # no delay ever grows from 0
        ("[retry]\nmax_delay = 1e300\n", "retry.max_delay"),
        ("[timeouts]\nconnect = nan\n", "timeouts.connect"),
        ('[timeouts]\ncommand = "inf"\n', "timeouts.command"),
        ("lease_batch = 99999999999999999999\n", "lease_batch"),
        ("poll_interval = 1" + "0" * 400 + "\n", "poll_interval"),  # beyond any float
        ('lease_for = "99999999999w"\n', "lease_for"),
    ],
)
def test_out_of_range_file_values_are_config_errors(tmp_path: Path, text: str, key: str) -> None:
    """Hardening #12: NaN, infinity and values that overflow later are ConfigErrors naming
    the key (exit 78), not an OverflowError (70) or a worker that breaks later."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(config_path=path, env={})


def test_out_of_range_environment_value_exits_78(cli: CLI) -> None:
    """Hardening #12: through the command, such a value is one line and exit 78."""
    cli.env["MAILSTROM_RETRY_MAX_AGE"] = "99999999999d"
    assert_one_line_error(cli("queue"), 78, "retry.max_age")


def test_a_store_url_with_a_bad_port_exits_78(cli: CLI) -> None:
    """libpq refused the port only when connecting: exit 75, and a worker waited for a
    store that could never open."""
    cli.env["MAILSTROM_STORE"] = "postgresql://u@db:5432x/mail"
    assert_one_line_error(cli("queue"), 78, "malformed store URL")
    assert_one_line_error(cli("worker", "--no-live"), 78, "malformed store URL")


def test_a_config_file_that_is_no_toml_exits_78(cli: CLI) -> None:
    """A config file that is not UTF-8, or nested past Python's stack, is one line and
    exit 78, not "internal error" (70)."""
    (cli.cwd / "binary.toml").write_bytes(b"\xff\xfe\x00\x01")
    assert_one_line_error(cli("--config", "binary.toml", "queue"), 78, "not UTF-8")
    (cli.cwd / "deep.toml").write_bytes(b"a = " + b"[" * 100_000)
    assert_one_line_error(cli("--config", "deep.toml", "queue"), 78, "nested too deeply")


@pytest.mark.parametrize("once", [["--once"], []])
def test_a_worker_on_a_memory_store_exits_78(cli: CLI, once: list[str]) -> None:
    """A memory store made by the worker's own process can never receive mail from
    another: the worker ran for ever (or, with --once, exited 0) delivering nothing. It is
    refused like every command that changes the store (and Django's mailstrom_worker)."""
    assert_one_line_error(
        cli("--store", "memory:", "worker", "--no-live", *once, timeout=30), 78, "memory store"
    )
    cli.env["MAILSTROM_STORE"] = "memory:"
    assert_one_line_error(cli("worker", "--no-live", *once, timeout=30), 78, "memory store")
