"""A worker's lease holder: the identity its lease tokens start with, by which
``Store.release_holder`` gives back what a killed worker leased (stores/base.py)."""

from __future__ import annotations

import pytest

from mailstrom.config import Config
from mailstrom.errors import InvalidArgument
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore
from mailstrom.stores.base import check_holder, holder_range, new_holder


@pytest.mark.parametrize("holder", ["01234567", "0123456789abcdef" * 2, "deadbeef"])
def test_holders_of_8_to_32_lower_case_hex_digits_are_taken(holder: str) -> None:
    assert check_holder(holder) == holder
    assert Worker(Config(), MemoryStore(), holder=holder).holder == holder


@pytest.mark.parametrize(
    "holder",
    [
        "0123456",  # too short
        "0" * 33,  # too long
        "0123ABCD",  # upper case: one holder, one spelling
        "0123abcg",
        "0123abcd.",  # the separator: would let one holder's range cover another's
        "0123abc%",  # LIKE's wildcard, SQL's quote: not even in a range's bound
        "0123abc'",
        " 0123abcd",
        "0123abcd\n",  # fullmatch: re's $ would let a trailing newline through
        "",
        12345678,
        b"0123abcd",
    ],
)
def test_anything_else_is_refused_with_a_value_error(holder: object) -> None:
    with pytest.raises(InvalidArgument, match="holder: expected 8 to 32 lower-case hex") as e:
        check_holder(holder)
    assert isinstance(e.value, ValueError) and e.value.argument == "holder"
    with pytest.raises(ValueError, match="holder"):
        Worker(Config(), MemoryStore(), holder=holder)  # type: ignore[arg-type]


def test_none_is_no_holder_for_a_store() -> None:
    with pytest.raises(ValueError, match="holder"):
        check_holder(None)  # a Worker's default: a fresh holder, not None


def test_an_error_does_not_echo_a_huge_holder() -> None:
    with pytest.raises(ValueError, match="holder") as e:
        check_holder("f" * 100_000)
    assert len(str(e.value)) < 120


def test_each_worker_gets_a_fresh_holder_by_default() -> None:
    holders = {Worker(Config(), MemoryStore()).holder for _ in range(3)} | {new_holder()}
    assert len(holders) == 4
    assert all(check_holder(h) == h and len(h) == 16 for h in holders)


def test_a_holders_range_holds_its_tokens_and_no_other_holders() -> None:
    low, high = holder_range("0123abcd")
    assert low <= "0123abcd." + "f" * 32 < high
    assert low <= "0123abcd." + "0" * 32 < high
    for other in ("0123abcd0.ff", "0123abcc.ff", "0123abce.00", "0123abcd", "ffffffff0123abcd"):
        assert not low <= other < high
