"""DKIM signatures (RFC 6376) for prepared messages, and which keys sign which message.

:func:`sign` makes one ``DKIM-Signature`` field per key, over the message as it will be
sent: ``c=relaxed/relaxed``, no ``l=`` (a body length would let anyone append content),
``t=`` always and ``x=`` when :attr:`DKIMConfig.expire` is set. The signed header fields
are those of :data:`SIGNED_HEADERS` that the message has, each listed once per occurrence;
From and Subject are listed once more than they occur ("over-signed", RFC 6376 §8.15), so
that a second From or Subject added on the way breaks the signature instead of being shown
to the reader as the real one.

The caller (``prepare``) makes the body 7-bit first, so no server along the way has a
reason to re-encode it; the signature then holds whether or not the receiver offers
8BITMIME.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mailstrom.dkim.canon import relaxed_body, relaxed_header, split_fields
from mailstrom.dkim.keys import DKIMKey
from mailstrom.dkim.signature import DKIMSignature as DKIMSignature  # re-exported
from mailstrom.errors import ConfigError

SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)
"""Header fields signed when present, in the order of the ``h=`` tag."""
OVERSIGNED = frozenset({"from", "subject"})
"""Listed in ``h=`` once more than they occur (RFC 6376 §8.15)."""

_SIGNED = tuple((name, name.encode("ascii"), name in OVERSIGNED) for name in SIGNED_HEADERS)
_FOLD_AT = 78
_B64_LINE = 72


@dataclass(frozen=True, slots=True, kw_only=True)
class DKIMConfig:
    """DKIM signing at submission (``Config.dkim``).

    >>> DKIMConfig(keys=(
    ...     DKIMKey(domain="example.com", selector="s2026r", private_key="/etc/dkim/r.pem"),
    ...     DKIMKey(domain="example.com", selector="s2026e", private_key="/etc/dkim/e.pem",
    ...             algorithm="ed25519-sha256"),
    ... ), required=True)  # doctest: +SKIP

    A message is signed by every key of the most specific key domain that equals, or is
    a parent of, the domain of a From address (DMARC relaxed alignment, RFC 7489 §3.1.1):
    with keys for ``example.com`` and ``news.example.com``, mail from
    ``a@news.example.com`` is signed by the ``news.example.com`` keys only, mail from
    ``a@shop.example.com`` by the ``example.com`` keys. Keys of one domain are typically
    an RSA and an Ed25519 key (RFC 8463 §4 suggests signing with both). A message no key
    matches is sent unsigned, or refused with
    :class:`~mailstrom.errors.NoDKIMKey` when ``required`` is true.
    """

    keys: Sequence[DKIMKey] = ()
    required: bool = False
    """Refuse (``NoDKIMKey``) a message that no key can sign, instead of sending it
    unsigned."""
    expire: timedelta | None = None
    """Signatures carry ``x=`` this long after their ``t=``; receivers treat a signature
    past it as invalid (RFC 6376 §3.5). ``None``: no expiry."""
    _by_domain: dict[str, tuple[DKIMKey, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        keys = tuple(self.keys)
        object.__setattr__(self, "keys", keys)
        seen: set[tuple[str, str]] = set()
        for key in keys:
            if not isinstance(key, DKIMKey):
                raise ConfigError(f"dkim.keys must be DKIMKey values, not {type(key).__name__}")
            if (key.domain, key.selector) in seen:
                raise ConfigError(
                    f"dkim key {key.domain}/{key.selector} is configured twice; a selector "
                    "names one key"
                )
            seen.add((key.domain, key.selector))
            self._by_domain[key.domain] = (*self._by_domain.get(key.domain, ()), key)
        if self.expire is not None and self.expire <= timedelta(0):
            raise ConfigError(f"dkim.expire must be positive, got {self.expire}")
        if self.required and not keys:
            raise ConfigError("dkim.required is set but no dkim.keys are configured")

    def keys_for(self, domains: Iterable[str]) -> tuple[DKIMKey, ...]:
        """The keys that sign mail from ``domains`` (lower-case A-labels, the From
        addresses' domains), without repeats; empty when none aligns."""
        found: list[DKIMKey] = []
        for domain in domains:
            name = domain
            while True:
                keys = self._by_domain.get(name)
                if keys is not None:
                    found.extend(k for k in keys if k not in found)
                    break
                dot = name.find(".")
                if dot == -1:
                    break
                name = name[dot + 1 :]
        return tuple(found)


def sign(
    data: bytes,
    keys: Sequence[DKIMKey],
    *,
    now: datetime,
    expire: timedelta | None = None,
) -> tuple[bytes, tuple[DKIMSignature, ...]]:
    """``data`` (a prepared message: CRLF line ends, a header section) with one
    ``DKIM-Signature`` field per key put in front, and what was signed.

    The same bytes must reach the receiver: sign last, after every change to the message.
    """
    blank = data.find(b"\r\n\r\n")
    if blank == -1:
        head, body = data if data.endswith(b"\r\n") else data + b"\r\n", b""
    else:
        head, body = data[: blank + 2], data[blank + 4 :]
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")
    names, signed = _signed_headers(head)
    timestamp = int(now.timestamp())
    tags = [f"t={timestamp}"]
    if expire is not None:
        tags.append(f"x={timestamp + max(1, int(expire.total_seconds()))}")
    fields: list[bytes] = []
    for key in keys:
        start = [
            "v=1",
            f"a={key.algorithm.value}",
            "c=relaxed/relaxed",
            f"d={key.domain}",
            f"s={key.selector}",
            *tags,
        ]
        unsigned = _fold_tags(start, names, body_hash)
        # RFC 6376 §3.7: the signature covers the signed fields, then this field itself
        # with an empty b= and without its final CRLF.
        canonical = signed + relaxed_header(unsigned.encode("ascii"))[:-2]
        value = base64.b64encode(key.sign(canonical)).decode("ascii")
        fields.append((unsigned + _fold_b64(value) + "\r\n").encode("ascii"))
    signatures = tuple(
        DKIMSignature(domain=k.domain, selector=k.selector, algorithm=k.algorithm) for k in keys
    )
    return b"".join(fields) + data, signatures


def _signed_headers(head: bytes) -> tuple[list[str], bytes]:
    """(the ``h=`` names, the canonicalised fields they select, in that order)."""
    by_name: dict[bytes, list[bytes]] = {}
    for field_name, raw in split_fields(head):
        found = by_name.get(field_name)
        if found is None:
            by_name[field_name] = [raw]
        else:
            found.append(raw)
    names: list[str] = []
    signed: list[bytes] = []
    for name, key, oversigned in _SIGNED:
        present = by_name.get(key)
        if present is None:
            if oversigned:
                names.append(name)
            continue
        names.extend([name] * (len(present) + oversigned))
        # Several fields of one name are taken from the bottom up (RFC 6376 §5.4.2); the
        # over-signed listing beyond them selects nothing.
        signed.extend(relaxed_header(raw) for raw in reversed(present))
    return names, b"".join(signed)


def _fold_tags(tags: list[str], names: list[str], body_hash: str) -> str:
    """``DKIM-Signature: v=1; ...; bh=...;`` folded near 78 columns, ending with
    ``b=`` (the signature goes right after it)."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for tag in tags:
        item = f"{tag};"
        if len(line) + 1 + len(item) > _FOLD_AT:
            lines.append(line)
            line = ""
        line += " " + item
    # h= is folded between names when long: FWS may surround its colons (RFC 6376 §3.5).
    pieces = [f"{name}:" for name in names]
    pieces[-1] = pieces[-1][:-1] + ";"
    pieces[0] = "h=" + pieces[0]
    for index, piece in enumerate(pieces):
        if len(line) + (1 if index == 0 else 0) + len(piece) > _FOLD_AT:
            lines.append(line)
            line = " " + piece
        else:
            line += (" " if index == 0 else "") + piece
    lines.append(line)
    lines.append(f" bh={body_hash};")
    lines.append(" b=")
    return "\r\n".join(lines)


def _fold_b64(value: str) -> str:
    """The b= value in lines of at most 72 characters (FWS inside it is ignored, RFC 6376
    §3.5); the first piece follows ``b=`` directly so that removing the value leaves the
    field exactly as it was signed."""
    first = _B64_LINE - 3
    parts = [value[:first]]
    parts.extend(value[i : i + _B64_LINE] for i in range(first, len(value), _B64_LINE))
    return "\r\n ".join(parts)
