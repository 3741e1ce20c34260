"""Printing data: rich tables on a terminal, plain aligned columns in pipes, JSON for scripts.

Plain output is for ``grep``/``awk``: one row per line, columns separated by two or more
spaces, empty cells shown as ``-`` so every row has every column.

What the views print comes largely from others: a Subject, addresses, a server's reply, a
bounce report, DNS records. Such text reaches the terminal only through :func:`visible`
(:func:`cell`, :func:`echo`, :func:`print_table`, :func:`print_fields` apply it), which
shows control characters as escapes: an ESC from a crafted Subject must not recolour or
rewrite the operator's terminal, nor a CR or line separator forge a line of output.
JSON output keeps the text as it is: the json module escapes C0 controls, and
:func:`print_json` the others a terminal would obey or reorder, as ``\\uXXXX`` escapes
that mean the same text to a parser.

Both must still be UTF-8 (RFC 8259 §8.1 for JSON). Text read with ``surrogateescape``
(a DNS record's octets, which the doctor keeps so that SPF sees them as published)
holds lone surrogates for octets that are not UTF-8: :func:`visible` shows each as the
escape of its octet (``\\xff``), and :func:`print_json` writes U+FFFD for it.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import io
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TextIO

from mailstrom.cli.exits import EX_CANTCREAT, CLIError
from mailstrom.safetext import UNICODE_CONTROLS, escaped_json

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# C0 controls and UNICODE_CONTROLS: DEL and C1 (ESC, CSI, OSC start terminal commands;
# CR, BS, VT rewrite what is shown), the Unicode line and paragraph separators, and the
# bidirectional controls that make text display in another order than it reads
# (CVE-2021-42574).
# Lone surrogates: what surrogateescape makes of an octet that is not UTF-8 (U+DC80 to
# U+DCFF), or text no encoder takes; written out raw they make the output invalid UTF-8.
_SURROGATES = r"\ud800-\udfff"
_CONTROL = re.compile(rf"[\x00-\x1f{UNICODE_CONTROLS}{_SURROGATES}]")
_SURROGATE = re.compile(f"[{_SURROGATES}]")
# _CONTROL but for tab, LF, and CR before LF: the layout of a message's lines.
_CONTROL_BUT_LAYOUT = re.compile(rf"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f{UNICODE_CONTROLS}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # the octet surrogateescape kept: show the octet
        code -= 0xDC00
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    r"""``text`` with every control character shown as an escape, for a terminal.

    >>> visible("hi\x1b[31mRED\u202e")
    'hi\\x1b[31mRED\\u202e'
    """
    if text.isprintable():  # the usual case: one C-level scan
        return text
    return _CONTROL.sub(_escape, text)


def visible_lines(data: bytes) -> str:
    """``data`` (a message) for a terminal: line breaks and tabs kept, other control
    characters and octets that are not UTF-8 shown as escapes. Text, for standard output
    to encode as the terminal's locale has it: written as UTF-8 to one that is not (the
    Linux console, xterm in a Latin-1 locale), a "Û" (C3 9B) was an 8-bit CSI there."""
    text = data.decode("utf-8", "backslashreplace")
    return _CONTROL_BUT_LAYOUT.sub(_escape, text)


def echo(text: str, stream: TextIO | None = None) -> None:
    """Print one line that may quote others (a reply, an address, a report): control
    characters, line breaks included, are shown as escapes (see :func:`visible`)."""
    stream = sys.stdout if stream is None else stream
    stream.write(visible(text) + "\n")


def is_tty(stream: TextIO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, datetimes and timedeltas → JSON-ready values (recursively); a
    float that is no number (NaN, infinite) → None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        # json writes them NaN and Infinity, which no JSON parser but Python's takes (jq,
        # JSON.parse): a store row holding one (SQLite's REAL does) spoiled the whole text.
        return None
    return value


def print_json(value: Any, stream: TextIO | None = None) -> None:
    """``value`` as indented JSON, in UTF-8 whatever its strings hold: a lone surrogate
    (an undecodable octet kept by ``surrogateescape``) becomes U+FFFD. The controls json
    leaves as they are (DEL, C1 such as the 8-bit CSI U+009B, the line separators, the
    bidirectional controls) are written as ``\\uXXXX`` escapes: the same value to a
    parser, and nothing a terminal would obey or reorder."""
    stream = sys.stdout if stream is None else stream
    stream.write(_json_text(value, stream) + "\n")


def print_json_list(items: Iterable[Any], stream: TextIO | None = None) -> None:
    """``print_json(list(items))``, the same text, written one element at a time: the
    whole text of ``queue --json --limit 100000`` took 800 MB (and 45 s) before its first
    octet was written. An element's text is indented one level deeper as the list's
    would be (its line breaks are all layout: json writes those in strings as ``\\n``)."""
    stream = sys.stdout if stream is None else stream
    opened = False
    for item in items:
        text = _json_text(item, stream).replace("\n", "\n  ")
        stream.write(f"{',' if opened else '['}\n  {text}")
        opened = True
    stream.write("\n]\n" if opened else "[]\n")


def _json_text(value: Any, stream: TextIO) -> str:
    """``value`` as :func:`print_json` writes it to ``stream``, without the line end."""
    text = json.dumps(to_jsonable(value), indent=2, ensure_ascii=False)
    # A lone surrogate becomes U+FFFD (escaped, it is one again to a parser); the other
    # controls json leaves raw, only inside strings, become the escapes that mean them.
    text = escaped_json(_SURROGATE.sub("\ufffd", text))
    return json_for(text, stream)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def writes_utf8(stream: TextIO) -> bool:
    """Whether ``stream`` encodes text as UTF-8 (an in-memory one, which encodes nothing,
    counts as such)."""
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return True
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def json_for(text: str, stream: TextIO) -> str:
    """JSON ``text`` as ``stream`` can write it: as it is in UTF-8; in another encoding (a
    locale such as de_DE.ISO-8859-1) with every character past ASCII as a ``\\uXXXX``
    escape (a pair past U+FFFF), the same value to a parser. Written raw, an "é" in a
    Subject was a UnicodeEncodeError there, and ``status --json`` an internal error (70);
    the escapes :func:`tolerant_stdout` writes would be no JSON."""
    return text if writes_utf8(stream) else ascii_json(text)


def ascii_json(text: str) -> str:
    """JSON ``text`` with every character past ASCII as a ``\\uXXXX`` escape (a pair past
    U+FFFF): the same value, in any encoding that holds ASCII."""
    if text.isascii():
        return text
    return _NON_ASCII.sub(lambda m: json.dumps(m.group())[1:-1], text)


def tolerant_stdout() -> None:
    """Standard output, closed, goes to /dev/null; open, it writes a character its
    encoding cannot hold (a locale that is not UTF-8) as an escape (``\\xe9``), as
    :func:`visible` writes control characters: strict, an "é" in an address or a Subject
    ended ``status`` or ``queue`` as an internal error (70), the line it was on unwritten.
    Standard error does so already; closed, it goes to /dev/null too."""
    if sys.stderr is None:
        # Closed (``2>&-``, a daemon that closed its descriptors): writing the error line
        # was an AttributeError, and the command ended with exit 1 (a traceback written
        # nowhere) instead of its code: sendmail's 75, try again, became 1, which a
        # caller such as Postfix's pipe(8) takes for a permanent failure.
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    stream = sys.stdout
    if stream is None:
        # Closed (``>&-``): Python sets it to None, and what print() silently drops,
        # stream.write() was an AttributeError, an "internal error" (70), after a view
        # had read the store or a command had acted. Nothing to write to: written away.
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
        return
    if not isinstance(stream, io.TextIOWrapper):
        return
    # In the C locale without UTF-8 mode (PYTHONUTF8=0) Python writes ASCII with
    # surrogateescape, which fails on an "é" as strict does; in UTF-8 it holds every
    # character the views write (they escape lone surrogates), and is left as it is.
    if stream.errors == "strict" or (
        stream.errors == "surrogateescape" and not writes_utf8(stream)
    ):
        stream.reconfigure(errors="backslashreplace")


class ReaderGone(BrokenPipeError):
    """The reader of a listing's standard output has gone (``mailstrom queue | head -1``):
    raised by a write to that output only (:func:`end_with_reader`), so that a broken
    pipe elsewhere (a socket, standard error) is not taken for it."""


class OutputFailed(CLIError, OSError):
    """Standard output could not be written for another reason than its reader going (a
    full disk under ``> file``, an I/O error): EX_CANTCREAT, as for an ``--out`` file.
    An OSError still, as it was: what only shows (the worker's live view, on a terminal
    hung up: EIO) goes on without it, as it did, rather than ending with exit 73."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write standard output: {exc.strerror or exc}", EX_CANTCREAT)


class _ReaderMayGo(io.RawIOBase):
    """The descriptor ``fd``, written until its reader has gone (a pipe to a ``head``
    that exited, a logger restarted): from then on it is /dev/null, and what is written
    is lost, never the command's work nor its exit code; or, ``ends``, the write raises
    :class:`ReaderGone`, which ends a listing. ``output``: ``fd`` is standard output,
    whose other write errors raise :class:`OutputFailed`."""

    def __init__(self, stream: TextIO, fd: int, *, ends: bool = False, output: bool = False):
        super().__init__()
        self._fd = fd
        # The stream whose descriptor this writes: collected, it would close it (the
        # /dev/null standing in for a closed standard output, which nothing else holds).
        self._stream = stream
        self._ends = ends
        self._output = output

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: ReadableBuffer, /) -> int:
        try:
            return os.write(self._fd, data)
        except BrokenPipeError as exc:
            if self._ends:
                raise ReaderGone(exc.errno, exc.strerror) from None
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._fd)
            os.close(null)
            return memoryview(data).nbytes
        except OSError as exc:
            if not self._output:
                raise
            # `queue --json > q.json` on a full disk, `hold --all > log` after the hold
            # was done: an OSError here was an "internal error" (70), a bug to report.
            raise OutputFailed(exc) from None


