"""One structured log record per delivery attempt, on the ``mailstrom.attempts`` logger.

Each record reads as a sentence for whoever prints ``record.getMessage()`` (an application's
own logging setup)::

    deferred bob@example.org via mx.example.org [192.0.2.1]: 451 4.7.1 Greylisted

and also carries ``event = "attempt"`` and the data in ``extra={"fields": ...}``, so a
structured formatter (the CLI's key=value or JSON, or the application's own) gets fields
rather than prose to parse. The message id field is ``message_id``: ``message`` is the text
of the record in most log systems. A failed attempt adds ``reason_class`` (why it failed,
:class:`~mailstrom.status.ReasonClass`) and, when the reply is a provider's well-known one,
``help``: the provider's page about it.
"""

from __future__ import annotations

import logging
from typing import Any

from mailstrom.policy.reasons import advice
from mailstrom.status import RecipientState
from mailstrom.stores.base import RecipientResult

ATTEMPT_LOGGER = "mailstrom.attempts"
ATTEMPT_EVENT = "attempt"
"""The ``event`` attribute of every attempt record."""
_log = logging.getLogger(ATTEMPT_LOGGER)


class AttemptText:
    """The message of an attempt record, built only when a handler formats the record
    (``LogRecord.getMessage`` calls ``str`` on it)."""

    __slots__ = ("result",)

    def __init__(self, result: RecipientResult) -> None:
        self.result = result

    def __str__(self) -> str:
        r = self.result
        a = r.attempt
        text = f"{r.state.value} {r.address}"
        if a.mx_host:
            text += f" via {a.mx_host}"
        if a.ip:
            text += f" [{a.ip}]"
        reason = " ".join(a.reason.split()) if a.reason else ""
        if a.uncertain:
            reason = f"{reason} (uncertain)" if reason else "uncertain"
        return f"{text}: {reason}" if reason else text

    def __repr__(self) -> str:
        return f"AttemptText({self})"


def attempt_fields(result: RecipientResult) -> dict[str, Any]:
    """The fields of one attempt's log line.

    As Postfix's ``from=``, ``size=`` and ``delay=``: ``from`` is the envelope sender,
    ``size`` the message's octets and ``delay`` the seconds from queueing to the end of
    this attempt (so it grows with every retry; never below 0). Left out when the result
    does not know them (results built by hand rather than by the worker).
    """
    a = result.attempt
    reason = a.reason_class
    queued_at = result.queued_at
    reply = a.reply
    # One dict per delivery: enum values as ``_value_`` (a plain attribute, where
    # ``.value`` goes through a descriptor).
    return {
        "message_id": result.message_id,
        "from": result.envelope_from,
        "rcpt": result.address,
        "size": result.size,
        # Never below 0, as the queue delay metric: a clock behind the one that queued
        # the message (another host's, or this one's stepped back) is no negative wait.
        "delay": round(max(0.0, (a.at - queued_at).total_seconds()), 3) if queued_at else None,
        "state": result.state._value_,
        "outcome": a.outcome._value_,
        "host": a.mx_host,
        "ip": a.ip,
        "port": a.port,
        "tls": a.tls_version,
        "cipher": a.tls_cipher,
        "tls_policy": a.tls_policy,
        "code": reply.code if reply else None,
        "reason": a.reason or None,
        "reason_class": reason._value_ if reason is not None else None,
        # Looked up again rather than carried: only failures logged at WARNING pay for it.
        "help": advice(reason, reply).help if reason is not None else None,
        "uncertain": a.uncertain or None,
        "duration": round(a.duration, 3),
        "next_attempt": result.next_attempt_at.isoformat() if result.next_attempt_at else None,
    }


def log_attempt(result: RecipientResult) -> None:
    """Log one attempt (INFO when delivered, WARNING otherwise)."""
    level = logging.INFO if result.state is RecipientState.DELIVERED else logging.WARNING
    if _log.isEnabledFor(level):  # the fields cost more than the call on the hot path
        # The record as Logger.log makes it with extra={"event": …, "fields": …}, less the
        # walk up the stack to find the caller (one line per delivery: the caller is always
        # this function) and the check that extra's keys are free (they are).
        record = _log.makeRecord(
            ATTEMPT_LOGGER, level, __file__, _LINE, AttemptText(result), (), None, "log_attempt"
        )
        record.event = ATTEMPT_EVENT
        record.fields = attempt_fields(result)
        _log.handle(record)


_LINE = log_attempt.__code__.co_firstlineno
