"""The suppression list as CSV, for ``mailstrom suppress import`` and ``export``.

The columns are ``target,source,reply,created_at,expires_at,message_id`` (times in ISO 8601
with a zone, ``2026-11-30T09:00:00+00:00``, kept in UTC); an export starts with that
header. An import may leave out the header (the columns are then taken in that order; a first
row is the header when its first cell names a column and one cell is ``target``) and
any column after ``target``: a file of one address or domain a line is a valid import.
A row whose first cell starts with ``#`` and is no target (``# note``, ``#note``, ``###``)
is a comment; ``#team@example.org`` is an address (``#`` is atext, RFC 5322 §3.2.3), so
every target an export writes imports again.
A cell an export writes that starts with ``=``, ``+``, ``-``, ``@``, NUL or white space
(after any ``'``), or ends with white space, gets a ``'`` in front, and an import takes one
such ``'`` off again: a spreadsheet opening the file shows ``=cmd|'/c'!a0@example.org`` (a
valid address) or a reply as text, instead of running it as a formula (OWASP's "CSV
injection"); a reply or message id keeps the white space at its ends behind that ``'``,
every other cell is stripped of it (``bob@example.org, manual``); and the file still
imports as it was exported.
A line break inside a cell (a multi-line reply) reads as LF whether it is CRLF or CR, as
in a file whose line ends were converted after the export.
Input is hostile: its size, its number of rows (entries, and empty and comment rows
apart), every line and every field are bounded,
and the first bad row stops the import with :class:`~mailstrom.errors.InvalidSuppression`
naming its line, before anything is written.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Protocol, TextIO

from mailstrom.errors import InvalidSuppression
from mailstrom.suppression import (
    MAX_REPLY,
    Suppression,
    SuppressionSource,
    check_entry_time,
    check_reply,
    normalize_target,
)

COLUMNS = ("target", "source", "reply", "created_at", "expires_at", "message_id")
MAX_INPUT = 64 * 1024 * 1024
"""Octets of CSV one import reads (about half a million entries with long replies)."""
MAX_ROWS = 1_000_000
"""Entries one import takes, all written in one transaction (about 5 s on SQLite, 10 s on
PostgreSQL, for a million; see docs/cli.md); and empty and comment rows it reads besides,
as many (room for a file of the most entries with an empty row after each, its line ends
converted twice)."""
_MAX_FIELD = MAX_REPLY * 4 + 2
"""The csv module's own limit per field: past it a row is refused while being read."""
_MAX_MESSAGE_ID = 128
_TEXTS = frozenset({"reply", "message_id"})
"""The columns whose white space at either end is their own (an export marks it)."""
_MAX_LINE = 2 * len(COLUMNS) * _MAX_FIELD
"""Characters of one line: room for a row of fields of the largest size, every character a
doubled quote. A row of millions of cells ("a,a,a,...", 64 MiB) is refused before the csv
module makes its list of cells, which took up to 3.5 GB with their copies."""
# What makes a spreadsheet read a cell as a formula (OWASP, CSV injection; ASVS 5.0 1.2.10),
# after the quotes an export adds: "'=x" is written "''=x", so that taking one quote off
# gives back any cell, one that started with quotes included. White space first too (\s:
# what str.strip() takes off a cell read), for the same ' to keep it.
_FORMULA = re.compile("'*[=+\\-@\0\\s]")


class Readable(Protocol):
    """A binary stream: a file opened ``rb``, ``sys.stdin.buffer``."""

    def read(self, size: int = -1, /) -> bytes: ...


def read_limited(stream: Readable, limit: int = MAX_INPUT) -> str:
    """Up to ``limit`` octets of ``stream`` decoded as UTF-8 (a BOM is dropped); raises
    InvalidSuppression when there is more, or when it is not UTF-8."""
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise InvalidSuppression(f"the input is larger than {limit} octets")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidSuppression(f"the input is not UTF-8 (at octet {exc.start})") from None


def parse_csv(
    text: str,
    *,
    now: datetime,
    source: SuppressionSource = SuppressionSource.MANUAL,
    max_rows: int = MAX_ROWS,
) -> list[Suppression]:
    """The entries of a CSV text; ``now`` and ``source`` fill the columns left out.

    >>> from datetime import UTC
    >>> [e.target for e in parse_csv("Bob@Example.org\\nexample.net\\n", now=datetime.now(UTC))]
    ['bob@example.org', 'example.net']
    """
    entries: list[Suppression] = []
    skipped = 0
    columns: tuple[str, ...] = COLUMNS
    previous = csv.field_size_limit(_MAX_FIELD)
    try:
        reader = csv.reader(_lines(text), strict=True)
        for row in _rows(reader):
            line = reader.line_num
            raw = [_line_breaks(c) for c in row]
            cells = [c.strip() for c in raw]
            if not any(cells) or _is_comment(cells[0]):
                # Counted too: 64 MiB of "#" lines, none an entry, took four minutes to
                # read (an exception per comment), and of empty lines one.
                skipped += 1
                if skipped > max_rows:
                    raise InvalidSuppression(
                        f"more than {max_rows} empty or comment rows", line=line
                    )
                continue
            if not entries and columns is COLUMNS and _is_header(cells):
                columns = _header(cells, line)
                continue
            if len(entries) >= max_rows:
                raise InvalidSuppression(f"more than {max_rows} entries", line=line)
            if len(cells) > len(columns):
                raise InvalidSuppression(
                    f"{len(cells)} columns, expected at most {len(columns)}", line=line
                )
            # Unquoted here, in at most six cells: a quote never makes a row blank, a
            # comment or a header. Only free text keeps its white space, and only behind
            # the ' an export puts first (it writes no other cell that starts with white
            # space): a target, source or time has none of its own ("'bob@example.org "
            # by hand is the address "'bob@example.org"), nor has ", '=x" by hand.
            fields = {
                name: _unquoted(r if name in _TEXTS and r.startswith("'") else c)
                for name, r, c in zip(columns, raw, cells, strict=False)
            }
            entries.append(_entry(fields, line=line, now=now, source=source))
    finally:
        csv.field_size_limit(previous)
    return entries


