"""Log lines for ``mailstrom worker``: one line per event, ``key=value`` (logfmt) or JSON.

Each delivery attempt arrives as one structured record (event ``attempt``, logged by the
worker on ``mailstrom.attempts``), so log collectors get fields rather than prose to parse.
A record's ``event`` is its ``event`` attribute when it has one, else its message; the
message id is the field ``message_id`` (never ``message``, which log systems keep for the
text of a record).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from mailstrom.stores.url import redact_url


@functools.lru_cache(maxsize=4)
def _second(epoch_second: int) -> str:
    return datetime.fromtimestamp(epoch_second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _timestamp(record: logging.LogRecord) -> str:
    # One delivery a line at thousands a second: format each second once.
    created = record.created
    second = int(created)
    return f"{_second(second)}{int((created - second) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _event(record: logging.LogRecord) -> str:
    event = getattr(record, "event", None)
    return event if isinstance(event, str) else record.getMessage()


_NEEDS_QUOTES = re.compile(r'[ "=\\]').search


def _logfmt_value(value: Any) -> str:
    # One line per delivery at full speed: C-level checks, not a loop over characters.
    if isinstance(value, str):
        if value and value.isprintable() and _NEEDS_QUOTES(value) is None:
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # digits, a sign, a dot, "e", "inf" or "nan": nothing to quote
    return _logfmt_value(json.dumps(value, ensure_ascii=False, default=str))


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=… event=attempt message_id=… rcpt=… reason="250 2.0.0 Ok"``."""

    def format(self, record: logging.LogRecord) -> str:
        pairs: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _event(record),
        }
        pairs.update((k, v) for k, v in _fields(record).items() if v is not None)
        line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in pairs.items())
        if record.exc_info:
            line += " exc=" + _logfmt_value(redact_url(self.formatException(record.exc_info)))
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line with the same keys as :class:`KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _event(record),
        }
        obj.update((k, v) for k, v in _fields(record).items() if v is not None)
        if record.exc_info:
            obj["exc"] = redact_url(self.formatException(record.exc_info))
        return json.dumps(obj, ensure_ascii=False, default=str)


def configure_logging(
    fmt: str, *, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send mailstrom's logs to ``stream`` (stderr) in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("mailstrom")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler
