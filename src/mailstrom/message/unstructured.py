"""Unstructured header text (Subject, Comments, an ``X-`` field) parsed as the stdlib's
``policy.default`` parses it, in work that grows with the length.

The stdlib's unstructured parser (``email._header_value_parser.get_unstructured``) copies
the rest of the value at every word and searches it for the end of an encoded word: its
work grows with the square of the length. A 60 KB Subject of ``a =?`` repeated cost 0.6 s
to check and 0.7 s more for the writer to refold. Here a value is handed to it in pieces,
cut where its reading does not change (:func:`pieces`), and the parse trees of the pieces
are joined into the one it makes of the whole; the stdlib's folder, quadratic in the
number of words in one list, gets them in groups (:class:`_Group`).
"""

from __future__ import annotations

import bisect
import re
import string
from email._header_value_parser import (
    EncodedWord,
    EWWhiteSpaceTerminal,
    UnstructuredTokenList,
    ValueTerminal,
    WhiteSpaceTerminal,
    get_encoded_word,
    get_unstructured,
)
from email.errors import HeaderParseError
from email.headerregistry import UnstructuredHeader
from typing import ClassVar, Literal

DECODED_PIECE = 1000
"""Most characters of a header value handed to the stdlib's parser at once.

Its unstructured parser copies (and regex-searches) the rest of the value at every word,
so its cost grows with the square of the length: a 64 KB Subject of ``=?a?q?b?=x``
repeated took 2.7 s of CPU per ``prepare()``. A value is parsed in pieces this long,
cut where the parser's reading does not change (see :func:`_cuts`)."""

LONGEST_DECODED_RUN = 4000
"""A stretch longer than this with nowhere to cut it (encoded words back to back, or no
white space) is taken word by word (:func:`_parse_words`), not handed to the parser."""

_WORD_GAP = re.compile(r"(?<=\S)[ \t]")
"""White space (as the parser starts a run of it) right after a character that is not."""

_WORD_OR_BLANK = re.compile(r"[ \t]\s*|[^ \t]+")
"""A word or a run of white space, as the parser splits text: a word runs to the next
space or tab, white space from there over any Unicode white space (``str.lstrip``)."""

_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[^?\s]*\?[^?\s]*\?=")
"""A word that is one encoded word: "?=" only at its end, so the parser ends it there."""


def parse_unstructured(value: str) -> UnstructuredTokenList:
    """The parse tree ``get_unstructured(value)`` makes, made piece by piece, its words
    in groups of :data:`FOLDED_GROUP` (see :class:`_Group`).

    A stretch of over :data:`LONGEST_DECODED_RUN` characters with nowhere to cut (encoded
    words back to back, as a long Subject of ``email.header.Header`` is written) is taken
    word by word: a word that is one encoded word is decoded, any other kept as written
    (see :func:`_parse_words`).
    """
    tokens = UnstructuredTokenList()
    for start, end in pieces(value):
        part = _parse_piece(value[start:end])
        tokens.extend(part)
        tokens.defects.extend(part.defects)
    if len(tokens) <= FOLDED_GROUP:
        return tokens
    tree = UnstructuredTokenList(
        _Group(tokens[at : at + FOLDED_GROUP]) for at in range(0, len(tokens), FOLDED_GROUP)
    )
    tree.defects = tokens.defects
    return tree


FOLDED_GROUP = 256
"""Most words (and runs of white space) of a parse tree in one group; a value within
:data:`~mailstrom.message.headers.MAX_FIELD` has at most 256 groups."""


class _Group(UnstructuredTokenList):
    """Words of an unstructured value kept together in its parse tree.

    The stdlib's folder takes the parts of a list off its front one by one
    (``list.pop(0)``), moving all the rest each time: the words of a 60 KB value in one
    list cost it work growing with the square of their number. A group is no syntactic
    break, so it is folded as its words are: whole when it fits on the line, else word by
    word."""

    syntactic_break = False


class LinearUnstructuredHeader(UnstructuredHeader):
    """``UnstructuredHeader`` parsed by :func:`parse_unstructured`: the stdlib's writer
    refolds a long raw value (a compat32 message's) by parsing it with its policy's
    header factory, so the writer's work grows with the length too."""

    @staticmethod
    def value_parser(value: str) -> UnstructuredTokenList:
        return parse_unstructured(value)


