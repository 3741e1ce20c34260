"""Address headers: parse an address list into validated mailboxes, and write one back.

The parser reads RFC 5322 §3.4 ``address-list`` syntax (display names, quoted strings,
comments, groups) in one left-to-right pass, so its cost is linear in the value's length
(the stdlib parser slices the remaining text at every token, which is quadratic: a To
list of 20,000 addresses took seconds). Every addr-spec found is validated once by
:mod:`mailstrom.message.addrspec`, and the result is a tuple of :class:`Group` values that
the envelope and the renderer use without validating again.

Refused rather than guessed, because a guess could send mail to the wrong place: obsolete
forms with white space or comments inside an addr-spec, routes (``<@a:b@c>``), an
unquoted comma in a display name, and RFC 2047 encoded words inside an addr-spec.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.header import decode_header

from mailstrom.errors import InvalidAddress, UnencodableHeader
from mailstrom.message.addrspec import ValidAddress, envelope_key, validate
from mailstrom.message.chars import check_header_text, shorten
from mailstrom.message.words import fold, phrase, unstructured_field

ADDRESS_FIELDS = (
    *("from", "sender", "reply-to", "to", "cc", "bcc"),
    *("resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc"),
)
"""Header fields whose values are address lists (lower-case), the resent ones (RFC 5322
§3.6.6) included."""
DROPPED_FIELDS = frozenset({"bcc", "resent-bcc"})
"""Address fields ``prepare()`` reads for the envelope and then removes, never sent."""
EXTRA_ADDRESS_FIELDS = frozenset(
    {
        "disposition-notification-to",  # RFC 8098 §2.1
        "mail-followup-to",
        "mail-reply-to",
        "return-receipt-to",
        "errors-to",
    }
)
"""Address-list fields a sender may add (lower-case): written as addresses, never as one
RFC 2047 word, when they are not ASCII."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A validated mailbox: display name (``""`` when none) and address forms."""

    name: str
    address: ValidAddress


@dataclass(frozen=True, slots=True)
class Group:
    """An RFC 5322 group, or (``name`` None) a lone mailbox outside any group."""

    name: str | None
    mailboxes: tuple[Mailbox, ...]


_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
# The common shapes "local@domain" and "Plain Name <local@domain>", which need no parser.
_ATOMS = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_SIMPLE = re.compile(
    rf"(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) <(?P<l1>{_ATOMS})@(?P<d1>{_ATOMS})>"
    rf"|(?P<l2>{_ATOMS})@(?P<d2>{_ATOMS}))"
)
# One token of an address list; "(" starts a comment, scanned by hand (comments nest).
# Atoms may hold non-ASCII (RFC 6532 §3.2); control characters never get this far.
_TOKEN = re.compile(
    r"(?P<ws>[ \t]+)"
    rf"|(?P<atom>[{_ATEXT}\x80-\U0010ffff]+)"
    r'|(?P<qs>"(?:[^"\\]|\\.)*")'
    r"|(?P<lit>\[[^\[\]\\]*\])"
    r"|(?P<sp>[<>@,;:.])"
    r"|(?P<cmt>\()",
    re.DOTALL,
)
_ENCODED_WORD = re.compile(r"=\?[^?]+\?[bBqQ]\?[^?]*\?=")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ws is dropped; "atom", "qs", "lit" or "sp"
    text: str
    space: str  # the white space before it ("" if none; a comment counts as " ")


CACHED_VALUE_LENGTH = 256
"""Longest address-list value whose parse is cached, in characters.

Senders repeat the same few addresses, so short values are cached; a long list is
parsed each time. A cache keyed by any value would keep up to 4,096 parses of 64 KiB
headers (each many times that size once parsed), including those of refused messages:
gigabytes. 256 characters hold a few mailboxes with display names, which covers the From,
Sender, Reply-To and To of nearly all real mail; the cache then stays within a few MB."""


def parse_address_list(field: str, value: str) -> tuple[Group, ...]:
    """Parse and validate one address-list header value (without line breaks).

    >>> parse_address_list("To", "Ann <ann@example.org>, Team: b@example.org;")[1].name
    'Team'

    Raises :class:`InvalidAddress` (malformed list, bad addr-spec) and the character
    errors of :func:`~mailstrom.message.chars.check_header_text`. The results for
    values of at most :data:`CACHED_VALUE_LENGTH` characters are cached.
    """
    if len(value) <= CACHED_VALUE_LENGTH:
        return _parse_cached(field, value)
    return _parse_address_list(field, value)


