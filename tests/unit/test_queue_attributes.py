"""Queue attributes at the boundary: tags, metadata, lanes, schedule and keys validated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailstrom import Config, Email, InvalidMetadata, InvalidQueueAttribute, InvalidTag, Lane
from mailstrom.bounds import EARLIEST_TIME
from mailstrom.client.common import prepare_for
from mailstrom.errors import ConfigError
from mailstrom.message.attributes import (
    MAX_METADATA_ENTRIES,
    MAX_METADATA_SIZE,
    MAX_METADATA_VALUE,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    check_metadata,
    check_tags,
    queue_attributes,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_tags_are_deduplicated_in_order() -> None:
    assert check_tags(["b", "a", "b", "order:42", "x/y@z+1"]) == ("b", "a", "order:42", "x/y@z+1")
    assert check_tags(None) == ()


@pytest.mark.parametrize(
    "tags",
    [
        "welcome",  # one string, not a list
        [""],
        ["x" * (MAX_TAG_LENGTH + 1)],
        ["has space"],
        ["comma,separated"],
        ["-leading"],
        ["ünïcode"],
        ["new\nline"],
        [42],
        [f"t{i}" for i in range(MAX_TAGS + 1)],
        5,  # not iterable: a raw TypeError before
        b"abc",
    ],
)
def test_bad_tags_raise_invalid_tag(tags: object) -> None:
    with pytest.raises(InvalidTag) as caught:
        check_tags(tags)  # type: ignore[arg-type]
    assert caught.value.field == "tags"


def test_the_limits_themselves_are_accepted() -> None:
    assert len(check_tags([f"t{i}" for i in range(MAX_TAGS)])) == MAX_TAGS
    assert check_tags(["x" * MAX_TAG_LENGTH])
    big = {f"k{i}": "v" * 200 for i in range(MAX_METADATA_ENTRIES)}
    assert len(check_metadata(big)) == MAX_METADATA_ENTRIES
    assert check_metadata({"k": "é" * (MAX_METADATA_VALUE // 2)})


def test_metadata_is_copied_with_sorted_keys() -> None:
    given = {"order": "42", "customer": "c-7", "note": "Grüße, 50\xa0% off — 日本"}
    checked = check_metadata(given)
    assert list(checked) == ["customer", "note", "order"]
    assert checked == given and checked is not given


@pytest.mark.parametrize(
    "metadata",
    [
        ["order", "42"],
        {"order": 42},
        {7: "x"},
        {"": "x"},
        {"bad key": "x"},
        {"k": "tab\there"},
        {"k": "\x7f"},
        # C1 controls and the Unicode line breaks are controls too ("one line").
        {"k": "x\x85y"},  # NEL
        {"k": "x\x9bK"},  # CSI: a terminal escape in one character
        {"k": "x\u2028y"},
        {"k": "x\u2029y"},
        {"k": "x" * (MAX_METADATA_VALUE + 1)},
        {"k": "é" * (MAX_METADATA_VALUE // 2 + 1)},  # counted in octets
        {"k": "\ud800"},
        {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)},
        {f"k{i}": "v" * 1000 for i in range(9)},  # > 8 KiB in all
    ],
)
def test_bad_metadata_raises_invalid_metadata(metadata: object) -> None:
    with pytest.raises(InvalidMetadata) as caught:
        check_metadata(metadata)  # type: ignore[arg-type]
    assert caught.value.field == "metadata"
    assert MAX_METADATA_SIZE == 8192


def test_schedule_expiry_and_key() -> None:
    at = datetime(2030, 1, 3, 9, 0)  # naive: UTC
    attrs = queue_attributes(
        send_at=at,
        max_age=timedelta(hours=2),
        idempotency_key="order-42-receipt",
        idempotency_window=timedelta(hours=24),
        now=NOW,
    )
    assert attrs.send_at == at.replace(tzinfo=UTC)
    assert attrs.expires_at == at.replace(tzinfo=UTC) + timedelta(hours=2)
    assert attrs.idempotency_until == NOW + timedelta(hours=24)
    assert queue_attributes(max_age=timedelta(minutes=5), now=NOW).expires_at == NOW + timedelta(
        minutes=5
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"expires_at": NOW, "max_age": timedelta(hours=1)}, "max_age"),
        ({"max_age": timedelta(0)}, "max_age"),
        ({"send_at": NOW, "expires_at": NOW - timedelta(seconds=1)}, "expires_at"),
        ({"send_at": "tomorrow"}, "send_at"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"priority": "Bulk"}, "priority"),
        ({"priority": "urgent", "lanes": ("transactional", "bulk")}, "priority"),
    ],
)
def test_bad_schedule_key_or_lane(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidQueueAttribute) as caught:
        queue_attributes(now=NOW, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


MINUS_5 = timezone(timedelta(hours=-5))
PLUS_5 = timezone(timedelta(hours=5))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        # Out of range once in UTC: astimezone() raised a raw OverflowError.
        ({"send_at": datetime(9999, 12, 31, 23, tzinfo=MINUS_5)}, "send_at"),
        ({"send_at": datetime(1, 1, 1, tzinfo=PLUS_5)}, "send_at"),
        ({"expires_at": datetime(9999, 12, 31, 23, 59, 59, tzinfo=MINUS_5)}, "expires_at"),
        # (send_at or now) + max_age beyond year 9999: a raw OverflowError too.
        ({"max_age": timedelta(days=365 * 9000)}, "max_age"),
        ({"max_age": timedelta.max}, "max_age"),
        ({"send_at": datetime(9999, 1, 1), "max_age": timedelta(days=400)}, "send_at"),
        # More than 100 years ahead: representable, but nothing should wait that long.
        ({"send_at": datetime.max}, "send_at"),
        ({"send_at": NOW + timedelta(days=36526)}, "send_at"),
        ({"expires_at": datetime(9999, 12, 31, tzinfo=UTC)}, "expires_at"),
        ({"send_at": NOW, "expires_at": NOW + timedelta(days=36526)}, "expires_at"),
        # Before 1900: no store reads such a time back, so a queued row holding one was
        # left out of `mailstrom queue` and `status` as unreadable.
        ({"send_at": datetime.min}, "send_at"),
        ({"send_at": datetime(1899, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)}, "send_at"),
        ({"expires_at": datetime(1, 1, 1, tzinfo=UTC)}, "expires_at"),
        ({"expires_at": datetime(1900, 1, 1, tzinfo=PLUS_5)}, "expires_at"),
        ({"send_at": datetime(1, 1, 2), "max_age": timedelta(days=1)}, "send_at"),
    ],
)
def test_extreme_dates_are_refused_as_queue_attributes(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidQueueAttribute) as caught:
        queue_attributes(now=NOW, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_dates_up_to_a_hundred_years_ahead_are_kept() -> None:
    far = NOW + timedelta(days=36525)
    attrs = queue_attributes(now=NOW, send_at=far, max_age=timedelta(days=36525))
    assert attrs.send_at == far and attrs.expires_at == far + timedelta(days=36525)
    # A time in the past is due at once, as before, back to 1900 (EARLIEST_TIME): an
    # earlier one is refused (above), as the stores read back no time before it.
    assert queue_attributes(now=NOW, send_at=EARLIEST_TIME).send_at == EARLIEST_TIME
    naive = datetime(1900, 1, 1)
    assert queue_attributes(now=NOW, expires_at=naive).expires_at == EARLIEST_TIME


def test_prepare_for_takes_the_email_fields_and_lets_keywords_replace_them() -> None:
    config = Config(helo_name="mail.example.com")
    email = Email(
        from_="app@example.com",
        to=["bob@example.org"],
        text="x",
        tags=["receipt"],
        metadata={"order": "42"},
        priority="bulk",
    )
    kept = prepare_for(config, email, envelope_from=None, envelope_to=None, now=NOW)
    assert kept.attributes.tags == ("receipt",)
    assert kept.attributes.metadata == {"order": "42"}
    assert kept.attributes.priority == "bulk"
    assert b"receipt" not in kept.data and b"order" not in kept.data  # never sent
    replaced = prepare_for(
        config, email, envelope_from=None, envelope_to=None, now=NOW, tags=["other"], priority=None
    )
    assert replaced.attributes.tags == ("other",)
    assert replaced.attributes.priority == "bulk"
    raw = b"From: app@example.com\r\nTo: bob@example.org\r\n\r\nx\r\n"
    plain = prepare_for(config, raw, envelope_from=None, envelope_to=None, now=NOW)
    assert plain.attributes.priority == "transactional"  # the default lane
    assert plain.attributes.tags == ()


def test_lane_configuration_is_checked() -> None:
    assert Config().lane_names == ("transactional", "bulk")
    with pytest.raises(ConfigError):
        Lane(name="Bulk")
    with pytest.raises(ConfigError):
        Lane(name="bulk", share=0)
    with pytest.raises(ConfigError):
        Config(lanes=(Lane(name="a"), Lane(name="a")))
    with pytest.raises(ConfigError):
        Config(lanes=(Lane(name="a"),))  # default_priority "transactional" is not a lane
    with pytest.raises(ConfigError):
        Config(idempotency_window=timedelta(0))
    assert Config(lanes=(Lane(name="a"),), default_priority="a").lane_names == ("a",)


@pytest.mark.parametrize("lanes", [None, 5, Lane(name="a"), "a", b"a"])
def test_lanes_that_are_no_sequence_of_lanes_are_a_config_error(lanes: object) -> None:
    # One Lane given alone, or None, raised a bare TypeError ("not iterable") from
    # Config's own check, where every other wrong value raises ConfigError.
    with pytest.raises(ConfigError, match="lanes"):
        Config(lanes=lanes, default_priority="a")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["café", "ünits", "日本"])
def test_a_tag_or_key_of_other_letters_is_refused_saying_ascii(name: str) -> None:
    """Tags and metadata keys take ASCII letters only (they travel in URLs, CSV files and
    command lines); the guide and the errors said "letters", which "café" is."""
    with pytest.raises(InvalidTag, match="ASCII letters"):
        check_tags([name])
    with pytest.raises(InvalidMetadata, match="ASCII letters"):
        check_metadata({name: "v"})