class UniqueLinearUnstructuredHeader(LinearUnstructuredHeader):
    """:class:`LinearUnstructuredHeader` for a field a message has once (Subject)."""

    # Declared as UnstructuredHeader declares it (not Literal[1]): what the registry takes.
    max_count: ClassVar[Literal[1] | None] = 1


def _parse_piece(piece: str) -> UnstructuredTokenList:
    if len(piece) <= LONGEST_DECODED_RUN:
        return get_unstructured(piece)
    return _parse_words(piece)


def _parse_words(stretch: str) -> UnstructuredTokenList:
    """``stretch`` split as the parser splits it, its words taken one at a time: a word
    that is one encoded word is decoded as the parser decodes it (the white space between
    two of them dropped), any other as written (the parser would look for encoded words
    inside it too). Linear: what the parser copies at each word is that word."""
    tree = UnstructuredTokenList()
    for match in _WORD_OR_BLANK.finditer(stretch):
        text = match.group()
        if text[0] in " \t":
            tree.append(WhiteSpaceTerminal(text, "fws"))
            continue
        word = _encoded_word(text)
        if word is None:
            tree.append(ValueTerminal(text, "vtext"))
            continue
        if len(tree) > 1 and isinstance(tree[-2], EncodedWord):
            tree[-1] = EWWhiteSpaceTerminal(str(tree[-1]), "fws")  # dropped: RFC 2047 §6.2
        tree.append(word)
    return tree


def _encoded_word(text: str) -> EncodedWord | None:
    """``text`` parsed as the one encoded word it is, or None."""
    if len(text) > DECODED_PIECE or not _ENCODED_WORD.fullmatch(text):
        return None
    try:
        word, rest = get_encoded_word(text)
    except HeaderParseError:  # an unknown encoding: the parser takes it as text too
        return None
    return word if not rest else None


def pieces(value: str) -> list[tuple[int, int]]:
    """Spans of ``value`` that parse alone as they parse within it, each at most
    :data:`DECODED_PIECE` long unless there was nowhere to cut it."""
    spans: list[tuple[int, int]] = []
    start = last = 0
    for cut in _cuts(value):
        if cut - start > DECODED_PIECE and last > start:
            spans.append((start, last))
            start = last
        last = cut
    if len(value) - start > DECODED_PIECE and last > start:
        spans.append((start, last))
        start = last
    spans.append((start, len(value)))
    return spans


def _cuts(value: str) -> list[int]:
    """Where ``value`` may be cut without changing what the stdlib reads in it: where a
    run of white space starts after a word that is no encoded word (so the white space is
    kept whatever follows, RFC 2047 §6.2), and no encoded word can span it."""
    opens = [match.start() for match in re.finditer(r"=\?", value)]
    closes = [match.start() for match in re.finditer(r"\?=", value)]
    cuts = []
    for gap in _WORD_GAP.finditer(value):
        at = gap.start()
        if not value.endswith("?=", 0, at) and _all_words_end_by(value, at, opens, closes):
            cuts.append(at)
    return cuts


def _all_words_end_by(value: str, at: int, opens: list[int], closes: list[int]) -> bool:
    """Whether every encoded word the parser may read before ``at`` ends by ``at``.

    The parser takes an encoded word from a ``=?`` to the first ``?=`` after it, white
    space inside included, or to the second when two hex digits follow the first (an
    ``=XX`` of quoted-printable). A word starting at or before the last ``=?`` so ends by
    the second ``?=`` after that ``=?``, by the first when no hex digits follow it; one
    with no ``?=`` after it is no encoded word."""
    last_open = bisect.bisect_left(opens, at - 1) - 1  # the last "=?" wholly before at
    if last_open < 0:
        return True
    first = bisect.bisect_left(closes, opens[last_open] + 2)
    if first == len(closes):
        return True
    end = closes[first] + 2
    if all(char in string.hexdigits for char in value[end : end + 2]) and end + 2 <= len(value):
        end = closes[first + 1] + 2 if first + 1 < len(closes) else len(value) + 1
    return end <= at