def _parse_address_list(field: str, value: str) -> tuple[Group, ...]:
    check_header_text(field, value)
    simple = _SIMPLE.fullmatch(value.strip(" \t"))
    if simple is not None:
        if simple["name"] is not None:
            box = Mailbox(simple["name"], _validate(field, value, simple["l1"], simple["d1"]))
        else:
            box = Mailbox("", _validate(field, value, simple["l2"], simple["d2"]))
        return (Group(None, (box,)),)
    return _Parser(field, value).address_list()


_parse_cached = functools.lru_cache(maxsize=4096)(_parse_address_list)


_LOCALHOSTS = frozenset({"localhost", "localhost.localdomain"})


def is_localhost(domain: str) -> bool:
    """Whether ``domain`` is ``localhost`` or a name under it (RFC 6761 §6.3: always this
    machine), or ``localhost.localdomain``, which no mail can be sent to: a name there is
    a local name. The last is this machine in Red Hat's /etc/hosts, and in Postfix's
    default mydestination (``localhost.$mydomain``) on a host without a domain, whose
    mydomain is then ``localdomain``; other names under ``localdomain`` may be other
    machines of a network, and are not."""
    domain = domain.lower()
    return domain in _LOCALHOSTS or domain.endswith(".localhost")


def parse_local_address_list(field: str, value: str, origin: str) -> tuple[Group, ...]:
    """:func:`parse_address_list`, but an addr-spec without a domain (a bare local name
    such as ``root``, as local programs write them), or at :func:`is_localhost`
    (``root@localhost``, fail2ban's default), gets ``origin`` as its domain. The
    sendmail personality checks its fields with this: the stdlib parser it qualifies
    them with keeps only the first word of ``To: Bob Smith`` (``Bob``), another mailbox.
    """
    check_header_text(field, value)
    return _Parser(field, value, origin=origin).address_list()


def parse_mailbox(role: str, value: str) -> Mailbox:
    """Exactly one mailbox (``addr`` or ``Name <addr>``), e.g. an explicit envelope address."""
    groups = parse_address_list(role, value)
    if len(groups) != 1 or groups[0].name is not None or len(groups[0].mailboxes) != 1:
        raise InvalidAddress(
            f"{role} must be exactly one address, got {shorten(value)}", address=value
        )
    return groups[0].mailboxes[0]


def mailboxes(groups: Iterable[Group]) -> list[Mailbox]:
    """All mailboxes of ``groups``, group members included, in order."""
    return [box for group in groups for box in group.mailboxes]


def _validate(field: str, value: str, local: str, domain: str) -> ValidAddress:
    try:
        return validate(local, domain)
    except InvalidAddress as exc:
        if exc.address == value:
            raise
        # Say which header it came from; ``address`` stays the addr-spec at fault.
        raise InvalidAddress(f"{field}: {exc.reason}", address=exc.address) from None


