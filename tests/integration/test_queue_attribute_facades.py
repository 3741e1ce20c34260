"""Queue attributes through both facades (queue only, no worker): the keywords reach the
store, bad values raise before anything is queued, and an idempotency key holds for the
configured window of the facade's clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailstrom import (
    AsyncMailstrom,
    Config,
    Email,
    InvalidQueueAttribute,
    InvalidTag,
    Mailstrom,
    QueueFilter,
)
from mailstrom.stores import MemoryStore
from tests.support.delivery import FakeClock

CONFIG = Config(helo_name="mail.example.com", idempotency_window=timedelta(hours=1))


def receipt(n: int = 42) -> Email:
    return Email(
        from_="shop@example.com",
        to=["bob@example.org"],
        subject="Receipt",
        text="x",
        tags=["receipt"],
        metadata={"order": str(n)},
    )


def test_the_sync_facade_keeps_attributes_and_honours_the_key_window() -> None:
    clock = FakeClock(datetime(2030, 1, 2, tzinfo=UTC))
    store = MemoryStore()
    ms = Mailstrom(CONFIG, store=store, worker=None, clock=clock)
    first = ms.send_email(receipt(), idempotency_key="order-42")
    clock.advance(timedelta(minutes=59))
    assert ms.send_email(receipt(), idempotency_key="order-42") == first
    clock.advance(timedelta(minutes=1))
    later = ms.send_email(receipt(), idempotency_key="order-42", tags=["again"])
    assert later != first
    assert ms.query_status(later).tags == ("again",)
    assert [m.id for m in ms.query(QueueFilter(tag="receipt"))] == [first]
    with pytest.raises(InvalidTag):
        ms.send_email(receipt(), tags=["no spaces please"])
    with pytest.raises(InvalidQueueAttribute) as caught:
        ms.send_email(receipt(), priority="urgent")
    assert caught.value.field == "priority"
    assert len(ms.query_recent()) == 2


async def test_the_async_facade_takes_the_same_keywords() -> None:
    store = MemoryStore()
    ms = AsyncMailstrom(CONFIG, store=store, worker=None)
    at = datetime.now(UTC) + timedelta(days=1)
    mid = await ms.send_email(
        receipt(),
        priority="bulk",
        send_at=at,
        max_age=timedelta(hours=2),
        idempotency_key="k",
        metadata={"user": "u-7"},
    )
    assert await ms.send_email(receipt(), idempotency_key="k") == mid
    status = await ms.query_status(mid)
    assert status.priority == "bulk"
    assert status.send_at == at and status.expires_at == at + timedelta(hours=2)
    assert dict(status.metadata) == {"user": "u-7"}
    assert status.tags == ("receipt",)
    assert [m.id for m in await ms.query(QueueFilter(tag="receipt"))] == [mid]
