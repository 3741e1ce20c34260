"""Reading a delivery status notification (RFC 3464) or a complaint (RFC 5965).

Parsed with the standard library's ``email`` package, leniently (``compat32``): reports
come from every kind of MTA, and a report whose returned message is cut short or malformed
still says what failed, since its ``message/delivery-status`` part comes before the
returned message. Everything is bounded: the octets read (:data:`MAX_REPORT`, by the
caller), the lines parsed (:data:`MAX_LINES`), the length of a Content-Type field
(:data:`MAX_CONTENT_TYPE`) and of them all (:data:`MAX_CONTENT_TYPES`), how deep its MIME
parts nest (:data:`MAX_DEPTH`), the recipients taken from one report and the length of
every field kept.

qmail sends neither, but bounces in its own plain-text format (QSBMF), read as a DSN.

What a report says is gathered into a :class:`Report`; matching it to a queued message
and recipient is :mod:`mailstrom.bounces.apply`'s job.
"""

from __future__ import annotations

import contextlib
import email
import email.parser
import email.policy
import itertools
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import Message
from enum import StrEnum
from typing import TypeVar

from mailstrom.errors import InvalidReport
from mailstrom.message.mime import MAX_DEPTH as MAX_MESSAGE_DEPTH
from mailstrom.message.stdlib_addresses import address_pairs
from mailstrom.safetext import safe_text

MAX_REPORT = 10 * 1024 * 1024
"""Octets of a report read from standard input; the rest is not parsed."""
MAX_LINES = 50_000
"""Lines of a report parsed; the rest is not. The parser makes an object of every line,
header field and MIME part, some hundred octets each, so ten megabytes of two-octet lines
or empty parts would take a gigabyte and a quarter of a minute. A report's own parts (its
text, its status or feedback part, the returned message's header) come first and take a
few thousand lines even for :data:`MAX_RECIPIENTS` recipients; what is cut is the
returned message's body."""
MAX_CONTENT_TYPE = 4096
"""Characters of a Content-Type field, its folded lines included; a report holding a
longer one is refused. The standard library reads such a field's parameters (the parser
its boundary, :func:`parse_report` the report type) in time quadratic in its length,
however few lines it takes: one field of ten megabytes took minutes. A real one, RFC 2231
parameters of a long file name included, takes a few hundred."""
MAX_CONTENT_TYPES = 64 * 1024
"""Characters of all the Content-Type fields of a report together; the fields past them
are cut off with the rest of the report, as lines past :data:`MAX_LINES` are. Each is
read in time quadratic in its length (see :data:`MAX_CONTENT_TYPE`), and ten megabytes of
parts, each a multipart with a field of 4,000 characters, took 24 s. A report's own
parts come first and take a few hundred; what is cut is the returned message's."""
MAX_DEPTH = MAX_MESSAGE_DEPTH + 2
"""Deepest MIME nesting read: a returned message may nest as deep as any mail sent
(:data:`mailstrom.message.mime.MAX_DEPTH`) below the report's own two levels
(``multipart/report``, ``message/rfc822``). The standard library's parser recurses per
level, so a report nested thousands deep would exhaust Python's stack."""
MAX_RECIPIENTS = 1000
"""Per-recipient blocks taken from one report."""
_MAX_FIELD = 1000
"""Characters kept of a field (a diagnostic, an address)."""
_ADDRESS_HEADERS = ("To", "Delivered-To", "X-Original-To", "Envelope-To", "Return-Path")
_MAX_ADDRESS_HEADERS = 20


