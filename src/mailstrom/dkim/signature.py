"""What a DKIM signature is, apart from making one: its algorithm and what it names.

Kept free of everything but the standard library, so that the status and message types
that mention signatures can name them at run time (``typing.get_type_hints`` on a
:class:`~mailstrom.status.MessageStatus` works, as serialisers need it to) without
loading the signing code, the key handling or ``cryptography``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DKIMAlgorithm(StrEnum):
    """A signing algorithm (the ``a=`` tag)."""

    RSA_SHA256 = "rsa-sha256"
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 6376 §3.3.1): verified everywhere."""
    ED25519_SHA256 = "ed25519-sha256"
    """Ed25519 over the SHA-256 of the signed data (RFC 8463): short keys and signatures,
    fast, but not verified by every receiver yet, so sign with RSA as well."""

    @property
    def key_type(self) -> str:
        """The ``k=`` tag of the DNS record."""
        return "rsa" if self is DKIMAlgorithm.RSA_SHA256 else "ed25519"

    @classmethod
    def named(cls, value: object) -> DKIMAlgorithm:
        """The algorithm ``value`` names: its ``a=`` value, or the key type alone
        (``"rsa"``, ``"ed25519"``), in any case; :class:`ValueError` otherwise."""
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower()
        return cls(_SHORT_NAMES.get(text, text))


_SHORT_NAMES = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


@dataclass(frozen=True, slots=True, kw_only=True)
class DKIMSignature:
    """What one signature on a prepared message says: the signing domain (``d=``),
    selector (``s=``) and algorithm (``a=``)."""

    domain: str
    selector: str
    algorithm: DKIMAlgorithm

    def __str__(self) -> str:
        return f"{self.domain} ({self.selector}, {self.algorithm.value})"
