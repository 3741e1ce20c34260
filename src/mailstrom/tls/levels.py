"""The TLS policy levels a configuration names, globally (``Config.tls``) or per domain
(``Config.tls_domains``). :class:`~mailstrom.config.TLSPolicy` is this enum."""

from __future__ import annotations

from enum import StrEnum


class TLSPolicy(StrEnum):
    """What to do about STARTTLS when delivering to MX hosts."""

    OPPORTUNISTIC = "opportunistic"
    """Use TLS when offered, without verifying the certificate; if the handshake fails,
    retry that host in plaintext on a new connection (as MTAs do)."""
    REQUIRED = "required"
    """Deliver only over TLS (certificate not verified); no TLS → temporary failure."""
    VERIFY = "verify"
    """Deliver only over TLS with a certificate valid for the MX host name."""
    NONE = "none"
    """Never use TLS (a peer whose TLS is known to be broken; Postfix's ``none``)."""
    DANE = "dane"
    """DANE (RFC 7672) where the MX host has DNSSEC-validated TLSA records, else
    opportunistic; needs ``dns.dnssec`` (Postfix's ``dane``)."""
    DANE_ONLY = "dane-only"
    """DANE or nothing: a host without usable TLSA records is not delivered to
    (Postfix's ``dane-only``); needs ``dns.dnssec``."""
