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


# --- hardening #14: secrets ------------------------------------------------------------------


def test_auth_without_tls_is_refused() -> None:
    """Hardening #14: AUTH over relay.tls = none (cleartext password) is a ConfigError."""
    from mailstrom import RelayConfig, RelayTLS

    with pytest.raises(ConfigError, match="allow_plaintext_auth"):
        RelayConfig(host="smtp.example.net", tls=RelayTLS.NONE, username="app", password="p")
    # Allowed when said explicitly, and of course over TLS or without AUTH.
    RelayConfig(
        host="127.0.0.1", tls=RelayTLS.NONE, username="app", password="p", allow_plaintext_auth=True
    )
    RelayConfig(host="smtp.example.net", tls=RelayTLS.STARTTLS, username="app", password="p")
    RelayConfig(host="smtp.example.net", tls=RelayTLS.IMPLICIT, username="app", password="p")
    RelayConfig(host="127.0.0.1", tls=RelayTLS.NONE)


def test_repr_hides_the_password() -> None:
    """Hardening #14: repr(RelayConfig) and repr(Config) never show the password."""
    from mailstrom import RelayConfig

    relay = RelayConfig(host="smtp.example.net", username="app", password="hunter2-secret")
    config = Config(helo_name="mail.example.com", relay=relay)
    for text in (repr(relay), repr(config), str(config)):
        assert "hunter2-secret" not in text
        assert "password='***'" in text
        assert "username='app'" in text
    assert "password=None" in repr(RelayConfig(host="smtp.example.net"))


def test_dkim_must_be_a_dkim_config() -> None:
    from mailstrom.dkim import DKIMConfig

    assert Config(helo_name="mail.example.com", dkim=DKIMConfig()).dkim == DKIMConfig()
    with pytest.raises(ConfigError, match="dkim must be a DKIMConfig, not dict"):
        Config(helo_name="mail.example.com", dkim={"keys": []})  # type: ignore[arg-type]
