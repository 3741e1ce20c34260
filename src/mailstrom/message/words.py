"""Header text: RFC 2047 encoded words, folding, and RFC 2231 parameter values.

The encodings themselves come from the stdlib (``email.quoprimime``,
``email.base64mime``, ``email.utils.encode_rfc2231``); this module decides what to
encode and where to break lines. Every function is linear in the length of its input:
each character is looked at a fixed number of times (the stdlib's own folder is
quadratic, which made a 1 MB subject take 44 s).
"""

from __future__ import annotations

import base64
import re
from email import base64mime, quoprimime
from email.utils import encode_rfc2231

from mailstrom.errors import LineTooLong, UnencodableHeader
from mailstrom.message.chars import shorten

MSG_ID_FIELDS = frozenset({"in-reply-to", "references", "content-id", "resent-message-id"})
"""Fields of msg-ids (RFC 5322 §3.6.4, RFC 2045 §7), lower-case: never RFC 2047 encoded."""

URI_FIELDS = frozenset(
    {
        "list-help",  # RFC 2369 §3
        "list-unsubscribe",
        "list-subscribe",
        "list-post",
        "list-owner",
        "list-archive",
        "list-unsubscribe-post",  # RFC 8058 §3.1: List-Unsubscribe=One-Click
        "archived-at",  # RFC 5064 §2
    }
)
"""Fields of URIs in angle brackets, lower-case: an RFC 2047 word is no URI, so a client
would find no unsubscribe link (RFC 2369 §2: a URI's non-ASCII is percent-encoded)."""

FOLD_AT = 78
"""Preferred line length (RFC 5322 §2.1.1 SHOULD)."""

_WORD_MAX = 75
"""Longest encoded word (RFC 2047 §2)."""
_WORD_LINE = 76
"""Longest line that holds an encoded word (RFC 2047 §2)."""
_WORD_MIN = len("=?utf-8?q??=") + 12
"""Room for an encoded word of one character, whatever it is (four octets as Q)."""
_OUR_WORD = re.compile(r"=\?utf-8\?([qb])\?([^?]*)\?=")
_CHROME = len("=?utf-8?q??=")
_Q_BUDGET = _WORD_MAX - _CHROME
_B_BUDGET = (_WORD_MAX - _CHROME) // 4 * 3
"""UTF-8 octets per base64 word: 15 groups of 3 octets make 60 characters."""

# Octets RFC 2047 §5(3) lets a "Q" word carry as themselves cost one character, the
# others three (=XX). Asked of the stdlib once per octet value.
_Q_COST = [quoprimime.header_length(bytes([octet])) for octet in range(256)]
_Q_SAFE = bytes(octet for octet in range(256) if _Q_COST[octet] == 1)

_PLAIN_TEXT = re.compile(r"[\t -~]*")
# What some reader might decode: =?charset?encoding?text?= anywhere in a word, or
# =?charset?encoding?=XX: the stdlib takes a "?=" before two hex digits for an =XX of the
# text, and reads on to the next "?=", or to the end ("=??q?=41" is "A").
_LOOKS_ENCODED = re.compile(r"=\?[^?]*\?[^?]*\?(?:[^?]*\?=|=[0-9A-Fa-f]{2})")
MAX_LINE = 998
FOLD_IF_NEEDED = "\0"
"""The white space before a piece of :func:`fold` that has none, where its line may
still break if it must: a phrase after a phrase list's bare comma, where CFWS may stand
(RFC 5322 §3.2.2, §3.6.5). Without it, tags joined by bare commas made one line, refused
past 998 octets; a break adds the one space that starts the next line."""
_WORDS = re.compile(r"[ \t]+|[^ \t]+")
_LIST_WORDS = re.compile(r"[ \t]+|,|[^ \t,]+")
""":data:`_WORDS` of a phrase list (Keywords), its commas tokens of their own."""
PHRASE_LIST_FIELDS = frozenset({"keywords"})
"""Fields of comma-separated phrases (RFC 5322 §3.6.5), lower-case: each phrase is
encoded on its own, the commas between them left as they are."""
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_PLAIN_PHRASE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")
_PRINTABLE = re.compile(r"[ -~]*")
_ATOM_MAX = MAX_LINE - FOLD_AT
"""Longest atom a display name keeps: the rest of its line (field name, ", ", ":;") fits
in 78."""
_SINGLE_SPACE = re.compile(r"(?<! ) (?! )")


