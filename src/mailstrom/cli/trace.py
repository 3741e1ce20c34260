"""The Received field ``sendmail`` puts at the top of each message it takes in.

RFC 5321 §4.4: a server that receives a message "MUST insert trace ("time stamp" or
"Received") information at the beginning of the message content". Without it a
recipient, or the operator reading a bounce, cannot tell where or when the mail
entered. Postfix writes ``Received: by HOST (Postfix, from userid UID)`` for mail
picked up from its sendmail and ``Received: from HELO ... with ESMTP`` for
``sendmail -bs``; these are mailstrom's.

The client's HELO or EHLO name is hostile text: it is written as given only when it is
a short run of the octets a domain or an address literal is made of, else as a comment
(``unknown (HELO ...)``) holding no character that could end the comment, break the
line or start an encoded word. Each clause is a line of its own, so that the field stays
far under 998 octets a line (RFC 5322 §2.1.1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mailstrom.message.identification import format_date

MAX_HELO_SHOWN = 255
"""Characters of the client's HELO name written at most (a domain name's longest)."""
_DOMAIN_LIKE = re.compile(rf"[A-Za-z0-9.\-_:\[\]]{{1,{MAX_HELO_SHOWN}}}")
"""A domain, or an address literal (RFC 5321 §4.1.3), as HELO names are written; the
underscore of names real hosts use too. Nothing here can end or fold the field."""
_UNSAFE_IN_COMMENT = re.compile(r"[^A-Za-z0-9.\-_:\[\]@+,/#!$%&'*^{}|~ ]")
"""What a comment may not hold as given: ``(``, ``)`` and ``\\`` would end it, a control
character or a line end would break the field, ``=`` could start an encoded word
(``=?``) that readers would decode, and non-ASCII would need SMTPUTF8."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SMTPArrival:
    """How a message came in by ``sendmail -bs``: the client's HELO or EHLO name as it
    gave it and the ``with`` protocol (RFC 5321 §4.4, RFC 6531 §3.7.3)."""

    helo: str
    protocol: str


def protocol(*, extended: bool, utf8: bool) -> str:
    """The ``with`` value of a message taken by SMTP: UTF8SMTP for a transaction that
    said SMTPUTF8 (RFC 6531 §3.7.3), ESMTP after EHLO, SMTP after HELO."""
    return "UTF8SMTP" if utf8 else "ESMTP" if extended else "SMTP"


def helo_shown(helo: str) -> str:
    """The client's HELO name as the Received field's ``from`` clause writes it."""
    if _DOMAIN_LIKE.fullmatch(helo):
        return helo
    text = _UNSAFE_IN_COMMENT.sub("?", helo[:MAX_HELO_SHOWN])
    return f"unknown (HELO {text})"


def received_field(
    *,
    by: str,
    now: datetime,
    newline: bytes,
    arrival: SMTPArrival | None = None,
    uid: int | None = None,
    recipients: Sequence[str] = (),
) -> bytes:
    """The Received field (with its line end ``newline``) for a message taken in at
    ``now`` by the host ``by``: from an SMTP client (``arrival``), else from the local
    user ``uid``. ``for`` names the recipient only when there is one, so that no Bcc
    recipient is shown to the others."""
    if arrival is not None:
        lines = [f"Received: from {helo_shown(arrival.helo)}"]
        lines.append(f"\tby {by} (mailstrom) with {arrival.protocol}")
    else:
        lines = [f"Received: by {by} (mailstrom, from userid {uid})"]
    if len(recipients) == 1 and _shown_recipient(recipients[0]):
        lines.append(f"\tfor <{recipients[0]}>")
    lines[-1] += ";"
    lines.append(f"\t{format_date(now)}")
    text = newline.decode("ascii").join(lines) + newline.decode("ascii")
    return text.encode("utf-8")


def _shown_recipient(address: str) -> bool:
    # Checked at RCPT already; one that could break the field is left out, and so is
    # a UTF-8 one, which would make the header need SMTPUTF8 when only an alias did.
    return len(address) <= 2 * MAX_HELO_SHOWN and address.isascii() and address.isprintable()
