from datetime import timedelta

import pytest

from mailstrom import Config, RetryPolicy
from mailstrom.errors import ConfigError


def test_defaults_follow_rfc_5321() -> None:
    config = Config(helo_name="mail.example.com")
    assert config.smtp_port == 25
    assert config.timeouts.greeting == 300
    assert config.timeouts.data_end == 600
    assert config.retry.min_delay == timedelta(minutes=5)
    assert config.retry.max_delay == timedelta(hours=1)


@pytest.mark.parametrize(
    "bad",
    [
        {"helo_name": ""},
        {"helo_name": "two words"},
        {"smtp_port": 0},
        {"smtp_port": 70000},
        {"max_connections": 0},
        {"lease_batch": 0},
        {"lease_for": timedelta(0)},
        {"retry": RetryPolicy(min_delay=timedelta(hours=2), max_delay=timedelta(hours=1))},
    ],
)
def test_bad_values_raise_config_error(bad: dict[str, object]) -> None:
    options: dict[str, object] = {"helo_name": "mail.example.com", **bad}
    with pytest.raises(ConfigError):
        Config(**options)  # type: ignore[arg-type]
