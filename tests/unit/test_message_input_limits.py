"""Regression tests for the audit of raw-input bounds in ``prepare()``, one group per
finding.

Each test names its finding in the docstring ("Input audit #N: ..."); each failed before the
fix it covers. Limits are made small through parameters, or inputs built just over a
default, so every test stays fast.
"""

from __future__ import annotations

from mailstrom.message.addresses import CACHED_VALUE_LENGTH, parse_address_list

# --- #2 the address cache keeps only short values ---------------------------------------


def test_long_address_lists_are_parsed_uncached() -> None:
    """Input audit #2: a parsed 64 KiB To header of a refused message stayed in the cache
    (800 of them: 1.1 GB); long values are now parsed each time, short ones still cached."""
    long_value = ", ".join(f"user{i}@example.org" for i in range(40))
    assert len(long_value) > CACHED_VALUE_LENGTH
    first = parse_address_list("To", long_value)
    assert parse_address_list("To", long_value) is not first
    assert parse_address_list("To", long_value) == first
    short_value = "Ann <ann@example.org>"
    assert parse_address_list("To", short_value) is parse_address_list("To", short_value)
