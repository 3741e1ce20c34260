"""``capture()``: collect everything a program queues through mailstrom, and send none of it.

The seam is the store's write entry, :meth:`Store.enqueue` and :meth:`Store.enqueue_many`:
every way of queueing mail ends there (``Mailstrom`` and ``AsyncMailstrom``'s
``send_email``/``send_emails``, the Django backend, which calls ``send_email``, and the
command line's ``send`` and ``sendmail``, which call ``store.enqueue`` directly). While a
capture is open those two methods of the shipped store classes are replaced, so the stores
a program made before entering the capture are covered too, and the program changes
nothing.

A captured message is still written to the program's own store, but *held* (as
``mailstrom send --hold`` queues it): its id is real, ``query_status``, ``query_recent``,
``cancel`` and ``mailstrom status`` see it, and no worker leases it — not one on a thread,
not a worker process mailstrom started, not a ``mailstrom worker`` elsewhere — because
the store itself refuses to hand out held mail. Its status is therefore ``queued`` with
``held=True``, and it stays so after the capture ends (a store kept after the test keeps
it held; releasing it would deliver it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import email
import email.policy
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any, cast, overload

from mailstrom.errors import StoreError
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import MessageStatus
from mailstrom.stores.base import Store, check_storable

__all__ = ["CapturedMessage", "Outbox", "capture", "capture_active", "parse_message"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CapturedMessage:
    """One message queued while a capture was open.

    ``data`` are the exact bytes a worker would have sent after DATA (Bcc removed, Date
    and Message-ID added); ``message`` is the same parsed by :func:`parse_message`, for
    assertions on headers and parts.
    """

    message_id: str
    """The id the store gave it (what ``send_email`` returned)."""
    envelope_from: str
    recipients: tuple[str, ...]
    """Envelope recipients (To, Cc and Bcc, or ``envelope_to``), de-duplicated."""
    data: bytes = field(repr=False)
    message: EmailMessage = field(repr=False, compare=False)
    store: Store = field(repr=False, compare=False)
    """The store it was queued (held) in."""

    @property
    def envelope_to(self) -> list[str]:
        """The envelope recipients as a list (compare with ``== ["bob@example.org"]``)."""
        return list(self.recipients)

    @property
    def subject(self) -> str | None:
        value = self.message["Subject"]
        return None if value is None else str(value)

    @property
    def text(self) -> str | None:
        """The text/plain body (the one a reader would show), or None: LF line ends, and
        a line end last, as the message holds it. A message ends its text with one, so
        ``text="Hello"`` and ``text="Hello\n"`` are sent alike and both read back as
        ``"Hello\n"`` (compare with that, or with ``mail.text.rstrip("\n")``)."""
        return self._body("plain")

    @property
    def html(self) -> str | None:
        """The text/html body, or None; like :attr:`text`, with a line end last."""
        return self._body("html")

    def _body(self, subtype: str) -> str | None:
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None:
            return None
        # A part in base64 (as non-ASCII text often is) decodes to its canonical CRLF
        # line ends: LF, as for any other part.
        return cast(str, part.get_content()).replace("\r\n", "\n")

    def status(self) -> MessageStatus:
        """Its status read from the store now: ``queued`` and ``held`` unless the test
        cancelled or released it. The store must still be open."""
        return self.store.status(self.message_id)

    def __deepcopy__(self, memo: dict[int, Any]) -> CapturedMessage:
        """A copy with its own parsed ``message``, naming the same store: the store is
        where the message is held, not part of it, and holds locks and connections that
        cannot be copied (``copy.deepcopy`` raised "cannot pickle '_thread.lock'")."""
        return dataclasses.replace(self, message=copy.deepcopy(self.message, memo))


class Outbox(Sequence[CapturedMessage]):
    """What a capture collected, oldest first; safe to read while other threads queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[CapturedMessage] = []
        self._ids: set[tuple[int, str]] = set()
        """(the store's ``id()``, the message id) of each message taken: a message id is
        unique in its store only (a store of the user's own may number from 1)."""
        self._stores: dict[int, Store] = {}
        """The stores of those ids, held so that no other store gets one of their ``id()``
        while the outbox lives (after :meth:`clear` too)."""

    @overload
    def __getitem__(self, index: int) -> CapturedMessage: ...

    @overload
    def __getitem__(self, index: slice) -> list[CapturedMessage]: ...

    def __getitem__(self, index: int | slice) -> CapturedMessage | list[CapturedMessage]:
        with self._lock:
            return self._messages[index]

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def __iter__(self) -> Iterator[CapturedMessage]:
        with self._lock:
            return iter(list(self._messages))

    def __repr__(self) -> str:
        return f"Outbox({self[:]!r})"

    def __eq__(self, other: object) -> bool:
        """Equal to a list (or an outbox) of the same messages, as a list is: a Sequence
        alone compares by identity, so ``outbox == []`` was False for an empty outbox
        and ``outbox != []`` True for one, however much had been sent."""
        if isinstance(other, Outbox):
            return self[:] == other[:]
        if isinstance(other, list):
            return self[:] == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by content

    def __copy__(self) -> Outbox:
        """A snapshot: an outbox of its own holding what this one holds now, which no
        capture adds to. Copied attribute by attribute, it shared this one's list and
        lock: it grew with every message captured after, and clearing it cleared this."""
        copied = Outbox()
        with self._lock:
            copied._messages = list(self._messages)
            copied._ids = set(self._ids)
            copied._stores = dict(self._stores)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> Outbox:
        """A snapshot (as :meth:`__copy__`) of copies of the messages (which name the same
        stores); it raised "cannot pickle '_thread.lock' object"."""
        copied = copy.copy(self)
        copied._messages = copy.deepcopy(copied._messages, memo)
        return copied

    def clear(self) -> None:
        """Forget what was collected so far (the store keeps it)."""
        with self._lock:
            self._messages.clear()

    def _add(self, messages: Sequence[CapturedMessage]) -> None:
        with self._lock:
            for message in messages:
                # A second send with an idempotency key at the same time (a test's frozen
                # clock) returns the first one's id: it is one message, captured once.
                key = (id(message.store), message.message_id)
                if key not in self._ids:
                    self._ids.add(key)
                    self._stores[key[0]] = message.store
                    self._messages.append(message)


class _UTF8HeaderPolicy(email.policy.EmailPolicy):
    """``email.policy.default``, but a header field holding UTF-8 (RFC 6532, as a message
    to or from a UTF-8 address has) is read as UTF-8: the bytes parser hands its octets on
    as surrogate escapes, and the address parser took them for undecodable octets
    (``"j\\udcc3\\udcb6rg@..."``). Octets that are no UTF-8 stay escaped, as before."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if isinstance(value, str) and not value.isascii():
            with contextlib.suppress(UnicodeError):  # set as text, or not UTF-8
                value = value.encode("ascii", "surrogateescape").decode("utf-8")
        return super().header_fetch_parse(name, value)


_POLICY = _UTF8HeaderPolicy()


def parse_message(data: bytes) -> EmailMessage:
    """Message bytes as an :class:`~email.message.EmailMessage` (``email.policy.default``;
    UTF-8 header fields, RFC 6532, read as UTF-8),
    line ends made LF first, as a reader shows them: ``get_content()`` of a text part
    then equals the text that was sent (but for a part in base64, whose decoded content
    keeps the CRLF of its canonical form; ``CapturedMessage.text`` and ``html`` make
    those LF too)."""
    message = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=_POLICY)
    return cast(EmailMessage, message)


def _queued_now(store: Store, message_id: str, prepared: PreparedMessage, now: datetime) -> bool:
    """Whether the store queued ``prepared`` as a new message. With an idempotency key it
    may instead return the id of the message queued before under that key (before the
    capture, when it is not even held, or earlier in it): nothing was queued, and a test
    that sends twice to prove that one mail goes out must see one.

    A store that cannot answer (its ``status()`` raises StoreError: a connection lost
    right after the write) leaves it taken as new: the id is real and the enqueue went
    through, held. Raising made ``send_email`` fail under the capture alone, for a message
    that was queued, and a retry with the key got that id back as an old one: it was
    never captured. Only a key used before the capture is then taken once too many (the
    outbox keeps each id once)."""
    if prepared.attributes.idempotency_key is None:
        return True
    try:
        status = store.status(message_id)
    except StoreError:
        return True
    return status.held and status.created_at == now


def _captured(store: Store, message_id: str, prepared: PreparedMessage) -> CapturedMessage:
    return CapturedMessage(
        message_id=message_id,
        envelope_from=prepared.envelope_from,
        recipients=prepared.recipients,
        data=prepared.data,
        message=parse_message(prepared.data),
        store=store,
    )


class _Interceptor:
    """Replaces ``enqueue``/``enqueue_many`` on store classes while captures are open.

    One process-wide instance: the methods are class attributes, shared by every thread.
    Each class is patched once however many captures name it, and restored when the last
    of them closes. Every open capture receives every message.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outboxes: list[Outbox] = []
        self._patched: dict[type, tuple[int, dict[str, Any]]] = {}
        self._local = threading.local()

    def open(self, outbox: Outbox, classes: Sequence[type]) -> None:
        for cls in classes:
            if not isinstance(cls, type) or not callable(getattr(cls, "enqueue", None)):
                raise TypeError(f"capture(store_types=...) takes Store classes, not {cls!r}")
        with self._lock:
            done: list[type] = []
            try:
                for cls in classes:
                    count, saved = self._patched.get(cls, (0, {}))
                    if count == 0:
                        saved = self._patch(cls)
                    self._patched[cls] = (count + 1, saved)
                    done.append(cls)
            except BaseException:
                # Nothing of a capture that did not start may stay: a class left patched
                # would hold every message the process queues from then on.
                self._unpatch(done)
                raise
            self._outboxes.append(outbox)

    @property
    def active(self) -> bool:
        with self._lock:
            return bool(self._outboxes)

    def close(self, outbox: Outbox, classes: Sequence[type]) -> None:
        with self._lock:
            # By identity: outboxes compare by content, and two open captures often hold
            # the same messages (none, at first).
            self._outboxes = [o for o in self._outboxes if o is not outbox]
            self._unpatch(classes)

    def _unpatch(self, classes: Iterable[type]) -> None:
        """Undo one capture's patching of ``classes`` (call under the lock)."""
        for cls in classes:
            count, saved = self._patched.pop(cls)
            if count > 1:
                self._patched[cls] = (count - 1, saved)
                continue
            _restore(cls, saved)

    def _patch(self, cls: type) -> dict[str, Any]:
        """Replace the class's ``enqueue`` and, where it has one, ``enqueue_many`` (a
        store of the user's own may hand batches to another store); what to restore."""
        saved: dict[str, Any] = {}
        wrappers: dict[str, Callable[[Any], Any]] = {
            "enqueue": self._enqueue,
            "enqueue_many": self._enqueue_many,
        }
        try:
            for name, wrap in wrappers.items():
                original = getattr(cls, name, None)
                if original is None:
                    continue
                was = cls.__dict__.get(name)
                setattr(cls, name, wrap(original))
                saved[name] = was
        except BaseException:
            _restore(cls, saved)
            raise
        return saved

    @contextlib.contextmanager
    def _inside(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def _nested(self) -> bool:
        # A subclass's enqueue calling super(), or enqueue_many below: captured once, above.
        return getattr(self._local, "depth", 0) > 0

    def _enqueue(self, original: Callable[..., str]) -> Callable[..., str]:
        def enqueue(
            store: Store, message: PreparedMessage, *, now: datetime, hold: bool = False
        ) -> str:
            if self._nested():
                return original(store, message, now=now, hold=hold)
            with self._inside():
                message_id = original(store, message, now=now, hold=True)
            if _queued_now(store, message_id, message, now):
                self._deliver([_captured(store, message_id, message)])
            return message_id

        return enqueue

    def _enqueue_many(self, original: Callable[..., list[str]]) -> Callable[..., list[str]]:
        def enqueue_many(
            store: Store, messages: Sequence[PreparedMessage], *, now: datetime
        ) -> list[str]:
            if self._nested():
                return original(store, messages, now=now)
            # The Store protocol holds single messages only: a batch becomes one held
            # enqueue per message (never a batch that a worker could lease before it is
            # held). A shipped store checks the whole batch before it writes any of it;
            # so is it checked here (else the messages before one it refuses were queued
            # and captured, where the store alone queues none). A store of the user's
            # own keeps its own rules. Only a failing store can then leave part of a
            # batch queued: what it took is captured all the same (it is in the store,
            # held, with a real id), and the error goes on.
            if messages and isinstance(store, tuple(shipped_store_types())):
                check_storable(messages, now=now)
            ids: list[str] = []
            try:
                with self._inside():
                    for m in messages:
                        ids.append(store.enqueue(m, now=now, hold=True))
            finally:
                self._deliver(
                    [
                        _captured(store, i, m)
                        for i, m in zip(ids, messages, strict=False)
                        if _queued_now(store, i, m, now)
                    ]
                )
            return ids

        return enqueue_many

    def _deliver(self, messages: list[CapturedMessage]) -> None:
        with self._lock:
            outboxes = list(self._outboxes)
        for outbox in outboxes:
            outbox._add(messages)


def _restore(cls: type, saved: dict[str, Any]) -> None:
    """Put back the methods :meth:`_Interceptor._patch` replaced."""
    for name, original in saved.items():
        if original is None:
            delattr(cls, name)  # it was inherited
        else:
            setattr(cls, name, original)


_interceptor = _Interceptor()


def shipped_store_types() -> list[type]:
    """The store classes mailstrom ships; PostgreSQL's only where its driver imports."""
    from mailstrom.stores.memory import MemoryStore
    from mailstrom.stores.sqlite import SQLiteStore

    types: list[type] = [MemoryStore, SQLiteStore]
    try:
        from mailstrom.stores.postgres import PostgresStore
    except ImportError:  # no libpq: no PostgresStore can exist to queue into
        pass
    else:
        types.append(PostgresStore)
    return types


def capture_active() -> bool:
    """Whether a capture is open (mail queued now is held, not delivered)."""
    return _interceptor.active


@contextlib.contextmanager
def capture(*, store_types: Iterable[type] = ()) -> Iterator[Outbox]:
    """Collect every message queued until the block ends; deliver none of them.

    >>> from mailstrom import Email, Mailstrom
    >>> from mailstrom.stores import MemoryStore
    >>> with capture() as outbox, Mailstrom(store=MemoryStore()) as ms:
    ...     mid = ms.send_email(Email(from_="app@example.com", to=["bob@example.org"],
    ...                               subject="Hi", text="Hello"))
    >>> [mail] = outbox
    >>> mail.message_id == mid, mail.envelope_to, mail.subject
    (True, ['bob@example.org'], 'Hi')
    >>> mail.status().held
    True

    Covers :class:`~mailstrom.stores.MemoryStore`, :class:`~mailstrom.stores.SQLiteStore`
    and ``PostgresStore`` (and their subclasses); name your own :class:`Store`
    implementations in ``store_types`` (classes with an ``enqueue`` method; anything else
    raises TypeError, and leaves no capture open). Captures may be nested or open in several
    threads at once: each collects everything queued while it is open. Mail queued
    inside is held in its store (see the module docstring), so ``mailstrom send --wait``
    waits out its ``--timeout`` and reports it pending.
    """
    outbox = Outbox()
    classes = [*shipped_store_types(), *store_types]
    _interceptor.open(outbox, classes)
    try:
        yield outbox
    finally:
        _interceptor.close(outbox, classes)
