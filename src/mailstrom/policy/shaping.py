"""Traffic shaping rules per destination (pure): which rule governs a recipient domain.

A :class:`DestinationRule` is keyed by a pattern: ``"example.org"`` names one recipient
domain (or one MX host) exactly, ``"*.google.com"`` every name below ``google.com``. A
domain is matched first by its own name, then by the names of its most preferred MX hosts
(the worker passes those of the best preference: a backup MX at a provider does not make a
domain the provider's, whose pause a 421 from the domain's own server then set), so
``"*.google.com"`` governs ``gmail.com`` and every Google Workspace domain alike, and they
share that rule's limits: the provider throttles by the sending IP, not by the
recipient domain. Of several rules matching one name the most specific (longest pattern,
an exact name before a wildcard) wins.

Defaults for the large providers ship in ``destinations.toml`` beside this module (connection
counts and messages per connection only: message rates depend on each sender's reputation
and are left for the user to set). :class:`ShapingConfig` holds the user's rules, which
replace a default of the same pattern and otherwise sit beside the defaults.

>>> book = RuleBook.of(ShapingConfig(rules=(DestinationRule(match="example.org",
...     max_connections=2), DestinationRule(match="*.example.org")), provider_defaults=False))
>>> book.match("example.org", ()).max_connections
2
>>> book.match("example.net", ("mx.example.org",)).match
'*.example.org'
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from importlib import resources
from typing import Any

from mailstrom.bounds import check_bool, check_duration, check_seconds, shown
from mailstrom.domains import a_label
from mailstrom.errors import ConfigError, InvalidShapingRule

DATA_FILE = "destinations.toml"
MAX_RULES = 1000
"""Most rules one configuration may hold (every name is compared with each wildcard)."""
MAX_RATE = 1_000_000.0
"""Highest rate accepted (messages or connections per minute or hour)."""
_PER_DAY = {"messages_per_minute": 1440, "messages_per_hour": 24, "connections_per_minute": 1440}
"""Each rate's units in a day: the lowest rate accepted is one a day (1/1440 a minute,
1/24 an hour). Providers state their limits a minute, an hour or a day, so a lower rate
is a wrong unit or a typo; a far lower one put the next message past any date."""
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
"""One label of a pattern, matched whole: with ``match`` and "$", which also matches
before a final line break, a label ending in one passed, and the rule matched no name."""


def normalise_name(name: str) -> str:
    """A domain or host name as rules compare it: lower case, no trailing dot."""
    return name.strip().rstrip(".").lower()


def _name(value: object) -> str:
    """``value`` as the text an :class:`InvalidShapingRule` names it by (its ``pattern``
    or ``field``): a string as it is, anything else by its repr (cut to 40 characters:
    ``str()`` of an int past 4,300 digits raises ValueError)."""
    return value if isinstance(value, str) else shown(value)


def _check_pattern(pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise InvalidShapingRule(
            f"match: expected a domain or '*.suffix' pattern, got {shown(pattern)}",
            pattern=_name(pattern),
            field="match",
        )
    text = normalise_name(pattern)
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if not name.isascii():
        # Recipients are queued with A-label domains (bob@bücher.example as
        # bob@xn--bcher-kva.example), and MX hosts come from DNS so: a rule kept in
        # U-labels governed none of them. As tls.domains takes a name, by IDNA 2008 from
        # the name as written (str.lower() can turn a sigma into another domain's).
        written = pattern.strip().rstrip(".")
        try:
            name = a_label(written[2:] if wildcard else written)
        except ValueError:
            name = ""  # refused below, as any other name that is none
        text = f"*.{name}" if wildcard else name
    labels = name.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidShapingRule(
            f"match: not a domain name or '*.suffix' pattern: {shown(pattern)} (a '*' may only "
            "stand first, as '*.example.com')",
            pattern=str(pattern),
            field="match",
        )
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRule:
    """Limits for the destinations ``match`` names; None leaves a limit to the global
    settings (``max_per_destination``, ``max_messages_per_connection``) or off (rates).

    Rates are token buckets holding one second's worth (at least one): over any stretch
    of time no more go out than the rate allows, plus that one second's worth.
    """

    match: str
    """``"example.org"``: that recipient domain or MX host; ``"*.google.com"``: any name
    below ``google.com``."""
    max_connections: int | None = None
    """SMTP connections open at once to this destination (per worker), idle and closing
    ones included."""
    messages_per_connection: int | None = None
    """Messages sent over one connection before it is closed and a new one opened."""
    messages_per_minute: float | None = None
    """Messages per minute to this destination, over all workers of one store."""
    messages_per_hour: float | None = None
    """Messages per hour to this destination, over all workers of one store."""
    connections_per_minute: float | None = None
    """New connections per minute to this destination, over all workers of one store."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", _check_pattern(self.match))
        for name in ("max_connections", "messages_per_connection"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000
            ):
                raise InvalidShapingRule(
                    f"{name}: expected an integer from 1 to 100000, got {shown(value)}",
                    pattern=self.match,
                    field=name,
                )
        for name, per_day in _PER_DAY.items():
            value = getattr(self, name)
            if value is None:
                continue
            # The range alone: it refuses NaN and infinity too, and compares an int of any
            # size exactly, where math.isfinite() raised OverflowError for one past a float
            # (TOML and the environment read integers of any size).
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 1 / per_day <= value <= MAX_RATE
            ):
                raise InvalidShapingRule(
                    f"{name}: expected a number from 1/{per_day} (one a day) to"
                    f" {MAX_RATE:g}, got {shown(value)}",
                    pattern=self.match,
                    field=name,
                )
            object.__setattr__(self, name, float(value))

    @property
    def wildcard(self) -> bool:
        return self.match.startswith("*.")

    def matches(self, name: str) -> bool:
        """Whether this rule governs ``name`` (already normalised)."""
        if self.wildcard:
            return name.endswith(self.match[1:])
        return name == self.match

    @property
    def limits_messages(self) -> bool:
        return self.messages_per_minute is not None or self.messages_per_hour is not None

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any], *, where: str) -> DestinationRule:
        """A rule from a TOML table (``where`` names it in errors)."""
        if not isinstance(entry, Mapping):
            raise InvalidShapingRule(
                f"{where}: expected a table with match and limits, got {shown(entry)}",
                pattern="",
                field="",
            )
        known = {f.name for f in fields(cls)}
        pattern = _name(entry.get("match", ""))
        # As strings: a Python mapping (Django's settings) may hold keys of other types,
        # which sorted() cannot compare with one another.
        unknown = sorted(_name(key) for key in set(entry) - known)
        if unknown:
            raise InvalidShapingRule(
                f"{where}: unknown setting {shown(unknown[0])} (known: {', '.join(sorted(known))})",
                pattern=pattern,
                field=unknown[0],
            )
        if "match" not in entry:
            raise InvalidShapingRule(f"{where}: match is required", pattern="", field="match")
        try:
            return cls(**entry)
        except InvalidShapingRule as exc:
            raise InvalidShapingRule(
                f"{where}: {exc.reason}", pattern=exc.pattern, field=exc.field
            ) from None


