"""Bounce messages: the delivery status notification (RFC 3464) mailstrom sends to a
message's envelope sender when it gives up on recipients itself.

Which messages get one (:func:`wants_notice`): never one with the null sender (a bounce
is never bounced: RFC 5321 §4.5.5); one that carries a DSN request (RFC 3461) when its
NOTIFY includes FAILURE or is left to the server; any other only when
``Config.bounce_notices`` is on. ``mailstrom sendmail`` gives every message a DSN request,
so mail submitted as by sendmail is bounced as an MTA would; the library's default is
off (the application reads ``query_status`` instead).

The notice is rendered here as bytes, ASCII only: a ``multipart/report`` with a readable
part, the ``message/delivery-status`` part and the returned message's headers (or the
whole message for ``RET=FULL``, when it is at most :data:`MAX_RETURNED` octets). Everything
that came from a peer (reply texts) is cut to one line of printable ASCII.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from mailstrom.message.dsn import DSN, Notify, Return, xtext
from mailstrom.status import AttemptOutcome

MAX_RETURNED = 1024 * 1024
"""Octets of the original message returned whole for RET=FULL; past it, headers only."""
_MAX_LINE = 900


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedRecipient:
    """One recipient a notice reports."""

    address: str
    status: str
    """RFC 3463 code: the reply's enhanced code, else 5.0.0 (4.0.0 for an expiry)."""
    diagnostic: str
    """The reply (``550 5.1.1 ...``) or the local reason."""
    remote_mta: str | None
    at: datetime


def wants_notice(
    envelope_from: str, dsn: DSN | None, *, default: bool, delay: bool = False
) -> bool:
    """Whether a final failure (``delay``: a delay) of a message is reported to its
    envelope sender."""
    if not envelope_from:
        return False
    if dsn is None:
        return default
    return not dsn.notify or (Notify.DELAY if delay else Notify.FAILURE) in dsn.notify


def status_of(outcome: AttemptOutcome, enhanced: str | None, *, delayed: bool = False) -> str:
    """The DSN ``Status`` of a failure: the enhanced code when it is a permanent one,
    else 5.0.0 (a refusal without one) or 4.4.7 (retries ran out: "delivery time
    expired", RFC 3463); of a delay, the temporary enhanced code or 4.0.0."""
    if delayed:
        return enhanced if enhanced and enhanced.startswith("4.") else "4.0.0"
    if enhanced and enhanced.startswith("5."):
        return enhanced
    return "5.0.0" if outcome is AttemptOutcome.PERMANENT else "4.4.7"


def render_notice(
    *,
    reporting_mta: str,
    sender: str,
    message_id: str,
    original: bytes,
    arrival: datetime,
    failed: Sequence[FailedRecipient],
    dsn: DSN | None,
    now: datetime,
    delayed: bool = False,
    retry_until: datetime | None = None,
) -> bytes:
    """The notice to ``sender`` about ``failed`` recipients of message ``message_id``;
    ``delayed``: a delay warning about recipients still being retried (``Action:
    delayed``, RFC 3464 §2.3.3), until ``retry_until`` if known."""
    boundary = f"{message_id}.{os.urandom(6).hex()}/{reporting_mta}"
    head = original.partition(b"\r\n\r\n")[0] + b"\r\n"
    full = (
        not delayed and dsn is not None and dsn.ret is Return.FULL and len(original) <= MAX_RETURNED
    )
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_line(sender)}>",
        "Subject: "
        + (
            "Delayed Mail (still being retried)"
            if delayed
            else "Undelivered Mail Returned to Sender"
        ),
        f"Date: {format_datetime(now)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        (
            "Your message has not been delivered yet to one or more recipients; delivery"
            " is still being tried"
            + (f", until {format_datetime(retry_until)} at the latest." if retry_until else ".")
            if delayed
            else "Your message could not be delivered to one or more recipients."
        ),
        "",
        *(f"<{_line(r.address)}>: {_line(r.diagnostic)}" for r in failed),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mailstrom-Queue-ID: {message_id}",
        *(
            [f"Original-Envelope-Id: {xtext(dsn.envid or message_id).decode()}"]
            if dsn is not None
            else []
        ),
        f"Arrival-Date: {format_datetime(arrival)}",
    ]
    for r in failed:
        lines += [
            "",
            *(
                [f"Original-Recipient: rfc822;{xtext(r.address).decode()}"]
                if dsn is not None and dsn.orcpt and r.address.isascii()
                else []
            ),
            f"Final-Recipient: rfc822; {_line(r.address)}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {r.status}",
            *([f"Remote-MTA: dns; {_line(r.remote_mta)}"] if r.remote_mta else []),
            f"Diagnostic-Code: {_diagnostic(r.diagnostic)}",
            f"Last-Attempt-Date: {format_datetime(r.at)}",
            *([f"Will-Retry-Until: {format_datetime(retry_until)}"] if retry_until else []),
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: "
        + ("Undelivered Message" if full else "Undelivered Message Headers"),
        "Content-Type: " + ("message/rfc822" if full else "text/rfc822-headers"),
        "",
    ]
    text = "\r\n".join(lines).encode("ascii", "replace") + b"\r\n"
    returned = original if full else head
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    return text + returned + f"\r\n--{boundary}--\r\n".encode("ascii")


def _diagnostic(text: str) -> str:
    """``smtp; <reply>`` for a server's reply, ``X-Mailstrom; <reason>`` for ours."""
    reply = text[:3].isdigit() and text[3:4] in (" ", "-", "")
    return f"{'smtp' if reply else 'X-Mailstrom'}; {_line(text)}"


def _line(text: str) -> str:
    """One line of printable ASCII, at most ``_MAX_LINE`` characters."""
    flat = " ".join(text.split())
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in flat)[:_MAX_LINE]