def outlive_readers() -> None:
    """Standard output and error of a command that acts (queues, changes the store,
    delivers) from now on outlive their readers: a BrokenPipeError out of a line it
    printed ended the command as a listing read by ``head`` ends, exit 0, whether its
    work was done or not (``send --wait`` printed the id, then neither delivered nor
    said it had not). Now the line is lost and the command goes on to its own code."""
    sys.stdout = _outliving(sys.stdout, output=True)
    sys.stderr = _outliving(sys.stderr)


def end_with_reader() -> None:
    """A listing's standard output ends it once its reader has gone (:class:`ReaderGone`,
    which ``| head`` makes exit 0); its standard error outlives its reader as every
    command's does. Any BrokenPipeError ended a listing so, exit 0: with standard error
    a pipe whose reader had gone, the note that no worker runs ended ``queue`` before
    its table, an empty queue to its reader; one from a socket said it had worked."""
    sys.stdout = _outliving(sys.stdout, ends=True, output=True)
    sys.stderr = _outliving(sys.stderr)


def _outliving(stream: TextIO, *, ends: bool = False, output: bool = False) -> TextIO:
    if not isinstance(stream, io.TextIOWrapper):
        return stream
    try:
        fd = stream.fileno()
        stream.flush()
    except (OSError, ValueError):  # no descriptor (a test's capture), or already broken
        return stream
    raw = _ReaderMayGo(stream, fd, ends=ends, output=output)
    # Buffered as it was: unbuffered (``python -u``) over the descriptor itself.
    binary: Any = io.BufferedWriter(raw) if isinstance(stream.buffer, io.BufferedWriter) else raw
    return io.TextIOWrapper(
        binary,
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=stream.line_buffering,
        write_through=stream.write_through,
    )


def cell(value: Any) -> str:
    """One table cell: times in UTC to the second, empty as ``-``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, enum.Enum):
        return str(value.value)
    # One line per row, whatever the reply said, and nothing a terminal would obey.
    return visible(" ".join(str(value).split()))


def age(since: datetime, now: datetime) -> str:
    """A compact age like ``45s``, ``12m``, ``3h``, ``2d``."""
    seconds = max(0, int((now - since).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """A table: rich when ``stream`` is a terminal, aligned plain text otherwise."""
    stream = sys.stdout if stream is None else stream
    cells = [[cell(v) for v in row] for row in rows]
    if is_tty(stream):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        shown = None if title is None else Text(visible(title))
        table = Table(title=shown, title_justify="left", header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            # Text, not markup: cells hold what servers said (SMTP replies, DNS records),
            # and "[/x]" in a reply must show as written, not crash the table.
            table.add_row(*(Text(c) for c in row))
        Console(file=stream).print(table)
        return
    if title:
        stream.write(visible(title) + "\n")
    widths = [width(h) for h in headers]
    for row in cells:
        widths = [max(w, width(c)) for w, c in zip(widths, row, strict=True)]
    for row in [list(headers), *cells]:
        padded = [c + " " * (w - width(c)) for c, w in zip(row, widths, strict=True)]
        stream.write("  ".join(padded).rstrip() + "\n")


def width(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide character (CJK, most
    emoji), none for a combining one. Padded by its count of characters, a column after
    an address such as 收件人@例子.example was pushed right by one per CJK character."""
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def print_fields(pairs: Sequence[tuple[str, Any]], stream: TextIO | None = None) -> None:
    """``Label:  value`` lines, labels aligned."""
    stream = sys.stdout if stream is None else stream
    # Labels too can quote others ("Meta KEY", a key as a store gives it back).
    shown = [(visible(label), value) for label, value in pairs]
    widest = max(width(label) for label, _ in shown) + 1
    for label, value in shown:
        pad = " " * (widest - width(label) - 1)
        stream.write(f"{label}:{pad}  {cell(value)}\n")
