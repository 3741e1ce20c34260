"""Relative file paths in a configuration file, read against the file's directory.

A path in a configuration file once meant a file in the working directory of whichever
command read it: a worker started in ``/`` and a ``sendmail`` run from an application's
directory then opened two different queue files, and mail was queued (exit 0) where no
worker would ever look. The file's directory is the same for every command that reads it,
so ``store = "queue.db"`` in ``/etc/mailstrom/config.toml`` is
``/etc/mailstrom/queue.db`` for all of them. Paths given in the environment or as options
stay relative to the working directory, as a shell user expects.

>>> flat = {"store": "sqlite:///queue.db", "tls_ca": "/etc/ssl/ca.pem"}
>>> anchor_paths(flat, Path("/etc/mailstrom/config.toml"))
>>> flat
{'store': 'sqlite:////etc/mailstrom/queue.db', 'tls_ca': '/etc/ssl/ca.pem'}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mailstrom.errors import ConfigError, InvalidStoreURL
from mailstrom.message.chars import shorten
from mailstrom.stores.url import StoreKind, parse_store_url

PATH_KEYS = ("tls_ca", "mta_sts.ca_file", "sendmail.aliases")
"""Settings holding one file's path (besides ``store`` and each DKIM key's
``private_key``)."""


def anchor_paths(flat: dict[str, Any], config_file: Path) -> None:
    """Make every relative path in ``flat`` (a file's settings by dotted key) absolute,
    against the directory of ``config_file``. Values that are no path (the wrong type,
    empty for "none", holding a NUL) are left for their parsers to refuse."""
    directory = os.path.dirname(os.path.abspath(config_file))
    for key in PATH_KEYS:
        if key in flat:
            flat[key] = _anchored(flat[key], directory)
    keys = flat.get("dkim.keys")
    if isinstance(keys, str):
        # The environment's form, which the file takes too: its paths are the file's. As
        # tables, which the parser takes as well: an anchored path written back into the
        # string would be split again at a ":" or "," in the file's directory.
        keys = flat["dkim.keys"] = _key_tables(keys)
    if isinstance(keys, list):
        for entry in keys:
            if isinstance(entry, dict) and _is_key_path(entry.get("private_key")):
                entry["private_key"] = _anchored(entry["private_key"], directory)
    if "store" in flat:
        flat["store"] = _anchored_store(flat["store"], directory, config_file)


def _anchored(value: Any, directory: str) -> Any:
    if not isinstance(value, str) or not value or "\0" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(directory, value))


DKIM_KEY_FIELDS = ("domain", "selector", "private_key", "algorithm")
"""The fields of a ``domain:selector:path[:algorithm]`` entry, as settings names them."""


def _key_tables(text: str) -> str | list[dict[str, str]]:
    """``domain:selector:path[:algorithm]`` entries separated by commas as the tables
    ``[[dkim.keys]]`` gives; the text as it was when one is no such entry, for the
    parser to refuse with its own words."""
    entries = [[part.strip() for part in entry.split(":")] for entry in text.split(",")]
    entries = [parts for parts in entries if parts != [""]]
    if not all(len(parts) in (3, 4) and all(parts) for parts in entries):
        return text
    return [dict(zip(DKIM_KEY_FIELDS, parts, strict=False)) for parts in entries]


def _is_key_path(value: Any) -> bool:
    """Whether a DKIM ``private_key`` string is a path to anchor: a key pasted in its
    place (PEM, base64) is refused, without being shown, by DKIMKey, and a directory
    written in front of it would hide it from that check."""
    from mailstrom.dkim.keys import key_text

    return isinstance(value, str) and key_text(value) is None


def _anchored_store(value: Any, directory: str, config_file: Path) -> Any:
    """A relative SQLite store, as the same URL (or bare path) with the file's directory.

    Refused when that file does not exist while the one in the working directory does:
    that is where earlier versions read it, and opening the other would make a new empty
    queue and strand the mail in the old one, unsent and unseen."""
    if not isinstance(value, str):
        return value
    try:
        url = parse_store_url(value)
    except InvalidStoreURL:
        return value  # refused, with its reason, where the store is opened
    if url.kind is not StoreKind.SQLITE or os.path.isabs(url.target):
        return value
    anchored = _anchored(url.target, directory)
    if not os.path.exists(anchored) and os.path.isfile(url.target):
        raise ConfigError(
            f"store: {shorten(value)} in {config_file} is read relative to that file's"
            f" directory ({shorten(anchored)}, which does not exist), no longer relative to"
            f" the working directory, where {shorten(os.path.abspath(url.target))} holds a"
            " queue: write the path of the queue you mean as an absolute path"
        )
    return f"sqlite:///{anchored}" if "://" in value else anchored
