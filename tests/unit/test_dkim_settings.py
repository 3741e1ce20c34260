"""DKIM and the Message-ID domain in the command line's configuration (TOML and MAILSTROM_*),
and a Config with DKIM keys crossing to a worker process."""

from __future__ import annotations

import pickle
from datetime import timedelta
from pathlib import Path

import pytest
from tests.support.dkim import ED25519, RSA, pem

from mailstrom import Config
from mailstrom.dkim import DKIMConfig, DKIMKey
from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, algorithm in (("rsa", RSA), ("ed", ED25519)):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(pem(algorithm))
        path.chmod(0o600)
        out[name] = path
    return out


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_settings(config_path=path, env=env or {}).config


def test_keys_tables(tmp_path: Path, keys: dict[str, Path]) -> None:
    config = load(
        tmp_path,
        f"""
message_id_domain = "mail.example.com"

[dkim]
required = true
expire = "7d"

[[dkim.keys]]
domain = "example.com"
selector = "s2026r"
private_key = "{keys["rsa"]}"
algorithm = "rsa-sha256"

[[dkim.keys]]
domain = "example.com"
selector = "s2026e"
private_key = "{keys["ed"]}"
algorithm = "ed25519-sha256"
""",
    )
    assert config.message_id_domain == "mail.example.com"
    assert config.dkim is not None
    assert config.dkim.required and config.dkim.expire == timedelta(days=7)
    assert [(k.selector, k.algorithm) for k in config.dkim.keys] == [
        ("s2026r", RSA),
        ("s2026e", ED25519),
    ]


def test_keys_from_the_environment(keys: dict[str, Path]) -> None:
    env = {
        "MAILSTROM_DKIM_KEYS": f"example.com:r:{keys['rsa']}, example.com:e:{keys['ed']}:ed25519",
        "MAILSTROM_DKIM_REQUIRED": "yes",
        "MAILSTROM_MESSAGE_ID_DOMAIN": "mail.example.com",
    }
    config = load_settings(env=env, search=False).config
    assert config.dkim is not None and config.dkim.required
    assert [k.algorithm for k in config.dkim.keys] == [RSA, ED25519]
    with pytest.raises(ConfigError, match="domain:selector:path"):
        load_settings(env={"MAILSTROM_DKIM_KEYS": "example.com:r"}, search=False)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('domain = "example.com"\nselector = "s"', "private_key is required"),
        ('domain = "example.com"\nselector = "s"\nprivate_key = "{rsa}"\nkey = "x"', "unknown"),
        ('domain = "example.com"\nselector = "s"\nprivate_key = 3', "private_key"),
        (
            'domain = "example.com"\nselector = "s"\nprivate_key = "{rsa}"\nalgorithm = "dsa"',
            "one of",
        ),
        ('domain = "example.com"\nselector = "s"\nprivate_key = "/nonexistent.pem"', "cannot read"),
    ],
)
def test_bad_key_tables(tmp_path: Path, keys: dict[str, Path], table: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load(tmp_path, "[[dkim.keys]]\n" + table.format(rsa=keys["rsa"]))


def test_required_without_keys_and_unknown_dkim_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no dkim"):
        load(tmp_path, "[dkim]\nrequired = true\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'dkim\.selector'"):
        load(tmp_path, '[dkim]\nselector = "s"\n')


def test_a_key_others_can_read_stops_the_configuration(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    keys["rsa"].chmod(0o640)
    text = f'[[dkim.keys]]\ndomain = "example.com"\nselector = "s"\nprivate_key = "{keys["rsa"]}"\n'
    with pytest.raises(ConfigError, match="chmod 600"):
        load(tmp_path, text)


def test_a_config_with_keys_crosses_to_a_worker_process(keys: dict[str, Path]) -> None:
    dkim = DKIMConfig(keys=(DKIMKey(domain="example.com", selector="s", private_key=keys["rsa"]),))
    config = Config(helo_name="mail.example.com", dkim=dkim)
    clone = pickle.loads(pickle.dumps(config))
    assert clone.dkim == dkim and clone.dkim.keys_for(["example.com"]) == dkim.keys