@functools.cache
def provider_rules() -> tuple[DestinationRule, ...]:
    """The rules shipped in ``destinations.toml`` (read once)."""
    text = resources.files("mailstrom.policy").joinpath(DATA_FILE).read_text(encoding="utf-8")
    document = tomllib.loads(text)
    return tuple(
        DestinationRule.from_mapping(
            {k: v for k, v in entry.items() if k != "provider"}, where=f"{DATA_FILE} rule {i}"
        )
        for i, entry in enumerate(document.get("rule", []))
    )


def _setting(name: str, check: Callable[[], object]) -> None:
    """Run ``check`` of the setting ``name``; its ConfigError becomes the
    :class:`InvalidShapingRule` that shaping raises for every bad setting."""
    try:
        check()
    except ConfigError as exc:
        raise InvalidShapingRule(str(exc), pattern="", field=name) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShapingConfig:
    """Traffic shaping: the rules, whether the shipped provider rules apply, and how long a
    throttled destination is paused.

    A throttling reply (421 at connection time, or 421/451 classed ``rate_limited``, such
    as Gmail's 4.7.28 or Microsoft's 4.7.650) pauses the whole destination for
    ``pause_first``, doubling on each repeat up to ``pause_max``; a destination that was
    not throttled for ``pause_max`` after its last pause starts again at ``pause_first``.
    """

    rules: tuple[DestinationRule, ...] = ()
    provider_defaults: bool = True
    """Apply the rules of ``policy/destinations.toml`` (Gmail, Microsoft, Yahoo, iCloud)
    where no rule of ``rules`` has the same pattern."""
    pause_first: timedelta = timedelta(minutes=5)
    """As long as the retry policy's first delay (and Postfix's ``minimal_backoff_time``):
    a throttled destination is never tried again sooner than a deferred recipient."""
    pause_max: timedelta = timedelta(hours=1)
    refresh: float = 1.0
    """Seconds between a worker's reads of the pauses other workers recorded."""

    def __post_init__(self) -> None:
        if isinstance(self.rules, DestinationRule | str | bytes) or not isinstance(
            self.rules, Iterable
        ):
            # tuple() would raise a bare TypeError for one rule given alone or None.
            raise InvalidShapingRule(
                "shaping.rules: expected a tuple of DestinationRule values, got "
                f"{type(self.rules).__name__}",
                pattern="",
                field="rules",
            )
        rules = tuple(self.rules)
        if len(rules) > MAX_RULES:
            raise InvalidShapingRule(
                f"shaping.rules: at most {MAX_RULES} rules, got {len(rules)}",
                pattern="",
                field="rules",
            )
        seen: set[str] = set()
        for rule in rules:
            if not isinstance(rule, DestinationRule):
                raise InvalidShapingRule(
                    f"shaping.rules: expected DestinationRule values, got {type(rule).__name__}",
                    pattern="",
                    field="rules",
                )
            if rule.match in seen:
                raise InvalidShapingRule(
                    f"shaping.rules: two rules for {rule.match!r}",
                    pattern=rule.match,
                    field="match",
                )
            seen.add(rule.match)
        object.__setattr__(self, "rules", rules)
        _setting("pause_first", lambda: check_duration(self.pause_first, "shaping.pause_first"))
        _setting("pause_max", lambda: check_duration(self.pause_max, "shaping.pause_max"))
        _setting("refresh", lambda: check_seconds(self.refresh, "shaping.refresh", maximum=3600))
        _setting(
            "provider_defaults",
            lambda: check_bool(self.provider_defaults, "shaping.provider_defaults"),
        )
        if self.pause_first > self.pause_max:
            raise InvalidShapingRule(
                "shaping: expected 0 < pause_first <= pause_max", pattern="", field="pause_first"
            )

    def effective_rules(self) -> tuple[DestinationRule, ...]:
        """The user's rules, then the provider rules they do not replace."""
        if not self.provider_defaults:
            return self.rules
        given = {rule.match for rule in self.rules}
        extra = tuple(r for r in provider_rules() if r.match not in given)
        return self.rules + extra


