"""The facades' queue calls refuse bad arguments where they enter, with
:class:`~mailstrom.errors.InvalidArgument` (or the typed error of their kind), the same
way on every store, and change nothing then. One test per bug that
``test_api_fuzz.py`` found."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from mailstrom import Config, Email, Mailstrom
from mailstrom.errors import InvalidArgument
from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import QueueFilter, Store


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "q.db")
    yield made
    made.close()


@pytest.fixture
def ms(store: Store) -> Mailstrom:
    facade = Mailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    for n in range(3):
        facade.send_email(Email(from_="a@example.com", to=[f"b{n}@example.org"], text="x"))
    return facade


def test_a_negative_filter_limit_is_refused_not_read_as_no_limit(ms: Mailstrom) -> None:
    """SQLite read LIMIT -1 as no limit: ``hold(QueueFilter(limit=-1))`` held every
    message there and none in the memory store."""
    with pytest.raises(InvalidArgument) as raised:
        ms.hold(QueueFilter(limit=-1))
    assert raised.value.argument == "limit"
    assert ms.stats().held == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("limit", None),
        ("limit", 2**80),
        ("limit", 1.5),
        ("limit", True),
        ("older_than", 5),
        ("older_than", -timedelta(seconds=1)),
        ("older_than", timedelta(days=999_999_999)),
        ("held", "no"),
        ("domain", b"example.org"),
        ("tag", 5),
        ("state", "bogus"),
        ("states", "queued"),
        ("states", 5),
    ],
)
def test_a_filter_field_of_the_wrong_kind_is_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        QueueFilter(**{field: value})  # type: ignore[arg-type]
    assert raised.value.argument == field


def test_states_given_by_value_match_the_same_messages_in_every_store(ms: Mailstrom) -> None:
    """``state="queued"`` matched every message in SQLite and none in the memory store
    (which compared the string with ``is``)."""
    assert len(ms.query(QueueFilter(state="queued"))) == 3  # type: ignore[arg-type]
    assert len(ms.query(QueueFilter(states=frozenset({"queued"})))) == 3  # type: ignore[arg-type]
    assert QueueFilter(state="failed").state is RecipientState.FAILED  # type: ignore[arg-type]