class ReportKind(StrEnum):
    """What a report is."""

    DSN = "dsn"
    """A delivery status notification: ``multipart/report; report-type=delivery-status``."""
    COMPLAINT = "complaint"
    """A feedback report: ``multipart/report; report-type=feedback-report``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportedRecipient:
    """One recipient a report speaks of."""

    final_recipient: str | None
    """The address the reporting MTA tried (DSN ``Final-Recipient``; ARF
    ``Original-Rcpt-To``)."""
    original_recipient: str | None = None
    """The address as the sender gave it (DSN ``Original-Recipient``, from ORCPT)."""
    action: str = ""
    """``failed``, ``delayed``, ``delivered``, ``relayed``, ``expanded`` (lower case);
    empty for a complaint."""
    status: str | None = None
    """The RFC 3463 status code, ``5.1.1``."""
    diagnostic: str | None = None
    """The remote MTA's reply or the reporting MTA's reason (``Diagnostic-Code``,
    without its type)."""
    diagnostic_type: str | None = None
    """The ``Diagnostic-Code``'s type, lower case: ``smtp`` for a server's reply, else
    the reporting MTA's own (``x-postfix``; ``x-mailstrom`` in mailstrom's notices)."""
    diagnostic_code: int | None = None
    """The SMTP reply code at the start of an ``smtp;`` diagnostic, if any."""
    diagnostic_status: str | None = None
    """The RFC 3463 code after that reply code (``550 5.2.2 full`` → ``5.2.2``), if any
    and of the reply's class (RFC 2034 §4)."""
    remote_mta: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What one DSN or ARF report says."""

    kind: ReportKind
    recipients: tuple[ReportedRecipient, ...]
    reporting_mta: str | None = None
    envelope_id: str | None = None
    """``Original-Envelope-Id``: the ENVID the message was sent with."""
    original_message_id: str | None = None
    """The ``Message-ID`` of the returned message or its headers."""
    feedback_type: str | None = None
    """ARF: ``abuse``, ``fraud``, ``virus``, ``other``, ..."""
    envelope_senders: tuple[str, ...] = ()
    """Addresses the original message's envelope sender may appear as (the report's own
    recipients, ``X-Postfix-Sender``, ``Original-Mail-From``, ``Return-Path``): where a
    VERP token is looked for."""


def parse_report(data: bytes) -> Report | None:
    """The report in ``data``, or None when ``data`` is no report (an ordinary message,
    an auto-reply); a qmail bounce (QSBMF, see :func:`_qmail`) is read as a DSN. Raises
    :class:`~mailstrom.errors.InvalidReport` for a ``multipart/report`` without the part
    its report type needs, or one nested deeper than :data:`MAX_DEPTH` or with a
    Content-Type field longer than :data:`MAX_CONTENT_TYPE`."""
    data = _first_lines(data)
    data = _bounded_content_types(data)
    message = _parse(data)
    if message.get_content_type() != "multipart/report":
        return _qmail(message, _addresses(message))
    report_type = _report_type(message)
    # A DSN's report type is delivery-status (RFC 3464), but servers that send its
    # status part as message/global-delivery-status (RFC 6533) may name the report after
    # that part: such a bounce was read as no report.
    if report_type in ("delivery-status", "global-delivery-status"):
        return _dsn(_parts(message), _addresses(message))
    if report_type == "feedback-report":
        return _arf(_parts(message), _addresses(message))
    return None  # a read receipt (disposition-notification) or another kind


def kept_texts(report: Report) -> Report:
    """``report`` with each text a store keeps or a view shows (the reporting and remote
    MTAs, the action, status, diagnostic and feedback type) as :func:`parse_report`
    makes it: one line of at most 1,000 characters, without control characters (see
    :func:`_field`). Unchanged for a parsed report; one an application builds itself
    (from a provider's webhook) is held to the same bounds before it is applied."""

    def text(value: str | None) -> str | None:
        return None if value is None else _field(value) or None

    recipients = tuple(
        replace(
            r,
            action=_field(r.action).lower(),  # as parse_report reads Action
            status=text(r.status),
            diagnostic=text(r.diagnostic),
            diagnostic_type=text(r.diagnostic_type),
            diagnostic_status=text(r.diagnostic_status),
            remote_mta=text(r.remote_mta),
        )
        for r in report.recipients
    )
    return replace(
        report,
        recipients=recipients,
        reporting_mta=text(report.reporting_mta),
        feedback_type=text(report.feedback_type),
    )


_EXTENDED_REPORT_TYPE = re.compile(r"report-type\*(?:([0-9]{1,3})(\*?))?", re.IGNORECASE)
"""The names of the report-type parameter in RFC 2231 form: ``report-type*`` (encoded),
``report-type*N`` (a section) and ``report-type*N*`` (an encoded section)."""


def _report_type(message: Message) -> str:
    """The report-type parameter of ``message``'s Content-Type, lower-cased; in RFC 2231
    form too (``report-type*=us-ascii''delivery-status``, or in sections), which compat32
    leaves undecoded for a name holding a hyphen (its pattern is ``\\w+``), so that
    get_param found no report type and such a report read as no report. A report type is
    an ASCII token: the charset named is not needed (decoding with one a peer names, such
    as ``undefined``, raises), nor is the language."""
    plain = message.get_param("report-type")
    if isinstance(plain, str):
        return plain.lower()
    sections: dict[int, str] = {}
    for name, value in message.get_params([])[1:]:
        match = _EXTENDED_REPORT_TYPE.fullmatch(name)
        if match is None:
            continue
        number = int(match[1] or 0)
        if match[1] is None or match[2]:
            if number == 0:
                value = value.split("'", 2)[-1]  # after charset'language'
            value = urllib.parse.unquote(value, encoding="latin-1")
        sections.setdefault(number, value)
    return "".join(sections[number] for number in sorted(sections)).lower()


class _RawFields(email.policy.Compat32):
    """``compat32``, but a field holding 8-bit octets is given as parsed (the octets as
    lone surrogates) instead of as an ``unknown-8bit`` Header whose text has lost them to
    U+FFFD: :func:`_field` reads them as UTF-8 where they are."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _RawFields()


class _Part(Message):
    """A MIME entity that knows its depth: the parser attaches each new entity to its
    parent as soon as it meets it, so the nesting is refused before the parser goes
    deeper (public API: ``_class`` and :meth:`~email.message.Message.attach`)."""

    depth = 0

    def attach(self, payload: Message | str) -> None:
        depth = self.depth + 1
        if depth > MAX_DEPTH:
            raise InvalidReport(
                f"MIME parts nested more than {MAX_DEPTH} levels deep "
                "(multipart and message levels)"
            )
        if isinstance(payload, _Part):
            payload.depth = depth
        super().attach(payload)


_Text = TypeVar("_Text", bytes, str)

_LINE_END = re.compile(rb"\r\n?|\n")
"""Where the parser ends a line: CRLF, CR or LF."""


def _lf_lines(text: str) -> str:
    """``text`` with each line ended by an LF, where the parser ends a line: a decoded
    part's or body's text is split into blocks and paragraphs here, at LFs. A CR alone
    ending each line (in base64 nothing says the lines are CRLF) made the part one
    line: a status part's recipient blocks, a qmail bounce's paragraphs went unread."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _first_lines(data: bytes) -> bytes:
    """``data`` up to the end of its :data:`MAX_LINES`-th line."""
    if data.count(b"\n") + data.count(b"\r") <= MAX_LINES:
        return data  # no more line ends than that, however they pair (one C-level pass)
    last = next(itertools.islice(_LINE_END.finditer(data), MAX_LINES - 1, None), None)
    return data if last is None else data[: last.end()]


# A Content-Type field wherever the parser may meet one (a report's headers, a returned
# message's parts): the field line and its continuation lines (RFC 5322 §2.2.3), after
# the line end before it (see _bounded_content_types).
_CONTENT_TYPE_BYTES = re.compile(
    rb"[\r\n](content-type:[^\r\n]*(?:(?:\r\n?|\n)[ \t][^\r\n]*)*)", re.IGNORECASE
)
_CONTENT_TYPE_TEXT = re.compile(_CONTENT_TYPE_BYTES.pattern.decode(), _CONTENT_TYPE_BYTES.flags)


def _bounded_content_types(text: _Text) -> _Text:
    """``text`` (the octets of a report, or a part's decoded text) up to the line of the
    Content-Type field that takes them all past :data:`MAX_CONTENT_TYPES`; InvalidReport
    for a field before it over :data:`MAX_CONTENT_TYPE`. A field starts a line, and
    the parser ends a line at a CR alone too: MULTILINE's ``^`` sees a line start only
    after an LF, so a field after a CR went unchecked, and was parsed in quadratic time
    (hours for ten megabytes). The line end the pattern starts with (one is put first)
    keeps the scan as fast as a search for a word."""
    fields: Iterator[re.Match[bytes]] | Iterator[re.Match[str]] = (
        _CONTENT_TYPE_BYTES.finditer(b"\n" + text)
        if isinstance(text, bytes)
        else _CONTENT_TYPE_TEXT.finditer("\n" + text)
    )
    total = 0
    for field in fields:
        size = field.end(1) - field.start(1)
        if size > MAX_CONTENT_TYPE:
            raise InvalidReport(
                f"a Content-Type field of {size} characters; at most {MAX_CONTENT_TYPE}"
            )
        total += size
        if total > MAX_CONTENT_TYPES:
            # Cut after the line end before the field (positions count the one put first).
            return text[: field.start(1) - 1]
    return text


def _parse(data: bytes) -> Message:
    parser = email.parser.BytesParser(_class=_Part, policy=_POLICY)
    return parser.parsebytes(data)


def _parts(message: Message) -> list[Message]:
    """The top-level parts of a multipart message (bounded)."""
    payload = message.get_payload() if message.is_multipart() else None
    if not isinstance(payload, list):
        raise InvalidReport("a multipart/report without parts")
    return [p for p in payload[:20] if isinstance(p, Message)]


def _part(parts: list[Message], *types: str) -> Message | None:
    for part in parts:
        if part.get_content_type() in types:
            return part
    return None


def _dsn(parts: list[Message], senders: list[str]) -> Report:
    status = _part(parts, "message/delivery-status", "message/global-delivery-status")
    if status is None:
        raise InvalidReport("a delivery-status report without a message/delivery-status part")
    blocks = _blocks(status, white=True)
    if not blocks:
        raise InvalidReport("an empty message/delivery-status part")
    per_message = blocks[0]
    recipients: list[ReportedRecipient] = []
    # The per-message block included: an MTA that leaves it out, or writes no blank line
    # between it and the first recipient's fields, puts that recipient's fields there.
    for block in blocks:
        final = _typed_address(block.get("Final-Recipient"))
        if final is None and block.get("Action") is None:
            continue  # not a recipient block (a stray blank line in the message block)
        if len(recipients) == MAX_RECIPIENTS:
            break
        diagnostic_type, diagnostic = _typed(block.get("Diagnostic-Code"), comments=True)
        code = _smtp_code(diagnostic) if diagnostic_type == "smtp" else None
        recipients.append(
            ReportedRecipient(
                final_recipient=final,
                original_recipient=_typed_address(block.get("Original-Recipient")),
                action=_plain(block.get("Action")).lower(),
                status=_status(block.get("Status")),
                diagnostic=diagnostic,
                diagnostic_type=diagnostic_type,
                diagnostic_code=code,
                diagnostic_status=_smtp_status(diagnostic, code),
                remote_mta=_typed(block.get("Remote-MTA"))[1],
            )
        )
    postfix_sender = _typed_address(per_message.get("X-Postfix-Sender"))
    return Report(
        kind=ReportKind.DSN,
        recipients=tuple(recipients),
        reporting_mta=_typed(per_message.get("Reporting-MTA"))[1],
        envelope_id=_plain(per_message.get("Original-Envelope-Id")) or None,
        original_message_id=_returned_message_id(parts),
        envelope_senders=tuple(
            [*senders, *([postfix_sender] if postfix_sender else []), *_returned_paths(parts)]
        ),
    )


def _arf(parts: list[Message], senders: list[str]) -> Report:
    feedback = _part(parts, "message/feedback-report")
    if feedback is None:
        raise InvalidReport("a feedback-report without a message/feedback-report part")
    blocks = _blocks(feedback, white=False)
    if not blocks:
        raise InvalidReport("an empty message/feedback-report part")
    fields = blocks[0]
    recipients = [
        ReportedRecipient(final_recipient=_bare(value))
        for value in (fields.get_all("Original-Rcpt-To") or [])[:MAX_RECIPIENTS]
        if _bare(value)
    ]
    mail_from = _bare(fields.get("Original-Mail-From"))
    return Report(
        kind=ReportKind.COMPLAINT,
        recipients=tuple(recipients),
        reporting_mta=_typed(fields.get("Reporting-MTA"))[1],
        original_message_id=_returned_message_id(parts),
        feedback_type=_plain(fields.get("Feedback-Type")).lower() or None,
        envelope_senders=tuple(
            [*senders, *([mail_from] if mail_from else []), *_returned_paths(parts)]
        ),
    )


_QMAIL_START = "Hi. This is the"
"""How a qmail bounce's body begins (QSBMF §2)."""
_QMAIL_HOST = re.compile(r"\AHi\. This is the [^\n]*? at (\S+?)\.?(?:\s|\Z)")
_QMAIL_BREAK = re.compile(r"(?<!\n)\n\n+(?=-)")
"""Where the break paragraph starts: the first paragraph that begins with "-". Tried at
the first line end of a run only: tried at each, a run of empty lines not followed by "-"
was read again from each of its lines (time quadratic in its length, and a part in base64
holds millions of them within the bounds on what is parsed)."""
_QMAIL_RECIPIENT = re.compile(r"<([^<>\n]*)>:[ \t]*")
"""The first line of a recipient paragraph: ``<address>:``."""
_QMAIL_STATUS = re.compile(r"\(#([0-9]\.[0-9]{1,3}\.[0-9]{1,3})\)\s*\Z")
"""The RFC 3463 code qmail ends its own reasons with: "(#5.1.1)"."""
_MAX_QMAIL_PARAGRAPHS = 10
"""Paragraphs of one recipient's reason read."""
_QMAIL_REMOTE = "Remote host said: "
_QMAIL_REPLY_LINE = re.compile(r"[2-5][0-9][0-9](?:[ -]|\Z)")


def _qmail(message: Message, senders: list[str]) -> Report | None:
    """The bounce in ``message`` when it is in the qmail-send bounce message format
    (QSBMF: qmail, netqmail and their forks send no RFC 3464 report), or None. Its body
    begins "Hi. This is the", then come a paragraph per failed recipient (a first line
    ``<address>:``, then the reason), a break paragraph that begins with "-", and the
    returned message. A reason of qmail's own ends in its RFC 3463 code ("(#5.1.1)"); one
    a server gave quotes its reply after "Remote host said:". Every recipient named has
    failed for good (QSBMF reports permanent failures only). A message that only begins
    so, without a break or a recipient paragraph, is no bounce."""
    if message.is_multipart() or message.get_content_type() != "text/plain":
        return None
    text = _LEADING_BLANK_LINES.sub("", _lf_lines(_text(message)))
    if not text.startswith(_QMAIL_START):
        return None
    cut = _QMAIL_BREAK.search(text)
    if cut is None:
        return None
    head, rest = text[: cut.start()], text[cut.end() :]
    intro, *paragraphs = _BLANK_LINES.split(head)
    named: list[tuple[str | None, list[str]]] = []
    for paragraph in paragraphs:
        found = _QMAIL_RECIPIENT.match(paragraph)
        if found is not None and paragraph[found.end() : found.end() + 1] in ("", "\n"):
            if len(named) == MAX_RECIPIENTS:
                break
            named.append((_bare(found[1]), [paragraph[found.end() :]]))
        elif named and len(named[-1][1]) < _MAX_QMAIL_PARAGRAPHS:
            # A reason that starts with an empty line (ezmlm's, a .qmail program's
            # output) is a paragraph of its own after the address.
            named[-1][1].append(paragraph)
    recipients = [_qmail_recipient(a, "\n".join(reason)) for a, reason in named if a]
    if not recipients:
        return None
    # Its first line only, and no longer than a field is kept: the pattern scans it.
    host = _QMAIL_HOST.match(intro.partition("\n")[0][:_MAX_FIELD])
    copy = _BLANK_LINES.split(rest, maxsplit=1)[1:]  # after the break paragraph
    returned = _headers(copy[0]) if copy else Message()
    paths = (_bare(v) for v in (returned.get_all("Return-Path") or [])[:5])
    return Report(
        kind=ReportKind.DSN,
        recipients=tuple(recipients),
        reporting_mta=(_field(host[1]) or None) if host is not None else None,
        original_message_id=_plain(returned.get("Message-ID")) or None,
        envelope_senders=tuple([*senders, *[a for a in paths if a]]),
    )


def _qmail_recipient(address: str, reason: str) -> ReportedRecipient:
    """A recipient paragraph of a qmail bounce: its address (as :func:`_bare` made it)
    and the lines of its reason."""
    lines = reason.strip("\n").split("\n")[:100]
    reply: list[str] = []
    for number, line in enumerate(lines):
        if line.startswith(_QMAIL_REMOTE):
            reply = [line[len(_QMAIL_REMOTE) :]]
            # A multi-line reply goes on with lines that start with its code.
            reply += itertools.takewhile(_QMAIL_REPLY_LINE.match, lines[number + 1 :])
            break
    own = _QMAIL_STATUS.search(" ".join(lines))
    if reply:
        diagnostic_type, diagnostic = "smtp", _field(" ".join(reply)) or None
    else:
        diagnostic_type, diagnostic = "x-qmail", _field(" ".join(lines)) or None
    code = _smtp_code(diagnostic) if diagnostic_type == "smtp" else None
    return ReportedRecipient(
        final_recipient=address,
        action="failed",
        status=_status(own[1]) if own is not None else None,
        diagnostic=diagnostic,
        diagnostic_type=diagnostic_type,
        diagnostic_code=code,
        diagnostic_status=_smtp_status(diagnostic, code),
    )


def _blocks(part: Message, *, white: bool) -> list[Message]:
    """The header blocks of a ``message/delivery-status``, ``message/global-delivery-status``
    or ``message/feedback-report`` part (the parser reads each block of the first as a
    message of headers); ``white``: a line of only spaces and tabs ends a block too (a
    DSN's, RFC 3464 §2.1; a feedback report is one block, RFC 5965 §3.1).

    Blank lines before the first block (one more after the part's header) start no block:
    the parser reads them as blocks without fields, and the first block, the per-message
    fields or a feedback report's only one, was then taken for an empty one."""
    blocks = _all_blocks(part, white=white)
    return list(itertools.dropwhile(lambda block: not block.keys(), blocks))


def _all_blocks(part: Message, *, white: bool) -> list[Message]:
    """The blocks as the parser reads them (see :func:`_blocks`)."""
    if _encoded(part):
        # In base64 or quoted-printable (how the 8-bit message/global-delivery-status
        # crosses a 7-bit hop): what the parser read is the encoded text, decoded whole.
        return _text_blocks(_decoded_body(part).decode("utf-8", "surrogateescape"), white)
    if not part.is_multipart():
        return _text_blocks(_text(part), white)
    payload = part.get_payload()
    if not isinstance(payload, list):
        return []
    blocks = [b for b in payload[: MAX_RECIPIENTS + 1] if isinstance(b, Message)]
    if white and any(_WHITE_LINE.search(value) for b in blocks for value in b.values()):
        # A line of only spaces or tabs ends a block (see _BLANK_LINES), but the parser
        # read it as the fold of the field above: the blocks it joined are split again.
        return _text_blocks("".join(_as_read(b) for b in blocks), white)
    if len(blocks) != 1:
        return blocks
    # message/global-delivery-status (RFC 6533, from SMTPUTF8 servers) is not a type the
    # parser splits: it reads the part as one message, the per-message block as its
    # header and the recipient blocks as its body.
    inner = blocks[0]
    body = inner.get_payload(decode=True)  # its octets as they came, 8-bit ones too
    if not isinstance(body, bytes) or not body.strip():
        return blocks  # one block indeed (a feedback report)
    if inner.get("Content-Transfer-Encoding") is not None:
        # Decoded by a field of the per-message block (the part's own is read by
        # _encoded): as much as of an encoded part, since what is decoded escapes
        # MAX_LINES (ten megabytes of base64 on one line made millions of fields).
        body = body[:_MAX_ENCODED]
    return [inner, *_text_blocks(body.decode("utf-8", "surrogateescape"), white)]


def _text_blocks(text: str, white: bool) -> list[Message]:
    """Header blocks separated by empty lines (``white``: or lines of only spaces and
    tabs), each read as a message of headers."""
    # Blank lines first would make the first block one without fields (see _blocks),
    # the fields that follow them its body.
    text = _LEADING_BLANK_LINES.sub("", _lf_lines(text))
    text = _bounded_content_types(text)  # a decoded part is new text
    # Read with the depth guard (_Part): a block that says it is multipart is parsed as
    # MIME, one recursion per level, and a few thousand levels (no blank line needed
    # between them) exhausted the stack (RecursionError, exit 70) where the report's own
    # parts are refused at MAX_DEPTH (InvalidReport).
    parser = email.parser.Parser(_class=_Part, policy=_POLICY)
    blank = _BLANK_OR_WHITE_LINES if white else _BLANK_LINES
    blocks = blank.split(text, maxsplit=MAX_RECIPIENTS + 1)[: MAX_RECIPIENTS + 1]
    return [parser.parsestr(b) for b in blocks]


_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*(?:\r\n?|\n))+")
"""Empty lines, or lines of only spaces and tabs, at the start of a text, however they
end: a returned message's headers are read as the parser reads them, and it ends a line
at a CR alone too."""
_BLANK_LINES = re.compile(r"\n\n+")
"""What ends a block: one empty line or more (as the parser splits message/delivery-status)."""
_BLANK_OR_WHITE_LINES = re.compile(r"\n(?:[ \t]*\n)+")
"""What ends a DSN's block: also a line of only spaces and tabs. RFC 3464 §2.1 separates
the blocks with blank lines, and such a line looks like one (a fold must carry text,
RFC 5322 §3.2.2)."""
_WHITE_LINE = re.compile(r"(?:\r\n?|\n)[ \t]*(?:\r\n?|\n|$)")
"""A line of only spaces and tabs in a field as the parser read it (a fold to nothing)."""


def _returned(parts: list[Message]) -> Message | None:
    """The returned message's headers (``message/rfc822``, ``text/rfc822-headers`` or
    their RFC 6532/6533 forms ``message/global``, ``message/global-headers``)."""
    part = _part(
        parts, "message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers"
    )
    if part is None:
        return None
    if _encoded(part):
        # mailstrom's own notices encode a returned message/global(-headers) that holds
        # 8-bit octets; the parser took the encoded text for a message (or for text).
        # Its octets read as the parser reads bytes: 8-bit ones as lone surrogates.
        return _headers(_decoded_body(part).decode("ascii", "surrogateescape"))
    if not part.is_multipart():
        return _headers(_text(part))
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        returned = payload[0]
        if returned.keys() or returned.is_multipart():
            return returned
        # No fields: a blank line came first, and the parser read the fields as the body.
        return _headers(_text(returned))
    return None


def _headers(text: str) -> Message:
    """The header fields at the start of ``text`` (only those: a body here would be
    parsed, and nested, for nothing), after any blank lines: one first would end the
    header section before it began, and the fields would be read as the body."""
    parser = email.parser.Parser(policy=_POLICY)
    return parser.parsestr(_LEADING_BLANK_LINES.sub("", text[:200_000]), headersonly=True)


def _text(part: Message) -> str:
    """The text of a part that is no multipart as the parser read it, each 8-bit octet a
    lone surrogate (as in the fields, see :class:`_RawFields`). Not ``get_payload()``: it
    decodes those octets by the part's ``charset`` parameter, which whoever sent the
    report writes, with U+FFFD for each that charset lacks (an encoded part holding one
    then failed to decode), TypeError for an RFC 2231 one (``charset*=``), and
    UnicodeError for a codec that cannot replace (``charset=idna``). With ``decode``
    it gives the octets as they came (decoded, for a base64 or quoted-printable part)."""
    data = part.get_payload(decode=True)
    return data.decode("ascii", "surrogateescape") if isinstance(data, bytes) else ""


def _encoded(part: Message) -> bool:
    return _field(part.get("Content-Transfer-Encoding")).lower() in ("base64", "quoted-printable")


_MAX_ENCODED = 200_000
"""Characters of an encoded part's text decoded."""


def _decoded_body(part: Message) -> bytes:
    """The octets of an encoded ``message/*`` part (at most :data:`_MAX_ENCODED` of
    them, or characters of its text put back together). The parser reads such a part as
    a message (a delivery-status one as a list of them) whatever its encoding: the
    encoded lines that look like header fields became that message's fields, the rest
    its body. In base64 no line does; in
    quoted-printable every ASCII one does, and a soft line break ends them early. The
    text is put back together (:func:`_as_read`) before it is decoded."""
    if not part.is_multipart():
        # Decoded whole (in C): read as text first, its 8-bit octets went by the part's
        # charset parameter (see _text), and the decoder wants them as they came.
        data = part.get_payload(decode=True)
        return data[:_MAX_ENCODED] if isinstance(data, bytes) else b""
    pieces: list[str] = []
    size = 0
    for inner in part.get_payload():
        if size > _MAX_ENCODED:
            break
        if isinstance(inner, Message):
            pieces.append(_as_read(inner))
            size += len(pieces[-1]) + 1
    # The empty line between the blocks of a delivery-status part (the parser split
    # them there); where there are two, _text_blocks still sees one block end.
    encoded = "\n".join(pieces)[:_MAX_ENCODED]
    carrier = Message()
    carrier["Content-Transfer-Encoding"] = _field(part.get("Content-Transfer-Encoding"))
    carrier.set_payload(encoded)
    data = carrier.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _as_read(message: Message) -> str:
    """The text the parser made ``message`` of: its fields as they came (a folded one
    with its line breaks), the empty line that ended them when one did, and its body
    (none when it was read as MIME parts: only headers are wanted of such a message)."""
    head = "".join(f"{name}: {value}\n" for name, value in message.items())
    if head and not any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in message.defects):
        head += "\n"
    return head + ("" if message.is_multipart() else _text(message))


def _returned_message_id(parts: list[Message]) -> str | None:
    returned = _returned(parts)
    if returned is None:
        return None
    # CFWS may surround a msg-id (RFC 5322 §3.6.4): "<a@b> (sent)" is the id <a@b>.
    value = _plain(returned.get("Message-ID"))
    return value or None


def _returned_paths(parts: list[Message]) -> list[str]:
    returned = _returned(parts)
    if returned is None:
        return []
    return [a for a in (_bare(v) for v in (returned.get_all("Return-Path") or [])[:5]) if a]


def _addresses(message: Message) -> list[str]:
    """The addresses the report itself was sent to (bounded)."""
    values = [
        _without_comments(_field(value))
        for name in _ADDRESS_HEADERS
        for value in (message.get_all(name) or [])[:_MAX_ADDRESS_HEADERS]
    ]
    return [addr for _, addr in address_pairs(values) if addr][:_MAX_ADDRESS_HEADERS]


def _without_comments(text: str) -> str:
    """``text`` with its RFC 5322 comments (``(...)``, nested, outside quoted strings)
    as spaces: ``getaddresses`` reads a nested comment by recursion, one level per
    parenthesis, so a field of a few hundred ``(`` raised RecursionError."""
    if "(" not in text:
        return text
    kept: list[str] = []
    depth = 0
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif depth:  # inside a comment, only its nesting counts
            depth += (char == "(") - (char == ")")
            if not depth:
                kept.append(" ")
            continue
        elif char == '"':
            quoted = not quoted
        elif char == "(" and not quoted:
            depth = 1
            continue
        if not depth:
            kept.append(char)
    return "".join(kept)


def _field(value: object, *, spaces: bool = False) -> str:
    """A header value as one line of at most ``_MAX_FIELD`` characters, safe to store and
    show (:func:`~mailstrom.safetext.safe_text`). Every text taken from a report passes
    here: whoever sends a report chooses its words, and they reach the store, the
    suppression list and the operator's terminal. ``spaces``: unfolded only (RFC 5322
    §2.2.3), its runs of spaces kept, as an address's quoted local part needs."""
    if value is None:
        return ""
    text = str(value)
    if not text.isascii():
        # 8-bit octets come as lone surrogates (see _RawFields): UTF-8 ones (RFC 6532
        # header fields, a message/global-delivery-status part) are read as what they
        # are, others as U+FFFD.
        with contextlib.suppress(UnicodeError):  # a surrogate standing for no octet
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    # Folded whitespace becomes one space first; what is left unsafe becomes U+FFFD.
    if spaces:
        return safe_text(_FOLD.sub("", text).strip()[:_MAX_FIELD])
    return safe_text(" ".join(text.split())[:_MAX_FIELD])


_FOLD = re.compile(r"(?:\r\n?|\n)(?=[ \t])")
"""A fold: the line break before the whitespace that continues a field; a CR alone too,
where the parser ends a line (kept, it became U+FFFD inside the address)."""


def _plain(value: object, *, spaces: bool = False) -> str:
    """A field as :func:`_field` makes it, without its comments: "text that appears in
    parentheses is considered a comment and not part of the contents" of a DSN field
    (RFC 3464 §2.1.1; RFC 5965's fields allow them too, as CFWS), so ``Action: failed
    (bad destination)`` says ``failed``. A quoted string's parentheses stay."""
    text = _without_comments(_field(value, spaces=spaces)).strip()
    return text if spaces else " ".join(text.split())


def _typed(
    value: object, *, spaces: bool = False, comments: bool = False
) -> tuple[str | None, str | None]:
    """``type; value`` fields (``rfc822; bob@x``, ``smtp; 550 ...``) → (type, value),
    without comments (:func:`_plain`) unless ``comments``: a diagnostic's text is the
    reply as the server wrote it, parentheses included."""
    text = _field(value, spaces=spaces) if comments else _plain(value, spaces=spaces)
    if not text:
        return None, None
    kind, sep, rest = text.partition(";")
    if not sep:
        return None, text
    return kind.strip().lower(), rest.strip() or None


def _typed_address(value: object) -> str | None:
    # Spaces kept: "john  doe"@example.org is another mailbox than "john doe"@...
    kind, address = _typed(value, spaces=True)
    if kind == "utf-8" and address is not None:
        address = _unescape_utf8(address)
    return _bare(address)


_EMBEDDED_CHAR = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unescape_utf8(address: str) -> str:
    """A ``utf-8`` address written as ``utf-8-addr-xtext`` (``\\x{F1}o\\x{F1}o@x``,
    RFC 6533 §3) in its own characters, made safe again: the escapes may name any."""

    def char(match: re.Match[str]) -> str:
        point = int(match.group(1), 16)
        surrogate = 0xD800 <= point <= 0xDFFF
        return chr(point) if point <= 0x10FFFF and not surrogate else "\ufffd"

    return safe_text(_EMBEDDED_CHAR.sub(char, address))


def _bare(value: object) -> str | None:
    """An address without angle brackets, comments or surrounding space; None when empty."""
    text = _plain(value, spaces=True)
    if text.startswith("<") and ">" in text:
        text = text[1 : text.index(">")]
    return text.strip() or None


def _status(value: object) -> str | None:
    """RFC 3464's ``Status``: an RFC 3463 code, class.subject.detail in ASCII digits (1 to
    3 each). str.isdigit() alone also takes other scripts' digits and "²"."""
    text = _plain(value).split(" ")[0]
    parts = text.split(".")
    if (
        len(parts) == 3
        and text.isascii()
        and parts[0] in ("2", "4", "5")
        and all(0 < len(p) <= 3 and p.isdigit() for p in parts)
    ):
        return text
    return None


def _smtp_code(diagnostic: str | None) -> int | None:
    """The reply code a ``smtp;`` diagnostic starts with: three ASCII digits (``int()``
    reads "4\u0665\u0660" as 450 and raises ValueError for "4\u00b20")."""
    head = (diagnostic or "")[:3]
    return int(head) if head.isascii() and head.isdigit() and head[0] in "45" else None


def _smtp_status(diagnostic: str | None, code: int | None) -> str | None:
    """The enhanced code after ``code`` in a ``smtp;`` diagnostic (``550 5.1.1 ...``, or
    ``550-5.1.1 ...`` for a multi-line reply), when it is of the same class."""
    if diagnostic is None or code is None or diagnostic[3:4] not in (" ", "-"):
        return None
    status = _status(diagnostic[4:].lstrip())
    return status if status is not None and status[0] == diagnostic[0] else None
