"""``retention.delivered`` / ``retention.failed``: the TOML file, MAILSTROM_* variables and
``Config(retention=RetentionConfig(...))``; bad values are ConfigErrors naming the key."""

from __future__ import annotations

import math
import pickle
from datetime import timedelta
from pathlib import Path

import pytest

from mailstrom import Config, RetentionConfig
from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings

DAY = timedelta(days=1)


def from_env(**env: str) -> RetentionConfig:
    return load_settings(env=env, search=False).config.retention


def test_the_default_keeps_everything() -> None:
    assert Config().retention == RetentionConfig(delivered=None, failed=None)
    assert not Config().retention.enabled
    assert from_env() == RetentionConfig()


def test_a_file_sets_both_ages(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[retention]\ndelivered = "30d"\nfailed = "12w"\n')
    retention = load_settings(config_path=path, env={}).config.retention
    assert retention == RetentionConfig(delivered=30 * DAY, failed=84 * DAY)
    assert retention.enabled


def test_the_environment_sets_them_and_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[retention]\ndelivered = "30d"\n')
    env = {"MAILSTROM_RETENTION_DELIVERED": "2h", "MAILSTROM_RETENTION_FAILED": "90d"}
    retention = load_settings(config_path=path, env=env).config.retention
    assert retention == RetentionConfig(delivered=timedelta(hours=2), failed=90 * DAY)


@pytest.mark.parametrize("value", ["0", "0s", "none", "off", " 0d "])
def test_zero_or_none_keeps_for_ever(value: str) -> None:
    """ "0" is "keep for ever" in every form: "0s" deleting mail as soon as it finished
    would lose what the operator meant to keep."""
    assert from_env(MAILSTROM_RETENTION_FAILED=value) == RetentionConfig()


def test_a_file_number_is_seconds_and_zero_or_false_keeps(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[retention]\ndelivered = 86400\nfailed = 0\n")
    assert load_settings(config_path=path, env={}).config.retention == RetentionConfig(
        delivered=DAY
    )
    path.write_text("[retention]\ndelivered = false\n")
    assert load_settings(config_path=path, env={}).config.retention == RetentionConfig()


@pytest.mark.parametrize("value", ["-1d", "nan", "inf", "1e400d", "36600000d", "30 days", "x"])
def test_bad_values_in_the_environment_are_config_errors(value: str) -> None:
    with pytest.raises(ConfigError, match=r"retention\.delivered"):
        from_env(MAILSTROM_RETENTION_DELIVERED=value)


def test_an_empty_variable_is_refused_not_read_as_keep_for_ever() -> None:
    """As for the other limits ``none`` turns off: an empty variable is most often one
    that was never set, and "keep for ever" is not what a "$AGE" unset should mean."""
    with pytest.raises(ConfigError, match="MAILSTROM_RETENTION_FAILED"):
        from_env(MAILSTROM_RETENTION_FAILED="")


@pytest.mark.parametrize("text", ["-86400", "nan", "inf", "1e300", '"forever"', "true", "[1]"])
def test_bad_values_in_a_file_are_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[retention]\nfailed = {text}\n")
    with pytest.raises(ConfigError, match=r"retention\.failed"):
        load_settings(config_path=path, env={})


@pytest.mark.parametrize("value", [-DAY, timedelta(days=365 * 101), 30, "30d", math.nan, True])
def test_bad_values_in_python_are_config_errors(value: object) -> None:
    with pytest.raises(ConfigError, match=r"retention\.delivered"):
        RetentionConfig(delivered=value)  # type: ignore[arg-type]


def test_config_refuses_what_is_no_retention_config() -> None:
    with pytest.raises(ConfigError, match="retention"):
        Config(retention={"delivered": DAY})  # type: ignore[arg-type]


def test_a_config_with_a_retention_crosses_to_a_worker_process() -> None:
    config = Config(helo_name="mail.example.com", retention=RetentionConfig(failed=DAY))
    assert pickle.loads(pickle.dumps(config)).retention == RetentionConfig(failed=DAY)
