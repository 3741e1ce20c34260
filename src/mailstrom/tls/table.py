"""The per-domain TLS policy table (``Config.tls_domains``), like Postfix's
``smtp_tls_policy_maps``: an exact domain, or ``*.parent`` for every name under it.

An exact entry wins over a wildcard, and a longer wildcard over a shorter one, so
``"*.bank.example" = "dane-only"`` with ``"legacy.bank.example" = "none"`` does what it
reads. The table is checked once when the configuration is made; lookups are pure.

>>> table = PolicyTable.parse({"example.com": "verify", "*.bank.example": "dane-only"})
>>> table.match("EXAMPLE.com")
('example.com', <TLSPolicy.VERIFY: 'verify'>)
>>> table.match("www.bank.example")
('*.bank.example', <TLSPolicy.DANE_ONLY: 'dane-only'>)
>>> table.match("bank.example") is None
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from mailstrom.arguments import word_of
from mailstrom.domains import a_label
from mailstrom.errors import ConfigError
from mailstrom.tls.levels import TLSPolicy

MAX_ENTRIES = 10_000
"""Entries one table may hold: a bound on what a configuration file can make us keep."""


def _pattern(text: str) -> str:
    """The normalised pattern (lower-case A-label domain, or ``*.`` and one), or raise."""
    if not isinstance(text, str):
        raise ConfigError(f"tls.domains: expected domain names as keys, got {text!r}")
    # Not lowered here: a_label lowers an ASCII name, and IDNA maps a Unicode one's case
    # (str.lower() turns a capital sigma into a final sigma, another domain's label).
    name = text.strip().rstrip(".")
    wildcard = name.startswith("*.")
    bare = name[2:] if wildcard else name
    try:
        ascii_name = a_label(bare) if bare else ""
    except ValueError:
        ascii_name = ""
    labels = ascii_name.split(".")
    if (
        not ascii_name
        or len(ascii_name) > 253
        or "*" in ascii_name
        or any(not label or len(label) > 63 for label in labels)
        or any(c.isspace() or c in "@[]/\\" for c in ascii_name)
    ):
        raise ConfigError(f"tls.domains: {text!r} is not a domain name or '*.' followed by one")
    return f"*.{ascii_name}" if wildcard else ascii_name


@dataclass(frozen=True, slots=True)
class PolicyTable:
    """Domain patterns and their :class:`TLSPolicy`; empty by default."""

    entries: Mapping[str, TLSPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, entries: Mapping[str, object]) -> PolicyTable:
        """A table from ``{pattern: level}``; bad patterns or levels raise ConfigError."""
        if not isinstance(entries, Mapping):
            raise ConfigError(f"tls.domains: expected a table of domain = level, got {entries!r}")
        if len(entries) > MAX_ENTRIES:
            raise ConfigError(f"tls.domains: at most {MAX_ENTRIES} entries, got {len(entries)}")
        parsed: dict[str, TLSPolicy] = {}
        for key, value in entries.items():
            pattern = _pattern(key)
            level = word_of(TLSPolicy, value)
            if level is None:
                choices = ", ".join(p.value for p in TLSPolicy)
                raise ConfigError(f"tls.domains: {key!r} = {value!r}: expected one of {choices}")
            if pattern in parsed and parsed[pattern] is not level:
                raise ConfigError(f"tls.domains: {key!r} given twice with different levels")
            parsed[pattern] = level
        return cls(parsed)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.entries.items())))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __iter__(self) -> Iterator[tuple[str, TLSPolicy]]:
        return iter(self.entries.items())

    def match(self, domain: str) -> tuple[str, TLSPolicy] | None:
        """The (pattern, level) that applies to ``domain``, or None (the global default)."""
        if not self.entries:
            return None
        name = domain.strip().rstrip(".")
        try:
            name = a_label(name)  # lower-case, by IDNA's mapping for a Unicode name
        except ValueError:
            name = name.lower()  # an odd name keeps its own spelling, but for case
        level = self.entries.get(name)
        if level is not None:
            return name, level
        # The nearest enclosing wildcard: a.b.c tries *.b.c, then *.c.
        parent = name
        while "." in parent:
            parent = parent.split(".", 1)[1]
            pattern = f"*.{parent}"
            level = self.entries.get(pattern)
            if level is not None:
                return pattern, level
        return None
