"""Load the command line's configuration: a TOML file, then ``MAILSTROM_*`` variables, then
options — each layer overriding the one before — into a :class:`~mailstrom.config.Config`
and a store URL.

Every setting has one dotted key (``helo_name``, ``dns.port``, ``retry.max_age``). In the
TOML file a dotted key is a table entry (``[dns]`` / ``port = 53``); in the environment it is
``MAILSTROM_`` + the key upper-cased with dots as underscores (``MAILSTROM_DNS_PORT``).
Unknown keys and bad values raise :class:`~mailstrom.errors.ConfigError` naming the key, so a
typo never silently falls back to a default.

Without a ``store`` setting the queue is :func:`~mailstrom.stores.url.default_store_path`:
``/var/spool/mailstrom/queue.db`` for root, ``$XDG_STATE_HOME/mailstrom/queue.db`` (by
default ``~/.local/state/mailstrom/queue.db``) for anyone else — never a file in the
working directory.

>>> s = load_settings(env={"MAILSTROM_SMTP_PORT": "2525", "HOME": "/home/ann"}, search=False)
>>> s.config.smtp_port, s.store_url == default_store_url({"HOME": "/home/ann"})
(2525, True)
"""

from __future__ import annotations

import codecs
import dataclasses
import ipaddress
import math
import os
import pwd
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailstrom.arguments import word_of
from mailstrom.bounds import MAX_DURATION, safe_repr
from mailstrom.bounds import MAX_INTEGER as MAX_INTEGER  # re-exported: its old home
from mailstrom.config import (
    Config,
    DNSConfig,
    EventLoop,
    HookConfig,
    Lane,
    MTASTSConfig,
    RelayConfig,
    RelayTLS,
    RetentionConfig,
    Timeouts,
    TLSPolicy,
    check_ca_file,
    check_hook_url,
    check_nameserver,
    shown_hook_url,
)
from mailstrom.dkim.config import DKIMConfig
from mailstrom.domains import helo_name_problem
from mailstrom.errors import ConfigError
from mailstrom.message.chars import shorten
from mailstrom.policy.retry import RetryPolicy
from mailstrom.policy.shaping import DestinationRule, ShapingConfig
from mailstrom.settings_paths import DKIM_KEY_FIELDS, anchor_paths
from mailstrom.stores.url import default_store_url, redact_url
from mailstrom.tls.table import PolicyTable

if TYPE_CHECKING:
    from mailstrom.dkim.keys import DKIMKey

ENV_PREFIX = "MAILSTROM_"
CONFIG_PATH_ENV = "MAILSTROM_CONFIG"
"""Names the configuration file, like ``--config`` (not a setting itself)."""
SYSTEM_CONFIG_PATH = Path("/etc/mailstrom/config.toml")
"""The system's configuration file; the only one the sendmail drop-in searches."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """What the command line runs with. Its ``repr`` shows no secret."""

    config: Config
    store_url: str
    config_file: Path | None = None
    """The TOML file that was read, if any."""
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The merged raw values by dotted key (for ``mailstrom config``)."""
    warnings: tuple[str, ...] = ()
    """Problems worth telling the user that do not stop the command (the CLI prints them)."""
    metrics_listen: str | None = None
    """``HOST:PORT`` where ``mailstrom worker`` serves /metrics and /healthz, if anywhere."""
    metrics_queue: bool = True
    """Whether those metrics hold the store's counts (``mailstrom_queue_*``,
    ``mailstrom_workers``), alike from every worker on the store: one exporter is enough."""
    web_listen: str | None = None
    """``HOST:PORT`` where ``mailstrom web`` serves the dashboard (default 127.0.0.1:8025)."""
    web_token: str | None = dataclasses.field(default=None, repr=False)
    """The token (a password) every dashboard page requires; required off loopback."""
    web_public_url: str | None = None
    """The dashboard's address as browsers reach it through a proxy, as an origin
    (``https://dash.example.org``, see :func:`parse_origin`)."""

    def __repr__(self) -> str:
        values = {k: "***" if k in SECRET_KEYS else v for k, v in self.values.items()}
        if isinstance(values.get("store"), str):
            values["store"] = redact_url(values["store"])
        if isinstance(values.get("hook.url"), str):
            values["hook.url"] = shown_hook_url(values["hook.url"])
        return (
            f"Settings(config={self.config!r}, store_url={redact_url(self.store_url)!r}, "
            f"config_file={self.config_file!r}, values={values!r}, "
            f"warnings={self.warnings!r})"
        )


# --- value parsers: each takes a TOML value or an environment string -------------------

Parser = Callable[[str, Any], Any]