class _Parser:
    """One pass over the tokens of an address list (RFC 5322 §3.4, obs-addr-list)."""

    def __init__(self, field: str, value: str, *, origin: str | None = None) -> None:
        self.field = field
        self.value = value
        self.origin = origin
        """The domain of an addr-spec without one; None: such an addr-spec is refused."""
        self.tokens = self._tokenize()
        self.pos = 0

    def fail(self, why: str) -> InvalidAddress:
        return InvalidAddress(
            f"{self.field} header is malformed ({why}): {shorten(self.value)}",
            address=self.value,
        )

    def _tokenize(self) -> list[_Token]:
        value = self.value
        tokens: list[_Token] = []
        space = ""
        pos = 0
        while pos < len(value):
            match = _TOKEN.match(value, pos)
            if match is None:
                char = value[pos]
                if char == '"':
                    raise self.fail("a quoted string is not closed")
                raise self.fail(f"unexpected {char!r} at position {pos}")
            kind = match.lastgroup
            assert kind is not None
            if kind == "ws":
                space += match.group()
                pos = match.end()
            elif kind == "cmt":
                pos = self._skip_comment(pos)
                space = space or " "
            else:
                tokens.append(_Token(kind, match.group(), space))
                space = ""
                pos = match.end()
        return tokens

    def _skip_comment(self, pos: int) -> int:
        depth = 0
        value = self.value
        while pos < len(value):
            char = value[pos]
            if char == "\\":
                pos += 2
                continue
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    return pos + 1
            pos += 1
        raise self.fail("a comment is not closed")

    def _is(self, index: int, text: str) -> bool:
        return (
            index < len(self.tokens)
            and self.tokens[index].kind == "sp"
            and self.tokens[index].text in text
        )

    def address_list(self) -> tuple[Group, ...]:
        groups: list[Group] = []
        tokens = self.tokens
        while self.pos < len(tokens):
            if self._is(self.pos, ","):  # an empty list element (RFC 5322 §4.4)
                self.pos += 1
                continue
            end = self._scan(self.pos)
            if self._is(end, ":"):
                groups.append(self._group(end))
            else:
                groups.append(Group(None, (self._mailbox(in_group=False),)))
            if self.pos < len(tokens):
                if not self._is(self.pos, ","):
                    raise self.fail(f"unexpected {shorten(tokens[self.pos].text)} after an address")
                self.pos += 1
        return tuple(groups)

    def _scan(self, index: int) -> int:
        """Index of the first ``, ; : <`` at or after ``index`` (or the end)."""
        while index < len(self.tokens) and not self._is(index, ",;:<"):
            index += 1
        return index

    def _group(self, colon: int) -> Group:
        if colon == self.pos:
            raise self.fail("a group needs a name before ':'")
        name = self._phrase(self.pos, colon)
        self.pos = colon + 1
        members: list[Mailbox] = []
        while True:
            if self.pos >= len(self.tokens):
                raise self.fail(f"the group {shorten(name)} is not closed with ';'")
            if self._is(self.pos, ";"):
                self.pos += 1
                return Group(name, tuple(members))
            if self._is(self.pos, ","):
                self.pos += 1
                continue
            members.append(self._mailbox(in_group=True))
            if not self._is(self.pos, ",;"):
                if self.pos >= len(self.tokens):
                    raise self.fail(f"the group {shorten(name)} is not closed with ';'")
                raise self.fail(f"unexpected {shorten(self.tokens[self.pos].text)} in a group")

    def _mailbox(self, *, in_group: bool) -> Mailbox:
        start = self.pos
        end = self._scan(start)
        if self._is(end, ":"):
            raise self.fail("a group inside a group" if in_group else "unexpected ':'")
        if self._is(end, ";") and not in_group:
            raise self.fail("';' outside a group")
        if not self._is(end, "<"):
            self.pos = end
            return Mailbox("", self._addr_spec(start, end))
        name = self._phrase(start, end) if end > start else ""
        close = end + 1
        while close < len(self.tokens) and not self._is(close, ">"):
            if self._is(close, "<:,;"):
                raise self.fail("'<' without a matching '>'")
            close += 1
        if close >= len(self.tokens):
            raise self.fail("'<' without a matching '>'")
        self.pos = close + 1
        return Mailbox(name, self._addr_spec(end + 1, close))

    def _addr_spec(self, start: int, end: int) -> ValidAddress:
        tokens = self.tokens[start:end]
        if not tokens:
            raise self.fail("an empty address")
        at = max((i for i, t in enumerate(tokens) if t.kind == "sp" and t.text == "@"), default=-1)
        if at == -1 and self.origin is not None:
            local = self._dot_atom(tokens, "a local name", quoted_ok=True)
            return _validate(self.field, self.value, local, self.origin)
        if at == -1:
            # The words as written, one space where there was white space or a comment:
            # "not an address" is not reported as 'notanaddress'.
            shown = "".join((" " if i and t.space else "") + t.text for i, t in enumerate(tokens))
            raise self.fail(f"{shorten(shown)} is not an address: it has no @-sign")
        if tokens[0].kind == "sp" and tokens[0].text == "@":
            raise self.fail("an address starts with '@' (source routes are not supported)")
        local = self._dot_atom(tokens[:at], "the part before the @-sign", quoted_ok=True)
        domain = self._dot_atom(tokens[at + 1 :], "the part after the @-sign", quoted_ok=False)
        if self.origin is not None and is_localhost(domain):
            domain = self.origin  # a local name, as a bare one is
        return _validate(self.field, self.value, local, domain)

    def _dot_atom(self, tokens: Sequence[_Token], what: str, *, quoted_ok: bool) -> str:
        if not tokens:
            raise self.fail(f"{what} is empty")
        if len(tokens) == 1 and (tokens[0].kind == ("qs" if quoted_ok else "lit")):
            return tokens[0].text
        for index, token in enumerate(tokens):
            expected = "atom" if index % 2 == 0 else "sp"
            if token.kind != expected or (expected == "sp" and token.text != "."):
                raise self.fail(f"{what} is not a dot-atom or a quoted string")
            if index and token.space:
                raise self.fail(f"{what} has white space or a comment inside it")
        if len(tokens) % 2 == 0:
            raise self.fail(f"{what} ends with a dot")
        return "".join(token.text for token in tokens)

    def _phrase(self, start: int, end: int) -> str:
        words: list[str] = []
        previous_encoded = False
        for token in self.tokens[start:end]:
            encoded = False
            if token.kind == "atom":
                text = token.text
                if "=?" in text and _ENCODED_WORD.fullmatch(text):
                    text, encoded = _decode_word(text)
            elif token.kind == "qs":
                text = _QUOTED_PAIR.sub(r"\1", token.text[1:-1])
            elif token.kind == "sp" and token.text == ".":
                text = "."  # obs-phrase: "John Q. Public" (RFC 5322 §4.1)
            else:
                raise self.fail(f"unexpected {shorten(token.text)} in a display name")
            # White space between two encoded words is not part of the text (RFC 2047 §6.2).
            if words and token.space and not (encoded and previous_encoded):
                words.append(token.space)
            words.append(text)
            previous_encoded = encoded
        name = "".join(words)
        check_header_text(f"{self.field} display name", name)
        return name


