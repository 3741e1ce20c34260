"""One structured log record per delivery attempt, on the ``mailstrom.attempts`` logger.

The fields travel in ``extra={"fields": ...}`` so a formatter (the CLI's key=value or JSON,
or the application's own) gets data rather than prose to parse.
"""

from __future__ import annotations

import logging
from typing import Any

from mailstrom.status import RecipientState
from mailstrom.stores.base import RecipientResult

ATTEMPT_LOGGER = "mailstrom.attempts"
_log = logging.getLogger(ATTEMPT_LOGGER)


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
    level = logging.INFO if result.state is RecipientState.DELIVERED else logging.WARNING
    if _log.isEnabledFor(level):  # the fields cost more than the call on the hot path
        _log.log(level, "attempt", extra={"fields": attempt_fields(result)})
