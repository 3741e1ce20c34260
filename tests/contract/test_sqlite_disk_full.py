"""The SQLite store on a full disk (tests/support/disk_full.py): enqueues fail with a
StoreError that says the disk is full, nothing half-written, no caller of a shared group
commit left without its answer; reads go on; and once space is freed the same store
object writes again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from mailstrom import Email, Mailstrom
from mailstrom.errors import StoreCorrupt, StoreError
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import SQLiteStore
from tests.support.disk_full import DiskFull

from .support import LEASE_FOR, NOW, lease_all, message, results_for

BIG = b"Subject: big\r\n\r\n" + b"x" * 40_000 + b"\r\n"
"""A body that needs pages of its own (ten 4 KiB pages): never fits a full disk."""


def many_recipients(n: int = 400) -> PreparedMessage:
    """A small message whose recipient rows need new pages: its message row fits in the
    room the file has, its recipients do not (a half-written message, if not undone)."""
    return message(*(f"user{i:04}@example.org" for i in range(n)))


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskFull:
    return DiskFull.patch(monkeypatch)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "queue.db")
    yield store
    store.close()


def rows(store: SQLiteStore) -> dict[str, int]:
    """How many rows each queue table holds, read on a connection of the test's own."""
    with closing(store._connect()) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("messages", "recipients", "attempts", "events")
        }


def assert_disk_full(exc: BaseException, store: SQLiteStore) -> None:
    """A temporary StoreError that tells an operator the disk is full, and where."""
    assert type(exc) is StoreError, repr(exc)
    assert not isinstance(exc, StoreCorrupt)
    text = str(exc)
    assert "disk" in text and "full" in text, text
    assert store.path in text, text
    assert "free" in text, text  # what to do about it


@pytest.mark.parametrize(
    "prepared", [message(data=BIG), many_recipients()], ids=["big-body", "many-recipients"]
)
def test_enqueue_on_a_full_disk_fails_plainly_and_writes_nothing(
    store: SQLiteStore, disk: DiskFull, prepared: PreparedMessage
) -> None:
    store.enable_events()
    kept = store.enqueue(message(), now=NOW)
    before = rows(store)
    with disk.while_full(), pytest.raises(StoreError) as failed:
        store.enqueue(prepared, now=NOW)
    assert_disk_full(failed.value, store)
    assert rows(store) == before  # no message without recipients, nor the reverse
    assert [m.id for m in store.recent()] == [kept]
    # Space freed: the same store object takes the same message.
    mid = store.enqueue(prepared, now=NOW)
    assert len(store.status(mid).recipients) == len(prepared.recipients)


def test_enqueue_many_on_a_full_disk_is_all_or_nothing(store: SQLiteStore, disk: DiskFull) -> None:
    before = rows(store)
    batch = [message(), message(data=BIG), message()]
    with disk.while_full(), pytest.raises(StoreError) as failed:
        store.enqueue_many(batch, now=NOW)
    assert_disk_full(failed.value, store)
    assert rows(store) == before
    assert len(store.enqueue_many(batch, now=NOW)) == 3


def test_reading_goes_on_while_the_disk_is_full(store: SQLiteStore, disk: DiskFull) -> None:
    mid = store.enqueue(message(), now=NOW)
    with disk.while_full():
        with pytest.raises(StoreError):
            store.enqueue(message(data=BIG), now=NOW)
        assert store.status(mid).id == mid
        assert [m.id for m in store.recent()] == [mid]
        assert store.stats().messages == 1
        assert store.next_due(now=NOW) == NOW
    # A view's own read-only store object too.
    viewer = SQLiteStore(store.path, read_only=True)
    try:
        with disk.while_full():
            assert viewer.status(mid).id == mid
    finally:
        viewer.close()


def test_the_facade_says_the_disk_is_full(store: SQLiteStore, disk: DiskFull) -> None:
    """``send_email`` on a full disk: the StoreError reaches the application, which can
    tell its user to try again later; nothing is queued."""
    with Mailstrom(store=store, worker=None) as ms:
        email = Email(from_="a@sender.test", to=["b@example.org"], subject="s", text="x" * 40_000)
        with disk.while_full(), pytest.raises(StoreError) as failed:
            ms.send_email(email)
        assert_disk_full(failed.value, store)
        assert store.recent() == []
        assert ms.query_status(ms.send_email(email)).recipients


def test_group_commit_on_a_full_disk_answers_every_caller(
    store: SQLiteStore, disk: DiskFull
) -> None:
    """Threads whose enqueues share one group commit while the disk fills: each gets its
    ids (and its message is stored whole) or its own disk-full error; none is lost or
    half-written. A transaction of them all fails as a whole on the big messages, and the
    small ones that fit the room left are committed one by one."""
    threads = 8
    start = threading.Barrier(threads)
    answers: dict[int, list[str] | BaseException] = {}

    def enqueue(n: int) -> None:
        prepared = message(data=BIG) if n % 2 else message(f"t{n}@example.org")
        start.wait()
        try:
            answers[n] = [store.enqueue(prepared, now=NOW)]
        except BaseException as exc:  # every answer is checked below
            answers[n] = exc

    store.enqueue(message(), now=NOW)  # the store's threads have enqueued lately
    with disk.while_full():
        workers = [threading.Thread(target=enqueue, args=(n,)) for n in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(timeout=10)
    assert sorted(answers) == list(range(threads))
    stored = {m.id for m in store.recent(limit=100)}
    for n, answer in answers.items():
        if isinstance(answer, BaseException):
            assert n % 2, f"a small message found no room: {answer!r}"
            assert_disk_full(answer, store)
        else:
            [mid] = answer
            assert mid in stored
            assert [r.address for r in store.status(mid).recipients] == [f"t{n}@example.org"]
    assert len(stored) == 1 + sum(isinstance(a, list) for a in answers.values())
    assert rows(store)["recipients"] == 2 + sum(isinstance(a, list) for a in answers.values())
    store.enqueue(message(data=BIG), now=NOW)


def test_recording_results_on_a_full_disk_fails_and_is_undone(
    store: SQLiteStore, disk: DiskFull
) -> None:
    """The worker's write (results and the next lease in one transaction) fails whole:
    the recipients stay leased to it, to be recorded by the retry once space is freed."""
    store.enqueue(many_recipients(60), now=NOW)
    lease = lease_all(store)
    results = results_for(lease, RecipientState.DELIVERED)
    before = rows(store)
    with disk.while_full(), pytest.raises(StoreError) as failed:
        store.record_and_lease(results, now=NOW, limit=10, lease_for=LEASE_FOR)
    assert_disk_full(failed.value, store)
    assert rows(store) == before
    recorded, _ = store.record_and_lease(results, now=NOW, limit=10, lease_for=LEASE_FOR)
    assert len(recorded) == 60
