"""What the queue keeps beside a message's bytes: tags, metadata, its priority lane, when it
may go and until when, and the key that makes a retried submission a no-op.

Pure validation at the boundary. Everything here comes from the calling program (or the
command line) and is stored, shown by ``mailstrom status`` and copied into every delivery
event, so each value is bounded in count, length and characters: a hostile or buggy caller
cannot make a row, a terminal line or a webhook body grow without limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mailstrom.arguments import shown
from mailstrom.bounds import EARLIEST_TIME
from mailstrom.errors import InvalidMetadata, InvalidQueueAttribute, InvalidTag
from mailstrom.message.chars import shorten

MAX_TAGS = 20
"""Tags one message may carry."""
MAX_TAG_LENGTH = 64
"""Characters of one tag."""
MAX_METADATA_ENTRIES = 32
"""Keys of one message's metadata."""
MAX_METADATA_KEY_LENGTH = 64
"""Characters of one metadata key."""
MAX_METADATA_VALUE = 1024
"""Octets (UTF-8) of one metadata value."""
MAX_METADATA_SIZE = 8192
"""Octets (UTF-8) of all keys and values of one message together."""
MAX_IDEMPOTENCY_KEY = 255
"""Characters of an idempotency key."""
MAX_LANE_NAME = 32
"""Characters of a priority lane's name."""
MAX_SCHEDULE = timedelta(days=36525)
"""How far ahead ``send_at`` may lie, and ``expires_at`` after it (100 years, the longest
duration the configuration takes): the store could hold year 9999, but nothing is meant
to wait that long, and dates near it overflow the arithmetic done on them."""
_SCHEDULE_LIMIT = "100 years"

# Tags and metadata keys travel in URLs, CSV files and command lines: letters, digits and a
# few separators, nothing that needs quoting in any of them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+\-]*\Z")
_LANE = re.compile(r"[a-z][a-z0-9_\-]*\Z")
# Printable ASCII without space: what an application uses as a request or order key.
_KEY = re.compile(r"[\x21-\x7e]+\Z")


# C0 controls, DEL, C1 controls (NEL, U+0085, among them) and the Unicode line and
# paragraph separators: tab and every line break included, as a value is shown on one line
# (a terminal, a CSV row, a log line), and nothing in it may move the cursor or start one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def check_tags(tags: Iterable[str] | str | None) -> tuple[str, ...]:
    """``tags`` de-duplicated in first-seen order; :class:`InvalidTag` for a bad one.

    >>> check_tags(["welcome", "signup", "welcome"])
    ('welcome', 'signup')
    """
    if tags is None:
        return ()
    if isinstance(tags, str | bytes):
        raise InvalidTag("tags must be a list of strings, not one string", field="tags")
    try:
        given = iter(tags)
    except TypeError:
        raise InvalidTag(
            f"tags must be a list of strings, not {type(tags).__name__}", field="tags"
        ) from None
    found: dict[str, None] = {}
    for tag in given:
        if not isinstance(tag, str):
            raise InvalidTag(f"a tag must be a string, not {type(tag).__name__}", field="tags")
        if not 1 <= len(tag) <= MAX_TAG_LENGTH:
            raise InvalidTag(
                f"a tag must have 1 to {MAX_TAG_LENGTH} characters, got {len(tag)}", field="tags"
            )
        if not _NAME.match(tag):
            raise InvalidTag(
                f"tag {tag[:MAX_TAG_LENGTH]!r}: use ASCII letters, digits and . _ : / @ + - "
                "(starting with a letter or digit)",
                field="tags",
            )
        found[tag] = None
        if len(found) > MAX_TAGS:
            raise InvalidTag(f"at most {MAX_TAGS} tags per message", field="tags")
    return tuple(found)


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``metadata`` with keys in sorted order; :class:`InvalidMetadata` when a key
    or value is not a bounded string.

    >>> check_metadata({"order": "42", "customer": "c-7"})
    {'customer': 'c-7', 'order': '42'}
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadata(
            f"metadata must be a mapping of strings, not {type(metadata).__name__}",
            field="metadata",
        )
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidMetadata(
            f"at most {MAX_METADATA_ENTRIES} metadata entries per message, got {len(metadata)}",
            field="metadata",
        )
    size = 0
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidMetadata("metadata keys and values must be strings", field="metadata")
        if not 1 <= len(key) <= MAX_METADATA_KEY_LENGTH or not _NAME.match(key):
            raise InvalidMetadata(
                f"metadata key {key[:MAX_METADATA_KEY_LENGTH]!r}: 1 to "
                f"{MAX_METADATA_KEY_LENGTH} ASCII letters, digits and . _ : / @ + -",
                field="metadata",
            )
        if _has_control(value):
            raise InvalidMetadata(
                f"metadata value of {key!r} holds a control character", field="metadata"
            )
        octets = len(value.encode("utf-8", "surrogatepass"))
        if octets > MAX_METADATA_VALUE:
            raise InvalidMetadata(
                f"metadata value of {key!r} has {octets} octets; at most {MAX_METADATA_VALUE}",
                field="metadata",
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMetadata(
                f"metadata value of {key!r} is not valid Unicode (a lone surrogate)",
                field="metadata",
            ) from None
        size += len(key) + octets
    if size > MAX_METADATA_SIZE:
        raise InvalidMetadata(
            f"metadata has {size} octets; at most {MAX_METADATA_SIZE} per message",
            field="metadata",
        )
    return {key: metadata[key] for key in sorted(metadata)}


def check_lane_name(name: object, *, what: str = "priority") -> str:
    """A lane name: 1 to 32 lower-case letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or len(name) > MAX_LANE_NAME or not _LANE.match(name):
        # Quoted briefly: the name may be megabytes, or an object whose repr raises.
        shown = shorten(name, 40) if isinstance(name, str) else type(name).__name__
        raise InvalidQueueAttribute(
            f"{what}: a lane name is 1 to {MAX_LANE_NAME} lower-case letters, digits, _ and -"
            f" starting with a letter, got {shown}",
            field="priority",
        )
    return name


def check_idempotency_key(key: object) -> str:
    """A key: 1 to 255 printable ASCII characters without spaces."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not _KEY.match(key):
        shown = key[:40] if isinstance(key, str) else type(key).__name__
        raise InvalidQueueAttribute(
            f"idempotency_key: 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters "
            f"without spaces, got {shown!r}",
            field="idempotency_key",
        )
    return key


def aware(when: datetime, what: str) -> datetime:
    """``when`` in UTC; a naive datetime is taken as UTC (as ``Email.date`` is).

    A time before 1900 (:data:`~mailstrom.bounds.EARLIEST_TIME`) is refused: no store
    reads one back, so a message queued with it was left out of ``mailstrom queue`` and
    ``status`` as unreadable while the worker still attempted it. A time in the past
    means at once (``send_at``) or expired (``expires_at``) all the same."""
    if not isinstance(when, datetime):
        raise InvalidQueueAttribute(
            f"{what} must be a datetime, not {type(when).__name__}", field=what
        )
    if when.tzinfo is None:
        utc = when.replace(tzinfo=UTC)
    else:
        try:
            utc = when.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00-05:00 is in year 10000 in UTC
            raise InvalidQueueAttribute(
                f"{what} {when.isoformat()} is out of range: in UTC it is not in years 1 to 9999",
                field=what,
            ) from None
    if utc < EARLIEST_TIME:
        raise InvalidQueueAttribute(
            f"{what} ({utc:%Y-%m-%d %H:%M:%S} UTC) is before {EARLIEST_TIME.year}, the "
            "earliest time the queue keeps",
            field=what,
        )
    return utc


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueAttributes:
    """A message's queue attributes, validated (what the store keeps beside its bytes).

    ``send_at`` is the earliest delivery time (None: at once); ``expires_at`` the moment
    its still-pending recipients fail with the reason ``expired`` (None: only the retry
    policy's maximum age applies). ``idempotency_key`` holds until ``idempotency_until``:
    a submission with the same key before then returns the first message's id.
    """

    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    priority: str | None = None
    """The lane; None is the configured default lane."""
    send_at: datetime | None = None
    expires_at: datetime | None = None
    idempotency_key: str | None = None
    idempotency_until: datetime | None = None


NO_ATTRIBUTES = QueueAttributes()
"""A message with no tags, no metadata, in the default lane, due at once, never expiring."""


def queue_attributes(
    *,
    tags: Iterable[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    priority: str | None = None,
    lanes: tuple[str, ...] | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    max_age: timedelta | None = None,
    idempotency_key: str | None = None,
    idempotency_window: timedelta = timedelta(hours=24),
    now: datetime,
) -> QueueAttributes:
    """Validate what a caller gave into :class:`QueueAttributes`.

    ``lanes`` are the configured lane names (``priority`` must be one of them); ``max_age``
    sets ``expires_at`` to ``send_at`` (or ``now``) plus it, so the two are exclusive.
    Raises :class:`~mailstrom.errors.InvalidQueueAttribute` (or its subclasses
    :class:`~mailstrom.errors.InvalidTag`, :class:`~mailstrom.errors.InvalidMetadata`).
    """
    if priority is not None:
        check_lane_name(priority)
        if lanes is not None and priority not in lanes:
            raise InvalidQueueAttribute(
                f"priority {priority!r} is not a configured lane ({', '.join(lanes)})",
                field="priority",
            )
    start = aware(send_at, "send_at") if send_at is not None else None
    if start is not None and start - now > MAX_SCHEDULE:
        raise InvalidQueueAttribute(
            f"send_at ({start:%Y-%m-%d %H:%M:%S} UTC) is more than {_SCHEDULE_LIMIT} ahead",
            field="send_at",
        )
    if expires_at is not None and max_age is not None:
        raise InvalidQueueAttribute("give expires_at or max_age, not both", field="max_age")
    until: datetime | None = None
    if expires_at is not None:
        until = aware(expires_at, "expires_at")
    elif max_age is not None:
        if not isinstance(max_age, timedelta) or not timedelta(0) < max_age <= MAX_SCHEDULE:
            raise InvalidQueueAttribute(
                f"max_age must be a positive timedelta of at most {_SCHEDULE_LIMIT}, "
                f"got {shown(max_age)}",
                field="max_age",
            )
        until = (start or now) + max_age  # both bounded: no overflow before year 9799
    if until is not None and start is not None and until <= start:
        raise InvalidQueueAttribute(
            f"expires_at ({until:%Y-%m-%d %H:%M:%S} UTC) must come after send_at "
            f"({start:%Y-%m-%d %H:%M:%S} UTC)",
            field="expires_at",
        )
    if until is not None and until - (start or now) > MAX_SCHEDULE:
        raise InvalidQueueAttribute(
            f"expires_at ({until:%Y-%m-%d %H:%M:%S} UTC) is more than {_SCHEDULE_LIMIT} "
            f"after {'send_at' if start is not None else 'now'}",
            field="expires_at",
        )
    key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
    return QueueAttributes(
        tags=check_tags(tags),
        metadata=check_metadata(metadata),
        priority=priority,
        send_at=start,
        expires_at=until,
        idempotency_key=key,
        idempotency_until=None if key is None else now + idempotency_window,
    )