def _specificity(rule: DestinationRule) -> tuple[int, int]:
    # Longer patterns are more specific; at one length an exact name beats a wildcard.
    return (len(rule.match.lstrip("*.")), 0 if rule.wildcard else 1)


class RuleBook:
    """Finds the rule for a destination: exact names by dictionary, wildcards in order of
    specificity (most specific first)."""

    def __init__(self, rules: Iterable[DestinationRule]) -> None:
        self._exact: dict[str, DestinationRule] = {}
        wildcards = []
        for rule in rules:
            if rule.wildcard:
                wildcards.append(rule)
            else:
                self._exact.setdefault(rule.match, rule)
        self._wildcards = sorted(wildcards, key=_specificity, reverse=True)

    @classmethod
    def of(cls, config: ShapingConfig) -> RuleBook:
        return cls(config.effective_rules())

    def __bool__(self) -> bool:
        return bool(self._exact or self._wildcards)

    def rule_for_name(self, name: str) -> DestinationRule | None:
        """The most specific rule governing one name (a domain or a host)."""
        name = normalise_name(name)
        exact = self._exact.get(name)
        if exact is not None:
            return exact
        for rule in self._wildcards:
            if rule.matches(name):
                return rule
        return None

    def match(self, domain: str, mx_hosts: Sequence[str]) -> DestinationRule | None:
        """The rule for recipient ``domain`` whose MX hosts are ``mx_hosts`` (best first):
        the domain's own rule, else the rule of its first MX host that has one."""
        rule = self.rule_for_name(domain)
        if rule is not None:
            return rule
        for host in mx_hosts:
            rule = self.rule_for_name(host)
            if rule is not None:
                return rule
        return None
