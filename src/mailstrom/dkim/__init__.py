"""DKIM signing (RFC 6376, RFC 8463, RFC 8301) of messages at submission.

Configure it with :class:`DKIMConfig` (``Config.dkim``, or ``[[dkim.keys]]`` in the
command line's TOML file); ``prepare()`` then signs each message with the keys aligned
with its From domain. Keys are made and published with ``mailstrom dkim keygen``.
"""

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports

if TYPE_CHECKING:
    from mailstrom.dkim.config import DKIMConfig
    from mailstrom.dkim.keys import DKIMKey, DNSRecord, generate_private_key
    from mailstrom.dkim.signature import DKIMAlgorithm, DKIMSignature
    from mailstrom.dkim.signing import SIGNED_HEADERS, sign


__all__ = [
    "SIGNED_HEADERS",
    "DKIMAlgorithm",
    "DKIMConfig",
    "DKIMKey",
    "DKIMSignature",
    "DNSRecord",
    "generate_private_key",
    "sign",
]

# Loaded on first use (PEP 562): importing the package costs only what is touched.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.dkim.keys": (
            "DKIMKey",
            "DNSRecord",
            "generate_private_key",
        ),
        "mailstrom.dkim.config": ("DKIMConfig",),
        "mailstrom.dkim.signing": ("SIGNED_HEADERS", "sign"),
        "mailstrom.dkim.signature": ("DKIMAlgorithm", "DKIMSignature"),
    },
)
