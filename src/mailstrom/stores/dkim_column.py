"""A message's DKIM outcome (:class:`~mailstrom.status.DKIMStatus`) as the stores keep it.

Every store records it at enqueue cut to the same bounds (:func:`bounded_dkim`). The SQL
stores write it as compact JSON text, ``{"signed": [[domain, selector, algorithm], ...]}``
or ``{"unsigned": reason}`` (migration 0004): PostgreSQL in the nullable column
``messages.dkim`` (``data`` is TOASTed out of line, so a later column costs nothing to
read), SQLite in the table ``message_dkim`` keyed by the message's rowid (made when a
column added to ``messages`` came after ``data`` and was read by walking the message's
overflow pages, ``benchmarks/status_read.py``; schema 20 moved the bytes to
``message_data``). No value means no DKIM outcome: DKIM was not configured,
or the message was queued before migration 0004.
"""

from __future__ import annotations

import json

from mailstrom.status import DKIMStatus
from mailstrom.stores.base import storable_text

MAX_DKIM_REASON = 512
"""Octets of an unsigned message's reason kept (it names From domains, which the message
chose)."""
MAX_DKIM_SIGNATURES = 16
"""Signatures kept per message. They come from the configuration (a domain typically has
an RSA and an Ed25519 key); a configuration that signs with more records the first 16."""


def bounded_dkim(status: DKIMStatus | None) -> DKIMStatus | None:
    """``status`` cut to what a store keeps: at most :data:`MAX_DKIM_SIGNATURES`
    signatures, a reason of at most :data:`MAX_DKIM_REASON` octets."""
    if status is None:
        return None
    if status.reason is not None:
        reason = storable_text(status.reason, MAX_DKIM_REASON)
        return status if reason is status.reason else DKIMStatus(reason=reason)
    if len(status.signatures) > MAX_DKIM_SIGNATURES:
        return DKIMStatus(signatures=status.signatures[:MAX_DKIM_SIGNATURES])
    return status


def dkim_to_column(status: DKIMStatus | None) -> str | None:
    """The column value of ``status`` (bounded first); None for no outcome."""
    status = bounded_dkim(status)
    if status is None:
        return None
    if status.reason is not None:
        value: object = {"unsigned": status.reason}
    else:
        value = {"signed": [[s.domain, s.selector, s.algorithm.value] for s in status.signatures]}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def dkim_from_column(text: str | None) -> DKIMStatus | None:
    """The outcome stored as ``text``. A value this version cannot read (damaged, or
    written by a newer mailstrom) reads as None, unknown: a status is still worth showing
    without it."""
    if text is None:
        return None
    try:
        value = json.loads(text)
        if "unsigned" in value:
            reason = value["unsigned"]
            if not isinstance(reason, str):
                return None
            return DKIMStatus(reason=reason)
        # Here, not at the top: a store is opened by workers that never sign or read these.
        from mailstrom.dkim.signature import DKIMAlgorithm, DKIMSignature

        signatures = tuple(
            DKIMSignature(domain=domain, selector=selector, algorithm=DKIMAlgorithm(algorithm))
            for domain, selector, algorithm in value["signed"]
        )
        if not all(isinstance(s.domain, str) and isinstance(s.selector, str) for s in signatures):
            return None
        return DKIMStatus(signatures=signatures)
    except (ValueError, TypeError, KeyError, RecursionError):  # (JSON nested too deep)
        return None
