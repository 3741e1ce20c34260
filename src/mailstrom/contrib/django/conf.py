"""Reading ``settings.MAILSTROM``: the keys of mailstrom's TOML file, as a Python dict.

Every key of :mod:`mailstrom.settings` is accepted, written flat with dots
(``"dns.port": 53``) or nested as the TOML tables are (``"dns": {"port": 53}``), and parsed
by the same code as the command line's file, so a value means the same in both places and a
typo is an error naming the key. One key is the Django integration's own:

``"worker"``
    where the backend delivers: ``"process"``, ``"thread"`` or ``None`` (queue only), as
    ``Mailstrom(worker=...)`` takes them; by default ``"auto"``, the facade's default (a
    child process for a SQLite or PostgreSQL store).

``MAILSTROM_*`` environment variables and configuration files are *not* read: the Django
settings are the one source, for the web processes and ``manage.py mailstrom_worker``
alike (a settings module can read the environment itself, e.g. for a password).

>>> load({"store": "memory:", "dns": {"port": 5353}, "worker": None}).settings.config.dns.port
5353
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

from django.core.exceptions import ImproperlyConfigured

from mailstrom.errors import ConfigError, InvalidStoreURL
from mailstrom.settings import ENV_PREFIX, Settings, load_settings
from mailstrom.stores.url import StoreKind, check_store_url

SETTING = "MAILSTROM"
"""The name of the Django setting."""

UNUSED_TIMEOUT = (
    "send_messages() only writes to mailstrom's store, which bounds its own waits (SQLite's "
    "write lock 30 s, PostgreSQL's connect_timeout and lock_timeout in the store URL); "
    "the deliveries' timeouts are MAILSTROM['timeouts']"
)
"""Why ``timeout`` (``EMAIL_TIMEOUT``) is not used: what it would bound, and where that is."""

UNUSED_CREDENTIALS = (
    "mailstrom delivers to each recipient's MX server itself, or through the relay "
    "MAILSTROM['relay'] names, with that relay's own username and password"
)
"""Why ``username`` and ``password`` (``auth_user``, ``EMAIL_HOST_USER``...) are not used."""


WorkerChoice = Literal["auto", "process", "thread"] | None
_WORKERS: tuple[WorkerChoice, ...] = ("auto", "process", "thread", None)


@dataclass(frozen=True, slots=True, kw_only=True)
class DjangoSettings:
    """What ``settings.MAILSTROM`` says: mailstrom's settings and where the worker runs."""

    settings: Settings
    worker: WorkerChoice = "auto"


def load(value: object) -> DjangoSettings:
    """Parse the value of ``settings.MAILSTROM`` (``None`` when it is not set).

    Raises :class:`~django.core.exceptions.ImproperlyConfigured` saying which key is
    wrong, chained to mailstrom's :class:`~mailstrom.errors.ConfigError`.
    """
    try:
        return _load(value)
    except (ConfigError, InvalidStoreURL) as exc:
        raise ImproperlyConfigured(f"{SETTING}: {exc}") from exc


def _load(value: object) -> DjangoSettings:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a dict, got {type(value).__name__}")
    flat = flatten(value)
    worker = flat.pop("worker", "auto")
    if worker not in _WORKERS:
        raise ConfigError(f"worker: expected 'process', 'thread' or None, got {worker!r}")
    # The process's environment still gives the default store its place (HOME,
    # XDG_STATE_HOME); MAILSTROM_* variables do not take part.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    settings = load_settings(env=env, overrides=flat, search=False)
    # A bad URL is a configuration error, found here rather than at the first send
    # (where fail_silently would swallow it): its parameters too, without connecting.
    store = check_store_url(settings.store_url)
    if worker == "process" and store.kind is StoreKind.MEMORY:
        raise ConfigError(
            "worker: 'process' needs a store another process can open (SQLite or "
            "PostgreSQL), not memory:"
        )
    return DjangoSettings(settings=settings, worker=cast(WorkerChoice, worker))


def flatten(value: Mapping[Any, Any]) -> dict[str, Any]:
    """``{"dns": {"port": 53}, "helo_name": "x"}`` → ``{"dns.port": 53, "helo_name": "x"}``.

    A key given twice (``"dns.port"`` and ``{"dns": {"port": ...}}``) and ``None`` as a
    value are refused: ``None`` is not a TOML value, and reading it as "the default" or
    as "off" would each surprise someone (leave the key out for the default; ``False``
    or ``"none"`` turn a limit such as ``retry.max_age`` off).
    """
    flat: dict[str, Any] = {}

    def put(key: str, item: Any) -> None:
        if key in flat:
            raise ConfigError(f"{key}: given twice")
        if item is None and key != "worker":
            raise ConfigError(
                f"{key}: None is not a value; leave the key out for the default "
                "(False, 0 or 'none' turn a limit off)"
            )
        flat[key] = _as_toml(key, item)

    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}")
        # Only a section's name ("dns") holds a table of keys. A dotted key names one
        # setting, whose value may itself be a table ("tls.domains": {...}) and is kept.
        if isinstance(item, Mapping) and "." not in key:
            for sub, subitem in item.items():
                if not isinstance(sub, str):
                    raise ConfigError(f"{key}: keys must be strings, got {sub!r}")
                put(f"{key}.{sub}", subitem)
        else:
            put(key, item)
    return flat


_TOML_INTEGERS = range(-(2**63), 2**63)
"""The integers a TOML file can hold (TOML 1.0: 64-bit signed)."""


def _as_toml(key: str, item: Any) -> Any:
    """Python values TOML has no word for, as the TOML file would write them: a tuple as
    a list, a timedelta as its seconds, a path (``BASE_DIR / "mail.db"``) as its string.
    An integer no TOML file holds is refused (in a list or table too): past 4,300 digits,
    even the error quoting it raised ValueError."""
    if isinstance(item, int) and not isinstance(item, bool) and item not in _TOML_INTEGERS:
        raise ConfigError(
            f"{key}: an integer past TOML's 64 bits ({item.bit_length()} bits), not a value"
        )
    if isinstance(item, tuple):
        return [_as_toml(key, entry) for entry in item]
    if isinstance(item, list):
        return [_as_toml(key, entry) for entry in item]
    if isinstance(item, Mapping):
        return {name: _as_toml(key, entry) for name, entry in item.items()}
    if isinstance(item, timedelta):
        return item.total_seconds()
    if isinstance(item, os.PathLike):
        # BASE_DIR / "mail.db": the file would hold the path as a string.
        return os.fspath(item)
    return item