def encoded_words(text: str, *, first: int = _WORD_MAX) -> list[str]:
    """``text`` as UTF-8 encoded words of at most 75 characters (the first at most
    ``first``), never splitting a character.

    >>> encoded_words("Grüße")
    ['=?utf-8?q?Gr=C3=BC=C3=9Fe?=']

    Like the stdlib, "Q" is used unless "B" is at least five characters shorter. Whitespace
    between two encoded words is dropped by decoders (RFC 2047 §6.2), so the words may be
    joined with a space or a fold.

    A word ends after a space of the text where one is in the second half of it, else
    where it is full: a decoder that keeps the whitespace between two encoded words (the
    stdlib's reader of display names does) then shows two spaces, not a space inside a
    word ("Groß britannien").
    """
    data = text.encode("utf-8")
    q_length = len(data) + 2 * len(data.translate(None, _Q_SAFE))
    b_length = (len(data) + 2) // 3 * 4
    use_q = q_length - b_length < 5
    full = _Q_BUDGET if use_q else _B_BUDGET
    budget = min(full, first - _CHROME if use_q else (first - _CHROME) // 4 * 3)
    words: list[str] = []
    start = 0  # octet offset of the current word
    cost = 0
    position = 0
    after_space = 0  # octet offset just past the word's last space (0: none yet)
    since_space = 0  # the cost of what follows that space
    for char in text:
        if char < "\x80":
            size = 1
            step = _Q_COST[ord(char)] if use_q else 1
        else:
            size = 2 if char < "\u0800" else 3 if char < "\U00010000" else 4
            # Every octet of a multi-octet UTF-8 character is above 127: "=XX" in Q.
            step = 3 * size if use_q else size
        if cost + step > budget and position > start:
            if after_space > start and 2 * since_space <= cost:
                words.append(_encode(data[start:after_space], use_q))
                start, cost = after_space, since_space
            else:
                words.append(_encode(data[start:position], use_q))
                start, cost = position, 0
            budget = full
        cost += step
        since_space += step
        position += size
        if char == " ":
            after_space, since_space = position, 0
    if position > start or not words:
        words.append(_encode(data[start:position], use_q))
    return words


def _encode(chunk: bytes, use_q: bool) -> str:
    if use_q:
        return quoprimime.header_encode(chunk, charset="utf-8")
    return base64mime.header_encode(chunk, charset="utf-8")


def unstructured_field(name: str, value: str, *, utf8: bool) -> str:
    """``Name: value`` (no final CRLF) folded near 78 characters at the value's own spaces.

    A word is RFC 2047 encoded when it is not ASCII (unless ``utf8``: RFC 6532 raw UTF-8),
    when a decoder could take part of it for an encoded word, also one that runs on over
    white space to a ``?=`` in a later word (the text must reach the reader literally),
    or when it would not fit in a 998-octet line. Neighbouring words that need encoding
    are encoded together with the spaces between them, which keeps those spaces (they
    would be dropped between two encoded words).

    A long plain word (a URL in List-Unsubscribe, say) stays as it is, on a line of its
    own if need be: the stdlib would encode it, which breaks structured headers, and 78 is
    only what RFC 5322 §2.1.1 prefers.

    Keywords and the other :data:`PHRASE_LIST_FIELDS` are comma-separated phrases (RFC
    5322 §3.6.5): without ``utf8`` each phrase is encoded on its own, so the commas stay
    between them (an encoded word holding one joined two keywords into one).

    In-Reply-To, References and the other :data:`MSG_ID_FIELDS` hold msg-ids, where RFC
    2047 words may not stand (RFC 2047 §5): a non-ASCII one raises
    :class:`~mailstrom.errors.UnencodableHeader` unless ``utf8``, as no reader would take
    the encoded word for the message it names. So does a non-ASCII List-Unsubscribe or
    other field of :data:`URI_FIELDS`: an encoded word in place of a URI is a link no
    client follows (with ``utf8`` it is written as the IRI it is, RFC 6532). No word of
    these fields is ever encoded, not even one that looks like an encoded word; one too
    long for a 998-octet line raises :class:`~mailstrom.errors.LineTooLong`.
    """
    key = name.lower()
    # Their URIs and msg-ids are no text: an encoded word in place of one names nothing.
    literal = key in URI_FIELDS or key in MSG_ID_FIELDS
    if not utf8 and not value.isascii():
        if key in URI_FIELDS:
            raise UnencodableHeader(
                f"{name} holds non-ASCII characters, but its URIs must be ASCII (RFC 2369 §2, "
                "RFC 3986 §2.1): percent-encode them, and write a domain as its A-label "
                "(xn--...)"
            )
        if key in MSG_ID_FIELDS:
            raise UnencodableHeader(
                f"{name} holds a non-ASCII msg-id, which cannot be RFC 2047 encoded (RFC "
                "2047 §5); an internationalised one needs UTF-8 header fields (an address "
                "with a UTF-8 local part, or a raw message)"
            )
    if len(name) + 2 + len(value) <= FOLD_AT and _PLAIN_TEXT.fullmatch(value) and "=?" not in value:
        return f"{name}: {value}"
    longest = MAX_LINE - len(name) - 2
    # Encoded together with its neighbours, a comma would join two phrases into one. A
    # word that looks like an encoded word with a comma in it is encoded whole, as
    # elsewhere (split at the comma, neither half would look like one, and readers
    # would decode it).
    tokens = _WORDS.findall(value)
    phrases = (
        not utf8
        and key in PHRASE_LIST_FIELDS
        and not any("," in word and _LOOKS_ENCODED.search(word) for word in tokens)
    )
    if phrases:
        tokens = _LIST_WORDS.findall(value)
    trailing = tokens[-1] if tokens and tokens[-1][0] in " \t" else ""
    # Whitespace after the last word may not fold away from it (RFC 5322 §3.2.5: the
    # field ends in *WSP), so a short run counts against the word's line: "x" * 989 + " "
    # would make a 999-octet line. A long run is split by fold() instead.
    last = len(tokens) - (2 if trailing else 1)
    pieces: list[tuple[str, str]] = []  # (whitespace before, text)
    run: list[str] = []  # words (and inner whitespace) waiting to be encoded together
    run_space = ""
    space = ""
    # Where a decoder may start an encoded word that reaches over white space, and how far
    # the tokens have come (each one's end), to find the word each such start lies in.
    starts = _decodable_starts(value) if "=?" in value else []
    first = 0  # the first of starts not yet passed
    end = 0
    for index, token in enumerate(tokens):
        end += len(token)
        if token[0] in " \t":
            space = token
            continue
        decodable = first < len(starts) and starts[first] < end
        while first < len(starts) and starts[first] < end:
            first += 1
        if phrases and token.startswith(","):  # a token of its own
            if run:
                _flush(pieces, run_space, run)
                run = []
                # RFC 2047 §5(3): white space parts an encoded word from a special.
                space = space or " "
            pieces.append((space, token))
            space = ""
            continue
        limit = longest - len(trailing) if index == last and len(trailing) <= FOLD_AT else longest
        if literal and _octets(token) > limit:
            # Never encoded (RFC 2047 §5): a URI or msg-id too long for a line was made
            # RFC 2047 words, which no client follows or threads by.
            raise LineTooLong(
                f"the {name} header holds a word of {_octets(token)} octets, "
                f"{shorten(token, 60)}, which can be neither folded nor encoded; with the "
                f"field's name a line holds at most {MAX_LINE} octets (RFC 5322 §2.1.1)"
            )
        # Nor one that looks like an encoded word: readers do not decode one here.
        if not literal and (decodable or _needs_encoding(token, utf8, limit)):
            if run:
                run.append(space)
            else:
                after_comma = phrases and not space and pieces and pieces[-1][1] == ","
                run_space = " " if after_comma else space
            run.append(token)
        else:
            if run:
                _flush(pieces, run_space, run)
                run = []
            # A phrase after a bare comma may be folded before, if its line must break.
            pieces.append((space or (FOLD_IF_NEEDED if phrases and pieces else ""), token))
        space = ""
    if run:
        if trailing and not phrases:
            # Encoded with the last word: it may not fold away from it (see above), and
            # left as it is it made the word's line longer than 76 characters (RFC 2047
            # §2); decoders keep white space inside a word. Not in a phrase list, where
            # it is CFWS around the last phrase, not part of it.
            run.append(trailing)
            trailing = ""
        _flush(pieces, run_space, run)
    # With no word the whole value is leading whitespace, which readers drop (the
    # stdlib strips it from the first line) and fold() drops before a first word.
    return fold(f"{name}:", pieces, trailing=trailing if pieces else "")


def _decodable_starts(value: str) -> list[int]:
    """The offsets of each ``=?`` in ``value`` from which a decoder may read an encoded
    word: readers (the stdlib's among them) take one from ``=?`` to the first ``?=``
    after it (see :data:`_LOOKS_ENCODED`), white space inside included, so
    ``=?utf-8?q?a b?=`` was read as ``a b``.
    Linear: a try from one ``=?`` reads no further than the fourth ``?`` from it."""
    starts = []
    at = value.find("=?")
    while at != -1:
        if _LOOKS_ENCODED.match(value, at):
            starts.append(at)
        at = value.find("=?", at + 1)
    return starts


def _needs_encoding(word: str, utf8: bool, longest: int) -> bool:
    if "=?" in word and _LOOKS_ENCODED.search(word):
        return True
    if word.isascii():
        return len(word) > longest
    return not utf8 or len(word.encode("utf-8")) > longest


def _flush(pieces: list[tuple[str, str]], space: str, run: list[str]) -> None:
    for index, word in enumerate(encoded_words("".join(run))):
        pieces.append((space if index == 0 else " ", word))


def fold(start: str, pieces: list[tuple[str, str]], *, trailing: str = "") -> str:
    """Join ``pieces`` after ``start``, breaking the line before a piece's whitespace when
    the line would pass 78 characters with it and the pieces glued to it. The first piece
    always gets one space after ``start``; a piece given no whitespace is glued to the one
    before, one given :data:`FOLD_IF_NEEDED` too unless the line must break before it.

    No line passes 998 octets (RFC 5322 §2.1.1) as long as each piece's text fits a line
    after one space (after ``start`` for the first): whitespace too long to go with its
    piece onto the next line is split, the line before keeping the part the next cannot
    hold. Unfolding (RFC 5322 §2.2.3) gives back every whitespace character. Only a run
    longer than both lines can take gets lines of its own (obs-FWS, RFC 5322 §4.2).

    A line that holds an encoded word ends by 76 characters (RFC 2047 §2): one too long
    for the room left on its line (the first line's, after the field's name) is split in
    two words, which decoders join again (RFC 2047 §6.2).
    """
    if trailing and pieces:
        # It stays on the last piece's line where it fits: it cannot precede a fold.
        pieces = [*pieces[:-1], (pieces[-1][0], pieces[-1][1] + trailing)]
        trailing = ""
    lines: list[str] = []
    line = start
    worded = False  # the line holds an encoded word
    index = 0
    while index < len(pieces):
        space, text = pieces[index]
        word = "=?" in text
        if index == 0:
            space = " "
        elif space:
            optional = space == FOLD_IF_NEEDED
            # What is glued after it (a phrase list's comma) goes onto its line with it.
            glued = index + 1 < len(pieces) and not pieces[index + 1][0]
            unit = _unit(pieces, index, text) if glued else text
            limit = _WORD_LINE if word or worded else FOLD_AT
            if len(line) + (0 if optional else len(space)) + len(unit) <= limit:
                space = "" if optional else space
            else:
                space = " " if optional else space
                excess = len(space) + _octets(unit) - MAX_LINE
                if excess > 0:
                    line, space = _split_space(lines, line, space, excess)
                lines.append(line)
                line, worded = "", False
        if word and len(line) + len(space) + len(text) > _WORD_LINE:
            split = _split_word(text, _WORD_LINE - len(line) - len(space))
            if split is not None:
                text = split[0]
                pieces = [
                    *pieces[: index + 1],
                    *((" ", w) for w in split[1:]),
                    *pieces[index + 1 :],
                ]
        line += space + text
        worded = worded or word
        index += 1
    line += trailing
    excess = _octets(line) - MAX_LINE
    if excess > 0:
        # Only whitespace ending the field can be past 998 (the text fits): it goes onto
        # lines of its own, as it may not be folded before a word.
        end = len(line.rstrip(" \t"))
        rest = line[max(end, len(line) - excess) :]
        line = line[: len(line) - len(rest)]
        for at in range(0, len(rest), MAX_LINE):
            lines.append(line)
            line = rest[at : at + MAX_LINE]
    lines.append(line)
    return "\r\n".join(lines)


def _unit(pieces: list[tuple[str, str]], index: int, text: str) -> str:
    """``text``, of ``pieces[index]``, and that of the pieces glued after it (given no
    white space: a phrase list's commas), which no fold may part from it: judged alone, a
    keyword that just fit made its line one longer with its comma."""
    end = index + 1
    while end < len(pieces) and not pieces[end][0]:
        end += 1
    return text + "".join(glued for _, glued in pieces[index + 1 : end])


def _split_word(text: str, room: int) -> list[str] | None:
    """``text``, an encoded word of ours (and what is glued after it: ",", " :"...),
    re-encoded as words whose first fits in ``room`` characters and the others each on a
    line of their own; None when it is no word of ours or no word fits."""
    match = _OUR_WORD.match(text)
    if match is None or room < _WORD_MIN:
        return None
    kind, payload = match.groups()
    if kind == "q":
        source = quoprimime.header_decode(payload).encode("latin-1").decode("utf-8")
    else:
        source = base64.b64decode(payload).decode("utf-8")
    glued = text[match.end() :]
    words = encoded_words(source, first=room)
    # One word can fit: re-encoded, a Q word may be a shorter B one. It fails only when
    # what is glued after it makes it too long.
    if len(words) == 1 and len(words[0]) + len(glued) > room:
        words = encoded_words(source, first=max(_WORD_MIN, room - len(glued)))
        if len(words) == 1 and len(words[0]) + len(glued) > room:
            return None
    words[-1] += glued
    return words


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _split_space(lines: list[str], line: str, space: str, excess: int) -> tuple[str, str]:
    """Move ``excess`` characters of whitespace ``space`` (at most all but its last, which
    must start the next line) onto ``line`` and, past 998, onto lines of their own;
    returns the line to append and what is left of ``space``."""
    excess = min(excess, len(space) - 1)
    take = min(excess, max(0, MAX_LINE - _octets(line)))
    line += space[:take]
    while take < excess:
        lines.append(line)
        line = space[take : min(excess, take + MAX_LINE)]
        take += len(line)
    return line, space[take:]


def phrase(text: str, *, utf8: bool) -> list[str]:
    """A display name as the words of an RFC 5322 phrase (join them with spaces or folds).

    Plain atoms stay as they are; other printable text becomes one quoted string, folded
    at its spaces when it does not fit a line; the rest (non-ASCII unless ``utf8``, a long
    name without spaces to fold at, text holding ``=?`` that decoders would misread)
    becomes encoded words.
    """
    if _PLAIN_PHRASE.fullmatch(text) and "=?" not in text:
        if len(text) <= FOLD_AT:
            return [text]
        # A long name must fold between its atoms (rejoined with one space each, as the
        # pattern allows only those, the words are the name). An atom too long for a line
        # with the field's name and punctuation cannot fold: encoded words can.
        atoms = text.split(" ")
        if max(map(len, atoms)) <= _ATOM_MAX:
            return atoms
    # A tab may stand in a quoted string (FWS): an encoded word's "=09" is read as a space
    # by the stdlib's reader of display names.
    printable = _PLAIN_TEXT.fullmatch(text) or (utf8 and text.replace("\t", " ").isprintable())
    if "=?" not in text and printable:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        quoted = f'"{escaped}"'
        if len(text) < FOLD_AT - 10:
            return [quoted]
        # A long one folds at its single spaces (FWS may stand in a quoted string, RFC
        # 5322 §3.2.4; unfolding gives each back): as encoded words, the stdlib's reader
        # of display names added a space at every break between two of them.
        words = _SINGLE_SPACE.split(quoted)
        if max(map(_octets, words)) <= _ATOM_MAX:
            return words
    return encoded_words(text)


def parameter(name: str, value: str) -> list[str]:
    """``name="value"`` for a MIME header parameter, as one or more ``;``-separated pieces.

    Printable ASCII that fits a line is a quoted string. Anything else uses RFC 2231
    (``name*=utf-8''…``, split into ``name*0*``, ``name*1*``… sections when long). A value
    holding ``=?`` also takes RFC 2231 form: RFC 2047 does not apply to parameters, but
    many readers (the stdlib among them) decode ``"=?utf-8?q?x?="`` anyway, so the literal
    text would not reach them.
    """
    # Octets of value a piece holds: 60, less for a long name, so that a piece's line
    # (" name*12*=...;") stays within 78 octets.
    room = min(60, max(12, 71 - len(name)))
    if _PRINTABLE.fullmatch(value) and "=?" not in value and len(value) < room:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return [f'{name}="{escaped}"']
    encoded = encode_rfc2231(value, "utf-8")
    if len(encoded) < room:
        return [f"{name}*={encoded}"]
    sections: list[str] = []
    start = 0
    while start < len(encoded):
        end = min(start + room, len(encoded))
        if end < len(encoded):
            # Never cut a %XX escape in two, nor a UTF-8 character (continuation octets
            # are 80-BF) across sections.
            percent = encoded.rfind("%", end - 2, end)
            if percent != -1:
                end = percent
            while encoded[end] == "%" and encoded[end + 1] in "89AB":
                end -= 3
        sections.append(f"{name}*{len(sections)}*={encoded[start:end]}")
        start = end
    return sections
