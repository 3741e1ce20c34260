"""Log lines for ``mailstrom worker``: one line per event, ``key=value`` (logfmt) or JSON.

Each delivery attempt is logged as one structured record (event ``attempt``) built from the
worker's result callback, so log collectors get fields rather than prose to parse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from mailstrom.stores.base import RecipientResult

ATTEMPT_LOGGER = "mailstrom.attempts"


def attempt_fields(result: RecipientResult) -> dict[str, Any]:
    """The fields of one attempt's log line."""
    a = result.attempt
    return {
        "message": result.message_id,
        "rcpt": result.address,
        "state": result.state.value,
        "outcome": a.outcome.value,
        "host": a.mx_host,
        "ip": a.ip,
        "port": a.port,
        "tls": a.tls_version,
        "cipher": a.tls_cipher,
        "code": a.reply.code if a.reply else None,
        "reason": a.reason or None,
        "uncertain": a.uncertain or None,
        "duration": round(a.duration, 3),
        "next_attempt": result.next_attempt_at.isoformat() if result.next_attempt_at else None,
    }


def log_attempt(result: RecipientResult) -> None:
    """Log one attempt (INFO when delivered, WARNING otherwise)."""
    level = logging.INFO if result.state.value == "delivered" else logging.WARNING
    logging.getLogger(ATTEMPT_LOGGER).log(
        level, "attempt", extra={"fields": attempt_fields(result)}
    )


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=… event=attempt message=… rcpt=… reason="250 2.0.0 Ok"``."""

    def format(self, record: logging.LogRecord) -> str:
        pairs: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        pairs.update((k, v) for k, v in _fields(record).items() if v is not None)
        line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in pairs.items())
        if record.exc_info:
            line += " exc=" + _logfmt_value(self.formatException(record.exc_info))
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line with the same keys as :class:`KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        obj.update((k, v) for k, v in _fields(record).items() if v is not None)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class _NotWorkerAttempts(logging.Filter):
    """The worker logs each attempt as prose too; the structured record replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "mailstrom.worker"
            and isinstance(record.msg, str)
            and record.msg.startswith("attempt ")
        )


def configure_logging(
    fmt: str, *, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send mailstrom's logs to ``stream`` (stderr) in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(_NotWorkerAttempts())
    root = logging.getLogger("mailstrom")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler
