"""How stores encode tags and metadata, and how they read back a row they did not write."""

from __future__ import annotations

from mailstrom.stores.attributes import metadata_from, metadata_json, tags_from, tags_json


def test_round_trip_and_empty_values_are_null() -> None:
    assert tags_json(()) is None and metadata_json({}) is None
    tags = ("a", "ü:b")
    assert tags_from(tags_json(tags)) == tags
    meta = {"z": "1", "a": 'quote " and \\ backslash'}
    text = metadata_json(meta)
    assert text is not None and text.index('"a"') < text.index('"z"')  # sorted keys
    assert metadata_from(text) == meta
    assert tags_from(["x"]) == ("x",)  # PostgreSQL hands back lists and dicts
    assert metadata_from({"k": "v"}) == {"k": "v"}


def test_damaged_rows_read_as_nothing_rather_than_failing() -> None:
    assert tags_from("not json") == ()
    assert tags_from('{"a": 1}') == ()
    assert tags_from('["ok", 7, null]') == ("ok",)
    assert metadata_from("[1, 2]") == {}
    assert metadata_from("{broken") == {}
    assert metadata_from('{"k": 1, "ok": "v"}') == {"ok": "v"}


def test_json_nested_too_deep_reads_as_nothing() -> None:
    """A row changed by hand to JSON nested deeper than Python's parser recurses raised
    RecursionError, which no reader of a row expects: every listing holding the message
    failed, and the event outbox stopped at its event."""
    deep = "[" * 5000 + "]" * 5000
    assert tags_from(deep) == ()
    assert metadata_from(deep) == {}
