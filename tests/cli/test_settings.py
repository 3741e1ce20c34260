"""Unit tests of settings.py: file < environment < options, and errors that name the key."""

from __future__ import annotations

import os
import re
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
import trustme

from mailstrom.config import Lane, RelayTLS, TLSPolicy
from mailstrom.errors import ConfigError
from mailstrom.settings import (
    KEYS,
    MAX_CONFIG_FILE_SIZE,
    MAX_KEY_PARTS,
    default_config_paths,
    env_name,
    load_settings,
    parse_dns_servers,
    parse_duration,
)
from mailstrom.stores.url import default_store_url
from mailstrom.suppression import SuppressionSource

FILE = """
store = "sqlite:///from-file.db"
helo_name = "file.example"
smtp_port = 2500
tls = "required"

[dns]
nameservers = ["192.0.2.1", "192.0.2.2"]
port = 5300

[retry]
min_delay = "1m"
max_age = "2d"

[timeouts]
connect = 3
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mailstrom.toml"
    path.write_text(FILE)
    return path


def test_defaults_without_file_or_env(tmp_path: Path) -> None:
    s = load_settings(env={}, search=False)
    assert s.store_url == default_store_url({})
    assert s.config.smtp_port == 25
    assert s.config.tls is TLSPolicy.OPPORTUNISTIC
    assert s.config.relay is None
    assert s.config_file is None


def test_file_values_map_onto_config(config_file: Path) -> None:
    s = load_settings(config_path=config_file, env={})
    c = s.config
    # A relative path in a file is relative to the file's directory.
    assert s.store_url == f"sqlite:///{config_file.parent}/from-file.db"
    assert (c.helo_name, c.smtp_port, c.tls) == ("file.example", 2500, TLSPolicy.REQUIRED)
    assert c.dns.nameservers == ("192.0.2.1", "192.0.2.2")
    assert c.dns.port == 5300
    assert c.retry.min_delay == timedelta(minutes=1)
    assert c.retry.max_age == timedelta(days=2)
    assert c.retry.max_delay == timedelta(hours=1)  # untouched default
    assert c.timeouts.connect == 3.0
    assert c.timeouts.data_end == 600.0


def test_precedence_file_then_env_then_options(config_file: Path) -> None:
    env = {
        "MAILSTROM_SMTP_PORT": "2600",
        "MAILSTROM_HELO_NAME": "env.example",
        "MAILSTROM_DNS_NAMESERVERS": "127.0.0.1",
    }
    s = load_settings(config_path=config_file, env=env, overrides={"smtp_port": 2700})
    assert s.config.smtp_port == 2700  # option beats env beats file
    assert s.config.helo_name == "env.example"  # env beats file
    assert s.config.dns.nameservers == ("127.0.0.1",)
    assert s.config.dns.port == 5300  # only in the file
    assert s.config.tls is TLSPolicy.REQUIRED
    assert s.store_url == f"sqlite:///{config_file.parent}/from-file.db"


def test_none_override_does_not_mask_lower_layers(config_file: Path) -> None:
    s = load_settings(config_path=config_file, env={}, overrides={"helo_name": None})
    assert s.config.helo_name == "file.example"


def test_default_locations_first_found(
    tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "mailstrom").mkdir(parents=True)
    (xdg / "mailstrom" / "config.toml").write_text('helo_name = "xdg.example"\n')
    env = {"XDG_CONFIG_HOME": str(xdg)}
    # $XDG_CONFIG_HOME/mailstrom/config.toml, even with a ./mailstrom.toml where we run
    # (config_file lives in tmp_path): see test_security.
    monkeypatch.chdir(tmp_path)
    s = load_settings(env=env)
    assert s.config.helo_name == "xdg.example"
    assert s.config_file == xdg / "mailstrom" / "config.toml"
    assert default_config_paths(env) == [
        xdg / "mailstrom" / "config.toml",
        Path("/etc/mailstrom/config.toml"),
    ]


def test_config_path_from_environment(config_file: Path, tmp_path: Path) -> None:
    s = load_settings(env={"MAILSTROM_CONFIG": str(config_file)})
    assert s.config.helo_name == "file.example"


def test_an_empty_config_path_in_the_environment_is_refused(tmp_path: Path) -> None:
    """``MAILSTROM_CONFIG=`` (``MAILSTROM_CONFIG="$CFG"`` with CFG unset) read the default
    files instead, silently, as ``--config ""`` did before it was refused: the file
    meant was never read and the user's own (or /etc's) settings applied."""
    xdg = tmp_path / "xdg"
    (xdg / "mailstrom").mkdir(parents=True)
    (xdg / "mailstrom" / "config.toml").write_text('helo_name = "xdg.example"\n')
    env = {"XDG_CONFIG_HOME": str(xdg), "MAILSTROM_CONFIG": ""}
    with pytest.raises(ConfigError, match=r"^MAILSTROM_CONFIG is set but empty"):
        load_settings(env=env)
    with pytest.raises(ConfigError, match=r"^MAILSTROM_CONFIG is set but empty"):
        load_settings(env=env, paths=[xdg / "mailstrom" / "config.toml"])  # sendmail's
    with pytest.raises(ConfigError, match=r"^config_path: expected a configuration file"):
        load_settings(config_path="", env={"XDG_CONFIG_HOME": str(xdg)})


@pytest.mark.parametrize(
    "name",
    [
        "MAILSTROM_RETRY_MAX_AGE",
        "MAILSTROM_RETRY_MAX_ATTEMPTS",
        "MAILSTROM_DKIM_EXPIRE",
        "MAILSTROM_SUPPRESS_FOR",
        "MAILSTROM_DELAY_WARNING",
    ],
)
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_limit_in_the_environment_is_refused_naming_it(name: str, value: str) -> None:
    """``MAILSTROM_RETRY_MAX_AGE=`` (``="$AGE"`` with AGE unset) meant "none": mail was
    retried for ever, signatures never expired, and nothing said so. An empty value is
    refused as an empty MAILSTROM_CONFIG or MAILSTROM_STORE is, naming the variable;
    ``none`` still turns the limit off."""
    with pytest.raises(ConfigError) as info:
        load_settings(env={name: value}, search=False)
    assert name in str(info.value)
    assert "none" in str(info.value)
    load_settings(env={name: "none"}, search=False)


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(config_path=tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("helo_nam = 'x'\n", "'helo_nam'"),
        ("[dns]\nports = 53\n", "'dns.ports'"),
        ("smtp_port = 'abc'\n", "smtp_port"),
        ("smtp_port = 70000\n", "smtp_port"),
        ("tls = 'sometimes'\n", "tls"),
        ("[retry]\nmax_age = 'forever'\n", "retry.max_age"),
        ("[relay]\nport = 25\n", "relay.host"),
        ("tls_ca = '/no/such/ca.pem'\n", "tls_ca"),
        ("retry_uncertain = 'maybe'\n", "retry_uncertain"),
        ("source_address = '10.0.0.300'\n", "source_address"),
        ("smtp_port = \n", "invalid TOML"),
        # A quoted dotted key beside its table's key: one setting given twice, the first
        # value silently lost.
        ('"dns.port" = 5353\n[dns]\nport = 53\n', "'dns.port' given twice"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(config_path=path, env={})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"helo_name = '\xff\xfe'\n", "not UTF-8 (at octet 13)"),
        (b"a = " + b"[" * 100_000, "nested too deeply"),
        (b"a = " + b"{b = " * 5_000 + b"1" + b"}" * 5_000, "nested too deeply"),
        (b"# padding\n" * (MAX_CONFIG_FILE_SIZE // 10 + 1), f"larger than {MAX_CONFIG_FILE_SIZE}"),
        (b"a" + b".a" * 3_000 + b" = 1\n", f"more than {MAX_KEY_PARTS} dotted parts (line 1)"),
        (b"[dns]\n" + b"a" + b" . 'b'" * 200 + b" = 1\n", "dotted parts (line 2)"),
    ],
    ids=["not UTF-8", "deep arrays", "deep inline tables", "too large", "deep key", "spaced"],
)
def test_unreadable_toml_is_a_config_error(tmp_path: Path, data: bytes, reason: str) -> None:
    """Not a crash (UnicodeDecodeError, RecursionError), nor a file read however large."""
    path = tmp_path / "c.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=re.escape(reason)):
        load_settings(config_path=path, env={})


def test_an_unquoted_domain_of_every_label_still_gets_its_advice(tmp_path: Path) -> None:
    """A key of more than MAX_KEY_PARTS dotted parts is refused before tomllib reads it
    (tomllib keeps every prefix of a dotted key: one key of 300,000 parts, 600 KB, ran
    the machine out of memory; 20,000 took 14 s and 1.5 GB). A domain written unquoted
    in [tls.domains], as many labels as a domain may have, still gets its advice."""
    path = tmp_path / "c.toml"
    domain = ".".join(["a"] * 127)
    path.write_text(f'[tls.domains]\n{domain} = "verify"\n')
    with pytest.raises(ConfigError, match="in quotes"):
        load_settings(config_path=path, env={})


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors (Notepad, PowerShell's ``Out-File -Encoding utf8``) start a UTF-8
    file with a BOM. It was refused as "invalid TOML: Invalid statement (at line 1, column
    1)", pointing at a first line that looks right; it is dropped now, as an import drops
    it from a CSV file."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbfhelo_name = 'mail.example.com'\r\n[dns]\r\nport = 5353\r\n")
    settings = load_settings(config_path=path, env={})
    assert settings.config.helo_name == "mail.example.com"
    assert settings.config.dns.port == 5353
    path.write_bytes(b"\xef\xbb\xbfhelo_name = '\xff'\n")
    with pytest.raises(ConfigError, match=re.escape("not UTF-8 (at octet 16)")):
        load_settings(config_path=path, env={})


def test_a_config_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    line = b'helo_name = "mail.example.com"\n'
    path.write_bytes(line + b"#" * (MAX_CONFIG_FILE_SIZE - len(line) - 1) + b"\n")
    assert path.stat().st_size == MAX_CONFIG_FILE_SIZE
    assert load_settings(config_path=path, env={}).config.helo_name == "mail.example.com"


def test_unknown_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MAILSTROM_HELO"):
        load_settings(env={"MAILSTROM_HELO": "x"}, search=False)


def test_bad_environment_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dns\.port"):
        load_settings(env={"MAILSTROM_DNS_PORT": "many"}, search=False)


def test_relay_and_limits_off(tmp_path: Path) -> None:
    env = {
        "MAILSTROM_RELAY_HOST": "smtp.example.net",
        "MAILSTROM_RELAY_TLS": "implicit",
        "MAILSTROM_RELAY_PORT": "465",
        "MAILSTROM_RELAY_VERIFY": "no",
        "MAILSTROM_RETRY_MAX_AGE": "none",
        "MAILSTROM_RETRY_MAX_ATTEMPTS": "3",
        "MAILSTROM_LEASE_FOR": "90s",
    }
    c = load_settings(env=env, search=False).config
    assert c.relay is not None
    assert (c.relay.host, c.relay.port, c.relay.tls, c.relay.verify) == (
        "smtp.example.net",
        465,
        RelayTLS.IMPLICIT,
        False,
    )
    assert c.retry.max_age is None
    assert c.retry.max_attempts == 3
    assert c.lease_for == timedelta(seconds=90)


def test_tls_ca_builds_a_verifying_context(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    c = load_settings(env={"MAILSTROM_TLS_CA": str(pem)}, search=False).config
    assert isinstance(c.tls_context, ssl.SSLContext)
    assert c.tls_context.verify_mode is ssl.CERT_REQUIRED
    assert c.tls_context.get_ca_certs()  # the test CA is loaded


def test_every_key_has_an_environment_name() -> None:
    names = {env_name(k) for k in KEYS}
    assert len(names) == len(KEYS)
    assert env_name("dns.nameservers") == "MAILSTROM_DNS_NAMESERVERS"


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    missing = [k for k in KEYS if f"`{k}`" not in doc or f"`{env_name(k)}`" not in doc]
    assert missing == []


def test_the_settings_table_names_each_key_with_its_variable() -> None:
    """Each row of docs/cli.md's settings table pairs a key with the variable that sets
    it, and the table lists exactly the keys the loader takes."""
    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    rows = re.findall(r"^\| `([a-z_.]+)` \| `(MAILSTROM_[A-Z_]+)` \|", doc, re.MULTILINE)
    assert sorted(key for key, _ in rows) == sorted(KEYS)
    assert [(key, name) for key, name in rows if env_name(key) != name] == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("15m", 900), ("2h", 7200), ("3d", 259200), ("1w", 604800)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "2 hours", "-1h", "h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


NON_ASCII_NUMBERS = [
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() and float() read it as 3
    "\u0663\u0660",
    "\u0967\u0968",  # Devanagari 12
    "\uff13",  # FULLWIDTH DIGIT THREE
    "\U0001d7d1",  # MATHEMATICAL BOLD DIGIT THREE
    "3\u3000",  # an ideographic space, which str.strip() and the regex took
    "\u00a03",
]


@pytest.mark.parametrize("text", [*NON_ASCII_NUMBERS, "\u0663h", "\u0661.\u0665m", "2\u3000h"])
def test_parse_duration_takes_ascii_digits_only(text: str) -> None:
    """The regex's \\d and float() took any script's digits: "\\u0663h" was three hours."""
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "key", ["smtp_port", "max_connections", "dns.timeout", "retry.multiplier",
            "retry.max_attempts", "lease_for", "tlsrpt.post_timeout"],
)  # fmt: skip
@pytest.mark.parametrize("text", NON_ASCII_NUMBERS)
def test_numbers_in_settings_take_ascii_digits_only(key: str, text: str) -> None:
    """int() and float() took them: MAILSTROM_SMTP_PORT=\\u0663\\u0660 was port 30."""
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(env={env_name(key): text}, search=False)


@pytest.mark.parametrize("text", ["\u0663", "\u0661.\u0665"])
def test_shaping_rule_limits_take_ascii_digits_only(text: str) -> None:
    env = {"MAILSTROM_SHAPING_RULES": f"example.org max_connections={text}"}
    with pytest.raises(ConfigError, match="max_connections: expected a number"):
        load_settings(env=env, search=False)


@pytest.mark.parametrize(
    ("value", "seconds"), [("10", 10), ("10s", 10), ("500ms", 0.5), ("2m", 120), (0.25, 0.25)]
)
def test_tlsrpt_post_timeout_is_a_duration(value: str | float, seconds: float) -> None:
    assert KEYS["tlsrpt.post_timeout"]("tlsrpt.post_timeout", value) == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", ["0", "0s", 0, 0.0, -1, "-1", "nan", "inf", "1e3", True])
def test_tlsrpt_post_timeout_is_more_than_none(value: object) -> None:
    # A time limit of 0 (or less) would fail every POST before it starts.
    with pytest.raises(ConfigError, match=re.escape("tlsrpt.post_timeout: ")):
        load_settings(env={}, overrides={"tlsrpt.post_timeout": value}, search=False)


SECONDS_KEYS = [
    "connection_idle", "poll_interval", "dns.timeout", "timeouts.connect",
    "timeouts.greeting", "timeouts.command", "timeouts.data_init", "timeouts.data_block",
    "timeouts.data_end", "hook.timeout", "hook.retry_min", "hook.retry_max", "mta_sts.timeout",
    "mta_sts.recheck",
]  # fmt: skip


@pytest.mark.parametrize("key", SECONDS_KEYS)
@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10", 10), (" 2.5 ", 2.5), ("1e2", 100), ("10s", 10), ("500ms", 0.5), ("5m", 300), (3, 3)],
)
def test_settings_in_seconds_also_take_a_duration(key: str, value: object, seconds: float) -> None:
    """Only lease_for, retry.*, shaping.* and tlsrpt.post_timeout took "30s" or "5m";
    the timeouts wanted a bare number and refused them. Every time setting now reads
    both, as a number of seconds."""
    assert KEYS[key](key, value) == seconds
    if isinstance(value, str):
        load_settings(env={env_name(key): value}, search=False)  # and from the environment


def test_a_timeout_given_as_a_duration_reaches_the_config() -> None:
    env = {"MAILSTROM_TIMEOUTS_GREETING": "5m", "MAILSTROM_POLL_INTERVAL": "250ms"}
    config = load_settings(env=env, search=False).config
    assert (config.timeouts.greeting, config.poll_interval) == (300.0, 0.25)


@pytest.mark.parametrize("key", ["timeouts.greeting", "mta_sts.recheck"])
@pytest.mark.parametrize("value", ["5 minutes", "10x", "inf", "nan", "-1s", "s", "\u0663s"])
def test_a_time_setting_refuses_what_is_no_time(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key}: ")):
        load_settings(env={env_name(key): value}, search=False)


def test_a_timeout_of_no_time_is_refused_in_either_form() -> None:
    for value in ("0", "0s", "0ms"):
        with pytest.raises(ConfigError, match=re.escape("timeouts.connect: expected")):
            load_settings(env={"MAILSTROM_TIMEOUTS_CONNECT": value}, search=False)


HOOK = {"MAILSTROM_HOOK_URL": "https://hooks.example/in", "MAILSTROM_HOOK_SECRET": "s" * 16}


def test_the_hooks_backoff_is_set_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """HookConfig's retry_min and retry_max were no settings: a failing endpoint was
    waited out from 1 s up to 5 min whatever the file or the environment said."""
    path = tmp_path / "config.toml"
    path.write_text('[hook]\nretry_min = "500ms"\nretry_max = "10m"\n')
    hook = load_settings(config_path=path, env=HOOK).config.hook
    assert hook is not None and (hook.retry_min, hook.retry_max) == (0.5, 600.0)
    env = HOOK | {"MAILSTROM_HOOK_RETRY_MIN": "2", "MAILSTROM_HOOK_RETRY_MAX": "1h"}
    hook = load_settings(env=env, search=False).config.hook
    assert hook is not None and (hook.retry_min, hook.retry_max) == (2.0, 3600.0)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"RETRY_MIN": "0"}, "hook.retry_min: expected"),
        ({"RETRY_MAX": "-1s"}, "hook.retry_max: expected"),
        ({"RETRY_MAX": "2d"}, "hook.retry_max: expected"),
        ({"RETRY_MIN": "10m"}, "hook.retry_min: expected at most hook.retry_max (300 s)"),
        ({"RETRY_MIN": "1m", "RETRY_MAX": "30s"}, "hook.retry_min: expected at most"),
    ],
)
def test_the_hooks_backoff_is_positive_bounded_and_in_order(
    settings: dict[str, str], reason: str
) -> None:
    env = HOOK | {f"MAILSTROM_HOOK_{k}": v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=re.escape(reason)):
        load_settings(env=env, search=False)


def test_ascii_numbers_with_spaces_around_them_still_load() -> None:
    env = {"MAILSTROM_SMTP_PORT": " 2525 ", "MAILSTROM_DNS_TIMEOUT": "\t2.5\n"}
    config = load_settings(env=env, search=False).config
    assert (config.smtp_port, config.dns.timeout) == (2525, 2.5)


def test_parse_dns_servers() -> None:
    assert parse_dns_servers(["127.0.0.1"]) == {"dns.nameservers": ["127.0.0.1"]}
    assert parse_dns_servers(["[::1]:5353", "127.0.0.1:5353"]) == {
        "dns.nameservers": ["::1", "127.0.0.1"],
        "dns.port": 5353,
    }
    assert parse_dns_servers(["::1"]) == {"dns.nameservers": ["::1"]}
    with pytest.raises(ConfigError, match="same port"):
        parse_dns_servers(["127.0.0.1:53", "127.0.0.2:54"])


def test_lanes_default_priority_and_idempotency_window_load(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'default_priority = "bulk"\nidempotency_window = "2h"\n'
        '[[lanes]]\nname = "transactional"\n[[lanes]]\nname = "bulk"\nshare = 0.5\n'
    )
    config = load_settings(config_path=path, env={}).config
    assert config.lanes == (Lane(name="transactional"), Lane(name="bulk", share=0.5))
    assert config.default_priority == "bulk"
    assert config.idempotency_window == timedelta(hours=2)
    env = {
        "MAILSTROM_LANES": "urgent, normal:0.6,bulk:0.25",
        "MAILSTROM_DEFAULT_PRIORITY": "normal",
    }
    from_env = load_settings(env=env, search=False).config
    assert from_env.lane_names == ("urgent", "normal", "bulk")
    assert from_env.lanes[2].share == 0.25
    for bad in ("Bulk", "bulk:0", "bulk:2", "a,a", ""):
        with pytest.raises(ConfigError):
            _ = load_settings(env={"MAILSTROM_LANES": bad}, search=False).config
    with pytest.raises(ConfigError):
        _ = load_settings(env={"MAILSTROM_DEFAULT_PRIORITY": "urgent"}, search=False).config


def test_a_lane_bypassing_bounce_suppressions_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[[lanes]]\nname = "account"\nbypass_suppression = ["hard_bounce", "async_bounce"]\n'
        '[[lanes]]\nname = "transactional"\n'
    )
    lanes = load_settings(config_path=path, env={}).config.lanes
    assert lanes[0].bypass_suppression == (
        SuppressionSource.HARD_BOUNCE,
        SuppressionSource.ASYNC_BOUNCE,
    )
    assert lanes[1].bypass_suppression == ()
    path.write_text('[[lanes]]\nname = "account"\nbypass_suppression = ["complaint"]\n')
    with pytest.raises(ConfigError, match=r"lanes\[0\]: .*'complaint' cannot be bypassed"):
        _ = load_settings(config_path=path, env={}).config


def test_mta_sts_ca_file_must_hold_certificates(tmp_path: Path) -> None:
    """A file that is no PEM bundle was taken (only its existence was checked): every
    MTA-STS policy fetch of the worker then failed with an SSLError."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^mta_sts\.ca_file: cannot load"):
        load_settings(env={"MAILSTROM_MTA_STS_CA_FILE": str(not_pem)}, search=False)
    trustme.CA().cert_pem.write_to_path(str(not_pem))
    loaded = load_settings(env={"MAILSTROM_MTA_STS_CA_FILE": str(not_pem)}, search=False)
    assert loaded.config.mta_sts is not None
    assert loaded.config.mta_sts.ca_file == str(not_pem)


