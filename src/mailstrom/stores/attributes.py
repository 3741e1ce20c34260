"""How stores write and read a message's queue attributes (tags, metadata).

SQLite keeps tags as a JSON array and metadata as a JSON object in TEXT columns; what is
read back was validated when it was written, but a row is still checked for shape, so a
hand-edited database cannot make ``status`` return something other than strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def tags_json(tags: Sequence[str]) -> str | None:
    """The column value of ``tags`` (NULL when there are none)."""
    return json.dumps(list(tags), ensure_ascii=False, separators=(",", ":")) if tags else None


def metadata_json(metadata: Mapping[str, str]) -> str | None:
    """The column value of ``metadata`` (NULL when empty)."""
    if not metadata:
        return None
    return json.dumps(dict(metadata), ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def tags_from(value: Any) -> tuple[str, ...]:
    """Tags from a column: a JSON text (SQLite), a list (PostgreSQL text[]) or NULL."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = _loads(value)
    if not isinstance(value, list):
        return ()
    return tuple(tag for tag in value if isinstance(tag, str))


def metadata_from(value: Any) -> dict[str, str]:
    """Metadata from a column: a JSON text (SQLite), a dict (PostgreSQL jsonb) or NULL."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = _loads(value)
    if not isinstance(value, dict):
        return {}
    # Keys sorted, as they were given (check_metadata) and as the JSON text keeps them:
    # jsonb hands them back shorter ones first.
    kept = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return dict(sorted(kept.items()))


def _loads(text: str) -> Any:
    """The JSON in ``text``; None for text that is not JSON (a damaged or hand-edited row
    reads as no tags or no metadata rather than making every status of it fail), nor for
    JSON nested deeper than Python's parser recurses (RecursionError, no ValueError: it
    failed every listing that held the row, and the event outbox at its event)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
