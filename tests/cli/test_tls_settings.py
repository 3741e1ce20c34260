"""The TLS policy settings: ``[tls]``, ``[tls.domains]``, ``dns.dnssec``, in file and env."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from mailstrom.config import TLSPolicy
from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings

FILE = """
[tls]
default = "verify"
remember_broken = "30m"

[tls.domains]
"legacy.example" = "none"
"*.bank.example" = "dane-only"

[dns]
dnssec = true
"""


def test_a_file_names_the_default_and_the_table(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FILE)
    config = load_settings(config_path=path, env={}).config
    assert config.tls is TLSPolicy.VERIFY
    assert config.tls_remember_broken == timedelta(minutes=30)
    assert config.dns.dnssec is True
    assert config.tls_table.match("legacy.example") == ("legacy.example", TLSPolicy.NONE)
    assert config.tls_table.match("www.bank.example") == ("*.bank.example", TLSPolicy.DANE_ONLY)


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FILE)
    env = {"MAILSTROM_TLS": "opportunistic", "MAILSTROM_TLS_DOMAINS": "a.example=required"}
    config = load_settings(config_path=path, env=env).config
    assert config.tls is TLSPolicy.OPPORTUNISTIC
    assert dict(config.tls_table) == {"a.example": TLSPolicy.REQUIRED}


def test_a_plain_tls_setting_still_works() -> None:
    config = load_settings(env={"MAILSTROM_TLS": "required"}, search=False).config
    assert config.tls is TLSPolicy.REQUIRED and not config.tls_table


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAILSTROM_TLS_DOMAINS": "example.com"}, "domain=level"),
        ({"MAILSTROM_TLS_DOMAINS": "example.com=often"}, "expected one of"),
        ({"MAILSTROM_TLS_DOMAINS": "x.example=dane"}, "dnssec"),
        ({"MAILSTROM_TLS_DOMAINS": "a.example=verify,a.example=none"}, "given twice"),
        ({"MAILSTROM_TLS_DOMAINS": "a.example=verify,A.example=none"}, "given twice"),
        ({"MAILSTROM_DNS_DNSSEC": "perhaps"}, "true or false"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env, search=False)


def test_tlsrpt_record_in_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[tlsrpt]\nrecord = true\norganization = "Example Inc."\n')
    config = load_settings(config_path=path, env={}).config
    assert config.tlsrpt_record is True and config.records_tls_sessions
    env = {"MAILSTROM_TLSRPT_RECORD": "false"}
    config = load_settings(config_path=path, env=env).config
    assert config.tlsrpt_record is False and not config.records_tls_sessions
    # MTA-STS with report (its default) counts sessions through the same switch.
    env |= {"MAILSTROM_MTA_STS_ENABLED": "true"}
    assert load_settings(config_path=path, env=env).config.records_tls_sessions
    env |= {"MAILSTROM_MTA_STS_REPORT": "false"}
    assert not load_settings(config_path=path, env=env).config.records_tls_sessions
    with pytest.raises(ConfigError, match=r"tlsrpt\.record"):
        load_settings(env={"MAILSTROM_TLSRPT_RECORD": "sometimes"}, search=False)


def test_the_environment_default_overrides_a_plain_tls_in_the_file(tmp_path: Path) -> None:
    # Two names of one setting: the environment's [tls] default replaces the file's plain
    # tls, as MAILSTROM_TLS replaces the file's [tls] default; in one layer tls still wins.
    path = tmp_path / "config.toml"
    path.write_text('tls = "opportunistic"\n')
    env = {"MAILSTROM_TLS_DEFAULT": "verify"}
    assert load_settings(config_path=path, env=env).config.tls is TLSPolicy.VERIFY
    both = env | {"MAILSTROM_TLS": "required"}
    assert load_settings(config_path=path, env=both).config.tls is TLSPolicy.REQUIRED
    over = load_settings(config_path=path, env=env, overrides={"tls": "none"}).config
    assert over.tls is TLSPolicy.NONE
