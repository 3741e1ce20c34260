"""mailstrom.testing.capture(): every way of queueing is collected, and held in its store."""

from __future__ import annotations

import copy
import doctest
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import mailstrom.testing.outbox
from mailstrom import (
    AsyncMailstrom,
    Config,
    Email,
    InvalidAddress,
    InvalidArgument,
    Mailstrom,
    MessageStatus,
    RecipientState,
    StoreError,
)
from mailstrom.message import PreparedMessage
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.testing import CapturedMessage, Outbox, capture
from mailstrom.testing.outbox import capture_active

CONFIG = Config(helo_name="app.test")
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def welcome(to: str = "bob@example.org", **extra: Any) -> Email:
    return Email(
        from_="Shop <hello@shop.test>",
        to=[to],
        subject="Welcome",
        text="Thanks for signing up.",
        html="<p>Thanks for signing up.</p>",
        **extra,
    )


def prepared(to: str) -> PreparedMessage:
    return PreparedMessage(
        data=f"From: a@shop.test\r\nTo: {to}\r\nSubject: raw\r\n\r\nHi\r\n".encode(),
        envelope_from="a@shop.test",
        recipients=(to,),
    )


def test_send_email_is_captured_with_its_envelope_and_parsed_message() -> None:
    store = MemoryStore()
    with capture() as outbox, Mailstrom(CONFIG, store=store) as ms:
        mid = ms.send_email(welcome(bcc=["audit@shop.test"]))
    [mail] = outbox
    assert mail.message_id == mid
    assert mail.envelope_from == "hello@shop.test"
    assert mail.envelope_to == ["bob@example.org", "audit@shop.test"]
    assert isinstance(mail.message, EmailMessage)
    assert mail.message["To"] == "bob@example.org"
    assert "Bcc" not in mail.message
    assert mail.subject == "Welcome"
    assert mail.text == "Thanks for signing up.\n"
    assert mail.html == "<p>Thanks for signing up.</p>\n"
    assert len(mail.data) == store.status(mid).size  # the stored bytes, as a worker sends them
    assert b"Bcc" not in mail.data


@pytest.mark.parametrize("text", ["Grüße", "日本語のテキスト\n二行目"])
def test_a_text_sent_in_base64_reads_back_with_lf_line_ends(text: str) -> None:
    # Non-ASCII text often goes in base64, whose decoded content keeps the CRLF of the
    # canonical form: mail.text was "Grüße\r\n" where "Hello" gave "Hello\n".
    with capture() as outbox, Mailstrom(CONFIG, store=MemoryStore()) as ms:
        ms.send_email(Email(from_="a@shop.test", to="b@example.org", text=text, html=text))
    [mail] = outbox
    assert b"base64" in mail.data
    assert mail.text == mail.html == text + "\n"


@pytest.mark.parametrize(
    ("given", "read"),
    [("Hello", "Hello\n"), ("Hello\n", "Hello\n"), ("Hello\n\n", "Hello\n\n"), ("", "\n")],
)
def test_text_and_html_end_with_a_line_end(given: str, read: str) -> None:
    # Documented, not stripped: a message ends its text with a line end, so "Hello" and
    # "Hello\n" are the same bytes and cannot read back apart; .text is what the message
    # holds (as mail.message's body and a FakeMX's message read), and the docs' example,
    # which sends and asserts "Thanks for signing up.\n", keeps passing.
    with capture() as outbox, Mailstrom(CONFIG, store=MemoryStore()) as ms:
        ms.send_email(Email(from_="a@shop.test", to="b@example.org", text=given, html=given))
    [mail] = outbox
    assert mail.text == mail.html == read
    body = mail.message.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content() == read


def test_utf8_header_fields_are_parsed_as_utf8() -> None:
    # An address with a UTF-8 local part makes the header fields raw UTF-8 (RFC 6532);
    # parsed as bytes, their addresses came out as surrogate escapes ("j\udcc3\udcb6rg").
    with capture() as outbox, Mailstrom(CONFIG, store=MemoryStore()) as ms:
        ms.send_email(
            Email(
                from_="Jörg Müller <jörg@shop.test>",
                to=["Ann <ann@example.org>", "zoë@example.org"],
            )
        )
    [mail] = outbox
    [sender] = mail.message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Jörg Müller", "jörg@shop.test")
    assert [a.addr_spec for a in mail.message["To"].addresses] == [
        "ann@example.org",
        "zoë@example.org",
    ]


def test_captured_mail_is_queued_and_held_and_the_worker_leaves_it_alone() -> None:
    store = MemoryStore()
    with capture() as outbox, Mailstrom(CONFIG, store=store) as ms:
        mid = ms.send_email(welcome())
        ms.wake()
    # The worker has stopped; it never leased the held message.
    status = store.status(mid)
    assert status.state is RecipientState.QUEUED
    assert status.held
    assert [r.attempts for r in status.recipients] == [0]
    assert outbox[0].status() == status
    assert store.next_due(now=NOW) is None  # nothing due: held mail is not pending work


def test_send_emails_queues_the_batch_held_in_order() -> None:
    store = MemoryStore()
    with capture() as outbox:
        ms = Mailstrom(CONFIG, store=store, worker=None)
        ids = ms.send_emails([welcome("a@example.org"), welcome("b@example.org")])
    assert [m.message_id for m in outbox] == ids
    assert [m.envelope_to for m in outbox] == [["a@example.org"], ["b@example.org"]]
    assert all(store.status(i).held for i in ids)


async def test_async_facade_is_captured() -> None:
    store = MemoryStore()
    with capture() as outbox:
        async with AsyncMailstrom(CONFIG, store=store) as ms:
            mid = await ms.send_email(welcome())
            [batch_id] = await ms.send_emails([welcome("c@example.org")])
            status = await ms.query_status(mid)
    assert [m.message_id for m in outbox] == [mid, batch_id]
    assert status.held


def test_raw_bytes_and_an_explicit_envelope() -> None:
    raw = b"From: a@shop.test\nTo: list@example.org\nSubject: raw\n\nbody\n"
    with capture() as outbox:
        Mailstrom(CONFIG, store=MemoryStore(), worker=None).send_email(
            raw, envelope_from="bounces@shop.test", envelope_to=["x@example.org"]
        )
    [mail] = outbox
    assert (mail.envelope_from, mail.envelope_to) == ("bounces@shop.test", ["x@example.org"])
    assert mail.message["To"] == "list@example.org"
    assert mail.html is None
    assert mail.text == "body\n"


def test_invalid_input_is_refused_and_nothing_is_captured() -> None:
    with capture() as outbox:
        ms = Mailstrom(CONFIG, store=MemoryStore(), worker=None)
        with pytest.raises(InvalidAddress):
            ms.send_email(Email(from_="a@shop.test", to=["not an address"], text="x"))
    assert len(outbox) == 0


def test_a_store_made_before_the_capture_is_covered_and_restored_after(tmp_path: Path) -> None:
    original = (MemoryStore.enqueue, SQLiteStore.enqueue, SQLiteStore.enqueue_many)
    memory, sqlite = MemoryStore(), SQLiteStore(tmp_path / "q.db")
    try:
        assert not capture_active()
        with capture() as outbox:
            assert capture_active()
            held = [memory.enqueue(prepared("a@x.test"), now=NOW)]
            held += sqlite.enqueue_many([prepared("b@x.test"), prepared("c@x.test")], now=NOW)
        assert not capture_active()
        assert (MemoryStore.enqueue, SQLiteStore.enqueue, SQLiteStore.enqueue_many) == original
        free = sqlite.enqueue(prepared("d@x.test"), now=NOW)
        assert [m.message_id for m in outbox] == held
        assert [m.store for m in outbox] == [memory, sqlite, sqlite]
        assert all(m.status().held for m in outbox)
        assert not sqlite.status(free).held
        assert len(outbox) == 3  # closed: no longer collecting
    finally:
        sqlite.close()


def test_a_sqlite_queue_keeps_captured_mail_held_after_reopening(tmp_path: Path) -> None:
    with capture(), Mailstrom(CONFIG, store=SQLiteStore(tmp_path / "q.db"), worker=None) as ms:
        mid = ms.send_email(welcome())
        ms.store.close()
    again = SQLiteStore(tmp_path / "q.db")
    try:
        assert again.status(mid).held
        assert again.stats().held == 1
    finally:
        again.close()