# re.ASCII: \d would take any Unicode digit ("٣h", float() reads it as 3) and \s any
# Unicode space. A setting, an option or a query string is written in ASCII digits.
# Possessive (*+, ++): a run of digits or spaces before a character the pattern cannot
# take was tried at every split, time quadratic in its length (20,000 digits, 11 s).
_DURATION = re.compile(r"\s*+(\d++(?:\.\d++)?)\s*+(ms|s|m|h|d|w)?\s*+", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``"90"``/``"90s"``, ``"15m"``, ``"2h"``, ``"3d"``, ``"1w"`` → timedelta.

    >>> parse_duration("2h")
    datetime.timedelta(seconds=7200)
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration (like 30s, 15m, 2h, 3d): {shorten(text, 60)}")
    number, unit = match.groups()
    return _bounded(float(number) * _UNIT_SECONDS[unit or "s"], text)


def _bounded(seconds: float, given: object) -> timedelta:
    if not math.isfinite(seconds) or seconds > MAX_DURATION.total_seconds():
        # The text may come from anywhere (a dashboard's query string): quote a piece.
        shown = shorten(given, 60) if isinstance(given, str) else repr(given)
        raise ValueError(f"not a duration of at most 100 years: {shown}")
    return timedelta(seconds=seconds)


def _quoted(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut in the middle to about ``limit``
    characters: a TOML array, table or key can be as large as the file (1 MiB), and the
    error would print it all."""
    text = safe_repr(value)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…({len(text) - limit} more)…{text[-half:]}"


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_quoted(value)}")
    return value


def _store(key: str, value: Any) -> str:
    """The store: a URL or a file's path. A URL may hold a password, so a value of the wrong
    type (a ``[store]`` table holding the URL, a list) is named by its type alone; a string
    is checked, and quoted with its password as ``***``, where the store is opened."""
    if not isinstance(value, str) or not value:
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise ConfigError(
            f"{key}: expected a store URL or file path as a non-empty string, got {shown}"
        )
    return value


def _any_str(key: str, value: Any) -> str:
    """A string, possibly empty (empty turns the feature off)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_quoted(value)}")
    return value


def ascii_only(text: str) -> bool:
    """Whether ``text`` may be given to ``int()`` or ``float()``: ASCII only. Both also read
    other scripts' digits (``int("\\u0663")`` is 3, ``float("\\uff11.\\uff15")`` 1.5), so a
    value that shows as something else would be taken as a number. Checked before
    ``str.strip()``, which would also strip U+3000 and the like."""
    return text.isascii()


def _int(minimum: int, maximum: int | None = MAX_INTEGER) -> Parser:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                if not ascii_only(value):
                    raise ValueError
                value = int(value.strip())
            except ValueError:
                raise ConfigError(
                    f"{key}: expected an integer in ASCII digits, got {shorten(value, 60)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: expected an integer ≥ {minimum}, got {_quoted(value)}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key}: expected an integer ≤ {maximum}, got {_quoted(value)}")
        return value

    return parse


def _port(key: str, value: Any) -> int:
    port: int = _int(1, maximum=None)(key, value)
    if port > 65535:
        raise ConfigError(f"{key}: not a port number: {port}")
    return port


def _float(minimum: float) -> Parser:
    def parse(key: str, value: Any) -> float:
        given = value
        if isinstance(value, str):
            try:
                if not ascii_only(value):
                    raise ValueError
                value = float(value.strip())
            except ValueError:
                raise ConfigError(
                    f"{key}: expected a number in ASCII digits, got {shorten(value, 60)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {_quoted(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        # NaN and infinity would pass a comparison check and break timers later.
        if not math.isfinite(number) or number < minimum:
            raise ConfigError(f"{key}: expected a finite number ≥ {minimum}, got {_quoted(given)}")
        return number

    return parse


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ConfigError(f"{key}: expected true or false, got {_quoted(value)}")


def _seconds(minimum: float) -> Parser:
    """A time in seconds: a number (``30``, ``0.5``, as TOML or an environment variable
    gives it) or a duration (``30s``, ``500ms``, ``5m``) like ``lease_for`` and
    ``tlsrpt.post_timeout`` take, so that every time setting reads the same."""
    as_number = _float(minimum)

    def parse(key: str, value: Any) -> float:
        if isinstance(value, str) and ascii_only(value) and not _NUMBER.fullmatch(value):
            try:
                seconds = parse_duration(value).total_seconds()
            except ValueError:
                raise ConfigError(
                    f"{key}: expected seconds or a duration (like 30s, 500ms, 5m),"
                    f" got {shorten(value, 60)}"
                ) from None
            if seconds < minimum:
                raise ConfigError(
                    f"{key}: expected at least {minimum:g} s, got {shorten(value, 60)}"
                )
            return seconds
        number: float = as_number(key, value)
        return number

    return parse


_NUMBER = re.compile(r"\s*+[-+]?(\d++(?:\.\d*+)?|\.\d++)([eE][-+]?\d++)?\s*+", re.ASCII)
"""A number as ``float()`` reads it (the old form of these settings), sign included.
Possessive, as :data:`_DURATION` is: digits, an optional point, digits split a
run of digits every way before the character that ended it."""


def _duration(key: str, value: Any) -> timedelta:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration, got {_quoted(value)}")
    try:
        if isinstance(value, int | float):
            if value < 0:
                raise ConfigError(f"{key}: expected a duration ≥ 0, got {_quoted(value)}")
            return _bounded(value, value)
        if isinstance(value, str):
            return parse_duration(value)
    except (ValueError, OverflowError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{key}: {exc}") from None
    raise ConfigError(f"{key}: expected a duration, got {_quoted(value)}")


def _positive_duration(key: str, value: Any) -> timedelta:
    """A duration as :func:`_duration` reads it, but more than none: a time limit of 0
    would fail every attempt before it starts."""
    duration = _duration(key, value)
    if duration <= timedelta(0):
        shown = shorten(value, 60) if isinstance(value, str) else repr(value)
        raise ConfigError(f"{key}: expected a duration > 0 (like 30s or 500ms), got {shown}")
    return duration


def _optional(parser: Parser, *, integer: bool = False) -> Parser:
    """``"none"``/``"off"``/``false`` (or 0 for numbers) turn a limit off. For an
    ``integer`` setting only the integer 0 does: ``0.0`` is a float, which ``parser``
    refuses as it refuses ``1.0``, not "no limit" where every other float is an error."""

    def parse(key: str, value: Any) -> Any:
        zero = value == 0 and (isinstance(value, int) or not integer)
        if (
            value is False
            or zero
            or (isinstance(value, str) and value.strip().lower() in ("", "none", "off", "0"))
        ):
            return None
        return parser(key, value)

    return parse


def _limit_or_none(instead: str) -> Parser:
    """A duration above zero, or ``"none"``/``"off"``/``false`` for no limit. Zero is
    refused in every form, ``instead`` saying what to write: through :func:`_optional`,
    ``0`` read as "none" and ``"0s"`` as a limit of nothing, opposite meanings."""

    def parse(key: str, value: Any) -> timedelta | None:
        if value is False or (
            isinstance(value, str) and value.strip().lower() in ("", "none", "off")
        ):
            return None
        limit = _duration(key, value)
        if limit <= timedelta(0):
            raise ConfigError(f"{key}: 0 is ambiguous; {instead}")
        return limit

    return parse


_max_age = _limit_or_none(
    'write "none" to retry without an age limit, or retry.max_attempts = 1 to give up at '
    "the first temporary failure"
)
"""``retry.max_age``: ``0`` read as "none" (never give up), ``"0s"`` as a limit that gives
up at the first temporary failure, and Postfix's ``maximal_queue_lifetime = 0`` means a
single attempt."""
_suppress_for = _limit_or_none(
    'write "none" to keep entries until they are removed, or suppress_on = [] to add none'
)
"""``suppress_for``: ``0`` read as "none" kept a hard bounce's entry for ever, where it
reads as "not at all"."""


def _choice(enum: type[TLSPolicy] | type[RelayTLS] | type[EventLoop]) -> Parser:
    def parse(key: str, value: Any) -> Any:
        member = word_of(enum, value)  # in any case, as Config reads these words
        if member is None:
            choices = ", ".join(e.value for e in enum)
            raise ConfigError(f"{key}: expected one of {choices}, got {_quoted(value)}")
        return member

    return parse


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in (part.strip() for part in value.split(",")) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {_quoted(value)}")
    return tuple(value)


_ORIGIN = re.compile(
    r"(?P<scheme>https?)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9-]+(?:\.[a-z0-9-]+)*)"
    r"(?::(?P<port>[0-9]{1,5}))?/?",
    re.ASCII | re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(text: str) -> str:
    """A site's address as a browser writes it in a request's ``Origin`` header:
    ``scheme://host[:port]`` in lower case, without its scheme's default port or a final
    ``/`` (ValueError for anything else: a path, a query, a user, a name in Unicode).

    >>> parse_origin("HTTPS://Dash.Example.org:443/")
    'https://dash.example.org'
    """
    match = _ORIGIN.fullmatch(text)
    if match is None:
        raise ValueError(
            "expected scheme://host[:port] with no path, such as https://dash.example.org "
            f"(a Unicode name in its xn-- form): {shorten(text, 60)}"
        )
    scheme, host, port = match["scheme"].lower(), match["host"].lower(), match["port"]
    if host.startswith("["):
        try:
            # As browsers write it: compressed ([::1], not [0:0::1]).
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"not an IPv6 address: {shorten(host, 60)}") from None
    if port is not None:
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port must be 1 to 65535: {port}")
        if int(port) != _DEFAULT_PORTS[scheme]:
            host = f"{host}:{int(port)}"
    return f"{scheme}://{host}"


def _origin(key: str, value: Any) -> str:
    try:
        return parse_origin(_str(key, value))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _listen(key: str, value: Any) -> str:
    from mailstrom.ops.server import parse_listen

    text = _str(key, value)
    try:
        parse_listen(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return text


def _dkim_keys(key: str, value: Any) -> tuple[DKIMKey, ...]:
    """``[[dkim.keys]]`` tables, or in the environment ``domain:selector:path[:algorithm]``
    entries separated by commas; each key file is read and checked here (DKIMKey)."""
    from mailstrom.dkim.keys import DKIMKey  # here: settings without DKIM never load it

    if isinstance(value, str):
        value = [_dkim_key_entry(key, entry) for entry in value.split(",") if entry.strip()]
    if not isinstance(value, list):
        # A single [dkim.keys] table is not quoted: its private_key may be the key
        # itself rather than its path.
        got = "one [dkim.keys] table" if isinstance(value, dict) else _quoted(value)
        raise ConfigError(f"{key}: expected [[dkim.keys]] tables, got {got}")
    keys: list[DKIMKey] = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table with domain, selector, private_key")
        unknown = sorted(set(entry) - set(DKIM_KEY_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown setting {_quoted(unknown[0])}")
        missing = [name for name in DKIM_KEY_FIELDS[:3] if name not in entry]
        if missing:
            raise ConfigError(f"{where}: {missing[0]} is required")
        for name, item in entry.items():
            _str(f"{where}.{name}", item)
        try:
            keys.append(
                DKIMKey(
                    domain=entry["domain"],
                    selector=entry["selector"],
                    private_key=entry["private_key"],
                    algorithm=entry.get("algorithm", "rsa-sha256"),
                )
            )
        except ConfigError as exc:  # "dkim key a.org/s: ...": say which setting too
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(keys)


def _dkim_key_entry(key: str, text: str) -> dict[str, str]:
    parts = [part.strip() for part in text.split(":")]
    if len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(
            f"{key}: expected domain:selector:path[:algorithm] entries separated by commas, "
            f"got {_quoted_unless_key(text.strip(), *parts)}"
        )
    return dict(zip(DKIM_KEY_FIELDS, parts, strict=False))


def _quoted_unless_key(text: str, *parts: str) -> str:
    """``text`` quoted, unless it or one of its ``parts`` is a private key rather than a
    key file's path: a key put where the entry belongs (``MAILSTROM_DKIM_KEYS`` set to
    the key a secret store holds, or with its selector missing) was quoted whole in the
    error, an Ed25519 seed's 44 characters all of it, a PEM key's last line."""
    from mailstrom.dkim.keys import key_text  # here: settings without DKIM never load it

    held = next(filter(None, map(key_text, (text, *parts))), None)
    return _quoted(text) if held is None else f"an entry holding {held} (not shown)"


def _shaping_rules(key: str, value: Any) -> tuple[DestinationRule, ...]:
    """``[[shaping.rules]]`` tables, or in the environment entries separated by ``;``, each
    a pattern followed by ``name=value`` limits:
    ``"*.google.com max_connections=5 messages_per_minute=100; example.org max_connections=1"``."""
    if isinstance(value, str):
        value = [_shaping_rule_entry(key, entry) for entry in value.split(";") if entry.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected [[shaping.rules]] tables, got {_quoted(value)}")
    return tuple(
        DestinationRule.from_mapping(entry, where=f"{key}[{index}]")
        for index, entry in enumerate(value)
    )


def _shaping_rule_entry(key: str, text: str) -> dict[str, Any]:
    pattern, *limits = text.split()
    entry: dict[str, Any] = {"match": pattern}
    for limit in limits:
        name, sep, number = limit.partition("=")
        if not sep:
            raise ConfigError(
                f"{key}: expected name=value after {_quoted(pattern)}, got {_quoted(limit)}"
            )
        if name in entry:
            # TOML refuses a key given twice in a table; a dict would keep the last value.
            raise ConfigError(f"{key}: {_quoted(name)} given twice for {_quoted(pattern)}")
        try:
            if not ascii_only(number):
                raise ValueError
            entry[name] = int(number) if number.strip().isdigit() else float(number)
        except ValueError:
            raise ConfigError(f"{key}: {name}: expected a number, got {_quoted(number)}") from None
    return entry


def _tls_domains(key: str, value: Any) -> PolicyTable:
    """A ``[tls.domains]`` table, or ``domain=level`` pairs separated by commas (the
    environment's form: ``example.com=verify,*.bank.example=dane-only``)."""
    if isinstance(value, str):
        entries: dict[str, str] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            name, sep, level = part.partition("=")
            if not sep or not name.strip() or not level.strip():
                raise ConfigError(
                    f"{key}: expected domain=level pairs, got {_quoted(part.strip())}"
                )
            name, level = name.strip(), level.strip()
            # A dict would keep the last silently ("verify" undone by a later "none");
            # the table refuses names given twice with different levels, so must this.
            if entries.get(name, level).lower() != level.lower():
                raise ConfigError(f"{key}: {_quoted(name)} given twice with different levels")
            entries[name] = level
        value = entries
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of domain = level, got {_quoted(value)}")
    for name, level in value.items():
        if isinstance(name, str) and isinstance(level, dict):
            # TOML reads the dots of an unquoted example.com as tables: {"example": {...}}.
            labels = [name]
            while isinstance(level, dict) and len(level) == 1:
                label, level = next(iter(level.items()))
                labels.append(str(label))
            domain = ".".join(labels)
            plain = isinstance(level, str) and len(level) <= 20 and level.replace("-", "").isalpha()
            shown = f'"{domain}" = "{level}"' if plain else f'"{domain}" = ...'
            raise ConfigError(
                f"{key}: write {_quoted(domain)} in quotes ({shown}): "
                "unquoted, TOML reads the dots of a domain as tables"
            )
    return PolicyTable.parse(value)


def _lanes(key: str, value: Any) -> tuple[Lane, ...]:
    """``[[lanes]]`` tables (``name``, optional ``share`` and ``bypass_suppression``),
    highest first; in the
    environment ``name[:share]`` entries separated by commas (``transactional,bulk:0.75``)."""
    if isinstance(value, str):
        entries: list[Any] = []
        for text in value.split(","):
            name, _, share = text.strip().partition(":")
            entries.append({"name": name} | ({"share": share} if share else {}))
        value = entries
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected [[lanes]] tables with a name (and a share)")
    lanes: list[Lane] = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: expected a table with a name (and a share)")
        unknown = sorted(set(entry) - {"name", "share", "bypass_suppression"})
        if unknown:
            raise ConfigError(f"{where}: unknown setting {_quoted(unknown[0])}")
        share = _float(0.0)(f"{where}.share", entry.get("share", 1.0))
        bypass = entry.get("bypass_suppression", ())
        try:
            name = _str(f"{where}.name", entry["name"])
            lanes.append(Lane(name=name, share=share, bypass_suppression=bypass))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(lanes)


def _path_or_none(key: str, value: Any) -> str:
    """A file's path, or ``""`` for none. No path holds a NUL character: ``open()`` raises
    ValueError for one, not the OSError its reader reports as a ConfigError."""
    path = _any_str(key, value)
    if "\0" in path:
        raise ConfigError(f"{key}: a file name cannot hold a NUL character: {shorten(path)}")
    return path


def _mail_domain(key: str, value: Any) -> str:
    """The domain of addresses made from bare names (``root@`` it): a fully qualified
    name (U-labels allowed) or an address literal. Anything else made every such address
    invalid, each message then refused as malformed (exit 65) instead of the setting."""
    text = _str(key, value)
    problem = mail_domain_problem(text)
    if problem is not None:
        raise ConfigError(
            f"{key}: {problem}: {shorten(text, 80)} (expected a domain like example.com)"
        )
    return text


def mail_domain_problem(text: str) -> str | None:
    """Why ``text`` cannot be the domain of addresses made from bare names (not a fully
    qualified name or an address literal, or a name no address may have), or None."""
    problem = helo_name_problem(text)
    if problem is None and "." not in text and not text.startswith("["):
        problem = "a single label, not a fully qualified name"
    return problem if problem is not None else _address_domain_problem(text)


def _address_domain_problem(domain: str) -> str | None:
    """Why no address may have ``domain``, as the addresses made with it are validated
    (an A-label that is no IDNA, a special-use name such as ``printer.local``), or None.
    Letters, digits and hyphens are not enough: every message with a bare name would be
    refused instead."""
    from mailstrom.errors import InvalidAddress
    from mailstrom.message.addrspec import validate

    try:
        validate("postmaster", domain)
    except InvalidAddress as exc:
        # The validator's reason speaks of an address: "The part after the @-sign is...".
        why = (str(exc).partition(": ")[2] or str(exc)).rstrip(".")
        return f"no mail address may have this domain ({why})"
    return None


def _existing_file(key: str, value: Any) -> str:
    path = _str(key, value)
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file: {path}")
    return path


def _ca_file(key: str, value: Any) -> str:
    """A PEM file of CA certificates that OpenSSL loads: checked here, not only where the
    context is made, so that ``--tls-ca`` names its option (a usage error, exit 64)."""
    path = _existing_file(key, value)
    check_ca_file(path, key)
    return path


def _hook_url(key: str, value: Any) -> str:
    """The hook's endpoint, checked as :class:`~mailstrom.config.HookConfig` checks it:
    here too, so that ``worker --hook`` names its option (a usage error, exit 64)."""
    url = _str(key, value)
    check_hook_url(url, key)
    return url


# Every key, with its parser. The order is the order of docs/cli.md.
KEYS: dict[str, Parser] = {
    "store": _store,
    "helo_name": _str,
    "smtp_port": _port,
    "source_address": _str,
    "allow_loopback": _bool,
    "tls": _choice(TLSPolicy),
    "tls_ca": _ca_file,
    "max_message_size": _int(1),
    "max_recipients": _int(1),
    "max_connections": _int(1),
    "max_per_destination": _int(1),
    "max_messages_per_connection": _int(1),
    "mx_address_limit": _int(1),
    "mx_host_limit": _int(1),
    "mx_session_limit": _int(1),
    "remember_unreachable": _duration,
    "connection_idle": _seconds(0),
    "retry_uncertain": _bool,
    "event_loop": _choice(EventLoop),
    "lease_for": _duration,
    "lease_batch": _int(1),
    "max_leased_bytes": _int(1),
    "poll_interval": _seconds(0.001),
    "dns.nameservers": _str_list,
    "dns.port": _port,
    "dns.timeout": _seconds(0.001),
    "timeouts.connect": _seconds(0.001),
    "timeouts.greeting": _seconds(0.001),
    "timeouts.command": _seconds(0.001),
    "timeouts.data_init": _seconds(0.001),
    "timeouts.data_block": _seconds(0.001),
    "timeouts.data_end": _seconds(0.001),
    "retry.min_delay": _positive_duration,
    "retry.max_delay": _duration,
    "retry.multiplier": _float(1.0),
    "retry.jitter": _float(0.0),
    "retry.max_age": _max_age,
    "retry.max_attempts": _optional(_int(1), integer=True),
    "relay.host": _str,
    "relay.port": _port,
    "relay.tls": _choice(RelayTLS),
    "relay.username": _str,
    "relay.password": _str,
    "relay.verify": _bool,
    "relay.allow_plaintext_auth": _bool,
    # Read by ``mailstrom doctor`` only (not part of Config: delivery never uses them).
    "doctor.probe": _str,
    "doctor.dnsbls": _str_list,
    "doctor.time_limit": _seconds(0.001),
    "events": _bool,
    "hook.url": _hook_url,
    "hook.secret": _str,
    "hook.timeout": _seconds(0.001),
    "hook.batch": _int(1),
    "hook.retry_min": _seconds(0.001),
    "hook.retry_max": _seconds(0.001),
    "hook.concurrency": _int(1),
    "metrics.listen": _listen,
    "metrics.queue": _bool,
    "metrics.domains": _str_list,
    "message_id_domain": _str,
    "dkim.keys": _dkim_keys,
    "dkim.required": _bool,
    "dkim.expire": _optional(_duration),
    # Read by the sendmail personality only (cli/localnames.py): the domain bare local
    # names get, and the aliases file ("" for none).
    "sendmail.origin": _mail_domain,
    "sendmail.aliases": _path_or_none,
    "shaping.rules": _shaping_rules,
    "shaping.provider_defaults": _bool,
    "shaping.pause_first": _duration,
    "shaping.pause_max": _duration,
    "tls.default": _choice(TLSPolicy),
    "tls.domains": _tls_domains,
    "tls.remember_broken": _duration,
    "dns.dnssec": _bool,
    "mta_sts.enabled": _bool,
    "mta_sts.port": _port,
    "mta_sts.ca_file": _ca_file,
    "mta_sts.timeout": _seconds(0.001),
    "mta_sts.recheck": _seconds(0),
    "mta_sts.report": _bool,
    # Read by ``mailstrom tlsrpt`` only: who the reports say they come from, and how long
    # one POST of a report may take.
    "tlsrpt.organization": _str,
    "tlsrpt.contact": _str,
    "tlsrpt.from": _str,
    "tlsrpt.post_timeout": _positive_duration,
    "web.listen": _listen,
    "web.token": _str,
    "web.public_url": _origin,
    # Read by workers: count TLS sessions for the reports (Config.tlsrpt_record).
    "tlsrpt.record": _bool,
    "lanes": _lanes,
    "default_priority": _str,
    "idempotency_window": _duration,
    "suppress_on": _str_list,
    "suppress_for": _suppress_for,
    "bounce_notices": _bool,
    "delay_warning": _optional(_duration),
    # Workers delete finished mail this long after it finished; 0 or none: never.
    "retention.delivered": _optional(_duration),
    "retention.failed": _optional(_duration),
}

SECRET_KEYS = frozenset(["relay.password", "hook.secret", "web.token"])
"""Settings whose values are never shown: not in errors, not in ``repr``."""

_SECTIONS = {key.partition(".")[0] for key in KEYS if "." in key}


def env_name(key: str) -> str:
    """``dns.port`` → ``MAILSTROM_DNS_PORT``."""
    return ENV_PREFIX + key.upper().replace(".", "_")


_ENV_KEYS = {env_name(key): key for key in KEYS}


# --- the layers --------------------------------------------------------------------------


def default_config_paths(env: Mapping[str, str]) -> list[Path]:
    """Where the ``mailstrom`` command looks for a configuration file when none is named,
    first found wins: ``$XDG_CONFIG_HOME/mailstrom/config.toml`` (by default
    ``~/.config/...``), then :data:`SYSTEM_CONFIG_PATH`.

    Never the working directory: whoever can write where a program runs would choose the
    store and the relay. A relative ``XDG_CONFIG_HOME`` or ``HOME`` is ignored for the same
    reason (and because the XDG specification says to).
    """
    paths = [SYSTEM_CONFIG_PATH]
    home = _user_config_home(env)
    if home is not None:
        paths.insert(0, home / "mailstrom" / "config.toml")
    return paths


def _user_config_home(env: Mapping[str, str]) -> Path | None:
    xdg = env.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg)
    home = env.get("HOME", "")
    if not os.path.isabs(home):
        try:
            home = pwd.getpwuid(os.geteuid()).pw_dir
        except KeyError:
            return None
    return Path(home) / ".config" if os.path.isabs(home) else None


MAX_CONFIG_FILE_SIZE = 1 << 20
"""Octets of a configuration file read at most (a full one is a few kilobytes)."""


def _is_config_file(path: Path) -> bool:
    """``path`` is a file; ConfigError when it cannot even be looked at. ``is_file``
    answers False only for a path that does not exist: a name too long for the system,
    or a directory on the way that we may not search, raises OSError."""
    try:
        return path.is_file()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {shorten(str(path))}: {exc.strerror or exc}"
        ) from None


def _not_a_config_file(path: Path) -> str:
    """Why the named ``path``, which is no regular file, cannot be read: it is missing,
    or it is something else (a directory, a pipe), which "not found" misdescribed."""
    try:
        kind = "a directory" if path.is_dir() else None if not path.exists() else "other"
    except OSError:
        kind = None
    if kind is None:
        return f"config file not found: {shorten(str(path))}"
    what = "a directory, not a file" if kind == "a directory" else "not a regular file"
    return f"cannot read config file {shorten(str(path))}: {what}"


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings by dotted key, relative paths made absolute against the file's
    directory (:mod:`mailstrom.settings_paths`); ConfigError when it cannot be read, is
    larger than :data:`MAX_CONFIG_FILE_SIZE`, is not UTF-8 (a byte order mark first is
    dropped) or not TOML, or has unknown keys."""
    document = _parse_toml(_read_config_text(path), path)
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        # TOML refuses a key given twice, but not a quoted "dns.port" beside [dns]'s
        # port: two keys to TOML, one setting here, whose first value would be lost.
        if key in flat:
            raise ConfigError(f"{path}: setting {_quoted(key)} given twice")
        flat[key] = value

    for name, value in document.items():
        if name in _SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                put(f"{name}.{sub}", subvalue)
        else:
            put(name, value)
    for key in flat:
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown setting {_quoted(key)}{_meant(key)}")
    anchor_paths(flat, path)
    return flat


def _meant(key: str) -> str:
    """What an unknown ``key`` likely meant, as the end of its error ("" for no guess).

    TOML puts every key under the table above it: ``helo_name`` written after ``[relay]``
    is ``relay.helo_name``. Else the nearest known key, for a typo."""
    if len(key) > 100:  # no guess for what is no key
        return ""
    section, _, name = key.partition(".")
    if name in KEYS and "." not in name:
        return (
            f"; {name!r} goes before the first [table] of the file (a key belongs to the "
            f"table above it, here [{section}])"
        )
    import difflib  # here: only a misspelt key needs it, never a start that reads none

    close = difflib.get_close_matches(key, KEYS, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_config_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_FILE_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_FILE_SIZE} octets: not a config file")
    # A byte order mark, which Windows editors put first, is no TOML: tomllib refused it
    # as an "invalid statement" at line 1, column 1, a line that looks right. Dropped.
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        # TOML files are UTF-8 (TOML 1.0 "Spec").
        where = bom + exc.start
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (at octet {where})") from None


MAX_KEY_PARTS = 130
"""Dotted parts of one TOML key at most. A setting's key has two or three
(``tls.domains."example.com"``); 130 leave room for a domain of 127 labels written
unquoted in ``[tls.domains]``, which is refused with advice rather than as this."""

_KEY_PART = r"""(?:[A-Za-z0-9_-]++|"[^"\n]*+"|'[^'\n]*+')"""
"""A bare or quoted key, as far as counting goes (an escaped quote ends it early: at
most one part more is counted). Possessive, and a string without its closing quote
scanned once per line: the scan is linear in the file."""
_DOTTED_KEY = re.compile(rf"{_KEY_PART}(?:[ \t]*+\.[ \t]*+{_KEY_PART})*+")


def _check_key_depth(text: str, path: Path) -> None:
    """ConfigError for a key of more than :data:`MAX_KEY_PARTS` dotted parts, before
    tomllib reads it: tomllib keeps every prefix of a dotted key (``a``, ``a.a``,
    ``a.a.a``, ...), memory and time quadratic in its parts. A 40 KB line of 20,000
    took 14 s and 1.5 GB; one of 300,000 within the file's 1 MiB, all the memory.
    Dotted words in a string or a comment count too: no setting's value has so many."""
    for match in _DOTTED_KEY.finditer(text):
        chain = match[0]
        if chain.count(".") >= MAX_KEY_PARTS and len(re.findall(_KEY_PART, chain)) > MAX_KEY_PARTS:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(
                f"{path}: invalid TOML: a key of more than {MAX_KEY_PARTS} dotted parts "
                f"(line {line})"
            )


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    _check_key_depth(text, path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: thousands of "[[[…"
        # exhaust Python's stack rather than raise TOMLDecodeError.
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError:
        # tomllib converts an integer with int(), which refuses one of more than 4,300
        # digits with a ValueError of its own, not TOMLDecodeError.
        raise ConfigError(f"{path}: invalid TOML: an integer too long to read") from None


_EMPTY_REFUSED = frozenset(
    {
        "retry.max_age",
        "retry.max_attempts",
        "dkim.expire",
        "suppress_for",
        "delay_warning",
        "retention.delivered",
        "retention.failed",
    }
)
"""The limits that ``none`` turns off, whose parsers read an empty value as ``none`` too:
an empty environment variable for one is refused (:func:`read_env`). A file's ``""`` is
written there on purpose; an empty variable is most often one that was never set."""


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``MAILSTROM_*`` variables by dotted key; unknown names raise ConfigError."""
    values: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV:
            continue
        key = _ENV_KEYS.get(name)
        if key is None:
            import difflib  # here: only a misspelt name needs it

            close = difflib.get_close_matches(name, _ENV_KEYS, n=1) if len(name) <= 100 else []
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown environment variable {name}{hint}")
        if key in _EMPTY_REFUSED and not value.strip():
            # ``MAILSTROM_RETRY_MAX_AGE="$AGE"`` with AGE unset read as "none": the limit
            # turned off in silence. Refused, as an empty MAILSTROM_CONFIG or STORE is.
            raise ConfigError(
                f'{name} is set but empty: write "none" for no {key} limit, or unset it '
                "for the default"
            )
        values[key] = value
    return values


def load_settings(
    *,
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    search: bool = True,
    paths: Sequence[Path] | None = None,
) -> Settings:
    """Merge file < environment < ``overrides`` (dotted keys, e.g. from options).

    ``config_path`` (or ``$MAILSTROM_CONFIG``) names the file, which must then exist
    (an empty name is a ConfigError); otherwise, when ``search`` is true, the first
    existing file of ``paths`` is read (default: :func:`default_config_paths`).
    """
    env = os.environ if env is None else env
    named = config_path if config_path is not None else env.get(CONFIG_PATH_ENV)
    if named == "":
        # Set but empty ("$CFG" with CFG unset) names no file: read as unset, the default
        # files were read instead, silently, and the file meant never was. As ``--config
        # ""`` and an empty MAILSTROM_STORE are, refused.
        raise ConfigError(
            "config_path: expected a configuration file, got ''"
            if config_path is not None
            else f"{CONFIG_PATH_ENV} is set but empty: name a configuration file, or unset it"
        )
    config_file: Path | None = None
    if named:
        config_file = Path(named)
        if not _is_config_file(config_file):
            raise ConfigError(_not_a_config_file(config_file))
    elif search:
        candidates = default_config_paths(env) if paths is None else paths
        config_file = next((p for p in candidates if _is_config_file(p)), None)

    values: dict[str, Any] = {}
    warnings: list[str] = []
    # Where each value was given, for its errors: an option is named by argparse (and
    # Django's dict by its caller), so it has none.
    sources: dict[str, str] = {}
    if config_file is not None:
        from_file = read_config_file(config_file)
        warnings.extend(_writable_by_others(config_file))
        warnings.extend(_exposed_secrets(config_file, from_file))
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, f"in {config_file}"))
    from_env = read_env(env)
    _overlay(values, from_env)
    sources.update({key: f"from {env_name(key)}" for key in from_env})
    for key in overrides or {}:
        if key not in KEYS:
            raise ConfigError(f"unknown setting {_quoted(key)}{_meant(key)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    _overlay(values, given)
    for key in given:
        sources.pop(key, None)
    try:
        parsed = {key: _parse(key, value) for key, value in values.items()}
        config = build_config(parsed)
    except ConfigError as exc:
        raise _with_source(exc, sources) from None
    return Settings(
        config=config,
        store_url=parsed["store"] if "store" in parsed else default_store_url(env),
        config_file=config_file,
        values=values,
        warnings=tuple(warnings),
        metrics_listen=parsed.get("metrics.listen"),
        metrics_queue=parsed.get("metrics.queue", True),
        web_listen=parsed.get("web.listen"),
        web_token=parsed.get("web.token"),
        web_public_url=parsed.get("web.public_url"),
    )


_ERROR_KEY = re.compile(r"([a-z_]+(?:\.[a-z_]+)?)(?=[:\[ ])", re.ASCII)
"""The setting an error names first (``retry.jitter: ...``, ``lanes[1]: ...``, and
Config's ``helo_name 'x': ...`` or ``default_priority 'x' is not ...``, which the file or
variable was missing from)."""


def _with_source(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """``exc`` saying where the value of the setting it names was given (``(in
    /etc/mailstrom/config.toml)``, ``(from MAILSTROM_SMTP_PORT)``): with a file and
    variables both in play, the key alone did not say which one to mend."""
    text = str(exc)
    match = _ERROR_KEY.match(text)
    source = sources.get(match[1]) if match else None
    if source is not None and len(exc.args) == 1:
        # The same error, said more: its type (InvalidShapingRule) and fields are kept.
        exc.args = (f"{text} ({source})",)
    return exc


_SAME_SETTING = {"tls": "tls.default", "tls.default": "tls"}
"""Settings with two names (``tls``, and ``[tls] default`` for a file with a
``[tls.domains]`` table): within one layer the plain ``tls`` wins."""


def _overlay(values: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """``layer``'s values over ``values``, a setting's other name included: the file's
    ``tls = "opportunistic"`` outlived ``MAILSTROM_TLS_DEFAULT=verify`` (the plain name
    won across layers), and mail went with the policy the environment meant to replace."""
    for key in layer:
        other = _SAME_SETTING.get(key)
        if other is not None:
            values.pop(other, None)
    values.update(layer)


def _parse(key: str, value: Any) -> Any:
    """One value through its key's parser; a secret's value never reaches the message."""
    if key not in SECRET_KEYS:
        return KEYS[key](key, value)
    try:
        return KEYS[key](key, value)
    except ConfigError:
        raise ConfigError(
            f"{key}: expected a non-empty string (the value is secret, so it is not shown; "
            "quote it in the file)"
        ) from None


def _writable_by_others(path: Path) -> list[str]:
    """A warning when every user may change the file at ``path``: whoever can write it
    chooses the store and the relay, the reason the working directory's file is never
    read (ssh refuses such a file, ``postfix check`` warns of one). A group's write bit
    is left alone: it may be an administrators' group, or the owner's own (umask 002)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return []
    if not mode & 0o002:
        return []
    return [
        f"{path} can be changed by any user (mode {mode:04o}), who could then choose "
        "the store and the relay; chmod o-w it"
    ]


def _exposed_secrets(path: Path, document: Mapping[str, Any]) -> list[str]:
    """A warning when the file at ``path`` (holding ``document``) has a password and other
    users can read it: as ssh does for private keys, any access for group or others is
    too open."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return []
    store = document.get("store")
    # Each secret's own variable: a web token was sent to MAILSTROM_RELAY_PASSWORD.
    variables = [env_name(k) for k in KEYS if k in SECRET_KEYS and k in document]
    if isinstance(store, str) and redact_url(store) != store:
        variables.append(f"the store URL in {env_name('store')}")
    if not variables or not mode & 0o077:
        return []
    return [
        f"{path} holds a password and other users can access it (mode {mode:04o}); "
        f"chmod 600 it, or give the password in the environment ({', '.join(variables)})"
    ]


def build_config(parsed: Mapping[str, Any]) -> Config:
    """Parsed values by dotted key → Config; what is not given keeps its default."""

    def section(name: str) -> dict[str, Any]:
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in parsed.items() if k.startswith(prefix)}

    top: dict[str, Any] = {k: v for k, v in parsed.items() if "." not in k}
    top.pop("store", None)
    tls_ca = top.pop("tls_ca", None)
    if tls_ca is not None:
        top["tls_context"] = _tls_context(tls_ca)
    if dns := section("dns"):
        top["dns"] = DNSConfig(**dns)
    if timeouts := section("timeouts"):
        top["timeouts"] = Timeouts(**timeouts)
    if retry := section("retry"):
        top["retry"] = RetryPolicy(**retry)
    if dkim := section("dkim"):
        top["dkim"] = DKIMConfig(**dkim)
    if relay := section("relay"):
        if "host" not in relay:
            others = ", ".join(f"relay.{k}" for k in sorted(relay))
            raise ConfigError(f"relay.host: required when {others} is set")
        top["relay"] = RelayConfig(**relay)
    if hook := section("hook"):
        if "url" not in hook:
            # Settings such as the secret may live in a shared file; no URL, no hook.
            hook = {}
        elif "secret" not in hook:
            raise ConfigError(
                f"hook.secret: required with hook.url (set it in the file or "
                f"{env_name('hook.secret')}); receivers check each request's signature"
            )
        if hook:
            top["hook"] = HookConfig(**hook)
    if (domains := section("metrics").get("domains")) is not None:
        top["metrics_domains"] = tuple(domains)
    if shaping := section("shaping"):
        top["shaping"] = ShapingConfig(**shaping)
    if retention := section("retention"):
        top["retention"] = RetentionConfig(**retention)
    tls = section("tls")
    if "default" in tls and "tls" not in top:
        # [tls] default = ... is how a file with [tls.domains] names the global level
        # (TOML cannot have both tls = "..." and a [tls] table); a plain tls wins.
        top["tls"] = tls["default"]
    if "domains" in tls:
        top["tls_domains"] = tls["domains"]
    if "remember_broken" in tls:
        top["tls_remember_broken"] = tls["remember_broken"]
    if (mta_sts := section("mta_sts")) and mta_sts.pop("enabled", True):
        top["mta_sts"] = MTASTSConfig(**mta_sts)
    if "record" in (tlsrpt := section("tlsrpt")):
        top["tlsrpt_record"] = tlsrpt["record"]
    try:
        return Config(**top)
    except ConfigError as exc:
        raise _named_as_settings(exc) from None


_FIELD_KEYS = {
    "metrics_domains": "metrics.domains",
    "tls_domains": "tls.domains",
    "tls_remember_broken": "tls.remember_broken",
    "tlsrpt_record": "tlsrpt.record",
}
"""Config fields whose setting has another name: Config's errors name the field."""


def _named_as_settings(exc: ConfigError) -> ConfigError:
    """``exc`` naming the setting (``metrics.domains``) where Config named its field
    (``metrics_domains``), which is no key of the file nor of the environment."""
    text = str(exc)
    for field, key in _FIELD_KEYS.items():
        if text.startswith(field):
            return ConfigError(key + text[len(field) :])
    return exc


def _tls_context(cafile: str) -> ssl.SSLContext:
    """A verifying context that trusts ``cafile`` (a PEM bundle) instead of the system."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_ca: cannot load {cafile}: {exc}") from None


def parse_dns_servers(servers: list[str]) -> dict[str, Any]:
    """``--dns-server HOST[:PORT]`` values → ``dns.nameservers`` and ``dns.port`` overrides.

    IPv6 addresses with a port are bracketed: ``[::1]:5353``. All servers share one port
    (DNSConfig has one), so differing ports raise ConfigError, as does a port given to some
    servers but not to others.

    >>> parse_dns_servers(["127.0.0.1:5353"])
    {'dns.nameservers': ['127.0.0.1'], 'dns.port': 5353}
    """
    hosts: list[str] = []
    ports: set[int] = set()
    portless = 0
    for server in servers:
        host, port = server, None
        if server.startswith("["):
            host, _, rest = server[1:].partition("]")
            if rest.startswith(":"):
                port = rest[1:]
            elif rest:  # "[::1]5353": the port, colon forgotten, was dropped (port 53)
                raise ConfigError(f"--dns-server: expected [HOST]:PORT, got {shorten(server)}")
        elif server.count(":") == 1:
            host, _, port = server.partition(":")
        if not host:
            raise ConfigError(f"--dns-server: expected HOST[:PORT], got {shorten(server)}")
        try:
            check_nameserver(host)
        except ConfigError:
            raise ConfigError(
                f"--dns-server: expected an IP address, got {shorten(server)}"
            ) from None
        hosts.append(host)
        if port is not None:
            ports.add(_port("--dns-server", port))
        else:
            portless += 1
    # A server given without a port means port 53 (or dns.port), which the others' port
    # would silently replace: "127.0.0.1" beside "[::1]:5353" was asked on 5353.
    if len(ports) > 1 or (ports and portless):
        raise ConfigError("--dns-server: all servers must use the same port (give it to each)")
    result: dict[str, Any] = {"dns.nameservers": hosts}
    if ports:
        result["dns.port"] = ports.pop()
    return result