def _decode_word(word: str) -> tuple[str, bool]:
    """An RFC 2047 word decoded, or the word itself when it cannot be decoded."""
    try:
        [(data, charset)] = decode_header(word)
        if isinstance(data, str) or charset is None:
            return word, False
        return data.decode(charset, errors="replace"), True
    except (LookupError, ValueError):
        return word, False


def format_address_field(name: str, groups: Sequence[Group], *, utf8: bool) -> str:
    """Render an address header line (without the final CRLF), folded near 78 characters.

    Display names become plain atoms, a quoted string, or RFC 2047 words (raw UTF-8 when
    ``utf8``, RFC 6532); addr-specs are the validated header forms. A line breaks only
    at the spaces between words, so a long list of encoded names keeps every comma.
    """
    pieces: list[tuple[str, str]] = []
    for group in groups:
        separator = ", " if pieces else " "
        if group.name is not None:
            words = phrase(group.name, utf8=utf8)
            # An encoded word must end at white space or a special that readers accept
            # after it; some (the stdlib) want white space before the colon.
            colon = " :" if words[-1].endswith("?=") else ":"
            words[-1] += colon if group.mailboxes else colon + ";"
            pieces.extend((separator if i == 0 else " ", w) for i, w in enumerate(words))
            separator = " "
        for index, box in enumerate(group.mailboxes):
            if index:
                separator = ", "
            words = (
                [*phrase(box.name, utf8=utf8), f"<{box.address.header}>"]
                if box.name
                else [box.address.header]
            )
            if group.name is not None and index == len(group.mailboxes) - 1:
                words[-1] += ";"
            pieces.extend((separator if i == 0 else " ", w) for i, w in enumerate(words))
    return _fold_list(f"{name}:", pieces)


def extra_field(name: str, value: str, *, utf8: bool) -> str:
    """An added header field, as :func:`~mailstrom.message.words.unstructured_field`
    writes it, except a non-ASCII one of :data:`EXTRA_ADDRESS_FIELDS`: that is an address
    list, written as :func:`format_address_field` does (names encoded, a U-label domain
    as its A-label). RFC 2047 words may not stand in an addr-spec (RFC 2047 §5): encoded
    as text, ``Disposition-Notification-To: Jörg <bob@bücher.example>`` became one word
    that names no address. A UTF-8 local part needs UTF-8 header fields (``utf8``); else
    :class:`~mailstrom.errors.UnencodableHeader`; a bad address :class:`InvalidAddress`.
    """
    if value.isascii() or name.lower() not in EXTRA_ADDRESS_FIELDS:
        return unstructured_field(name, value, utf8=utf8)
    groups = parse_address_list(name, value)
    if not utf8 and any(box.address.smtputf8 for box in mailboxes(groups)):
        raise UnencodableHeader(
            f"{name} holds an address with a UTF-8 local part, which cannot be RFC 2047 "
            "encoded (RFC 2047 §5); it needs UTF-8 header fields (an address with a UTF-8 "
            "local part in From, To or Cc, or a raw message)"
        )
    return format_address_field(name, groups, utf8=utf8)


def _fold_list(start: str, pieces: list[tuple[str, str]]) -> str:
    # A ", " separator folds as "," at the end of the line and " " at the start of the next.
    out: list[tuple[str, str]] = []
    for space, text in pieces:
        if space == ", ":
            if out:
                out[-1] = (out[-1][0], out[-1][1] + ",")
            space = " "
        out.append((space, text))
    return fold(start, out)


def dedupe(addresses: Iterable[str]) -> tuple[str, ...]:
    """Drop repeated envelope addresses, first seen wins.

    The domain is compared case-insensitively, the local part exactly (RFC 5321 §2.4).
    Envelope forms already have lower-case domains, but callers may pass others.
    """
    seen: set[tuple[str, str]] = set()
    kept: list[str] = []
    for address in addresses:
        key = envelope_key(address)
        if key not in seen:
            seen.add(key)
            kept.append("@".join(key))
    return tuple(kept)
