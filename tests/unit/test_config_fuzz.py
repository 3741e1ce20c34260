"""Fuzzing the command line's configuration (``mailstrom worker --config FILE``,
``mailstrom check``, the sendmail drop-in): whatever a TOML file or the ``MAILSTROM_*``
variables hold, ``load_settings`` returns settings or raises
:class:`~mailstrom.errors.ConfigError` naming the key (exit 78), never another exception,
and a value it takes is the value given (``"false"`` is False, ``"2525"`` is 2525).

Files are built from valid seeds (every known key, with a value of its own kind) and
mutated: values of every other TOML type (strings for numbers, arrays, inline tables,
dates, huge integers, inf and nan, negative and huge durations), unknown and duplicated
keys, octets that are not UTF-8, deep nesting, cut files.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (300 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/unit/test_config_fuzz.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.errors import ConfigError
from mailstrom.settings import KEYS, SECRET_KEYS, env_name, load_settings

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "300"))

# A valid TOML value for each kind of key, by the parser's kind.
VALID: dict[str, list[str]] = {
    "store": ['"sqlite:///tmp/q.db"'],
    "helo_name": ['"mx.example.org"', '"bücher.example"'],
    "smtp_port": ["25", '"2525"'],
    "allow_loopback": ["true", '"false"', '"yes"', '"0"'],
    "tls": ['"opportunistic"', '"verify"'],
    "max_message_size": ["10485760", '"1000"'],
    "connection_idle": ["2.5", '"0"'],
    "lease_for": ['"5m"', "300", "0.5", '"1.5h"'],
    "retry.max_age": ['"5d"', '"off"', "false", '"none"'],
    "retry.max_attempts": ["3", '"none"'],
    "dns.nameservers": ['["127.0.0.1"]', '"127.0.0.1, ::1"'],
    "lanes": ['[{name = "a"}, {name = "b", share = 0.5}]'],
    "shaping.rules": ['[{match = "*.example.org", max_connections = 2}]'],
    "tls.domains": ['{"example.org" = "verify"}'],
    "metrics.listen": ['"127.0.0.1:9100"'],
    "suppress_on": ['["5.1.1"]', '"550, 5.1.1"'],
}
HOSTILE_VALUES = [
    '""',
    '" "',
    '"x"',
    '"-1"',
    '"1e400"',
    '"nan"',
    '"inf"',
    '"-5m"',
    '"99999999999999999999w"',
    '"1_000"',
    '"0x10"',
    '"١٢"',
    '"\\u0000"',
    '"true "',
    '"False"',
    '"of"',
    "0",
    "-1",
    "1",
    "65536",
    "9223372036854775807",
    "-9223372036854775808",
    "1.5",
    "-0.0",
    "inf",
    "-inf",
    "nan",
    "1e308",
    "true",
    "false",
    "[]",
    "[1, 2]",
    '["a", ""]',
    "[[]]",
    "{}",
    "{a = 1}",
    '{name = "x", share = nan}',
    '[{name = "x", share = -1}]',
    '[{name = "x"}, {name = "x"}]',
    '[{match = "", max_connections = 1}]',
    '[{match = "a.org", max_connections = inf}]',
    '[{domain = "a.org", selector = "s", private_key = "/nonexistent"}]',
    '{"" = "verify"}',
    '{"a.org" = 5}',
    "1979-05-27T07:32:00Z",
    "07:32:00",
]
UNKNOWN_KEYS = ["colour", "dns.colour", "retry", "tls.default.x", "Helo_Name", "dns.port.x"]
BOOL_KEYS = ["allow_loopback", "retry_uncertain", "events", "bounce_notices"]
MUTATED = "(mutated)"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


@st.composite
def documents(draw: Any) -> tuple[bytes, dict[str, str]]:
    """A TOML file (dotted keys, one a line) and the value text given to each key."""
    chosen: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 1)):
            key = draw(st.sampled_from(sorted(VALID)))
            value = draw(st.sampled_from(VALID[key]))
        else:
            key = draw(st.sampled_from([*KEYS, *BOOL_KEYS]))
            value = draw(st.sampled_from(HOSTILE_VALUES + VALID.get(key, [])))
        chosen[key] = value
    lines = [f"{key} = {value}" for key, value in chosen.items()]
    roll = draw(st.integers(0, 19))
    if roll == 0:
        unknown = draw(st.sampled_from(UNKNOWN_KEYS))
        lines.append(f"{unknown} = 1")
        chosen[unknown.rpartition(".x")[0] or unknown] = "1"
    elif roll == 1:
        lines.append(draw(st.sampled_from(lines)))  # a key given twice
    elif roll == 2:
        lines.append("x = " + "[" * draw(st.integers(100, 3000)))
    raw = "\n".join(lines).encode()
    roll = draw(st.integers(0, 19))
    if roll in (0, 1):
        chosen[MUTATED] = ""  # the values are no longer those given
    if roll == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\0", b"\r", b"\xed\xa0\x80"]))
    elif roll == 1:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw, chosen


def check_taken(values: dict[str, str], loaded: Any) -> None:
    """A value taken is the value given: words for booleans, digits for a port."""
    if MUTATED in values:
        return
    config = loaded.config
    for key in BOOL_KEYS:
        if key not in values:
            continue
        text = values[key].strip('"').strip().lower()
        if text in TRUE_WORDS:
            assert getattr(config, key) is True, key
        elif text in FALSE_WORDS:
            assert getattr(config, key) is False, key
    if "smtp_port" in values:
        assert config.smtp_port == int(values["smtp_port"].strip('"'))


def check_refusal(exc: ConfigError, given: dict[str, str], path: Path | None) -> None:
    """A refusal names the key (or the file, for TOML it cannot read) and shows no secret."""
    text = str(exc)
    # The key, its variable, or (inside a section's own message: "shaping: expected
    # 0 < pause_first <= pause_max") its name in the section.
    keys = [
        *given,
        *(env_name(k) for k in given),
        *(k.partition(".")[2] for k in given if "." in k),
    ]
    named = any(k in text for k in keys) or (path is not None and str(path) in text)
    assert named, f"no key named in {text!r}"
    for key in SECRET_KEYS & set(given):
        secret = given[key].strip('"')
        others = [v.strip('"') for k, v in given.items() if k != key]
        if len(secret) >= 8 and not any(secret in other for other in others):
            assert secret not in text, f"{key}'s value shown: {text!r}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(document=documents())
def test_a_config_file_is_settings_or_a_config_error_naming_the_key(
    document: tuple[bytes, dict[str, str]],
) -> None:
    raw, given_values = document
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(raw)
        try:
            loaded = load_settings(config_path=path, env={"HOME": tmp}, search=False)
        except ConfigError as exc:
            event("refused")
            check_refusal(exc, given_values, path)
            return
    event("loaded")
    check_taken(given_values, loaded)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    chosen=st.dictionaries(
        st.sampled_from(sorted(KEYS)),
        st.one_of(
            st.sampled_from(
                [v.strip('"') for v in [*HOSTILE_VALUES, *(v for vs in VALID.values() for v in vs)]]
            ),
            st.text(max_size=20),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_environment_variables_are_settings_or_a_config_error_naming_the_key(
    chosen: dict[str, str],
) -> None:
    env = {env_name(key): value for key, value in chosen.items()}
    env["HOME"] = "/nonexistent"
    try:
        loaded = load_settings(env=env, search=False)
    except ConfigError as exc:
        event("refused")
        check_refusal(exc, chosen, None)
        return
    event("loaded")
    check_taken({k: f'"{v}"' for k, v in chosen.items()}, loaded)


# --- what the fuzzing found ------------------------------------------------------------


def test_a_bad_metrics_domain_names_the_setting() -> None:
    # Was: "metrics_domains: ...", the Config field, no key of the file or environment.
    with pytest.raises(ConfigError, match=r"^metrics\.domains: expected domain names"):
        load_settings(env={"MAILSTROM_METRICS_DOMAINS": "0\x850"}, search=False)


def test_an_unreadable_dkim_key_names_the_setting(tmp_path: Path) -> None:
    # Was: "dkim key a.org/s: cannot read ...", without the setting that names the file.
    path = tmp_path / "config.toml"
    path.write_text(
        '[[dkim.keys]]\ndomain = "a.org"\nselector = "s"\nprivate_key = "/nonexistent"\n'
    )
    with pytest.raises(ConfigError, match=r"^dkim\.keys\[0\]: dkim key a\.org/s: cannot read"):
        load_settings(config_path=path, env={}, search=False)
