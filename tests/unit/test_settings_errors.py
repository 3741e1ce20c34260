"""Errors of the settings loader: what they show of a bad value (hardening #14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings, parse_dns_servers

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "text",
    [
        # The likely mistake: the URL put in a [store] table, as [dns] holds dns.port.
        f'[store]\nurl = "postgresql://app:{SECRET}@db.internal/mail"\n',
        f'store = ["postgresql://app:{SECRET}@db.internal/mail"]\n',
    ],
)
def test_a_store_of_the_wrong_type_is_not_echoed(tmp_path: Path, text: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config_path=config, env={})
    assert str(raised.value).startswith("store: ")
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "allow_loopback = [" + ", ".join(["1"] * 50_000) + "]\n",  # a bool
        "store = [" + ", ".join(['"x"'] * 50_000) + "]\n",
        "[dns]\nnameservers = [" + ", ".join(["1"] * 50_000) + "]\n",
        "[dns]\ntimeout = [" + ", ".join(["1"] * 50_000) + "]\n",
        "[retry]\nmax_attempts = [" + ", ".join(["1"] * 50_000) + "]\n",
        "tls = [" + ", ".join(["1"] * 50_000) + "]\n",
        "lease_for = [" + ", ".join(["1"] * 50_000) + "]\n",
        "[dkim]\nkeys = {" + ", ".join(f"k{i} = 1" for i in range(50_000)) + "}\n",
        "x" * 100_000 + " = 1\n",  # an unknown setting
        "[dns]\n" + "x" * 100_000 + " = 1\n",
    ],
)
def test_a_huge_bad_value_is_quoted_in_a_few_lines(tmp_path: Path, text: str) -> None:
    """A TOML value or key can be as large as the file (1 MiB): the error quotes a piece."""
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config_path=config, env={})
    assert len(str(raised.value)) < 300 + len(str(config))


@pytest.mark.parametrize(
    "servers", [["127.0.0.1", "[::1]:5353"], ["[::1]:5353", "127.0.0.1"], ["127.0.0.2:5353", "::1"]]
)
def test_dns_servers_with_and_without_a_port_are_refused(servers: list[str]) -> None:
    """DNSConfig has one port for all servers: a server given without one (port 53) beside
    one with :5353 was queried on 5353, a port it was not given."""
    with pytest.raises(ConfigError, match="same port"):
        parse_dns_servers(servers)


def test_an_integer_too_long_to_read_in_a_config_file_is_a_config_error(tmp_path: Path) -> None:
    """tomllib reads an integer with int(), which refuses one of more than 4,300 digits with
    a ValueError that is no TOMLDecodeError: every command ended as an internal error."""
    config = tmp_path / "c.toml"
    config.write_text(f"max_recipients = {'1' * 5000}\n")
    with pytest.raises(ConfigError, match="integer too long"):
        load_settings(config_path=config, env={})


@pytest.mark.parametrize(
    "value", [10**5000, [10**5000], {"x": 10**5000}], ids=["int", "list", "dict"]
)
def test_an_integer_too_long_to_show_is_named_in_the_error(value: object) -> None:
    """Python has no repr for an int of more than 4,300 digits: the error about one given
    from Python (Django's MAILSTROM setting) failed to be written, a bare ValueError."""
    with pytest.raises(ConfigError, match="max_recipients") as raised:
        load_settings(overrides={"max_recipients": value}, env={})
    assert len(str(raised.value)) < 300
