"""The routing settings (hardening finding #6) in Config, in the command line's TOML and
environment layers, and on their way into the Router."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailstrom.config import Config, DNSConfig
from mailstrom.errors import ConfigError
from mailstrom.routing import Router
from mailstrom.settings import env_name, load_settings


def test_config_defaults_are_safe() -> None:
    """Hardening #6: loopback refused, 5 addresses and 2 sessions per attempt by default."""
    config = Config(helo_name="mail.example.com")
    assert config.allow_loopback is False
    assert config.mx_address_limit == 5
    assert config.mx_session_limit == 2


@pytest.mark.parametrize("name", ["mx_address_limit", "mx_session_limit"])
def test_config_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config(helo_name="mail.example.com", **{name: 0})  # type: ignore[arg-type]


def test_settings_from_environment() -> None:
    env = {
        "MAILSTROM_ALLOW_LOOPBACK": "1",
        "MAILSTROM_MX_ADDRESS_LIMIT": "8",
        "MAILSTROM_MX_SESSION_LIMIT": "3",
    }
    config = load_settings(env=env, search=False).config
    assert (config.allow_loopback, config.mx_address_limit, config.mx_session_limit) == (
        True,
        8,
        3,
    )
    assert env_name("allow_loopback") == "MAILSTROM_ALLOW_LOOPBACK"
    assert load_settings(env={}, search=False).config.allow_loopback is False


def test_settings_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "mailstrom.toml"
    path.write_text("allow_loopback = true\nmx_address_limit = 2\n")
    config = load_settings(config_path=path, env={}).config
    assert config.allow_loopback is True
    assert config.mx_address_limit == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAILSTROM_ALLOW_LOOPBACK", "maybe"), ("MAILSTROM_MX_ADDRESS_LIMIT", "0"),
     ("MAILSTROM_MX_SESSION_LIMIT", "-1")],
)  # fmt: skip
def test_bad_settings_name_the_key(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name.removeprefix("MAILSTROM_").lower()):
        load_settings(env={name: value}, search=False)


def test_for_config_takes_the_policy_from_config() -> None:
    router = Router.for_config(
        Config(helo_name="client.test", allow_loopback=True, mx_address_limit=3)
    )
    assert router.policy.allow_loopback
    assert router.policy.mx_address_limit == 3
    default = Router(DNSConfig())
    assert not default.policy.allow_loopback
    assert default.policy.mx_address_limit == 5
