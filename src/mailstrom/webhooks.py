"""Delivery events as JSON, and the signature on hook requests.

A hook request is a POST whose body is ``{"events": [...]}`` (UTF-8 JSON), one object per
recorded result, oldest first::

    {"id": 41, "type": "deferred", "at": "2030-01-02T03:04:05.678901+00:00",
     "message_id": "0190f3a2…", "recipient": "bob@example.org", "attempt": 2,
     "reply": {"code": 452, "enhanced": "4.2.2", "text": "Mailbox full"}, "error": null,
     "reason_class": "mailbox", "mx_host": "mx.example.org", "ip": "192.0.2.1",
     "tls": true, "uncertain": false, "next_attempt_at": "2030-01-02T03:14:05+00:00",
     "tags": ["receipt"], "metadata": {"order": "42"}}

``id`` is unique and increasing per store: a request that timed out may arrive again, so
receivers de-duplicate on it (and on the URL it came to, where several stores post to
one endpoint: each store numbers its own). The ``Mailstrom-Signature`` header reads
``t=<unix seconds>,v1=<hex>``: the hex is HMAC-SHA256 under the shared secret over the
timestamp, a full stop, and the exact body bytes (the scheme Stripe and Svix use), so a
receiver can reject forged requests and, by the timestamp, replayed ones::

    from mailstrom.webhooks import verify_signature

    if not verify_signature(secret, request.headers.get("Mailstrom-Signature"), request.body):
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable
from typing import Any

from mailstrom.status import DeliveryEvent

SIGNATURE_HEADER = "Mailstrom-Signature"
TOLERANCE = 300
"""Seconds a signature's timestamp may differ from the receiver's clock (replay window)."""
_MAX_TIMESTAMP_DIGITS = 12
"""Digits of a ``t=`` value read at most (Unix seconds have 10 until the year 2286): a
longer one would only make ``int()`` (past 4,300 digits) or the clock comparison (past a
float's range) raise instead of answering False."""
MAX_HEADER = 4096
"""Characters of a ``Mailstrom-Signature`` value read at most: :func:`sign` writes about 80,
a receiver accepting several ``v1=`` values some hundreds. A longer one (whoever sent the
request chose it) is no signature, so that the work it costs (a split, a comparison per
``v1=`` value) stays bounded."""
_SURROGATE = re.compile("[\ud800-\udfff]")
_OWS = " \t"
"""HTTP's optional white space (RFC 9110 §5.6.3); ``str.strip()`` would also take a
no-break space, U+3000 and the like."""


def event_json(event: DeliveryEvent) -> dict[str, Any]:
    """One event as the JSON object hooks receive and ``mailstrom events --json`` prints."""
    reply = event.reply
    return {
        "id": event.id,
        "type": event.state.value,
        "at": event.at.isoformat(),
        "message_id": event.message_id,
        "recipient": event.address,
        "attempt": event.attempt,
        "reply": None
        if reply is None
        else {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text},
        "error": event.error,
        "reason_class": event.reason_class,
        "mx_host": event.mx_host,
        "ip": event.ip,
        "tls": event.tls,
        "uncertain": event.uncertain,
        "next_attempt_at": event.next_attempt_at.isoformat() if event.next_attempt_at else None,
        "tags": list(event.tags),
        "metadata": dict(event.metadata),
    }


def encode_events(events: Iterable[DeliveryEvent]) -> bytes:
    """The body of one hook request."""
    payload = {"events": [event_json(e) for e in events]}
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate (SQLite's reading of an octet that is not UTF-8, in a row another
    # tool wrote) cannot be encoded: the batch holding it would never be sent, nor any
    # event after it. It becomes U+FFFD, as an undecodable octet does when decoded.
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    return text.encode()


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The ``Mailstrom-Signature`` header value for ``body``.

    >>> sign("whsec", b"{}", timestamp=1700000000)[:13]
    't=1700000000,'
    """
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str,
    header: str | bytes | None,
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> bool:
    """Whether ``header`` (the ``Mailstrom-Signature`` value) signs ``body`` under
    ``secret`` with a timestamp within ``tolerance`` seconds of ``now`` (default: the
    clock). Several ``v1=`` values are accepted (one may match), as other senders of
    this scheme sign with an old and a new secret at once; a worker signs with its one
    ``hook.secret``, so rotate it on the receiving side: accept either secret
    (``verify_signature(new, ...) or verify_signature(old, ...)``) while every worker
    is given the new one, then drop the old. ``None`` (a request without the header, as
    ``request.headers.get()`` gives it) signs nothing: False. A ``bytes`` header, as raw
    ASGI and WSGI headers are, is read as ASCII (one that is not ASCII is False), and so is
    one longer than :data:`MAX_HEADER` characters; ``body`` is the request's exact bytes.
    Whatever the header holds, the answer is True or False. Raises ValueError for an
    empty ``secret`` (``HookConfig`` refuses one): anybody can sign with the empty key.

    >>> body = b'{"events":[]}'
    >>> verify_signature("whsec", sign("whsec", body), body)
    True
    >>> verify_signature("other", sign("whsec", body), body)
    False
    """
    if not secret:
        # No worker signs with it, so it would verify only forgeries: a receiver that
        # read its secret from an unset variable ("") accepted every one.
        raise ValueError("verify_signature needs the hook's secret, not an empty one")
    if header is None:
        # A request without the header: a receiver's headers.get() gives None for it, and
        # header.split() raised AttributeError instead of answering False.
        return False
    if len(header) > MAX_HEADER:
        return False
    if not isinstance(header, str):
        if not header.isascii():
            return False
        # A raw header (ASGI's, or bytes a WSGI server left undecoded): header.split(",")
        # raised TypeError, a str separator for bytes.
        header = header.decode("ascii")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip(_OWS).partition("=")
        if key == "t" and _is_timestamp(value):
            timestamp = int(value)
        elif key == "v1" and value.isascii():
            # compare_digest() raises TypeError for str with other characters; a hex
            # digest has none, so such a value signs nothing.
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = _digest(secret, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in signatures)


def _is_timestamp(value: str) -> bool:
    """Whether a ``t=`` value is what :func:`sign` writes: ASCII digits, a few. The header
    comes from whoever sent the request; ``str.isdigit()`` alone also takes "\u0663"
    (``int()`` reads it as 3) and "²" (``int()`` raises ValueError)."""
    return 0 < len(value) <= _MAX_TIMESTAMP_DIGITS and value.isascii() and value.isdigit()
