"""Date and Message-ID: the fields that date and identify a message (RFC 5322 §3.6.1,
§3.6.4), checked where a message brings its own.

A reader cannot sort or thread a message whose Date it cannot read, and Gmail refuses
mail without a valid Message-ID; both are refused at submission rather than sent.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_tz

from mailstrom.errors import InvalidHeaderValue
from mailstrom.message.chars import shorten

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
# UTF-8 is atext in a raw UTF-8 header section (RFC 6532 §3.2); the builder is ASCII only.
_ID_LEFT = rf'(?:[{_ATEXT}\x80-\U0010ffff]+(?:\.[{_ATEXT}\x80-\U0010ffff]+)*|"(?:[^"\\]|\\.)*")'
_ID_RIGHT = rf"(?:[{_ATEXT}\x80-\U0010ffff]+(?:\.[{_ATEXT}\x80-\U0010ffff]+)*|\[[!-Z^-~]*\])"
_CFWS = r"[ \t]*(?:\((?:[^()\\]|\\.)*\)[ \t]*)*"
_MSG_ID = re.compile(rf"{_CFWS}(<{_ID_LEFT}@{_ID_RIGHT}>){_CFWS}", re.DOTALL)
"""msg-id (RFC 5322 §3.6.4): id-left a dot-atom-text or (obs-id-left) a quoted string,
id-right a dot-atom-text or a no-fold-literal, with comments and white space around."""
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)", re.DOTALL)
"""A comment without one inside it (RFC 5322 §3.2.2)."""
_DATE_TIME = re.compile(
    r"[ \t]*(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[ \t]*,[ \t]*)?"
    r"[0-9]{1,2}[ \t]+(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[ \t]+[0-9]{2,}[ \t]+"
    r"[0-9]{2}[ \t]*:[ \t]*[0-9]{2}(?:[ \t]*:[ \t]*[0-9]{2})?"
    r"[ \t]*(?:[+-][0-9]{4}|[A-Za-z]{1,5})[ \t]*",
    re.IGNORECASE,
)
"""A date-time (RFC 5322 §3.3) with its comments made spaces: a day, month and year, a
time, and a zone, which may not be left out. White space may stand around every token
(§4.3 obsolete syntax), and a zone may be any name of up to five letters: one a reader
does not know stands for ``-0000`` (§4.3)."""
_FOREIGN_DIGIT_OR_SPACE = re.compile(r"[^\D0-9]|[^\S\x00-\x7f]")
"""A digit or white space that is not ASCII: parsedate_tz() reads the date with int() and
str.split(), which take both ("\u0660\u0662 Jan" is the 2nd), yet a date-time has
neither (RFC 5322 §3.3) and a reader could not tell the day."""


def check_message_id(value: str, *, field: str = "Message-ID") -> str:
    """The msg-id of a ``Message-ID`` value, in angle brackets without the comments and
    white space around it; :class:`InvalidHeaderValue` when it is not one.

    >>> check_message_id(" <a.b@example.com> (sent by cron)")
    '<a.b@example.com>'
    """
    match = _MSG_ID.fullmatch(value)
    if match is None:
        raise InvalidHeaderValue(
            f"invalid {field} {shorten(value)}: expected <id-left@id-right> (RFC 5322 "
            "§3.6.4), e.g. <unique-part@example.com>",
            header=field,
        )
    return match[1]


def check_msg_ids(value: str, *, field: str) -> None:
    """Raise :class:`InvalidHeaderValue` unless ``value`` is one or more msg-ids, with
    comments and white space around them: an In-Reply-To or References field (RFC 5322
    §3.6.4; the obsolete phrases of §4.5.4 may not be generated)."""
    at = 0
    while at < len(value) or not at:
        # One msg-id at a time: a pattern repeating _MSG_ID would backtrack over every
        # split of a long run of white space between two.
        match = _MSG_ID.match(value, at)
        if match is None:
            raise InvalidHeaderValue(
                f"invalid {field} {shorten(value)}: expected one or more <id-left@id-right> "
                "(RFC 5322 §3.6.4), each in angle brackets",
                header=field,
            )
        at = match.end()


def format_date(when: datetime) -> str:
    """``when`` (timezone-aware) as an RFC 5322 date-time, for a Date field.

    >>> format_date(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    'Tue, 02 Jan 2024 03:04:05 +0000'

    A zone has hours and minutes only (RFC 5322 §3.3): ``format_datetime`` writes an
    offset with seconds as six digits (``+000030``), which no reader takes, so such a
    time (a local mean time of ``zoneinfo`` before standard time) is written in UTC.
    """
    offset = when.utcoffset()
    if offset is not None and offset % timedelta(minutes=1):
        when = when.astimezone(UTC)
    return format_datetime(when)


def check_date(value: str, *, field: str = "Date") -> None:
    """Raise :class:`InvalidHeaderValue` unless ``value``, a ``field`` value, is a readable
    RFC 5322 date.

    Obsolete forms stay valid (RFC 5322 §4.3): two-digit years, zone names such as
    ``GMT`` or ``EST``, comments and white space around the tokens. A second of 60 is a
    leap second (§3.3). A date without a zone is refused (§3.3 requires one).
    """
    # isascii() first: one C-level pass, true for almost every Date. A comment may still
    # hold UTF-8 (RFC 6532), so only the characters parsedate_tz() misreads are refused.
    foreign = not value.isascii() and _FOREIGN_DIGIT_OR_SPACE.search(value) is not None
    # parsedate_tz() takes a date without a zone (time.ctime()'s "Sat Dec  5 23:35:25
    # 2026", or a comment where the zone belongs) for UTC; readers may take it for their
    # own local time, or not read it. The grammar first, comments two deep at most.
    bare = _COMMENT.sub(" ", _COMMENT.sub(" ", value)) if "(" in value else value
    shaped = not foreign and _DATE_TIME.fullmatch(bare) is not None
    parts = parsedate_tz(value) if shaped else None
    try:
        if parts is None:
            raise ValueError("unreadable")
        year, month, day, hour, minute, second = parts[:6]
        if second > 60:
            raise ValueError("second out of range")
        offset = timedelta(seconds=parts[9] or 0)
        datetime(year, month, day, hour, minute, min(second, 59), tzinfo=timezone(offset))
    except (ValueError, OverflowError):
        raise InvalidHeaderValue(
            f"invalid {field} {shorten(value)}: expected an RFC 5322 date-time (§3.3) such "
            "as 'Tue, 02 Jan 2024 03:04:05 +0000'",
            header=field,
        ) from None