@pytest.mark.parametrize(
    "text", ["max_age = 0", 'max_age = "0"', 'max_age = "0s"', "max_age = 0.0"]
)
def test_retry_max_age_of_zero_is_refused(tmp_path: Path, text: str) -> None:
    """``retry.max_age = 0`` meant "never give up" (as "none" does), while ``"0s"`` gave
    up at the first temporary failure, and Postfix's ``maximal_queue_lifetime = 0`` means
    one attempt without retries: an operator could get either. Every zero is refused."""
    path = tmp_path / "c.toml"
    path.write_text(f"[retry]\n{text}\n")
    with pytest.raises(ConfigError, match=r"^retry\.max_age: .*none.*max_attempts = 1"):
        load_settings(config_path=path, env={})


@pytest.mark.parametrize("text", ['"none"', '"off"', "false", '""'])
def test_retry_max_age_off(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[retry]\nmax_age = {text}\n")
    assert load_settings(config_path=path, env={}).config.retry.max_age is None


def test_a_bad_value_names_the_file_or_variable_it_came_from(tmp_path: Path) -> None:
    """A bad value's error named its key alone: with a file and MAILSTROM_* variables
    (a systemd unit's, a container's) the operator could not tell which one to mend, nor
    which of the default files had been read."""
    path = tmp_path / "c.toml"
    path.write_text('smtp_port = "x"\n[retry]\njitter = 2\n')
    where = re.escape(f"(in {path})")
    with pytest.raises(ConfigError, match=rf"^smtp_port: .*'x' {where}$"):
        load_settings(config_path=path, env={})
    # A value the dataclasses refuse (after parsing) is named with its source as well.
    env = {"MAILSTROM_SMTP_PORT": "25"}
    with pytest.raises(ConfigError, match=rf"^retry\.jitter: .*2\.0 {where}$"):
        load_settings(config_path=path, env=env)
    env = {"MAILSTROM_SMTP_PORT": "y", "MAILSTROM_RETRY_JITTER": "0.1"}
    with pytest.raises(ConfigError, match=r"^smtp_port: .*'y' \(from MAILSTROM_SMTP_PORT\)$"):
        load_settings(config_path=path, env=env)
    # An option (or Django's dict) is named by its caller: no source is added.
    with pytest.raises(ConfigError, match=r"^smtp_port: .*'z'$"):
        load_settings(config_path=path, env={}, overrides={"smtp_port": "z"})


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('helo_name = "bad name"\n', "helo_name 'bad name'"),
        ('default_priority = "urgent"\n', "default_priority 'urgent' is not"),
        ('[retry]\nmin_delay = "2h"\nmax_delay = "1h"\n', "retry.min_delay must not"),
    ],
)
def test_a_value_config_refuses_names_its_file_or_variable(
    tmp_path: Path, text: str, named: str
) -> None:
    """Config's own checks begin with the setting and a space, not a colon (``helo_name
    'bad name': ...``): their errors named neither the file nor the variable, the one
    thing that tells which of the two to mend."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(named)}.* \(in {re.escape(str(path))}\)$"):
        load_settings(config_path=path, env={})
    key = named.split(" ")[0]
    value = text.splitlines()[-1].partition("= ")[2].strip('"')
    if key == "retry.min_delay":
        env = {"MAILSTROM_RETRY_MIN_DELAY": "2h", "MAILSTROM_RETRY_MAX_DELAY": "1h"}
    else:
        env = {env_name(key): value}
    with pytest.raises(ConfigError, match=rf"\(from {env_name(key)}\)$"):
        load_settings(env=env, search=False)


def test_a_config_path_that_is_no_file_is_not_called_missing(tmp_path: Path) -> None:
    """``--config /etc/mailstrom`` (the directory) and ``--config <(make-config)`` (a
    pipe) were "config file not found", though the path was there to see."""
    with pytest.raises(ConfigError, match=r"^cannot read config file .*: a directory, not a"):
        load_settings(config_path=tmp_path, env={})
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"^cannot read config file .*pipe\.toml'?: not a reg"):
        load_settings(env={"MAILSTROM_CONFIG": str(fifo)})
    with pytest.raises(ConfigError, match=r"^config file not found: .*missing\.toml"):
        load_settings(config_path=tmp_path / "missing.toml", env={})


def test_an_unknown_key_says_what_was_likely_meant(tmp_path: Path) -> None:
    """An unknown key's error named it alone. TOML puts every key under the table above
    it, so a top-level setting written after ``[relay]`` became "relay.helo_name", an
    error that did not say why; a misspelt key did not say which one was meant."""
    path = tmp_path / "c.toml"
    path.write_text('[relay]\nhost = "smtp.example.net"\n\nhelo_name = "mail.example.com"\n')
    with pytest.raises(ConfigError, match=r"'relay\.helo_name'.*'helo_name'.*before.*\[relay\]"):
        load_settings(config_path=path, env={})
    path.write_text('[dns]\nnameserver = ["192.0.2.1"]\n')
    with pytest.raises(ConfigError, match=r"'dns\.nameserver'; did you mean 'dns\.nameservers'"):
        load_settings(config_path=path, env={})
    env = {"MAILSTROM_MAX_CONNECTION": "5"}
    with pytest.raises(
        ConfigError, match=r"MAILSTROM_MAX_CONNECTION; did you mean MAILSTROM_MAX_CONNECTIONS\?"
    ):
        load_settings(env=env, search=False)
    with pytest.raises(ConfigError, match=r"'smtp_prot'; did you mean 'smtp_port'\?"):
        load_settings(env={}, search=False, overrides={"smtp_prot": 25})
    # Nothing close: no guess.
    path.write_text("colour = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'colour'$"):
        load_settings(config_path=path, env={})


def test_an_unquoted_domain_in_tls_domains_says_to_quote_it(tmp_path: Path) -> None:
    """TOML reads ``example.com = "verify"`` as a table ``example`` holding ``com``: the
    error blamed the level ("'example' = {'com': 'verify'}: expected one of ..."), which
    was right, and never the missing quotes."""
    path = tmp_path / "c.toml"
    path.write_text('[tls.domains]\nmail.example.com = "verify"\n')
    quoted = re.escape('("mail.example.com" = "verify")')
    with pytest.raises(
        ConfigError, match=rf"^tls\.domains: write 'mail\.example\.com' in quotes {quoted}"
    ):
        load_settings(config_path=path, env={})


@pytest.mark.parametrize(
    ("secret", "variable"),
    [
        ('[web]\ntoken = "t0ken-t0ken-t0ken-t0ken"\n', "MAILSTROM_WEB_TOKEN"),
        (
            '[hook]\nurl = "https://hooks.example/in"\nsecret = "s3cret-s3cret-s3cret-s3"\n',
            "MAILSTROM_HOOK_SECRET",
        ),
        ('store = "postgresql://app:s3cret@db.example/mail"\n', "MAILSTROM_STORE"),
    ],
)
def test_the_readable_secret_warning_names_the_variable_for_that_secret(
    tmp_path: Path, secret: str, variable: str
) -> None:
    """A dashboard token or a hook secret in a file others can read was warned about
    with the advice to move "the password" to MAILSTROM_RELAY_PASSWORD, a variable that
    holds neither: the warning now names the variables of the secrets the file holds."""
    config = tmp_path / "c.toml"
    config.write_text(secret)
    config.chmod(0o644)
    (warning,) = load_settings(config_path=config, env={"HOME": str(tmp_path)}).warnings
    assert variable in warning
    if variable != "MAILSTROM_RELAY_PASSWORD":
        assert "MAILSTROM_RELAY_PASSWORD" not in warning


@pytest.mark.parametrize("text", ["0", '"0"', "0.0", '"0s"'])
def test_suppress_for_of_zero_is_refused(tmp_path: Path, text: str) -> None:
    """``suppress_for = 0`` read as "none": a hard bounce then suppressed its address for
    ever, where zero reads as "not at all"; ``"0s"`` was refused, as
    ``Config(suppress_for=timedelta(0))`` is. Every zero is refused, naming "none"."""
    path = tmp_path / "c.toml"
    path.write_text(f"suppress_for = {text}\n")
    with pytest.raises(ConfigError, match=r"^suppress_for: .*none"):
        load_settings(config_path=path, env={})
    with pytest.raises(ConfigError, match=r"^suppress_for: .*none"):
        load_settings(env={"MAILSTROM_SUPPRESS_FOR": text.strip('"')}, search=False)
    path.write_text('suppress_for = "none"\n')
    assert load_settings(config_path=path, env={}).config.suppress_for is None


@pytest.mark.parametrize("text", ["0.0", "1.0", "3.5"])
def test_max_attempts_as_a_float_is_refused_zero_included(tmp_path: Path, text: str) -> None:
    """``retry.max_attempts = 0.0`` was read as "none" (retry without a count limit), where
    ``1.0`` and every other float is refused as no integer: 0.0 is refused the same way."""
    path = tmp_path / "c.toml"
    path.write_text(f"[retry]\nmax_attempts = {text}\n")
    with pytest.raises(ConfigError, match=r"^retry\.max_attempts: expected an integer"):
        load_settings(config_path=path, env={})
    for off in ("0", '"none"', "false"):
        path.write_text(f"[retry]\nmax_attempts = {off}\n")
        assert load_settings(config_path=path, env={}).config.retry.max_attempts is None


@pytest.mark.timeout(60)  # the fault was CPU growing as the square of the value's length
@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("connection_idle", "1" * 200_000 + "x", id="digits-then-junk"),
        pytest.param("lease_for", "1" + " " * 400_000 + "x", id="spaces-then-junk"),
        pytest.param("timeouts.connect", "1" + " " * 400_000 + "x", id="seconds-spaces"),
    ],
)
def test_a_long_time_value_in_a_file_is_refused_in_linear_time(
    tmp_path: Path, key: str, value: str
) -> None:
    # A file may hold 1 MiB. The number and duration patterns backtracked over a run of
    # digits or spaces before a character they could not take, quadratically: a value of
    # 20,000 digits took 11 s, and one filling the file would have taken hours.
    section, _, name = key.rpartition(".")
    path = tmp_path / "config.toml"
    table = f"[{section}]\n" if section else ""
    path.write_text(f'{table}{name} = "{value}"\n')
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(config_path=path, env={}, search=False)


@pytest.mark.timeout(60)  # the fault was CPU growing as the square of the value's length
@pytest.mark.parametrize(
    "store",
    [
        pytest.param("a" * 600_000, id="one-long-word"),
        pytest.param("a://u:x/" * 80_000, id="many-schemes"),
        pytest.param("a://u:x/" * 80_000 + " postgresql://u:s3cret@h/db", id="then-a-password"),
    ],
)
def test_a_long_store_in_a_file_is_looked_at_in_linear_time(tmp_path: Path, store: str) -> None:
    # The file's store is searched for a password (to warn when others may read it) and
    # hidden in every message that quotes it. The search tried a scheme at each letter of
    # a word and read each "://" on to the line's end: 40,000 letters took 4 s, and a
    # store filling the 1 MiB file held every command for minutes before any check.
    path = tmp_path / "config.toml"
    path.write_text(f'store = "{store}"\n')
    settings = load_settings(config_path=path, env={}, search=False)
    # What the timeout cannot see: the search still finds a password past them all.
    assert "s3cret" not in repr(settings)
