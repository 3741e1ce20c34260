"""Traffic shaping rules: matching by domain and MX host, the shipped provider defaults,
the TOML and environment settings, and typed errors for bad input."""

from __future__ import annotations

import doctest
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom.config import Config, Timeouts
from mailstrom.errors import ConfigError, InvalidShapingRule
from mailstrom.policy import shaping
from mailstrom.policy.shaping import DestinationRule, RuleBook, ShapingConfig, provider_rules
from mailstrom.settings import load_settings


def book(*rules: DestinationRule, defaults: bool = False) -> RuleBook:
    return RuleBook.of(ShapingConfig(rules=rules, provider_defaults=defaults))


def test_exact_pattern_matches_the_domain_only() -> None:
    rules = book(DestinationRule(match="example.org", max_connections=1))
    assert rules.match("example.org", ()) is not None
    assert rules.match("EXAMPLE.org.", ()) is not None  # case and trailing dot ignored
    assert rules.match("mail.example.org", ()) is None
    assert rules.match("notexample.org", ()) is None


def test_wildcard_matches_names_below_the_suffix_only() -> None:
    rule = DestinationRule(match="*.google.com")
    rules = book(rule)
    assert rules.match("gmail.com", ("gmail-smtp-in.l.google.com",)) is rule
    assert rules.match("google.com", ()) is None  # "*." means below, not the name itself
    assert rules.match("x.org", ("evilgoogle.com",)) is None  # a label boundary is required


def test_the_domain_wins_over_its_mx_hosts_and_the_first_matching_host_decides() -> None:
    by_domain = DestinationRule(match="example.org", max_connections=1)
    google = DestinationRule(match="*.google.com", max_connections=5)
    outlook = DestinationRule(match="*.outlook.com", max_connections=7)
    rules = book(by_domain, google, outlook)
    assert rules.match("example.org", ("aspmx.l.google.com",)) is by_domain
    hosts = ("mx.unknown.example", "x.protection.outlook.com", "aspmx.l.google.com")
    assert rules.match("example.net", hosts) is outlook


def test_the_most_specific_rule_wins() -> None:
    broad = DestinationRule(match="*.example.com")
    narrow = DestinationRule(match="*.eu.example.com")
    exact = DestinationRule(match="mx.eu.example.com")
    rules = book(broad, narrow, exact)
    assert rules.rule_for_name("a.eu.example.com") is narrow
    assert rules.rule_for_name("a.us.example.com") is broad
    assert rules.rule_for_name("mx.eu.example.com") is exact


@pytest.mark.parametrize(
    "pattern", ["Bücher.Example", "bücher.example.", "\uff22\u00dcCHER\uff0eexample"]
)
def test_a_rule_written_with_u_labels_governs_its_domain_as_queued(pattern: str) -> None:
    """Recipients are queued with A-label domains (bob@bücher.example as
    bob@xn--bcher-kva.example); a rule naming the domain in U-labels, as tls.domains,
    metrics_domains and the suppression list take it, was refused ("given as A-labels")."""
    rule = DestinationRule(match=pattern, max_connections=1)
    assert rule.match == "xn--bcher-kva.example"
    rules = book(rule)
    assert rules.match("xn--bcher-kva.example", ()) is rule
    wildcard = DestinationRule(match="*.Bücher.example", max_connections=2)
    assert wildcard.match == "*.xn--bcher-kva.example"
    assert book(wildcard).match("example.org", ("mx.xn--bcher-kva.example",)) is wildcard
    with pytest.raises(InvalidShapingRule, match="two rules"):
        ShapingConfig(rules=(rule, DestinationRule(match="xn--bcher-kva.example")))


@pytest.mark.parametrize(
    "pattern", ["bü cher.example", "*.bü*.example", "💩.example", "ü" * 64 + ".de"]
)
def test_a_bad_u_label_rule_raises_a_typed_error(pattern: str) -> None:
    with pytest.raises(InvalidShapingRule) as caught:
        DestinationRule(match=pattern)
    assert caught.value.field == "match"


def test_provider_defaults_cover_the_big_providers_and_user_rules_replace_them() -> None:
    shipped = {r.match for r in provider_rules()}
    assert {"*.google.com", "*.outlook.com", "*.yahoodns.net"} <= shipped
    assert all(r.messages_per_minute is None for r in provider_rules())  # the user's call
    rules = RuleBook.of(ShapingConfig())
    gmail = rules.match("gmail.com", ("gmail-smtp-in.l.google.com",))
    assert gmail is not None and gmail.max_connections == 5
    mine = DestinationRule(match="*.google.com", max_connections=2, messages_per_minute=60)
    rules = RuleBook.of(ShapingConfig(rules=(mine,)))
    assert rules.match("gmail.com", ("gmail-smtp-in.l.google.com",)) is mine
    assert not RuleBook.of(ShapingConfig(provider_defaults=False))


def test_microsoft_365_domains_on_the_dnssec_mx_names_are_microsoft_s() -> None:
    """Exchange Online gives a domain with inbound SMTP DANE an MX host below
    ``mx.microsoft`` (``contoso-com.p-v1.mx.microsoft``), not below
    ``protection.outlook.com``: such domains escaped every Microsoft default and were
    sent to with the global limits alone."""
    rules = RuleBook.of(ShapingConfig())
    found = rules.match("contoso.com", ("contoso-com.p-v1.mx.microsoft",))
    assert found is not None and found.match == "*.mx.microsoft"
    assert (found.max_connections, found.messages_per_connection) == (5, 50)


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"match": ""}, "match"),
        ({"match": "exa mple.org"}, "match"),
        ({"match": "mail.*.example.org"}, "match"),
        ({"match": "*"}, "match"),
        # A line break ends no label: "$" let one through before the end of a label.
        ({"match": "example\n.org"}, "match"),
        ({"match": "*.example\n.org"}, "match"),
        ({"match": "x.org", "max_connections": 0}, "max_connections"),
        ({"match": "x.org", "max_connections": True}, "max_connections"),
        ({"match": "x.org", "messages_per_connection": 1.5}, "messages_per_connection"),
        ({"match": "x.org", "messages_per_minute": 0}, "messages_per_minute"),
        ({"match": "x.org", "messages_per_hour": float("nan")}, "messages_per_hour"),
        ({"match": "x.org", "connections_per_minute": -1}, "connections_per_minute"),
        ({"match": "x.org", "messages_per_minute": "10"}, "messages_per_minute"),
        # Below one a day: a typo or a wrong unit (1e-12 an hour overflowed the schedule).
        ({"match": "x.org", "messages_per_hour": 1e-12}, "messages_per_hour"),
        ({"match": "x.org", "messages_per_hour": 0.04}, "messages_per_hour"),
        ({"match": "x.org", "messages_per_minute": 0.0006}, "messages_per_minute"),
        ({"match": "x.org", "connections_per_minute": 1e-300}, "connections_per_minute"),
        # An integer past any float (TOML and the environment read integers of any size).
        ({"match": "x.org", "messages_per_minute": 10**400}, "messages_per_minute"),
    ],
)
def test_bad_rules_raise_a_typed_error_naming_the_field(fields: dict, bad: str) -> None:
    with pytest.raises(InvalidShapingRule) as caught:
        DestinationRule(**fields)
    assert caught.value.field == bad
    assert isinstance(caught.value, ConfigError)


def test_the_lowest_rate_is_one_a_day() -> None:
    rule = DestinationRule(
        match="x.org",
        messages_per_minute=1 / 1440,
        messages_per_hour=1 / 24,
        connections_per_minute=1 / 1440,
    )
    assert rule.messages_per_hour == 1 / 24
    with pytest.raises(InvalidShapingRule, match=r"from 1/24 \(one a day\)"):
        DestinationRule(match="x.org", messages_per_hour=1e-12)


