"""``settings.MAILSTROM`` → mailstrom's settings: the TOML file's keys, flat or nested,
parsed by the command line's own code (no sockets, no Django setup needed)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from mailstrom import RelayTLS, TLSPolicy
from mailstrom.contrib.django.conf import flatten, load
from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings


def test_flat_and_nested_keys_mean_the_same_as_the_toml_file(tmp_path: Path) -> None:
    flat = load(
        {
            "store": "sqlite:////var/spool/app/mail.db",
            "helo_name": "mail.example.com",
            "dns.nameservers": ["127.0.0.1"],
            "dns.port": 5353,
            "retry.max_age": "2d",
            "relay.host": "smtp.example.com",
            "relay.tls": "implicit",
        }
    )
    nested = load(
        {
            "store": "sqlite:////var/spool/app/mail.db",
            "helo_name": "mail.example.com",
            "dns": {"nameservers": ["127.0.0.1"], "port": 5353},
            "retry": {"max_age": "2d"},
            "relay": {"host": "smtp.example.com", "tls": "implicit"},
        }
    )
    toml = tmp_path / "config.toml"
    toml.write_text(
        'store = "sqlite:////var/spool/app/mail.db"\nhelo_name = "mail.example.com"\n'
        '[dns]\nnameservers = ["127.0.0.1"]\nport = 5353\n[retry]\nmax_age = "2d"\n'
        '[relay]\nhost = "smtp.example.com"\ntls = "implicit"\n'
    )
    from_file = load_settings(config_path=toml, env={})
    assert flat.settings.config == nested.settings.config == from_file.config
    assert flat.settings.store_url == from_file.store_url == "sqlite:////var/spool/app/mail.db"
    config = flat.settings.config
    assert config.dns.port == 5353 and config.retry.max_age == timedelta(days=2)
    assert config.relay is not None and config.relay.tls is RelayTLS.IMPLICIT


def test_python_values_toml_lacks() -> None:
    conf = load({"retry": {"min_delay": timedelta(minutes=2)}, "dns.nameservers": ("::1",)})
    assert conf.settings.config.retry.min_delay == timedelta(minutes=2)
    assert conf.settings.config.dns.nameservers == ("::1",)


def test_a_path_is_its_string(tmp_path: Path) -> None:
    # settings.py builds paths as BASE_DIR / "...", as docs/django.md says to: "store":
    # BASE_DIR / "mail.db" was ImproperlyConfigured ("expected a store URL or file path
    # as a non-empty string, got PosixPath"), where str() of it was taken.
    aliases = tmp_path / "aliases"
    conf = load({"store": tmp_path / "mail.db", "sendmail": {"aliases": aliases}})
    same = load({"store": str(tmp_path / "mail.db"), "sendmail.aliases": str(aliases)})
    assert conf.settings.store_url == same.settings.store_url
    assert conf.settings.config == same.settings.config


@pytest.mark.parametrize(
    ("value", "worker"),
    [({}, "auto"), ({"worker": None}, None), ({"worker": "thread"}, "thread")],
)
def test_the_worker_key(value: dict[str, object], worker: str | None) -> None:
    assert load({"store": "memory:", **value}).worker == worker


def test_no_setting_means_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    conf = load(None)
    assert conf.worker == "auto"
    assert conf.settings.config.tls is TLSPolicy.OPPORTUNISTIC
    # The same fixed per-user queue as the command line's (never the working directory).
    assert conf.settings.store_url in (
        f"sqlite:///{tmp_path}/mailstrom/queue.db",
        "sqlite:////var/spool/mailstrom/queue.db",  # when the tests run as root
    )


def test_environment_variables_take_no_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSTROM_SMTP_PORT", "2525")
    monkeypatch.setenv("MAILSTROM_UNKNOWN_THING", "x")  # the command line would refuse it
    assert load({"store": "memory:"}).settings.config.smtp_port == 25


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"smtp_prot": 25}, "unknown setting 'smtp_prot'"),
        ({"dns": {"prot": 53}}, "unknown setting 'dns.prot'"),
        ({"smtp_port": "x"}, "smtp_port: expected an integer"),
        ({"dns.port": 53, "dns": {"port": 54}}, "dns.port: given twice"),
        ({"retry.max_age": None}, "retry.max_age: None is not a value"),
        ({"worker": "task"}, "worker: expected 'process', 'thread' or None"),
        ({"store": "mysql://db/mail"}, "unknown store URL"),
        # The store's own checks of its URL, which ran only at the first send.
        ({"store": "postgresql://app@db/mail?dead_after=zz"}, "dead_after in a PostgreSQL"),
        ({"store": "postgresql://app@db/mail?bogus=1"}, "libpq cannot parse"),
        ({"store": "memory:", "worker": "process"}, "worker: 'process' needs a store"),
        ({"relay.password": "x"}, "relay.host: required"),
        ("sqlite:///mail.db", "expected a dict"),
        # Past TOML's 64-bit integers: the error about it raised ValueError (an int of
        # more than 4,300 digits cannot be written as text), a traceback from the check.
        ({"smtp_port": 10**5000}, "smtp_port: an integer past TOML's 64 bits"),
        ({"lanes": [{"name": "bulk", "share": -(10**5000)}]}, "lanes: an integer past"),
    ],
)
def test_mistakes_are_improperly_configured_naming_the_key(value: object, says: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"^MAILSTROM: ") as info:
        load(value)
    assert says in str(info.value)
    assert isinstance(info.value.__cause__, ConfigError | ValueError)


def test_a_secret_is_not_shown_in_the_error() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        load({"relay": {"host": "smtp.example.com", "password": 12345}})
    assert "12345" not in str(info.value)


def test_flatten_keeps_values_as_given() -> None:
    assert flatten({"dns": {"port": 53}, "tls": "verify"}) == {"dns.port": 53, "tls": "verify"}


def test_a_table_valued_setting_given_flat_is_the_nested_one() -> None:
    # "tls.domains" holds a table: the flat form was split once more and refused
    # ("unknown setting 'tls.domains.example.com'").
    domains = {"example.com": "verify"}
    flat = load({"store": "memory:", "tls.domains": domains})
    nested = load({"store": "memory:", "tls": {"domains": domains}})
    assert flat.settings.config == nested.settings.config
    assert flat.settings.config.tls_domains.entries == {"example.com": TLSPolicy.VERIFY}
    assert flatten({"tls.domains": domains}) == {"tls.domains": domains}
