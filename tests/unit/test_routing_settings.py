"""The routing settings (hardening finding #6) in Config, in the command line's TOML and
environment layers, and on their way into the Router."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
    assert config.mx_host_limit is None  # twice mx_address_limit


@pytest.mark.parametrize("name", ["mx_address_limit", "mx_host_limit", "mx_session_limit"])
def test_config_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config(helo_name="mail.example.com", **{name: 0})  # type: ignore[arg-type]


def test_settings_from_environment() -> None:
    env = {
        "MAILSTROM_ALLOW_LOOPBACK": "1",
        "MAILSTROM_MX_ADDRESS_LIMIT": "8",
        "MAILSTROM_MX_SESSION_LIMIT": "3",
        "MAILSTROM_MX_HOST_LIMIT": "12",
    }
    config = load_settings(env=env, search=False).config
    assert (config.allow_loopback, config.mx_address_limit, config.mx_session_limit) == (
        True,
        8,
        3,
    )
    assert config.mx_host_limit == 12
    assert env_name("allow_loopback") == "MAILSTROM_ALLOW_LOOPBACK"
    assert load_settings(env={}, search=False).config.allow_loopback is False


def test_settings_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "mailstrom.toml"
    path.write_text("allow_loopback = true\nmx_address_limit = 2\nmx_host_limit = 12\n")
    config = load_settings(config_path=path, env={}).config
    assert config.allow_loopback is True
    assert config.mx_address_limit == 2
    assert config.mx_host_limit == 12
    assert Router.for_config(config).policy.hosts_considered == 12


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAILSTROM_ALLOW_LOOPBACK", "maybe"), ("MAILSTROM_MX_ADDRESS_LIMIT", "0"),
     ("MAILSTROM_MX_SESSION_LIMIT", "-1"), ("MAILSTROM_MX_HOST_LIMIT", "0"),
     ("MAILSTROM_MX_HOST_LIMIT", "none"), ("MAILSTROM_MX_HOST_LIMIT", "2.5")],
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
    assert router.policy.hosts_considered == 6  # no mx_host_limit: twice the address limit
    config = Config(helo_name="client.test", mx_address_limit=3, mx_host_limit=20)
    assert Router.for_config(config).policy.hosts_considered == 20
    default = Router(DNSConfig())
    assert not default.policy.allow_loopback
    assert default.policy.mx_address_limit == 5


APPLICATION_TYPE = textwrap.dedent(
    """
    import sys, types
    import dns.rdata, dns.rdataclass, dns.rdatatype
    from dns.rdtypes.txtbase import TXTBase
    from mailstrom.config import DNSConfig
    from mailstrom.routing.router import make_resolver

    make_resolver(DNSConfig(nameservers=("127.0.0.1",)))
    module = types.ModuleType("app_ta")
    module.TA = type("TA", (TXTBase,), {})  # the application's own class of TA
    dns.rdata.register_type(module, dns.rdatatype.TA, "TA", rdclass=dns.rdataclass.ANY)
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TA, '"hello"')
    print(type(rdata).__name__)
    """
)


def test_a_resolver_made_leaves_an_application_its_own_record_classes() -> None:
    """Making a resolver imports dnspython's class of every record type (a worker out of
    descriptors could not import one later), and enters nothing for a type dnspython has
    no class of: an application's class registered for one afterwards applies. Was: the
    types without a class were entered as generic for class IN, and an IN record of the
    application's type no longer parsed (dnspython asked for the generic syntax)."""
    ran = subprocess.run(
        [sys.executable, "-c", APPLICATION_TYPE], capture_output=True, text=True, timeout=60
    )
    assert (ran.returncode, ran.stdout.strip()) == (0, "TA"), ran.stderr
