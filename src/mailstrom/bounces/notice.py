"""Bounce messages: the delivery status notification (RFC 3464) mailstrom sends to a
message's envelope sender when it gives up on recipients itself, and the "relayed" one
owed when a message asking to hear of its delivery (NOTIFY=SUCCESS) goes to a server that
does not offer DSN, which could not be asked to report it (RFC 3461 §5.2.2).

Which messages get one (:func:`wants_notice`): never one with the null sender (a bounce
is never bounced: RFC 5321 §4.5.5); one that carries a DSN request (RFC 3461) when its
NOTIFY includes FAILURE or is left to the server; any other only when
``Config.bounce_notices`` is on. ``mailstrom sendmail`` gives every message a DSN request,
so mail submitted as by sendmail is bounced as an MTA would; the library's default is
off (the application reads ``query_status`` instead).

The notice is rendered here as bytes, ASCII only: a ``multipart/report`` with a readable
part, the ``message/delivery-status`` part and the returned message's headers (or the
whole message for ``RET=FULL``, when it is at most :data:`MAX_RETURNED` octets), in
base64 as ``message/global(-headers)`` when they hold 8-bit octets. Everything that came
from a peer (reply texts) is cut to one line of printable ASCII.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from mailstrom.dkim.config import DKIMConfig
from mailstrom.domains import a_label
from mailstrom.errors import InvalidAddress
from mailstrom.message.addrspec import validate_address
from mailstrom.message.dsn import DSN, Notify, Return
from mailstrom.status import AttemptOutcome

MAX_RETURNED = 1024 * 1024
"""Octets of the original message returned whole for RET=FULL; past it, headers only."""
_MAX_LINE = 900
MAX_PER_RECIPIENT = 10 * (_MAX_LINE + 40)
"""Octets a notice spends at most on each recipient it reports: its line in the readable
part and its block of the delivery report, ten lines of at most ``_MAX_LINE`` ASCII
characters after their field names. A notice grows with its recipients, not with the
message it reports on alone (see :data:`MAX_RETURNED`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedRecipient:
    """One recipient a notice reports."""

    address: str
    status: str
    """RFC 3463 code (see :func:`status_of`)."""
    diagnostic: str
    """The reply (``550 5.1.1 ...``) or the local reason."""
    own: bool = False
    """``diagnostic`` is mailstrom's own even if it looks like a reply (a refusal it made
    with a code: SIZE, SMTPUTF8, null MX), not a server's."""
    remote_mta: str | None
    at: datetime | None
    """When delivery to it was last attempted; None when it never was (refused from the
    suppression list, or expired before any attempt): ``Last-Attempt-Date`` is left out
    (RFC 3464 §2.3.7: the date of the last attempt, an optional field)."""


def shown_diagnostic(text: str) -> str:
    """What a notice shows of a recipient's diagnostic ``text`` (a server's reply, or the
    local reason): one line of printable ASCII, at most ``_MAX_LINE`` characters. A mark
    "notice owed" keeps no more than this of it: a reply's 4,096 characters, each an
    escape in the mark's JSON, made a mark of 49 KB for each recipient."""
    return _line(text)


def wants_notice(
    envelope_from: str,
    dsn: DSN | None,
    *,
    default: bool,
    delay: bool = False,
    success: bool = False,
) -> bool:
    """Whether a final failure (``delay``: a delay; ``success``: a delivery) of a message
    is reported to its envelope sender. A delivery only when the message asks for it
    (NOTIFY=SUCCESS): RFC 3461 §4.1 reports none by default."""
    if not envelope_from:
        return False
    if success:
        return dsn is not None and Notify.SUCCESS in dsn.notify
    if dsn is None:
        return default
    return not dsn.notify or (Notify.DELAY if delay else Notify.FAILURE) in dsn.notify


def status_of(
    outcome: AttemptOutcome,
    enhanced: str | None,
    *,
    delayed: bool = False,
    expired: bool = False,
) -> str:
    """The DSN ``Status`` of a failure: the enhanced code when it is a permanent one,
    else 5.0.0 (a refusal without one) or 4.4.7 (retries ran out, or ``expired``: the
    message passed the expiry its sender set; both "delivery time expired", RFC 3463);
    of a delay, the temporary enhanced code or 4.0.0; of a delivery, the success code or
    2.0.0."""
    if outcome is AttemptOutcome.DELIVERED:
        return enhanced if enhanced and enhanced.startswith("2.") else "2.0.0"
    if delayed:
        return enhanced if enhanced and enhanced.startswith("4.") else "4.0.0"
    if expired:
        return "4.4.7"
    if enhanced and enhanced.startswith("5."):
        return enhanced
    return "5.0.0" if outcome is AttemptOutcome.PERMANENT else "4.4.7"


def mailer_daemon_domain(
    candidates: Iterable[str | None], *, prefer: Callable[[str], bool] | None = None
) -> str | None:
    """The first of ``candidates`` that an address can have as its domain (in A-label
    form), or None. The host's name comes first, but it may be one no address can have
    (``localhost``, the default on a host without a usable name, or ``mac.local``): a
    notice from ``MAILER-DAEMON@localhost`` would be refused by ``prepare`` and lost.
    With ``prefer``, the first such domain it accepts comes before the others (one a
    DKIM key signs: see :func:`signable_by`)."""
    usable: list[str] = []
    for domain in candidates:
        if not domain:
            continue
        try:
            usable.append(validate_address(f"MAILER-DAEMON@{domain}").envelope.partition("@")[2])
        except InvalidAddress:
            continue
    if prefer is not None:
        for domain in usable:
            if prefer(domain):
                return domain
    return usable[0] if usable else None


def signable_by(dkim: DKIMConfig | None) -> Callable[[str], bool] | None:
    """Whether a key of ``dkim`` signs mail from a domain (None: no key signs any). A
    notice from a domain no key aligns with goes out unsigned, and with ``dkim.required``
    not at all (``prepare`` refuses it): the sender never heard of the failure."""
    if dkim is None or not dkim.keys:
        return None
    return lambda domain: bool(dkim.keys_for((domain.lower(),)))


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
    from_domain: str | None = None,
    relayed: bool = False,
) -> bytes:
    """The notice to ``sender`` about ``failed`` recipients of message ``message_id``;
    ``delayed``: a delay warning about recipients still being retried (``Action:
    delayed``, RFC 3464 §2.3.3), until ``retry_until`` if known; ``relayed``: a report
    that ``failed`` were delivered to servers that do not report deliveries (``Action:
    relayed``), with the message's headers only (RET is about failures, RFC 3461 §4.3).
    It is from ``MAILER-DAEMON@<from_domain>`` (default: the reporting MTA's name; see
    :func:`mailer_daemon_domain`)."""
    reporting_mta = _host_name(reporting_mta)
    message_id = _line(message_id)
    from_domain = reporting_mta if from_domain is None else _host_name(from_domain)
    # Not the host's name, as Postfix does: an address literal's brackets are not allowed
    # in a boundary, and a long name would take it past 70 characters (RFC 2046 §5.1.1).
    queue_id = "".join(c for c in message_id[:50] if c.isalnum())
    boundary = f"{queue_id}.{os.urandom(6).hex()}"
    head = original.partition(b"\r\n\r\n")[0] + b"\r\n"
    full = (
        not (delayed or relayed)
        and dsn is not None
        and dsn.ret is Return.FULL
        and len(original) <= MAX_RETURNED
    )
    action = "relayed" if relayed else "delayed" if delayed else "failed"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{from_domain}>",
        # A UTF-8 local part stays UTF-8 (RFC 6532): the notice needs SMTPUTF8 to reach
        # that address anyway, and any ASCII stand-in would be some other address.
        f"To: <{_verbatim(sender, unicode=True)}>",
        "Subject: "
        + (
            "Successful Mail Relay Report"
            if relayed
            else "Delayed Mail (still being retried)"
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
            "Your message was relayed to the recipients below. Their mail servers do not"
            " report deliveries: you may get no further notice of it."
            if relayed
            else "Your message has not been delivered yet to one or more recipients; delivery"
            " is still being tried"
            + (f", until {format_datetime(retry_until)} at the latest." if retry_until else ".")
            if delayed
            else "Your message could not be delivered to one or more recipients."
        ),
        "",
        # Cut as a whole: an address and a reply each of up to _MAX_LINE make a line past
        # RFC 5322's 998 octets, which prepare() refuses (and the notice would be lost).
        *(f"<{_address(r.address)}>: {_line(r.diagnostic)}"[:_MAX_LINE] for r in failed),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        # In the order of RFC 3464 §2.2's grammar: Original-Envelope-Id first, the
        # extension fields last.
        *(
            # Decoded: xtext is the SMTP parameter's encoding, and RFC 3461 §4.4 limits the
            # value "prior to encoding as xtext" to printable ASCII so that a DSN can hold it.
            [f"Original-Envelope-Id: {_line(dsn.envid or message_id)}"] if dsn is not None else []
        ),
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {format_datetime(arrival)}",
        f"X-Mailstrom-Queue-ID: {message_id}",
    ]
    for r in failed:
        lines += [
            "",
            *(
                # As the ORCPT parameter named it, decoded (RFC 3461 §4.2, RFC 3464
                # §2.3.1): bob+news@…, not the parameter's bob+2Bnews@….
                [f"Original-Recipient: rfc822;{_verbatim(r.address)}"]
                if dsn is not None and dsn.orcpt and r.address.isascii()
                else []
            ),
            f"Final-Recipient: {_address_type(r.address)}; {_address(r.address)}",
            f"Action: {action}",
            f"Status: {_line(r.status)}",
            *([f"Remote-MTA: dns; {_line(r.remote_mta)}"] if r.remote_mta else []),
            f"Diagnostic-Code: {_diagnostic(r.diagnostic, own=r.own)}",
            *([f"Last-Attempt-Date: {format_datetime(r.at)}"] if r.at is not None else []),
            *([f"Will-Retry-Until: {format_datetime(retry_until)}"] if retry_until else []),
        ]
    returned = original if full else head
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: "
        + (
            "Undelivered Message"
            if full
            else "Message Headers"
            if relayed
            else "Undelivered Message Headers"
        ),
        *_returned_type(returned, full=full),
        "",
    ]
    text = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    if not returned.isascii():
        returned = base64.encodebytes(returned).replace(b"\n", b"\r\n")
    return text + returned + f"\r\n--{boundary}--\r\n".encode("ascii")


def _returned_type(returned: bytes, *, full: bool) -> list[str]:
    """The returned message's Content-Type (and Content-Transfer-Encoding). One with 8-bit
    octets (UTF-8 header fields, RFC 6532, or an 8-bit body) is ``message/global`` or
    ``message/global-headers`` in base64 (RFC 6532 §3.7, RFC 6533 §6.3), which those
    types allow and ``message/rfc822`` does not: the notice stays ASCII, and needs
    neither SMTPUTF8 nor 8BITMIME of the sender's server."""
    if returned.isascii():
        return ["Content-Type: " + ("message/rfc822" if full else "text/rfc822-headers")]
    return [
        "Content-Type: " + ("message/global" if full else "message/global-headers"),
        "Content-Transfer-Encoding: base64",
    ]


def _diagnostic(text: str, *, own: bool = False) -> str:
    """``smtp; <reply>`` for a server's reply, ``X-Mailstrom; <reason>`` for ours (``own``:
    a refusal of ours written as a reply; ``smtp`` says a server sent it, RFC 3464
    §2.3.6)."""
    reply = not own and text[:3].isdigit() and text[3:4] in (" ", "-", "")
    return f"{'smtp' if reply else 'X-Mailstrom'}; {_line(text)}"


def _host_name(name: str) -> str:
    """``name`` in ASCII: a U-label domain in the A-label form EHLO sends it in (a name
    that has none, cut to printable ASCII like peer text)."""
    if not name.isascii():
        try:
            return a_label(name)
        except ValueError:
            pass
    return _line(name)


def _address_type(address: str) -> str:
    """The address type of a DSN recipient field: ``utf-8`` for an address that is not
    ASCII (RFC 6533 §3), else ``rfc822``."""
    return "rfc822" if address.isascii() else "utf-8"


def _address(address: str) -> str:
    """``address`` as a DSN recipient field writes it: an ASCII one as one printable
    line; any other as ``utf-8-addr-xtext`` (RFC 6533 §3), each character that is not
    printable ASCII, and ``+``, ``=`` and ``\\``, written ``\\x{HEX}``: the field stays
    ASCII and still names the address (``?`` for each letter would name another one)."""
    if address.isascii():
        return _verbatim(address)
    return "".join(
        c if 33 <= ord(c) < 127 and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address
    )[:_MAX_LINE]


def _verbatim(address: str, *, unicode: bool = False) -> str:
    """``address`` as it is when it is one line of printable ASCII (``unicode``: printable
    characters), as every address the queue holds is; else as :func:`_line` makes it. Not
    :func:`_line` alone: a quoted local part's run of spaces (``"john  doe"@...``) is part
    of the address, and one space would name another mailbox."""
    if all(32 <= ord(c) < 127 or (unicode and c.isprintable()) for c in address):
        return address[:_MAX_LINE]
    return _line(address, unicode=unicode)


def _line(text: str, *, unicode: bool = False) -> str:
    """One line of printable ASCII (``unicode``: printable characters), at most
    ``_MAX_LINE`` characters."""
    flat = " ".join(text.split())
    return "".join(c if 32 <= ord(c) < 127 or (unicode and c.isprintable()) else "?" for c in flat)[
        :_MAX_LINE
    ]