def _line_breaks(cell: str) -> str:
    """``cell`` with each line break inside it as LF, as an export writes it. A file whose
    line ends were converted (saved on Windows, ``unix2dos``, Git's ``autocrlf``) has the
    break inside a quoted multi-line reply converted too, to CRLF or CR, which a reply
    may not hold (:func:`~mailstrom.suppression.check_reply`)."""
    if "\r" not in cell:
        return cell
    return cell.replace("\r\n", "\n").replace("\r", "\n")


def _quoted(cell: str) -> str:
    """``cell`` as an export writes it: with a ``'`` in front when a spreadsheet would
    take it for a formula, or when it starts or ends with white space, which an import
    strips off a cell without one (a server's reply "550 5.1.1 user unknown ", kept so
    by the worker, came back without its last character)."""
    return "'" + cell if _FORMULA.match(cell) or cell[-1:].isspace() else cell


def _unquoted(cell: str) -> str:
    """``cell``, as read, as :func:`_quoted` was given it: without the ``'`` in front and
    as it is, or stripped of white space when it has no such ``'`` (a file written by
    hand, ``bob@example.org, manual``)."""
    if cell.startswith("'"):
        rest = cell[1:]
        if _FORMULA.match(rest) or rest[-1:].isspace():
            return rest
    return cell.strip()


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` as the csv module reads them, each at most :data:`_MAX_LINE`
    characters long; InvalidSuppression naming the first one that is longer."""
    for number, line in enumerate(io.StringIO(text, newline=""), 1):
        if len(line) > _MAX_LINE:
            raise InvalidSuppression(f"a line longer than {_MAX_LINE} characters", line=number)
        yield line


def _is_comment(cell: str) -> bool:
    """Whether a row whose first cell is ``cell`` is a comment: it starts with ``#`` and
    is no address or domain (a domain never holds ``#``: :func:`normalize_target`)."""
    if not cell.startswith("#"):
        return False
    try:
        normalize_target(cell)
    except InvalidSuppression:
        return True
    return False


def _is_header(cells: list[str]) -> bool:
    """Whether a first row is the header: its first cell names a column (an entry's is
    its target) and one cell is ``target``. A reply or message id that says "target" in
    an entry's row does not make it one."""
    names = [c.lower() for c in cells]
    return names[0] in COLUMNS and "target" in names


def _rows(reader: Iterator[list[str]]) -> Iterator[list[str]]:
    try:
        yield from reader
    except csv.Error as exc:
        line = getattr(reader, "line_num", None)
        raise InvalidSuppression(f"malformed CSV: {exc}", line=line) from None


def _header(cells: list[str], line: int) -> tuple[str, ...]:
    names = tuple(c.lower() for c in cells)
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise InvalidSuppression(
            f"unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})", line=line
        )
    if len(set(names)) != len(names):
        raise InvalidSuppression("a column is named twice", line=line)
    return names


def _entry(
    fields: dict[str, str], *, line: int, now: datetime, source: SuppressionSource
) -> Suppression:
    try:
        target = normalize_target(fields.get("target", ""))
    except InvalidSuppression as exc:
        raise InvalidSuppression(exc.reason, line=line) from None
    kind = fields.get("source") or source.value
    try:
        chosen = SuppressionSource(kind)
    except ValueError:
        known = ", ".join(s.value for s in SuppressionSource)
        raise InvalidSuppression(f"unknown source {kind!r} (known: {known})", line=line) from None
    reply = check_reply(fields.get("reply", ""), line=line)
    message_id = fields.get("message_id") or None
    if message_id is not None and (
        len(message_id) > _MAX_MESSAGE_ID or not message_id.isprintable()
    ):
        raise InvalidSuppression("the message_id is not a message id", line=line)
    return Suppression(
        target=target,
        source=chosen,
        reply=reply,
        created_at=_time(fields.get("created_at"), line, "created_at") or now,
        expires_at=_time(fields.get("expires_at"), line, "expires_at"),
        message_id=message_id,
    )


def _time(text: str | None, line: int, what: str) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidSuppression(f"not an ISO 8601 time: {text[:40]!r}", line=line) from None
    if when.utcoffset() is None:
        raise InvalidSuppression(f"a time without a zone: {text!r} (add Z or +00:00)", line=line)
    try:
        # In UTC, as the stores keep it: 0001-01-01T00:00+01:00 is before the first time
        # Python can hold there, and an entry stored with it could not be read back.
        when = when.astimezone(UTC)
    except OverflowError:
        raise InvalidSuppression(f"a time out of range: {text!r}", line=line) from None
    return check_entry_time(when, what=what, line=line)


def write_csv(entries: Iterable[Suppression], stream: TextIO) -> int:
    """Write a header and ``entries``; returns how many were written."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for e in entries:
        row = (
            e.target,
            # An unknown source or time (a stored row that cannot be read) is left
            # empty: importing the file again fills it as for any entry without one.
            e.source.value if e.source is not None else "",
            e.reply,
            e.created_at.isoformat() if e.created_at is not None else "",
            e.expires_at.isoformat() if e.expires_at is not None else "",
            e.message_id or "",
        )
        writer.writerow([_quoted(c) for c in row])
        count += 1
    return count