def test_nested_captures_each_collect_what_is_queued_while_open() -> None:
    store = MemoryStore()
    with capture() as outer:
        store.enqueue(prepared("a@x.test"), now=NOW)
        with capture() as inner:
            store.enqueue(prepared("b@x.test"), now=NOW)
        assert capture_active()
        store.enqueue(prepared("c@x.test"), now=NOW)
    assert [m.recipients for m in outer] == [("a@x.test",), ("b@x.test",), ("c@x.test",)]
    assert [m.recipients for m in inner] == [("b@x.test",)]
    assert not capture_active()


class AuditedStore(MemoryStore):
    """A subclass overriding enqueue and calling the original."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        self.calls += 1
        return super().enqueue(message, now=now, hold=hold)


def test_a_subclass_is_captured_once_even_when_named_too() -> None:
    store = AuditedStore()
    with capture(store_types=[AuditedStore]) as outbox:
        mid = store.enqueue(prepared("a@x.test"), now=NOW)
        ids = store.enqueue_many([prepared("b@x.test")], now=NOW)
    assert [m.message_id for m in outbox] == [mid, *ids]
    assert store.calls == 2  # the batch went through the subclass's enqueue
    assert "enqueue" in AuditedStore.__dict__  # its own method is back
    assert all(store.status(i).held for i in [mid, *ids])


class WrappingStore:
    """A Store of the user's own that is no subclass of a shipped one."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        return self.inner._add([message], now=now, hold=hold)[0]

    def enqueue_many(self, messages: Sequence[PreparedMessage], *, now: datetime) -> list[str]:
        return self.inner._add(messages, now=now, hold=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_store_types_names_the_users_own_store_classes() -> None:
    store = WrappingStore()
    with capture() as missed:
        store.enqueue(prepared("a@x.test"), now=NOW)
    with capture(store_types=[WrappingStore]) as outbox:
        mid = store.enqueue(prepared("b@x.test"), now=NOW)
    assert len(missed) == 0
    assert [m.message_id for m in outbox] == [mid]
    assert store.status(mid).held
    assert "enqueue" in WrappingStore.__dict__


class EnqueueOnlyStore:
    """A store of the user's own defining ``enqueue`` and handing the rest, batches
    included, to a shipped store."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        return self.inner._add([message], now=now, hold=hold)[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_store_type_without_enqueue_many_is_captured() -> None:
    # Entering raised AttributeError, having patched the shipped stores and registered
    # the outbox for good: every later message of the process was held.
    store = EnqueueOnlyStore()
    with capture(store_types=[EnqueueOnlyStore]) as outbox:
        mid = store.enqueue(prepared("a@x.test"), now=NOW)
        ids = store.enqueue_many([prepared("b@x.test")], now=NOW)
    assert [m.message_id for m in outbox] == [mid, *ids]
    assert all(store.status(i).held for i in [mid, *ids])
    assert not capture_active()
    assert "enqueue_many" not in EnqueueOnlyStore.__dict__


@pytest.mark.parametrize("wrong", ["MemoryStore", MemoryStore(), object, int])
def test_a_capture_that_cannot_start_leaves_nothing_behind(wrong: object) -> None:
    with pytest.raises(TypeError, match="store_types"), capture(store_types=[wrong]):
        pass  # pragma: no cover
    assert not capture_active()
    store = MemoryStore()
    mid = store.enqueue(prepared("a@x.test"), now=NOW)
    assert not store.status(mid).held  # the next message is queued, not held
    assert SQLiteStore.enqueue.__qualname__ == "SQLiteStore.enqueue"


def test_the_outbox_reads_like_a_list() -> None:
    with capture() as outbox:
        store = MemoryStore()
        for to in ("a@x.test", "b@x.test", "c@x.test"):
            store.enqueue(prepared(to), now=NOW)
        assert isinstance(outbox, Outbox)
        assert len(outbox) == 3
        assert [m.envelope_to[0] for m in outbox[1:]] == ["b@x.test", "c@x.test"]
        assert isinstance(outbox[-1], CapturedMessage)
        assert "b@x.test" in repr(outbox)
        outbox.clear()
        store.enqueue(prepared("d@x.test"), now=NOW)
    assert [m.envelope_to for m in outbox] == [["d@x.test"]]


def test_the_outbox_compares_like_a_list() -> None:
    # Outbox compared by identity: "assert outbox == []" failed on an empty outbox, and
    # "assert outbox != []" (something was sent) passed when nothing had been.
    with capture() as outbox, capture() as other:
        assert outbox == [] and not outbox != []  # noqa: SIM202 - the operator under test
        MemoryStore().enqueue(prepared("a@x.test"), now=NOW)
    assert outbox != [] and not outbox == []  # noqa: SIM201
    assert outbox == [outbox[0]] == list(outbox)
    assert outbox == other
    assert outbox != [outbox[0], outbox[0]]
    other.clear()
    assert outbox != other
    assert outbox != (outbox[0],)  # as a list is not a tuple
    # Closing a capture closes that one, not another that holds the same messages.
    with capture() as outer:
        with capture() as inner:
            assert inner == outer
        MemoryStore().enqueue(prepared("b@x.test"), now=NOW)
    assert [m.envelope_to for m in outer] == [["b@x.test"]] and inner == []


def test_the_fixture_captures(mailstrom_outbox: Outbox) -> None:
    mid = Mailstrom(CONFIG, store=MemoryStore(), worker=None).send_email(welcome())
    assert [m.message_id for m in mailstrom_outbox] == [mid]


def test_the_docstring_example_runs() -> None:
    results = doctest.testmod(mailstrom.testing.outbox, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-clock", "clock"])
def test_a_send_the_idempotency_key_turns_away_is_not_captured(frozen: bool) -> None:
    # A send whose idempotency key was used before returns the earlier message's id and
    # queues nothing: it was captured anyway, once per send (a test proving "a retried
    # request sends one email" saw two), and one queued before the capture showed up as
    # a captured message that is not even held.
    store = MemoryStore()
    ticks = iter(range(100))
    ms = Mailstrom(
        CONFIG,
        store=store,
        worker=None,
        clock=(lambda: NOW) if frozen else (lambda: NOW.replace(second=next(ticks))),
    )
    before = ms.send_email(welcome(), idempotency_key="before")
    with capture() as outbox:
        assert ms.send_email(welcome(), idempotency_key="before") == before
        first = ms.send_email(welcome("c@example.org"), idempotency_key="once")
        assert ms.send_email(welcome("c@example.org"), idempotency_key="once") == first
    assert [m.message_id for m in outbox] == [first]
    assert all(m.status().held for m in outbox)
    assert not store.status(before).held


class NumberingStore:
    """A store of the user's own that numbers its messages from 1, as a table's key does:
    its ids are unique in the store, not across stores."""

    def __init__(self) -> None:
        self.messages: list[PreparedMessage] = []

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        self.messages.append(message)
        return str(len(self.messages))


def test_messages_of_two_stores_with_the_same_id_are_both_captured() -> None:
    # The outbox took a message id it had seen for the same message sent again (an
    # idempotency key at a frozen clock), whichever store it came from: the first message
    # of a second store numbering from 1 was dropped.
    first, second = NumberingStore(), NumberingStore()
    with capture(store_types=[NumberingStore]) as outbox:
        first.enqueue(prepared("a@x.test"), now=NOW)
        second.enqueue(prepared("b@x.test"), now=NOW)
    assert [(m.message_id, m.envelope_to, m.store) for m in outbox] == [
        ("1", ["a@x.test"], first),
        ("1", ["b@x.test"], second),
    ]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_captured_message_can_be_deep_copied(kind: str, tmp_path: Path) -> None:
    """copy.deepcopy of a captured message (a test keeping a snapshot, a fixture handing
    out copies) raised "cannot pickle '_thread.lock' object": it copied the store, locks
    and connection included. A copy names the same store and has its own parsed message."""
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    try:
        with capture() as outbox, Mailstrom(CONFIG, store=store) as ms:
            ms.send_email(welcome())
        [mail] = outbox
        copied = copy.deepcopy(mail)
        assert copied == mail
        assert copied.store is store
        assert copied.message is not mail.message
        copied.message.replace_header("Subject", "Changed")
        assert (mail.subject, copied.subject) == ("Welcome", "Changed")
        assert copied.status().held
        assert copy.deepcopy([mail, mail]) == [mail, mail]
    finally:
        store.close()


def test_a_copy_of_the_outbox_is_a_snapshot_of_its_own() -> None:
    """copy.copy(outbox) shared the original's list and lock: the "snapshot" grew with
    every message captured after it, and clearing it cleared the capture's outbox too.
    copy.deepcopy(outbox) raised "cannot pickle '_thread.lock' object"."""
    store = MemoryStore()
    with capture() as outbox:
        store.enqueue(prepared("a@x.test"), now=NOW)
        shallow, deep = copy.copy(outbox), copy.deepcopy(outbox)
        store.enqueue(prepared("b@x.test"), now=NOW)
        assert [m.envelope_to for m in shallow] == [["a@x.test"]]
        assert deep == shallow and shallow[0] is outbox[0] and deep[0] is not outbox[0]
        shallow.clear()
        assert len(outbox) == 2
        store.enqueue(prepared("c@x.test"), now=NOW)
    assert [m.envelope_to[0] for m in outbox] == ["a@x.test", "b@x.test", "c@x.test"]
    assert shallow == [] and len(deep) == 1


class StatusFailsOnce(MemoryStore):
    """A store whose first ``status()`` fails, as a database connection lost between two
    calls makes it: the enqueue before it was written."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def status(self, message_id: str) -> MessageStatus:
        if not self.failed:
            self.failed = True
            raise StoreError("connection lost")
        return super().status(message_id)


def test_a_keyed_send_is_captured_when_the_store_cannot_say_it_is_new() -> None:
    # With an idempotency key the capture asks the store whether the id is a new message;
    # when that status() failed, send_email raised though the message was queued (held),
    # and a retry with the same key returned its id as an old one: never captured.
    store = StatusFailsOnce()
    ticks = iter(range(100))
    ms = Mailstrom(CONFIG, store=store, worker=None, clock=lambda: NOW.replace(second=next(ticks)))
    with capture() as outbox:
        mid = ms.send_email(welcome(), idempotency_key="signup")
        assert ms.send_email(welcome(), idempotency_key="signup") == mid
    assert store.failed
    assert [m.message_id for m in outbox] == [mid]
    assert outbox[0].status().held


class FullAfterOne(MemoryStore):
    """A store that takes one message and refuses the next, as a disk filling up in the
    middle of a batch does."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def enqueue(self, message: PreparedMessage, *, now: datetime, hold: bool = False) -> str:
        if self.taken == 1:
            raise StoreError("disk full")
        self.taken += 1
        return super().enqueue(message, now=now, hold=hold)


def test_a_batch_the_store_takes_part_of_is_captured_as_far_as_it_was_taken() -> None:
    # Under a capture a batch is queued one held message at a time; when the store failed
    # on the second, the first was in the store (held, its id real) but not in the outbox.
    store = FullAfterOne()
    ms = Mailstrom(CONFIG, store=store, worker=None)
    with capture() as outbox, pytest.raises(StoreError, match="disk full"):
        ms.send_emails([welcome("a@example.org"), welcome("b@example.org")])
    [kept] = store.recent()
    assert [(m.message_id, m.envelope_to) for m in outbox] == [(kept.id, ["a@example.org"])]
    assert outbox[0].status().held


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_batch_with_a_message_no_store_takes_is_queued_and_captured_not_at_all(
    kind: str, tmp_path: Path
) -> None:
    # A store checks a whole batch before it writes any of it; under a capture the batch
    # went one message at a time, so the messages before the invalid one were queued
    # (held) and captured, where the store alone queues none and the docs promise that
    # invalid input captures nothing.
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    twice = PreparedMessage(
        data=b"Subject: x\r\n\r\nHi\r\n",
        envelope_from="a@shop.test",
        recipients=("b@x.test", "b@X.TEST"),
    )
    try:
        with capture() as outbox, pytest.raises(InvalidArgument, match="named twice"):
            store.enqueue_many([prepared("a@x.test"), twice], now=NOW)
        assert len(outbox) == 0
        assert store.recent() == []
    finally:
        store.close()
