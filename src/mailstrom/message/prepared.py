"""The validated, encoded form of a message: what the store keeps and the worker streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailstrom.dkim.signature import DKIMSignature
from mailstrom.message.attributes import NO_ATTRIBUTES, QueueAttributes
from mailstrom.message.dsn import DSN

if TYPE_CHECKING:
    from mailstrom.status import DKIMStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedMessage:
    """A message ready for transmission, serialised once at submission.

    ``data`` is the exact bytes to send after DATA: CRLF line endings, Bcc removed, Date and
    Message-ID present, *not* dot-stuffed (the SMTP session does that). ``envelope_from`` is
    an addr-spec (``""`` for the null reverse-path); ``recipients`` are addr-specs,
    de-duplicated with the domain compared case-insensitively, in first-seen order.
    """

    data: bytes
    envelope_from: str
    recipients: tuple[str, ...]
    smtputf8: bool = False
    """True when an envelope address or a header needs SMTPUTF8 (RFC 6531)."""
    eightbit: bool = False
    """True when the content holds 8-bit octets and so needs BODY=8BITMIME (RFC 6152)."""
    header_message_id: str | None = None
    subject: str | None = None
    dkim: tuple[DKIMSignature, ...] = ()
    """The DKIM signatures ``data`` carries, one per key that signed it; empty when it was
    not signed (no DKIM configured, or no key aligned with the From domain)."""
    dkim_unsigned: str | None = None
    """Why ``data`` is not signed although DKIM is configured (no key aligns with the From
    domain); None when it is signed or DKIM is not configured."""
    require_tls: bool = False
    """REQUIRETLS (RFC 8689): deliver only over TLS to a server authenticated by DANE,
    MTA-STS or certificate verification that offers REQUIRETLS, at an MX host DANE, MTA-STS
    or DNSSEC-validated MX records vouch for; otherwise fail (5.7.30)."""
    attributes: QueueAttributes = NO_ATTRIBUTES
    """Tags, metadata, priority lane, schedule, expiry and idempotency key: what the queue
    keeps beside the bytes (see :mod:`mailstrom.message.attributes`)."""
    dsn: DSN | None = None
    """The delivery status notifications asked for (RFC 3461), sent to servers offering
    DSN; None: no DSN parameters."""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def dkim_status(self) -> DKIMStatus | None:
        """The DKIM outcome the store records for this message: signed (``dkim``),
        unsigned with the reason (``dkim_unsigned``), or None without DKIM."""
        from mailstrom.status import DKIMStatus

        if self.dkim:
            return DKIMStatus(signatures=self.dkim)
        if self.dkim_unsigned is not None:
            return DKIMStatus(reason=self.dkim_unsigned)
        return None