def test_shaping_config_is_validated() -> None:
    rule = DestinationRule(match="x.org")
    with pytest.raises(InvalidShapingRule, match="two rules"):
        ShapingConfig(rules=(rule, DestinationRule(match="X.org")))
    with pytest.raises(InvalidShapingRule, match="pause_first"):
        ShapingConfig(pause_first=timedelta(hours=2), pause_max=timedelta(hours=1))
    with pytest.raises(InvalidShapingRule, match="at most"):
        ShapingConfig(rules=tuple(DestinationRule(match=f"d{i}.org") for i in range(1001)))
    with pytest.raises(ConfigError, match="ShapingConfig"):
        Config(helo_name="mail.example.com", shaping={"rules": []})  # type: ignore[arg-type]


@pytest.mark.parametrize("rules", [None, 5, DestinationRule(match="x.org", max_connections=1)])
def test_rules_that_are_no_collection_raise_a_typed_error(rules: object) -> None:
    # One rule given alone, not in a tuple, is the likely slip.
    with pytest.raises(InvalidShapingRule, match=r"shaping\.rules: expected a tuple") as caught:
        ShapingConfig(rules=rules)  # type: ignore[arg-type]
    assert caught.value.field == "rules"


def test_rules_from_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[shaping]\npause_first = "30s"\npause_max = "2h"\nprovider_defaults = false\n\n'
        '[[shaping.rules]]\nmatch = "*.google.com"\nmax_connections = 2\n'
        "messages_per_minute = 120\n\n"
        '[[shaping.rules]]\nmatch = "example.org"\nmessages_per_hour = 500\n'
        "connections_per_minute = 6\nmessages_per_connection = 10\n"
    )
    shaping = load_settings(config_path=path, env={}).config.shaping
    assert shaping.pause_first == timedelta(seconds=30)
    assert shaping.pause_max == timedelta(hours=2)
    assert shaping.provider_defaults is False
    assert shaping.rules == (
        DestinationRule(match="*.google.com", max_connections=2, messages_per_minute=120),
        DestinationRule(
            match="example.org",
            messages_per_hour=500,
            connections_per_minute=6,
            messages_per_connection=10,
        ),
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[shaping.rules]]\nmatch = "x.org"\nmax_conections = 2\n', "unknown setting"),
        ("[[shaping.rules]]\nmax_connections = 2\n", "match is required"),
        ('[[shaping.rules]]\nmatch = "x.org"\nmax_connections = -2\n', "max_connections"),
        ("[shaping]\nrules = 5\n", "expected"),
        ("[shaping]\nrulez = []\n", "unknown setting"),
    ],
)
def test_bad_toml_names_the_problem(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(config_path=path, env={})


def test_rules_from_the_environment() -> None:
    env = {
        "MAILSTROM_SHAPING_RULES": "*.google.com max_connections=5 messages_per_minute=100;"
        " example.org messages_per_hour=10.5",
        "MAILSTROM_SHAPING_PAUSE_FIRST": "2m",
    }
    shaping = load_settings(env=env, search=False).config.shaping
    assert shaping.rules == (
        DestinationRule(match="*.google.com", max_connections=5, messages_per_minute=100),
        DestinationRule(match="example.org", messages_per_hour=10.5),
    )
    assert shaping.pause_first == timedelta(minutes=2)
    with pytest.raises(ConfigError, match="name=value"):
        load_settings(env={"MAILSTROM_SHAPING_RULES": "x.org 5"}, search=False)
    with pytest.raises(ConfigError, match="expected a number"):
        load_settings(env={"MAILSTROM_SHAPING_RULES": "x.org max_connections=a"}, search=False)


@pytest.mark.parametrize(
    "rules",
    [
        "x.org max_connections=1 max_connections=7",
        "x.org messages_per_minute=100 messages_per_minute=1",
    ],
)
def test_a_limit_given_twice_in_one_rule_of_the_environment_is_refused(rules: str) -> None:
    """TOML refuses a key given twice in one table; the environment's form kept the last
    value silently (``max_connections=1 max_connections=7`` opened seven connections)."""
    with pytest.raises(ConfigError, match=r"shaping\.rules: .* given twice"):
        load_settings(env={"MAILSTROM_SHAPING_RULES": rules}, search=False)


def test_a_rate_too_large_for_a_float_is_a_configuration_error(tmp_path: Path) -> None:
    huge = "1" + "0" * 400
    with pytest.raises(InvalidShapingRule, match="messages_per_minute"):
        load_settings(
            env={"MAILSTROM_SHAPING_RULES": f"x.org messages_per_minute={huge}"}, search=False
        )
    path = tmp_path / "config.toml"
    path.write_text(f'[[shaping.rules]]\nmatch = "x.org"\nmessages_per_hour = {huge}\n')
    with pytest.raises(InvalidShapingRule, match="messages_per_hour"):
        load_settings(config_path=path, env={})


def test_a_rule_with_keys_of_several_types_names_one_it_does_not_know() -> None:
    # A Python dict (Django's MAILSTROM setting, load_settings overrides) may hold keys
    # that are no strings; sorting them together for the message raised TypeError.
    rules = [{"match": "x.org", 1: 2, "colour": "red"}]
    with pytest.raises(InvalidShapingRule, match="unknown setting") as caught:
        load_settings(overrides={"shaping.rules": rules}, env={}, search=False)
    assert caught.value.field == "1"


HUGE = 10**3999
"""An integer TOML cannot hold but a Python setting can: 4,000 digits."""


@pytest.mark.parametrize(
    ("build", "field"),
    [
        pytest.param(
            lambda: DestinationRule(match="x.org", max_connections=HUGE),
            "max_connections",
            id="huge-count",
        ),
        pytest.param(
            lambda: DestinationRule(match="x.org", messages_per_minute=HUGE),
            "messages_per_minute",
            id="huge-rate",
        ),
        pytest.param(
            lambda: DestinationRule(match="x.org", max_connections="9" * 5000),  # type: ignore[arg-type]
            "max_connections",
            id="long-string",
        ),
        pytest.param(lambda: DestinationRule(match="a" * 5000 + ".org"), "match", id="long-match"),
        pytest.param(
            lambda: DestinationRule(match=["x.org"] * 2000),  # type: ignore[arg-type]
            "match",
            id="list-match",
        ),
        pytest.param(
            lambda: DestinationRule.from_mapping(["x.org"] * 2000, where="rule 1"),  # type: ignore[arg-type]
            "",
            id="list-entry",
        ),
        pytest.param(
            lambda: DestinationRule.from_mapping({"match": "x.org", "k" * 5000: 1}, where="r"),
            "k" * 5000,
            id="long-key",
        ),
        # Past Python's 4,300 digits an int has no repr at all: writing the error raised a
        # bare ValueError ("Exceeds the limit ... for integer string conversion").
        pytest.param(
            lambda: DestinationRule(match="x.org", max_connections=10**5000),
            "max_connections",
            id="int-without-repr",
        ),
    ],
)
def test_a_bad_value_is_quoted_in_a_few_characters(build: Any, field: str) -> None:
    # Was: the value in full (a 4,000-digit integer, a list of 2,000 names), where every
    # other configuration error quotes a value in at most 40 characters.
    with pytest.raises(InvalidShapingRule) as caught:
        build()
    assert len(str(caught.value)) < 200, str(caught.value)[:300]
    assert caught.value.field == field


def test_a_number_of_seconds_too_large_for_a_float_is_a_configuration_error() -> None:
    # Was OverflowError ("int too large to convert to float") from math.isfinite(), for
    # ShapingConfig.refresh and every number of seconds of the configuration alike.
    with pytest.raises(InvalidShapingRule, match="refresh") as caught:
        ShapingConfig(refresh=10**400)
    assert caught.value.field == "refresh"
    with pytest.raises(ConfigError, match=r"timeouts\.connect"):
        Timeouts(connect=10**400)


def test_the_module_s_examples_hold() -> None:
    # Was: the example matched a rule for "example.org" by an MX host "mx.example.org",
    # which an exact pattern never matches (it names one domain or host, as said above it).
    assert doctest.testmod(shaping).failed == 0
