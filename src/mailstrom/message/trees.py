"""A stdlib ``Message`` tree as ``prepare()`` takes it: its fields checked before the
stdlib writes it, and the bytes it wrote checked to hold the parts and fields the tree
does.

Before: the stdlib stores what it is given and writes it as it is, on some Pythons
whatever it holds (see :func:`check_entity_headers`), so every entity's fields are
checked, within the bounds raw input has.

After: the stdlib writes a multipart's boundary as it finds it. One the caller gave
(``set_boundary()``, a Content-Type header, a parsed source) is not checked against the
parts' content, as one the writer makes up is: a part body or a preamble holding a
delimiter line of that boundary is read as more parts, or fewer, than the tree has —
parts nobody built, with header fields of the sender's choosing. So the bytes are read
back at the octet level (:mod:`~mailstrom.message.mime`, raw input's reader) along the
tree (:func:`check_written_tree`), and so are their header fields: the stdlib's folder
can break a line so that the rest reads as a field of its own.
"""

from __future__ import annotations

import bisect
import re
import string
from collections.abc import Iterable, Iterator
from email._header_value_parser import get_encoded_word
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader, DateHeader, UnstructuredHeader
from email.message import Message
from typing import NoReturn, cast

from mailstrom.errors import HeaderInjection, InvalidHeaderValue, InvalidMessage
from mailstrom.message import mime
from mailstrom.message.addresses import (
    ADDRESS_FIELDS,
    DROPPED_FIELDS,
    Group,
    mailboxes,
    parse_address_list,
)
from mailstrom.message.bounds import (
    MAX_HEADER_FIELDS,
    MAX_HEADER_SECTION,
    MAX_PARTS,
    MAX_STRUCTURED_TOKENS,
    section_too_long,
    structured_tokens,
    too_many_fields,
    too_many_parts,
)
from mailstrom.message.chars import (
    check_header_text,
    check_other_line_breaks,
    describe,
    shorten,
)
from mailstrom.message.encoding import has_bare_line_end
from mailstrom.message.envelope import DEFAULT_MAX_RECIPIENTS, MailboxCount
from mailstrom.message.headers import check_field_name, check_field_size
from mailstrom.message.identification import check_message_id
from mailstrom.message.policies import HEADER_FACTORY

_PARAMETERISED = frozenset({"content-type", "content-disposition"})
"""The fields whose values have MIME parameters (RFC 2045 §5.1, RFC 2183)."""


def check_entity_headers(message: Message, *, max_recipients: int = DEFAULT_MAX_RECIPIENTS) -> bool:
    """Refuse header fields of a stdlib message that would smuggle lines when written;
    return whether its own address fields hold a non-ASCII addr-spec.

    Every entity's fields are checked, not only the top level's: a compat32 part
    (``MIMEBase.add_header(..., filename=...)``) stores whatever it is given, and the
    stdlib writes a line break in it as header lines of that part (or as a blank line
    and a forged body) on Pythons without ``verify_generated_headers`` (before 3.11.10
    and 3.12.5), and with it on those before the fix of CVE-2026-1299. Raises
    :class:`HeaderInjection`, the field name and size errors of raw input, or
    :class:`InvalidMessage` for a tree that cannot be read.

    Its own address fields' mailboxes are counted as each field is first read, as
    prepare() counts a raw message's (:class:`~mailstrom.message.envelope.MailboxCount`,
    ``max_recipients``): 16 Bcc fields of 9,000 mailboxes were each parsed three times,
    13 s, before the message was refused; now it is refused with
    :class:`~mailstrom.errors.TooManyRecipients` at the first field past the bound.
    """
    counted = MailboxCount(max_recipients)
    utf8 = False
    try:
        for part in _entities(message):
            where = "the header section" if part is message else "a MIME part's header"
            if len(part) > MAX_HEADER_FIELDS:  # before the stdlib folds each of them
                raise too_many_fields(len(part), where=where)
            section = 2  # the empty line that ends it
            for name, raw_value in part.raw_items():
                groups: tuple[Group, ...] | None = None  # as our parser read the value
                check_field_name(name)
                text = str(raw_value)
                # Bounded before the stdlib folds it: its folder is quadratic in the length.
                check_field_size(name, len(name) + 2 + len(text))
                # And so is their sum, as raw input's is: each field within its bound
                # still made a section of 64 MiB for the stdlib to fold first.
                section += len(name) + 4 + len(text)
                if section > MAX_HEADER_SECTION:
                    raise section_too_long(section, where=where)
                if hasattr(raw_value, "defects"):
                    # A policy-made header object was checked for CR/LF when it was set
                    # from a string, and holds its value unfolded.
                    if "\r" in text or "\n" in text:
                        _injection(name, text)
                    # And holds it decoded: a control character in a value with a
                    # non-ASCII one was written inside an RFC 2047 word or an RFC 2231
                    # parameter, where the checks of the written octets never see it.
                    _check_object_text(name, raw_value, text)
                else:
                    # Raw strings (compat32, or parsed source) may only break lines to
                    # fold them.
                    _check_folding(name, text)
                    check_other_line_breaks(name, text)
                    groups = _check_structured(name, text, top=part is message)
                    _check_decoded(name, text)
                if name.lower() in _PARAMETERISED:
                    _check_parameter_names(name, raw_value, text)
                if name.lower() not in ADDRESS_FIELDS:
                    continue
                if part is not message:
                    utf8 = utf8 or _may_hold_utf8_address(name, raw_value, text)
                    continue
                if hasattr(raw_value, "defects"):
                    # Parsed by the stdlib when it was set; its addresses are not counted.
                    found = not utf8 and _has_utf8_address(name, raw_value)
                else:
                    if groups is None:
                        groups = _read_address_list(name, text, refuse=not utf8)
                    if groups is not None:
                        counted.add(groups)
                    found = groups is not None and any(
                        box.address.smtputf8 for box in mailboxes(groups)
                    )
                # A dropped field is never sent (prepare() drops it): a UTF-8 address
                # there needs SMTPUTF8 in its own transaction's envelope only, and made
                # every other field raw UTF-8, so that the To and Cc recipients failed at
                # servers without SMTPUTF8 (5.6.7). Still parsed, for the InvalidAddress
                # a bad one raises.
                if name.lower() not in DROPPED_FIELDS:
                    utf8 = utf8 or found
    except InvalidMessage:
        raise
    except Exception as exc:  # a hand-made Message can hold anything
        raise InvalidMessage(f"the EmailMessage cannot be read: {exc!r}") from exc
    return utf8


def least_written_size(message: Message) -> int:
    """A lower bound on the octets the stdlib writes for ``message``: its leaves'
    payloads, which it holds already encoded and writes at least as long (a line end may
    become CRLF, a character several octets). ``message`` has been walked by
    :func:`check_entity_headers`, which bounds the tree."""
    size = 0
    for part in _entities(message):
        if not part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, str | bytes):
                size += len(payload)
    return size


def check_payloads(message: Message) -> None:
    """Refuse a leaf payload of ``message`` that the stdlib cannot write as it is given:

    - one labelled ``Content-Transfer-Encoding: binary`` whose content holds a bare CR or
      LF: the stdlib writes each as a line end, CRLF, and the part arrived with other
      octets than it was given (see
      :func:`~mailstrom.message.encoding.check_binary_line_ends`, raw input's check);
    - a str with non-ASCII characters and no charset to encode them in
      (``set_payload("hé")``): the stdlib's 'ascii' codec error read as a header's;
    - a str holding a lone surrogate that carries no octet (surrogateescape carries
      U+DC80-U+DCFF, and then only ASCII may stand beside them): the stdlib's
      ``get_payload()`` raised UnicodeEncodeError reading it.

    ``message`` has been walked by :func:`check_entity_headers`, which bounds the tree."""
    for part in _entities(message):
        if part.is_multipart():
            continue
        try:
            raw = part.get_payload()
        except UnicodeEncodeError as exc:
            char = describe(exc.object[exc.start])
            raise InvalidMessage(
                f"a {part.get_content_type()} part's body cannot be read: it holds lone "
                f"surrogates, and {char} where only ASCII or an octet carried by "
                "surrogateescape (U+DC80-U+DCFF) may stand; set it with set_content(text) "
                "or set_payload(octets)"
            ) from None
        if (
            isinstance(raw, str)
            and not raw.isascii()
            and part.get_content_charset() is None
            and not _surrogates(raw)
        ):
            # What set_payload(text, charset) and set_content() hold is encoded already,
            # or octets carried as surrogates, which the stdlib writes as they are.
            raise InvalidMessage(
                f"a {part.get_content_type()} part's body is text with non-ASCII "
                f"characters ({shorten(raw, 40)}) but no charset to encode them in; set it "
                "with set_content(text) or set_payload(text, 'utf-8')"
            )
        if str(part.get("Content-Transfer-Encoding", "")).strip().lower() != "binary":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and has_bare_line_end(payload):
            raise mime.binary_line_end(part.get_content_type())


def _surrogates(text: str) -> bool:
    """Whether ``text`` carries octets as lone surrogates (``surrogateescape``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _entities(message: Message) -> Iterator[Message]:
    """Every entity of ``message``, itself first, within the bounds raw input has
    (:data:`~mailstrom.message.mime.MAX_DEPTH` levels, :data:`MAX_PARTS` entities).

    The stdlib walks and writes a message recursively: a hand-made tree a few thousand
    levels deep raised :class:`RecursionError` from ``prepare()``.
    """
    count = 0
    pending: list[tuple[Message, int]] = [(message, 0)]
    while pending:
        part, depth = pending.pop()
        count += 1
        if count > MAX_PARTS:
            raise too_many_parts()
        if depth > mime.MAX_DEPTH:
            raise mime.nesting_too_deep()
        yield part
        children = part.get_payload() if part.is_multipart() else None
        for child in reversed(children) if isinstance(children, list) else ():
            if not isinstance(child, Message):
                raise InvalidMessage(
                    f"a multipart's parts must be messages, not {type(child).__name__}"
                )
            pending.append((child, depth + 1))


def _read_address_list(name: str, text: str, *, refuse: bool) -> tuple[Group, ...] | None:
    """The groups of a top-level address field's raw ``text``; one our parser cannot read
    is refused as it refuses it (``refuse``), or else None: once an address field has
    made the message UTF-8, the rest were not read here, and one that is no address list
    is refused as before, by whatever reads it first after."""
    try:
        return parse_address_list(name, text.replace("\r\n", "").replace("\n", ""))
    except InvalidMessage:
        if refuse:
            raise
        return None


def _has_utf8_address(name: str, value: object) -> bool:
    """Whether an address of the field has a UTF-8 local part. A U-label domain alone
    does not count: it is written as its A-label (RFC 2047 words may not stand in an
    addr-spec, but an A-label may), so the message needs no SMTPUTF8 for it."""
    if isinstance(value, AddressHeader):
        return any(not address.username.isascii() for address in value.addresses)
    text = str(value).replace("\r\n", "").replace("\n", "")
    return any(box.address.smtputf8 for box in mailboxes(parse_address_list(name, text)))


def _may_hold_utf8_address(name: str, value: object, text: str) -> bool:
    """:func:`_has_utf8_address` for an attached message's field, which is only carried:
    one that is no valid address list is not refused, and is written as raw UTF-8 when
    it is not ASCII, rather than as encoded words the stdlib would put in an addr-spec."""
    if text.isascii():
        return False
    try:
        return _has_utf8_address(name, value)
    except InvalidMessage:
        return True


def _check_folding(name: str, value: str) -> None:
    lines = value.replace("\r\n", "\n").split("\n")
    for line in lines[1:]:
        if not line.startswith((" ", "\t")) or "\r" in line:
            _injection(name, value)
    if "\r" in lines[0]:
        raise HeaderInjection(f"{name} header value contains a bare CR: {value!r}", header=name)


def _check_structured(name: str, value: str, *, top: bool) -> tuple[Group, ...] | None:
    """Refuse a raw structured value of over :data:`MAX_STRUCTURED_TOKENS` tokens that the
    stdlib would parse, in work growing with their number times the length, and ours
    cannot read: an address list is read by our linear parser instead
    (:func:`_own_reading`), and refused as it refuses it. Return its groups when it was
    read so, else None."""
    if not _parsed_as_structured(name):
        return None
    if structured_tokens(value) is None:
        return None
    groups = _own_reading(name, value, top=top)
    if groups is not None:
        return groups
    raise InvalidHeaderValue(
        f"the {name} header has more than {MAX_STRUCTURED_TOKENS} tokens (words, special "
        f"characters, runs of white space); real ones have a few dozen: {shorten(value)}",
        header=name,
    )


def _parsed_as_structured(name: str) -> bool:
    """Whether the stdlib's parser reads the field ``name`` as structured: unstructured
    text (mailstrom.message.unstructured) and dates (``parsedate_tz``) are read in linear
    work."""
    return not issubclass(HEADER_FACTORY[name], (UnstructuredHeader, DateHeader))


def _own_reading(name: str, value: str, *, top: bool) -> tuple[Group, ...] | None:
    """The groups of ``value`` when our linear parser reads it, an address list (the
    writer then folds it as the builder does, see ``encoding._SMTPPolicy``), else None.
    At the top level a value it cannot read is refused as it refuses it, and so is a
    Message-ID that is no msg-id: the message would be refused for them after the writer
    anyway."""
    key = name.lower()
    if key in ADDRESS_FIELDS:
        try:
            return parse_address_list(name, "".join(value.splitlines()))
        except InvalidMessage:
            if top:
                raise
            return None  # an attached message's field is carried, not read
    if key == "message-id" and top:
        # Refused as raw input's check refuses it; a valid one is still bounded: the
        # stdlib's writer parses it (real ones are a few dozen tokens).
        check_message_id("".join(value.splitlines()))
    return None


def _check_decoded(name: str, value: str) -> None:
    """Refuse a raw value that decodes to CR or LF: an RFC 2047 word in it, or an RFC 2231
    parameter (``filename*=utf-8''%0D%0AX-Injected%3A%201``).

    The stdlib's writer refolds a raw value that is long (or not ASCII, with raw UTF-8
    headers) by parsing it as ``policy.default`` does, which decodes both, even an encoded
    word inside a parameter, and writes what they decode to: on 3.11.7 a long Subject
    holding ``=?utf-8?q?=0D=0AX-Injected:_1?=`` became a header field. A header object set
    from such a string holds its decoded value, and is checked on that.
    """
    if "=?" not in value and ("%" not in value or name.lower() not in _PARAMETERISED):
        return
    if _parsed_as_structured(name) and structured_tokens(value) is not None:
        # Read by our own parser (_check_structured), not to be handed to the stdlib's.
        _check_encoded_words(name, "".join(value.splitlines()))
        return
    try:
        decoded = str(HEADER_FACTORY(name, "".join(value.splitlines())))
    except Exception:
        return  # nor can the writer parse it: serialise() raises InvalidMessage
    if "\r" in decoded or "\n" in decoded:
        raise HeaderInjection(
            f"{name} header value holds an encoded word or parameter that decodes to a "
            f"line break: {shorten(value)}",
            header=name,
        )


def _check_encoded_words(name: str, value: str) -> None:
    """Refuse ``value`` if any encoded word the stdlib's parser could read in it decodes to
    CR or LF, wherever it stands, in work linear in the length.

    The parser takes an encoded word at a "=?" as ``get_encoded_word`` does: to the first
    "?=" after it, or to the second when two hex digits follow the first and the word had
    fewer than two "?"; only a word with exactly two "?" inside decodes. The "?" of each
    "=?" inside one counts among them: at most two others start within it, so each
    character is decoded a few times at most."""
    opens = [match.start() for match in re.finditer(r"=\?", value)]
    if not opens:
        return
    closes = [match.start() for match in re.finditer(r"\?=", value)]
    marks = [match.start() for match in re.finditer(r"\?", value)]
    for start in opens:
        body = start + 2
        first = bisect.bisect_left(closes, body)
        if first == len(closes):
            return  # nor after any later "=?"
        end = closes[first]
        after = value[end + 2 : end + 4]
        questions = bisect.bisect_left(marks, end) - bisect.bisect_left(marks, body)
        if len(after) == 2 and all(c in string.hexdigits for c in after) and questions < 2:
            second = bisect.bisect_left(closes, end + 2)
            end = closes[second] if second < len(closes) else len(value)
            questions = bisect.bisect_left(marks, end) - bisect.bisect_left(marks, body)
        if questions != 2:
            continue  # _ew.decode() cannot split it: no encoded word
        try:
            # Read alone, the word ends at the same "?=": no other is inside it but one
            # followed by hex digits, which the parser reads past as it did.
            text = str(get_encoded_word(f"=?{value[body:end]}?=")[0])
        except HeaderParseError:
            continue  # nor can the parser decode it
        if "\r" in text or "\n" in text:
            raise HeaderInjection(
                f"{name} header value holds an encoded word that decodes to a line "
                f"break: {shorten(value)}",
                header=name,
            )


MAX_PARAMETER_NAME = 40
"""Longest MIME parameter name taken from a stdlib message (RFC 2045 §5.1 sets none).

The stdlib's writer splits a long parameter into RFC 2231 sections of the line length
less the name (``email._header_value_parser._fold_mime_parameters``); for a name of 60
characters or so nothing of the value fits, and on 3.11.7 it loops for ever. Real names
(``filename``, ``boundary``, ``creation-date``) are short."""

# A run of characters long enough to hold a parameter name over the bound: only then is a
# raw value parsed to find its names.
_LONG_RUN = re.compile(rf"[^\s;=]{{{MAX_PARAMETER_NAME + 1},}}")


def _check_parameter_names(name: str, value: object, text: str) -> None:
    """Refuse a Content-Type or Content-Disposition value with a parameter name over
    :data:`MAX_PARAMETER_NAME` characters, before the stdlib's writer hangs on it."""
    params: Iterable[str] | None = getattr(value, "params", None)
    if params is None:  # a raw string: parsed as the writer does when it refolds it
        if _LONG_RUN.search(text) is None:
            return
        try:
            params = getattr(HEADER_FACTORY(name, "".join(text.splitlines())), "params", ())
        except Exception:
            return  # nor can the writer parse it: serialise() raises InvalidMessage
    for param in params:
        if len(param) > MAX_PARAMETER_NAME:
            raise InvalidHeaderValue(
                f"the {name} header has a parameter name of {len(param)} characters, "
                f"{shorten(param, 60)}; the limit is {MAX_PARAMETER_NAME}",
                header=name,
            )


def _check_object_text(name: str, header: object, text: str) -> None:
    """The rule of :func:`~mailstrom.message.chars.check_header_text` for a header object's
    value and its MIME parameters, decoded, as for every other header value."""
    check_header_text(name, text)
    params = getattr(header, "params", None)
    if params:
        for value in params.values():
            if isinstance(value, str):
                check_header_text(name, value)


def _injection(name: str, value: str) -> NoReturn:
    raise HeaderInjection(
        f"{name} header value contains a line break that is not folding: {shorten(value)}",
        header=name,
    )


def check_written_tree(message: Message, data: bytes) -> None:
    """Raise :class:`InvalidMessage` if ``data`` (``message`` as the stdlib wrote it, CRLF
    line ends) reads back with other parts than ``message`` holds, or an entity with a
    header line that is none of its fields (:class:`HeaderInjection`).

    ``message`` has been walked within the bounds already (:func:`check_entity_headers`):
    every multipart's parts are messages, and the tree is at most
    :data:`~mailstrom.message.mime.MAX_DEPTH` deep.
    """
    pending = [(message, 0, len(data), "text/plain")]
    while pending:
        node, start, end, default = pending.pop()
        _check_written_fields(node, data[start : _written_head_end(data, start, end)])
        if not node.is_multipart():
            continue  # a leaf's body is checked as the parts around it are
        # A list of messages: check_entity_headers refused anything else in one.
        children = cast("list[Message]", node.get_payload())
        item = mime.entity(data, start, end, default=default)
        if item.maintype == "message" and children:
            # The writer writes the first message of a message/* part only, and whatever
            # its Content-Transfer-Encoding says, as the stdlib's reader reads it.
            pending.append((children[0], item.body, item.end, "text/plain"))
        elif item.maintype == "multipart":
            untyped = "message/rfc822" if item.content_type == "multipart/digest" else "text/plain"
            spans = _part_spans(item, len(children))
            pending.extend(
                (child, part_start, part_end, untyped)
                for child, (part_start, part_end) in zip(children, spans, strict=False)
            )


def _written_head_end(data: bytes, start: int, end: int) -> int:
    """Where the header section the writer wrote at ``data[start:end]`` ends: after its
    empty line, whatever comes before it. A reader ends it at a line that is no field
    (:func:`~mailstrom.message.mime.body_start`); here such a line is checked, and
    refused, rather than taken for the start of the body."""
    if data.startswith(b"\r\n", start) or start >= end:
        return min(start + 2, end)
    blank = data.find(b"\r\n\r\n", start, end)
    if blank != -1:
        return blank + 4
    return end if _FIELD.match(data, start, end) else start


WRITER_FIELDS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
"""Fields the stdlib's writer may add to an entity: Content-Type when it gives a multipart
a boundary (``set_boundary``), and all three when it re-encodes a payload
(``set_payload(payload, charset)``)."""

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def _check_written_fields(node: Message, head: bytes) -> None:
    """Refuse a header line the writer wrote for ``node`` that is neither a field of it
    nor a continuation line.

    The stdlib's folder can break a line before a comment without the white space that
    makes the rest a continuation: ``Content-Type: application/xxx…(X-Injected: 1)``
    was written with ``(X-Injected: 1)`` as a field of its own.
    """
    written = (
        head.count(b"\r\n")
        - head.count(b"\r\n ")
        - head.count(b"\r\n\t")
        - head.endswith(b"\r\n\r\n")  # the empty line that ends the section
    )
    if written == len(node):
        # As many lines start a field as the node has fields, and the writer writes
        # each of them: no line was added (counted at C speed: most messages stop here).
        return
    names: set[str] | None = None
    field = "(none)"
    for line in head.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        match = _FIELD.match(line)
        if match is not None:
            if names is None:
                names = {key.lower() for key in node} | WRITER_FIELDS
            if match[1].decode("ascii").lower() in names:
                field = match[1].decode("ascii")
                continue
        raise HeaderInjection(
            f"the stdlib wrote the {field} field with a line that does not continue it: "
            f"{shorten(line.decode('latin-1'))} (it could not fold the value; shorten or "
            "change it)",
            header=field,
        )


def _part_spans(item: mime.Entity, parts: int) -> tuple[tuple[int, int], ...]:
    """The spans of the ``parts`` parts of the multipart ``item``, read back."""
    found = mime.layout(item)
    opening, closing = mime.delimiter_lines(item)
    # An empty multipart is written with one empty part: RFC 2046 §5.1.1 requires one.
    if found is None or opening != max(parts, 1) or closing != 1:
        shown = "(none)" if item.boundary is None else shorten(item.boundary.decode("ascii"))
        raise InvalidMessage(
            f"the boundary {shown} of a multipart holding {parts} part(s) was written in "
            f"{opening} delimiter line(s) and {closing} close delimiter(s): it also occurs "
            "in the parts' content (or reads back otherwise than the writer used it), so "
            "receivers would read other parts; leave it unset for the stdlib to choose "
            "one that occurs nowhere else"
        )
    return found.parts
