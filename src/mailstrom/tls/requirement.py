"""What one connection to one MX host requires of TLS: the value the decision hands on.

A :class:`TLSRequirement` is decided per destination domain and MX host (see
:mod:`mailstrom.tls.decide`) before a connection is opened; the opener keys idle
connections by its mode, and the attempt history records its :attr:`~TLSRequirement.label`
so that status and logs say which policy applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TLSMode(StrEnum):
    """How a connection uses STARTTLS (the values are what logs and status show)."""

    NONE = "none"
    """Plaintext, even when STARTTLS is offered."""
    OPPORTUNISTIC = "opportunistic"
    """TLS when offered, certificate not checked; a failed handshake falls back to
    plaintext on a new connection (RFC 7435)."""
    REQUIRED = "required"
    """TLS or nothing; certificate not checked."""
    VERIFY = "verify"
    """TLS with a certificate valid for the MX host name (PKIX, the trust store)."""
    DANE = "dane"
    """TLS with a certificate matching the host's TLSA records (RFC 7672)."""

    @property
    def authenticated(self) -> bool:
        """Whether the peer is authenticated (what REQUIRETLS, RFC 8689, needs)."""
        return self in (TLSMode.VERIFY, TLSMode.DANE)


class PolicySource(StrEnum):
    """Where a requirement came from."""

    DEFAULT = "default"
    """The global ``Config.tls`` policy."""
    TABLE = "table"
    """An entry of the per-domain table ``Config.tls_domains``."""
    DANE = "dane"
    """The MX host's DNSSEC-validated TLSA records."""
    MTA_STS = "mta-sts"
    """The domain's MTA-STS policy (RFC 8461)."""
    REMEMBERED = "remembered"
    """The host's TLS handshake failed recently: plaintext at once (opportunistic only).
    ``detail`` is the source of the opportunistic requirement it replaces."""
    TLS_REQUIRED_NO = "tls-required-no"
    """The message carries ``TLS-Required: No`` (RFC 8689 §4): policies are ignored."""
    RELAY = "relay"
    """The smarthost's settings (``Config.relay``)."""


DIGEST_SIZES = {1: 32, 2: 64}
"""Data octets of TLSA matching types 1 (SHA-256) and 2 (SHA-512): RFC 6698 §2.1.3."""


def der_element(data: bytes, offset: int) -> tuple[int, int]:
    """Where the content of the DER element at ``offset`` (of a one-octet tag, as those of
    certificates are) starts, and where the element ends; ValueError when it does not
    fit in ``data``."""
    start = offset + 2
    if start > len(data):
        raise ValueError("DER element cut short")
    length = data[offset + 1]
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(data):
            raise ValueError("DER length unreadable")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise ValueError("DER element cut short")
    return start, end


def _one_der_sequence(data: bytes) -> bool:
    """Whether ``data`` is one DER SEQUENCE and nothing else: the outside of a certificate
    or a SubjectPublicKeyInfo. Not the empty data, a copy cut short or run on, nor the
    base64 of a PEM file pasted in place of its DER."""
    if data[:1] != b"\x30":
        return False
    try:
        return der_element(data, 0)[1] == len(data)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSARecord:
    """One TLSA record (RFC 6698 §2.1): usage, selector, matching type and data.

    ``selector`` 0 is the full certificate, 1 its SubjectPublicKeyInfo; ``matching`` 0 is
    the data itself, 1 its SHA-256, 2 its SHA-512.
    """

    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def fits_matching_type(self) -> bool:
        """The data is what its matching type holds (RFC 6698 §2.1.3): a digest of its
        size, 32 octets for SHA-256 and 64 for SHA-512; for the full data (0) of a
        certificate (selector 0) or a SubjectPublicKeyInfo (1), one DER SEQUENCE that
        fills it, as both are (RFC 6698 §2.1.2). A record that does not fit is malformed:
        unusable (RFC 7672 §2.2), as OpenSSL's and so Postfix's DANE hold it."""
        size = DIGEST_SIZES.get(self.matching)
        if size is not None:
            return len(self.data) == size
        if self.matching == 0 and self.selector in (0, 1):
            return _one_der_sequence(self.data)
        return True  # unknown parameters: unusable already, whatever the data

    @property
    def usable(self) -> bool:
        """Usable for SMTP (RFC 7672 §3.1.3: PKIX usages 0 and 1 are not)."""
        return self.usage in (2, 3) and self.selector in (0, 1) and self.matching in (0, 1, 2)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSRequirement:
    """What a connection to ``mx_host`` for ``domain`` requires, and why.

    ``mode`` says how STARTTLS is used; ``source`` which policy decided and ``reason`` in
    words (for status and logs). ``tlsa`` holds the usable TLSA records when ``mode`` is
    DANE; ``detail`` a short qualifier of the source ("enforce", "testing", the table
    pattern that matched...).

    >>> TLSRequirement(mode=TLSMode.VERIFY, source=PolicySource.TABLE,
    ...                reason="tls.domains: example.com = verify").label
    'verify'
    """

    mode: TLSMode
    source: PolicySource
    reason: str = ""
    tlsa: tuple[TLSARecord, ...] = ()
    detail: str = ""
    mx_listed: bool = False
    """The domain's MTA-STS policy (fetched over authenticated HTTPS) lists the MX host: the
    host is the domain's own, not only what a DNS answer said (RFC 8689 §4.2.1)."""
    fallback: TLSMode | None = None
    """The mode to connect in again, on a new connection, when a connection in ``mode``
    fails TLS (MTA-STS testing: try what enforce would ask, then deliver as before)."""
    tls_failed: bool = False
    """``mode`` is plaintext because TLS with the host failed, just now (the fallback of a
    connection that failed it) or recently (remembered), whatever policy ``source`` is: a
    server taking mail over TLS only refuses such a session, not the mail."""
    dane_names: tuple[str, ...] = ()
    """With ``mode`` DANE, the names a DANE-TA(2) certificate may be issued for (RFC 7672
    §3.2.2), the TLSA base domain first (it is the SNI name); empty means the MX host name
    alone. These depend on the MX host only, not on the recipient domain."""
    dane_next_hops: tuple[str, ...] = ()
    """With ``mode`` DANE, the next-hop domain and its CNAME expansion (when it is an
    alias), which a DANE-TA(2) certificate may name too (RFC 7672 §3.2.2). Tried after
    ``dane_names``: a connection accepted through them alone serves that domain only (see
    :meth:`mailstrom.runtime.opener.Opener.key`)."""

    @property
    def authenticated(self) -> bool:
        """Whether the peer is authenticated (VERIFY or DANE)."""
        return self.mode.authenticated

    @property
    def label(self) -> str:
        """The policy applied, as status and logs show it: ``none``, ``opportunistic``,
        ``required``, ``verify``, ``dane``, ``mta-sts enforce`` / ``mta-sts testing``."""
        if self.source is PolicySource.MTA_STS:
            return f"mta-sts {self.detail}" if self.detail else "mta-sts"
        return self.mode.value
