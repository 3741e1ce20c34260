"""Log lines for ``mailstrom worker``: one line per event, ``key=value`` (logfmt) or JSON.

Each delivery attempt arrives as one structured record (event ``attempt``, logged by the
worker on ``mailstrom.attempts``), so log collectors get fields rather than prose to parse.
A record's ``event`` is its ``event`` attribute when it has one, else its message; the
message id is the field ``message_id`` (never ``message``, which log systems keep for the
text of a record).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from mailstrom.cli.logbuffer import BufferedStreamHandler
from mailstrom.cli.output import ascii_json, writes_utf8
from mailstrom.safetext import escaped_json
from mailstrom.stores.url import redact_url


@functools.lru_cache(maxsize=4)
def _second(epoch_second: int) -> str:
    return datetime.fromtimestamp(epoch_second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _timestamp(record: logging.LogRecord) -> str:
    # One delivery a line at thousands a second: format each second once.
    created = record.created
    second = int(created)
    return f"{_second(second)}{int((created - second) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    if fields.__class__ is dict:  # the usual case, without the cost of an ABC check
        return fields
    return fields if isinstance(fields, Mapping) else {}


def _event(record: logging.LogRecord) -> str:
    event = getattr(record, "event", None)
    return event if isinstance(event, str) else record.getMessage()


_NEEDS_QUOTES = re.compile(r'[ "=\\]').search
# json.dumps with a keyword builds a new encoder per call; one encoder serves every line
# (it keeps no state between calls) and writes the same text.
_json_text = json.JSONEncoder(ensure_ascii=False).encode
_json_line = json.JSONEncoder(ensure_ascii=False, default=str).encode


def _logfmt_value(value: Any) -> str:
    # One line per delivery at full speed: C-level checks, not a loop over characters.
    if isinstance(value, str):
        if value and value.isprintable() and _NEEDS_QUOTES(value) is None:
            return value
        return escaped_json(_json_text(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # digits, a sign, a dot, "e", "inf" or "nan": nothing to quote
    return _logfmt_value(_json_line(value))


# Printable ASCII but for space, '"', '=' and '\\': a value made only of these needs no
# quotes. Anything else (also any non-ASCII text) goes the long way, _logfmt_value.
_PLAIN_ASCII = re.compile(r"[!#-<>-\[\]-~]+").fullmatch
_PLAIN_KEPT = 4096  # values a formatter remembers as plain (then it starts again)
_PLAIN_KEPT_LENGTH = 256  # longer values are checked every time rather than kept


def _is_plain(value: str, plain: set[str]) -> bool:
    if _PLAIN_ASCII(value) is None:
        return False
    if len(value) <= _PLAIN_KEPT_LENGTH:
        plain.add(value)
    return True


def _logfmt_ascii_value(value: Any) -> str:
    """:func:`_logfmt_value` in ASCII, for a stream that is not UTF-8: a value past ASCII
    quoted, with JSON's ``\\uXXXX`` escapes (what a quoted value's escapes are). The
    stream's own escapes ("\\xe9", "\\U0001f600") are no escapes of a quoted value,
    and were read literally in a bare one; a character the stream's encoding holds went
    out as it is beside them."""
    text = _logfmt_value(value)
    if text.isascii():
        return text
    if not text.startswith('"'):  # bare: printable, no space, quote, "=" or backslash
        text = _json_text(text)
    return ascii_json(text)


def _logfmt_pairs(
    fields: Mapping[str, Any], plain: set[str], value: Callable[[Any], str] = _logfmt_value
) -> list[str]:
    # One line per delivery at thousands a second: the common values inline (text that
    # needs no quotes, an int, a float) rather than a function call each. Most text repeats
    # from line to line (state, host, IP address, TLS version, cipher, sender): ``plain``
    # holds what was already found to need no quotes (ASCII only), a set lookup instead of
    # a check. ``value`` writes the others.
    return [
        f"{k}={v}"
        if (v.__class__ is str and (v in plain or _is_plain(v, plain)))
        or v.__class__ is int
        or v.__class__ is float
        else f"{k}={value(v)}"
        for k, v in fields.items()
        if v is not None
    ]


class _Heads:
    """The ``level=… logger=… event=…`` of a logfmt line: what repeats from line to line,
    formatted once per combination."""

    def __init__(self, build: Callable[[str, str, str], str]) -> None:
        self._build = build
        self._cache: dict[tuple[str, str, str], str] = {}

    def __call__(self, record: logging.LogRecord) -> str:
        key = (record.levelname, record.name, _event(record))
        head = self._cache.get(key)
        if head is None:
            head = self._build(*key)
            if len(self._cache) >= 256:  # events can be free text: keep the cache bounded
                self._cache.clear()
            self._cache[key] = head
        return head


def _logfmt_head(
    levelname: str, name: str, event: str, value: Callable[[Any], str] = _logfmt_value
) -> str:
    return f"level={value(levelname.lower())} logger={value(name)} event={value(event)}"


def _logfmt_overriding(
    record: logging.LogRecord, fields: Mapping[str, Any], value: Callable[[Any], str]
) -> str:
    pairs: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": _event(record),
    }
    pairs.update((k, v) for k, v in fields.items() if v is not None)
    return " ".join(f"{k}={value(v)}" for k, v in pairs.items())


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=… event=attempt message_id=… rcpt=… reason="250 2.0.0 Ok"``;
    ``ascii_only`` for a stream that is not UTF-8 (see :func:`configure_logging`)."""

    def __init__(self, *, ascii_only: bool = False) -> None:
        super().__init__()
        self._value = _logfmt_ascii_value if ascii_only else _logfmt_value
        self._head = _Heads(functools.partial(_logfmt_head, value=self._value))
        self._plain: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        if "ts" in fields or "level" in fields or "logger" in fields or "event" in fields:
            line = _logfmt_overriding(record, fields, self._value)  # it replaces a head value
        else:
            line = f"ts={_timestamp(record)} {self._head(record)}"
            if fields:
                if len(self._plain) > _PLAIN_KEPT:
                    self._plain.clear()
                pairs = _logfmt_pairs(fields, self._plain, self._value)
                if pairs:
                    line = f"{line} {' '.join(pairs)}"
        if record.exc_info:
            line += " exc=" + self._value(redact_url(self.formatException(record.exc_info)))
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line with the same keys as :class:`KeyValueFormatter`;
    ``ascii_only`` for a stream that is not UTF-8 (see :func:`configure_logging`)."""

    def __init__(self, *, ascii_only: bool = False) -> None:
        super().__init__()
        self._ascii_only = ascii_only

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _event(record),
        }
        fields = _fields(record)
        if fields:
            obj.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            obj["exc"] = redact_url(self.formatException(record.exc_info))
        line = escaped_json(_json_line(obj))
        return ascii_json(line) if self._ascii_only else line


def configure_logging(
    fmt: str, *, level: int = logging.INFO, stream: TextIO | None = None, buffered: bool = False
) -> logging.Handler:
    """Send mailstrom's logs to ``stream`` (stderr) in ``fmt`` ("text" or "json").

    ``buffered`` (``mailstrom worker``: a line per delivery) writes lines in batches, at
    once for warnings and within 0.1 s otherwise (:mod:`mailstrom.cli.logbuffer`); short
    commands write each line as it comes.
    """
    handler = BufferedStreamHandler(stream) if buffered else logging.StreamHandler(stream)
    # A line to a stream that is not UTF-8 (a locale such as de_DE.ISO-8859-1) has its
    # characters past ASCII as \u escapes: standard error wrote an "é" of a reply as
    # "\xe9", which no JSON reader takes, and the collector dropped the line (key=value
    # alike: its quoted values are JSON strings).
    ascii_only = not writes_utf8(handler.stream)
    handler.setFormatter(
        JSONFormatter(ascii_only=ascii_only)
        if fmt == "json"
        else KeyValueFormatter(ascii_only=ascii_only)
    )
    root = logging.getLogger("mailstrom")
    for old in root.handlers:
        if isinstance(old, BufferedStreamHandler):
            old.close()  # writes what it holds and ends its timer thread
    top = logging.getLogger()
    if all(h in root.handlers for h in top.handlers):
        # The warnings of the libraries the worker drives (psycopg's pool: "error
        # connecting in 'mailstrom': ...", asyncio's) go out as lines of this format too,
        # at the root's level (warnings): with no handler of the root's they reached
        # Python's last resort and stderr as bare text, one line and a tab-indented half
        # line each among the JSON lines. Only when nobody else configured the root (an
        # application running the Django command keeps its own).
        top.handlers[:] = [handler]
        # The warnings of Python's ``warnings`` (a library's UserWarning, a coroutine
        # never awaited) too: Python printed them as bare text, a source line indented
        # below, among the JSON lines; as records (logger py.warnings) they are lines of
        # the format, their newlines escaped.
        logging.captureWarnings(True)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler
