"""Real aiosmtpd SMTP servers on loopback, scripted to accept, refuse, stall or drop.

Needs the ``testing`` extra (``pip install 'mailstrom[testing]'``). Each server runs its
own event loop on a thread, so tests of sync and async code alike can use it::

    server_context, client_context = tls_contexts("mx.test")
    mx = start_receiving_server(server_context)                  # 127.0.0.1, ephemeral port
    mx2 = start_receiving_server(server_context, host="127.0.0.2", port=mx.port)
    mx.rcpt_replies["rej@x.test"] = "550 5.1.1 No such user"
    mx.rcpt_replies["grey@x.test"] = ["451 4.7.1 Greylisted", "250 2.1.5 OK"]
    ...
    [msg] = mx.wait_for_messages(1)           # or: await mx.await_messages(1)
    assert msg.content == b"...\\r\\n" and msg.tls
    mx.stop(), mx2.stop()

A server is also a context manager that stops it, when the block fails too
(``with start_receiving_server(server_context) as mx: ...``).

:class:`~mailstrom.testing.FakeMX` wraps one with a DNS zone; mailstrom's own test suite
has this as the ``smtp_server`` fixture (a factory whose servers stop after the test).

Options of ``start_receiving_server(tls_context, ...)`` (all keyword-only)
    ``host="127.0.0.1"``, ``port=0`` (pass another server's ``.port`` to share it: MX
    delivery uses one port for every host), ``name="mx.test"`` (greeting/EHLO name),
    ``starttls=True`` (offer STARTTLS), ``require_starttls=False`` (530 before TLS),
    ``tls_broken=False`` (offer STARTTLS, answer 220, then break the handshake),
    ``implicit_tls=False`` (TLS from the first byte, as on port 465; STARTTLS is then
    not offered, and REQUIRETLS is with ``requiretls``),
    ``smtputf8=True``, ``eightbitmime=True``, ``pipelining=True``,
    ``enhancedstatuscodes=True`` (advertise the keywords), ``size_limit=DEFAULT_SIZE_LIMIT``
    (advertised as SIZE, RFC 1870; a MAIL with a larger SIZE, or content past it, gets
    552; None: no limit, nothing advertised), ``auth=None`` (no AUTH offered, over TLS
    either, and AUTH answered 502; ``(user, password)``: AUTH PLAIN and
    LOGIN offered even without TLS, only these credentials pass), ``auth_mechanisms=("PLAIN",
    "LOGIN")`` (which of the two to offer),
    ``requiretls=False`` (offer REQUIRETLS, RFC 8689, after STARTTLS, and accept it on
    MAIL FROM: it then shows in the message's ``mail_options``),
    ``greeting=None`` (e.g. ``"421 4.3.2 Go away"``: a non-2xx greeting is sent, then the
    connection closed), ``ehlo_reply=None`` (e.g. ``"502 5.5.1 No EHLO"`` forces HELO),
    ``stall_on=None``, ``drop_on=None`` (see below), ``dsn=False`` (advertise DSN and take
    its RFC 3461 MAIL and RCPT parameters, recorded in ``dsn_params``; aiosmtpd alone
    refuses them).

Rules on a :class:`ReceivingServer`, changeable while it runs (from any thread)
    ``rcpt_replies[address]``, ``mail_reply``, ``data_reply``: a reply line such as
    ``"451 4.7.1 Try later"``, or a list of them used one per command, the last one
    repeating (greylisting: ``["451 ...", "250 ..."]``; ``Repeated("451 ...", n, "250
    ...")`` for one reply ``n`` times over, however large ``n``; an empty list is
    refused with ValueError when set; a list set again, the same one too, starts from
    its first reply, on every server given that ``rcpt_replies``: ``mx2.rcpt_replies =
    mx1.rcpt_replies`` shares the rules, each server keeping its own turn in them). A 2xx
    rule accepts.
    ``starttls_reply``: a reply line to STARTTLS instead of going ahead (None: go ahead);
    after a ``421`` the server closes the connection.
    ``stall_on``: a command name (``"greeting"``, ``"ehlo"``, ``"starttls"``, ``"mail"``,
    ``"rcpt"``, ``"data"``, ``"rset"``, ``"quit"``) or ``"dot"`` (after the content): the
    server stops answering there, to test client timeouts. Stalls end when the client
    disconnects. ``drop_on``: the same names; the server closes the connection instead of
    answering. Shorthands: ``drop_on_data`` (closes on the DATA command, before 354, so
    the client has sent no content) and ``drop_after_dot`` (takes the content, closes
    without the final reply: the client cannot know whether the message was accepted).
    ``messages_per_connection``: how many MAIL commands one connection may give (None:
    no limit); the next gets ``over_limit_reply`` (``"421 4.7.0 Message limit of this
    connection reached, closing"``; None: no reply) and the connection is closed, as a
    server with Exim's ``smtp_accept_max_per_connection`` does.
    ``rcpt_limit``: how many recipients one transaction may have (None: no limit); each
    RCPT beyond it gets ``452 4.5.3 Too many recipients``, as RFC 5321 §4.5.3.1.10 has a
    server with such a limit answer (Postfix's ``smtpd_recipient_limit``).
    ``quit_delay``: seconds the server waits before it answers QUIT, a slow close (the
    connection stays open, and counted in ``open_connections``, until then).
    ``data_delay``: seconds the server waits after the final dot before it replies, a slow
    delivery (the message is in ``received``, and in ``messages`` when accepted, at once).
    Per recipient (lower-case addresses): ``stall_rcpts``, where the server stops
    answering at that RCPT, and ``drop_after_dot_rcpts``, where a transaction with one of
    them among its accepted recipients is closed after its content, without a reply.

What a server records
    ``messages``: :class:`ReceivedMessage` for every message answered 2xx after the dot;
    ``received``: every message whose final dot arrived, whatever happened next;
    ``commands``: command verbs in arrival order (``"EHLO"``, ``"MAIL"``, ...);
    ``pipelined``: how many commands arrived while later ones were already buffered
    (non-zero only when the client pipelines); ``connections``: connections accepted.
    ``connected_at``: the wall-clock time (``time.time()``) of each accepted connection;
    ``open_connections`` and ``peak_connections``: connections open now and at most at
    once; ``arrivals``: the wall-clock time of each ``received`` message's final dot.
    ``wait_for_messages(n, timeout)`` blocks on a condition until ``n`` messages are in
    and returns the first ``n`` of them, however many more arrived (raises AssertionError
    on timeout, saying what the server saw: connections, how far each of the last five
    got (its commands, the last three with their replies, a TLS handshake not completed),
    the reply to each RCPT, what arrived and how it was answered);
    ``await_messages(n, within)`` is its asyncio form (asyncio only: under trio,
    RuntimeError, no running event loop; call the blocking form in a thread there);
    ``wait_for_received(n, timeout)`` and ``await_received(n, within)`` wait on
    ``received`` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, AnyStr, cast, overload

from mailstrom.testing import _conversation
from mailstrom.testing._conversation import Conversation
from mailstrom.testing._extra import missing_extra
from mailstrom.testing.outbox import parse_message

try:
    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException
except ImportError as exc:
    raise missing_extra(exc) from exc

__all__ = [
    "DEFAULT_SIZE_LIMIT",
    "ReceivedMessage",
    "ReceivingServer",
    "Repeated",
    "Rule",
    "ServerFactory",
    "contexts_for",
    "free_loopback_port",
    "start_receiving_server",
    "tls_contexts",
]

DEFAULT_SIZE_LIMIT = 64 * 1024 * 1024
"""Octets of a message a server takes unless told otherwise (``size_limit``): above all
mailstrom sends with its default configuration (``Config.max_message_size``, 35 MiB; a
bounce notice returning such a message in base64), yet bounded, as a server holds each
message in memory; without one, a test could make it hold gigabytes."""

_STOP_TIMEOUT = 10.0
"""Seconds a server's stop waits for its loop to close the connections (and, once that
timed out, for the rest of the stop on each later call)."""

Rule = str | Sequence[str]
"""A reply line, or replies used one per command with the last one repeating (a list;
:class:`Repeated` for one reply many times over)."""


class Repeated(Sequence[str]):
    """``reply`` ``times`` over, then ``then``: the rule ``[reply] * times + [then]`` in
    constant memory (``FakeMX.defer(address, times=n)`` builds one; the list took 8 MB
    for a million, and failed for more). Read-only, as a rule in use should be."""

    __slots__ = ("reply", "then", "times")

    def __init__(self, reply: str, times: int, then: str) -> None:
        self.reply = reply
        self.times = times
        self.then = then

    def __len__(self) -> int:
        # len() must fit an index: past that many turns, it is ``reply`` for ever anyway.
        return min(self.times, sys.maxsize - 1) + 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        position = index + size if index < 0 else index
        if not 0 <= position < size:
            raise IndexError("Repeated index out of range")
        return self.reply if position < self.times else self.then

    def __repr__(self) -> str:
        return f"[{self.reply!r}] * {self.times} + [{self.then!r}]"


def _rule(rule: Rule | None, where: str) -> Rule | None:
    """``rule``, checked where it is set: an empty list gives no reply, and the command it
    was for failed inside aiosmtpd (an IndexError, a 500 to the client)."""
    if rule is None or isinstance(rule, str):
        return rule
    if not isinstance(rule, Sequence):
        raise TypeError(f"{where}: a reply line or a list of them, not {rule!r}")
    if len(rule) == 0:
        raise ValueError(f"{where}: an empty list of replies gives no reply; give one at least")
    return rule


class _Rules(dict[str, Rule]):
    """``rcpt_replies``: a dict whose rules are checked as they are set (:func:`_rule`),
    each starting from its first reply. Every setting gets a new :meth:`stamp`, which a
    server compares with the one its turn in the rule began at: so every server using
    the dict starts over, where a restart told to the server that made it left another
    (``mx2.rcpt_replies = mx1.rcpt_replies``) going on where it was."""

    def __init__(self) -> None:
        super().__init__()
        self._stamps: dict[str, int] = {}
        self._settings = itertools.count(1)

    def __setitem__(self, address: str, rule: Rule) -> None:
        # None (which reads as no rule, so accept) is kept as it always was.
        super().__setitem__(address, cast(Rule, _rule(rule, f"rcpt_replies[{address!r}]")))
        self._stamps[address] = next(self._settings)

    def stamp(self, address: str) -> int:
        """Which setting of ``address``'s rule is in force (0: none through this dict)."""
        return self._stamps.get(address, 0)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for address, rule in dict(*args, **kwargs).items():
            self[address] = rule

    def setdefault(self, address: str, rule: Rule) -> Rule:
        if address not in self:
            self[address] = rule
        return self[address]

    def __ior__(self, other: Any) -> _Rules:  # type: ignore[override,misc]
        self.update(other)
        return self


_STALL_NAMES = frozenset(
    {"greeting", "ehlo", "helo", "starttls", "auth", "mail", "rcpt", "data", "rset"}
    | {"noop", "quit", "dot"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedMessage:
    """One message as the server got it; ``content`` is un-dot-stuffed, CRLF included."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    tls: bool
    tls_version: str | None
    helo: str | None
    auth_login: str | None
    peer: tuple[str, int]
    reply: str | None
    """The reply sent after the dot (None when the server dropped or stalled)."""

    @property
    def envelope_from(self) -> str:
        """The MAIL FROM address (``""`` for the null reverse-path, which ``mail_from``
        holds as aiosmtpd gives it, ``"<>"``)."""
        return "" if self.mail_from == "<>" else self.mail_from

    @property
    def envelope_to(self) -> list[str]:
        """The recipients the server accepted in this transaction, in RCPT order."""
        return list(self.rcpt_tos)

    @property
    def accepted(self) -> bool:
        """Whether the server answered the final dot with 2xx."""
        return self.reply is not None and self.reply.startswith("2")

    @property
    def message(self) -> EmailMessage:
        """``content`` parsed (a new object each time); see
        :func:`~mailstrom.testing.outbox.parse_message`."""
        return parse_message(self.content)


class ReceivingServer:
    """One aiosmtpd server running in its own thread; see the module docstring."""

    def __init__(
        self,
        *,
        host: str,
        pipelining: bool,
        eightbitmime: bool,
        enhancedstatuscodes: bool,
        tls_broken: bool,
        greeting: str | None,
        ehlo_reply: str | None,
        auth: tuple[str, str] | None,
        requiretls: bool = False,
    ) -> None:
        self.host = host
        self.requiretls = requiretls
        self.port = 0
        self.pipelining = pipelining
        self.eightbitmime = eightbitmime
        self.enhancedstatuscodes = enhancedstatuscodes
        self.tls_broken = tls_broken
        self.greeting = greeting
        self.ehlo_reply = ehlo_reply
        self.auth = auth
        self.dsn = False
        self.dsn_params: list[tuple[str, str, tuple[str, ...]]] = []
        """With ``dsn=True``: (``"MAIL"`` or ``"RCPT"``, address, its RFC 3461 parameters)
        for every command that carried some, in arrival order."""
        self._rcpt_replies: dict[str, Rule] = _Rules()
        self._mail_reply: Rule | None = None
        self._data_reply: Rule | None = None
        self.starttls_reply: str | None = None
        self._stall_on: str | None = None
        self._drop_on: str | None = None
        self.quit_delay = 0.0
        self.data_delay = 0.0
        self.messages_per_connection: int | None = None
        self.rcpt_limit: int | None = None
        self.over_limit_reply: str | None = (
            "421 4.7.0 Message limit of this connection reached, closing"
        )
        self._turns: dict[str, tuple[Sequence[str], int, int]] = {}
        """Per place a list rule is used: the list, the stamp of its setting (see
        :meth:`_Rules.stamp`), and how many of its replies it gave."""
        self.stall_rcpts: set[str] = set()
        self.drop_after_dot_rcpts: set[str] = set()
        self.connections = 0
        self.connected_at: list[float] = []
        self.open_connections = 0
        self.peak_connections = 0
        self.generation = 0
        self.arrivals: list[float] = []
        self.pipelined = 0
        self.commands: list[str] = []
        self._messages: list[ReceivedMessage] = []
        self._received: list[ReceivedMessage] = []
        self._rcpt_answers: list[tuple[str, str]] = []
        """(address, reply) of every RCPT answered, for the message of a failed wait."""
        self._conversations: deque[Conversation] = deque(maxlen=_conversation.KEPT)
        """The last connections, how far each got, for the message of a failed wait."""
        self._condition = threading.Condition()
        self._awaiting: list[Callable[[], None]] = []  # wakes each async wait, on its loop
        self._stopped = False
        self._controller: _Controller | None = None

    # --- rules ---------------------------------------------------------------------------

    @property
    def stall_on(self) -> str | None:
        """Where the server stops answering (a command name or ``"dot"``), or None."""
        return self._stall_on

    @stall_on.setter
    def stall_on(self, value: str | None) -> None:
        self._stall_on = _stall_point(value)

    @property
    def drop_on(self) -> str | None:
        """Where the server closes the connection instead of answering, or None."""
        return self._drop_on

    @drop_on.setter
    def drop_on(self, value: str | None) -> None:
        self._drop_on = _stall_point(value)

    # A rule set (again) starts from its first reply: its turn was kept per list object,
    # so the same list (a module's constant, a tuple literal) set anew went on where it
    # was, and a test that greylisted an address again saw it accepted at once.

    @property
    def rcpt_replies(self) -> dict[str, Rule]:
        """The rules for RCPT TO, per address (none: accept)."""
        return self._rcpt_replies

    @rcpt_replies.setter
    def rcpt_replies(self, value: dict[str, Rule]) -> None:
        # Kept as given (a test may go on editing its own dict, or subclass one): every
        # rule in it starts from its first reply.
        with self._condition:
            self._rcpt_replies = value
            self._turns = {k: v for k, v in self._turns.items() if not k.startswith("rcpt ")}

    @property
    def mail_reply(self) -> Rule | None:
        """The rule for MAIL FROM (None: accept)."""
        return self._mail_reply

    @mail_reply.setter
    def mail_reply(self, value: Rule | None) -> None:
        self._mail_reply = _rule(value, "mail_reply")
        self._restart("mail")

    @property
    def data_reply(self) -> Rule | None:
        """The rule for the reply after the content (None: accept)."""
        return self._data_reply

    @data_reply.setter
    def data_reply(self, value: Rule | None) -> None:
        self._data_reply = _rule(value, "data_reply")
        self._restart("data")

    def _restart(self, where: str) -> None:
        """Forget how far the rule used at ``where`` (a key of :meth:`take`) has gone."""
        with self._condition:
            self._turns.pop(where, None)

    @property
    def drop_on_data(self) -> bool:
        return self.drop_on == "data"

    @drop_on_data.setter
    def drop_on_data(self, value: bool) -> None:
        self.drop_on = "data" if value else None

    @property
    def drop_after_dot(self) -> bool:
        return self.drop_on == "dot"

    @drop_after_dot.setter
    def drop_after_dot(self, value: bool) -> None:
        self.drop_on = "dot" if value else None

    def take(self, rule: Rule | None, *, key: str | None = None, stamp: int = 0) -> str | None:
        """The reply a rule gives now; a list yields its replies in turn, the last sticks.

        Where the list is in use (``key``: ``"mail"``, ``"data"``, ``"rcpt <address>"``)
        has its own turn in it, and the list is left as given: one list set for two
        addresses (or a test module's constant, on two servers) greylists each of them,
        where taking its replies out of it deferred the first address only. A turn
        starts over when the rule's ``stamp`` (which setting of it this is) changes."""
        if rule is None or isinstance(rule, str):
            return rule
        where = key if key is not None else f"id {id(rule)}"
        with self._condition:
            previous = self._turns.get(where)
            same = previous is not None and previous[0] is rule and previous[1] == stamp
            turn = previous[2] if previous is not None and same else 0
            self._turns[where] = (rule, stamp, turn + 1)
            return rule[min(turn, len(rule) - 1)]

    def rcpt_rule(self, address: str) -> str | None:
        rules = self.rcpt_replies
        key = address
        rule = rules.get(key)
        if rule is None:
            key = address.lower()
            rule = rules.get(key)
        stamp = rules.stamp(key) if isinstance(rules, _Rules) else 0
        return self.take(rule, key=f"rcpt {key}", stamp=stamp)

    # --- what arrived ------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted (2xx after the dot), in arrival order."""
        with self._condition:
            return list(self._messages)

    @property
    def received(self) -> list[ReceivedMessage]:
        """Every message whose final dot arrived, accepted or not."""
        with self._condition:
            return list(self._received)

    def record(self, message: ReceivedMessage, *, accepted: bool) -> None:
        with self._condition:
            self._received.append(message)
            self.arrivals.append(time.time())
            if accepted:
                self._messages.append(message)
            self._notify_waits()

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until ``count`` messages were accepted; AssertionError after ``timeout``."""
        return self._wait(self._messages, count, timeout, "accepted")

    def wait_for_received(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until the final dot of ``count`` messages arrived, whatever the reply;
        AssertionError after ``timeout``."""
        return self._wait(self._received, count, timeout, "received")

    async def await_messages(self, count: int, within: float = 10.0) -> list[ReceivedMessage]:
        """:meth:`wait_for_messages` without blocking the event loop."""
        return await self._await(self._messages, count, within, "accepted")

    async def await_received(self, count: int, within: float = 10.0) -> list[ReceivedMessage]:
        """:meth:`wait_for_received` without blocking the event loop."""
        return await self._await(self._received, count, within, "received")

    def _wait(
        self, items: list[ReceivedMessage], count: int, timeout: float, what: str
    ) -> list[ReceivedMessage]:
        _check_count(count)
        with self._condition:
            self._condition.wait_for(lambda: self._waited(items, count), timeout)
            return self._outcome(items, count, timeout, what)

    async def _await(
        self, items: list[ReceivedMessage], count: int, timeout: float, what: str
    ) -> list[ReceivedMessage]:
        """:meth:`_wait` on the running loop. No thread blocks for it (one did, in the
        loop's executor: cancelled, it waited out the timeout, and so did closing the
        loop), so a cancelled wait leaves nothing behind."""
        _check_count(count)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(changed.set)

        with self._condition:
            self._awaiting.append(wake)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while not self._is_waited(items, count):
                        await changed.wait()
                        changed.clear()
        finally:
            with self._condition:
                self._awaiting.remove(wake)
        with self._condition:
            return self._outcome(items, count, timeout, what)

    def _is_waited(self, items: list[ReceivedMessage], count: int) -> bool:
        with self._condition:
            return self._waited(items, count)

    def _waited(self, items: list[ReceivedMessage], count: int) -> bool:
        """Whether a wait for ``count`` ``items`` is over (call under the condition). A
        stopped server takes no more: a wait for more fails at once, not at its timeout."""
        return len(items) >= count or self._stopped

    def _outcome(
        self, items: list[ReceivedMessage], count: int, timeout: float, what: str
    ) -> list[ReceivedMessage]:
        """What a finished wait returns, or raises (call under the condition): the first
        ``count`` items, however many arrived (all of them made ``[got] = wait_for(1)``
        fail once a second message was in too)."""
        if len(items) < count:
            raise AssertionError(
                f"{self.host}:{self.port} {what} {len(items)} messages, expected {count}"
                + (" before it was stopped" if self._stopped else f" within {timeout}s")
                + self._seen()
            )
        return items[:count]

    def _seen(self) -> str:
        """What the server saw, for a failed wait's message (call under the condition):
        whether a client came, how its recipients were answered, what arrived and with
        which reply. The count alone left a test's author to find all that out."""
        if not self.connections:
            return "; no client connected"
        notes = [f"{self.connections} connection(s)"]
        if self._conversations:
            notes.append(_conversation.describe(self._conversations, self.connections))
        if self._rcpt_answers:
            notes.append(
                "RCPT answered: "
                + _last(f"{address}: {reply!r}" for address, reply in self._rcpt_answers)
            )
        if self._received:
            notes.append(
                "arrived: "
                + _last(
                    f"from {m.envelope_from!r} to {m.envelope_to} "
                    f"{m.message['Subject']!r}, answered {m.reply!r}"
                    for m in self._received
                )
            )
        return "; " + "; ".join(notes)

    def _note_rcpt(self, address: str, reply: str) -> None:
        with self._condition:
            self._rcpt_answers.append((address, reply))

    def _notify_waits(self) -> None:
        """Wake every wait, blocking and async (call under the condition)."""
        self._condition.notify_all()
        for wake in self._awaiting:
            wake()

    # --- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving; idempotent. TimeoutError when the server's event loop is blocked
        (a handler that does not return to it) for 10 s: the server then stops, and frees
        its port, as soon as the loop is free, and the next call waits for that. The
        waits end even when the stop raises: they waited out their whole timeout."""
        try:
            if self._controller is not None:
                self._controller.stop()
                self._controller = None
        finally:
            with self._condition:
                self._stopped = True
                self._notify_waits()

    def __enter__(self) -> ReceivingServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # also when the test failed inside the block

    def __repr__(self) -> str:
        return f"<ReceivingServer {self.host}:{self.port}>"


def _check_count(count: int) -> None:
    """ValueError unless ``count`` is a whole number of messages (``-1`` waited for
    nothing and returned all but the last)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"a wait needs a count of at least 0 messages, got {count!r}")


def _last(lines: Iterable[str], shown: int = 10) -> str:
    """The last ``shown`` of ``lines``, joined, saying how many came before them."""
    items = list(lines)
    kept = ", ".join(items[-shown:])
    return kept if len(items) <= shown else f"({len(items) - shown} earlier), {kept}"


def _stall_point(value: str | None) -> str | None:
    """``value`` as the rules compare it (lower case), or ValueError when it names no
    point: set as an attribute, a typo or ``"DATA"`` matched no command, so the server
    answered as though no rule was set."""
    if value is None:
        return None
    point = value.lower() if isinstance(value, str) else value
    if point not in _STALL_NAMES:
        raise ValueError(f"unknown stall/drop point {value!r}")
    return point


async def _forever() -> None:
    """Stall: wait until the connection is lost (which cancels the handler)."""
    await asyncio.Event().wait()


class _Handler:
    """aiosmtpd hooks applying the server's rules and recording messages."""

    def __init__(self, fixture: ReceivingServer) -> None:
        self.fixture = fixture

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        fixture = self.fixture
        if fixture.ehlo_reply is not None:
            return [fixture.ehlo_reply]
        session.host_name = hostname
        # Without ``auth``, aiosmtpd still offered AUTH over TLS (and refused every login).
        lines = [
            r
            for r in responses
            if (fixture.eightbitmime or r != "250-8BITMIME")
            and (fixture.auth is not None or not r.startswith("250-AUTH"))
        ]
        extra = []
        if fixture.pipelining:
            extra.append("250-PIPELINING")
        if fixture.enhancedstatuscodes:
            extra.append("250-ENHANCEDSTATUSCODES")
        if fixture.dsn:
            extra.append("250-DSN")
        if fixture.requiretls and _over_tls(server):
            extra.append("250-REQUIRETLS")  # RFC 8689 §2: only over TLS
        return lines[:1] + extra + lines[1:]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.fixture.take(self.fixture.mail_reply, key="mail") or "250 2.1.0 OK"
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.lower() in self.fixture.stall_rcpts:
            await _forever()
        limit = self.fixture.rcpt_limit
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            reply = "452 4.5.3 Too many recipients"
        else:
            reply = self.fixture.rcpt_rule(address) or "250 2.1.5 OK"
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        self.fixture._note_rcpt(address, reply)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fixture = self.fixture
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
        drop = fixture.drop_on == "dot" or any(
            r.lower() in fixture.drop_after_dot_rcpts for r in envelope.rcpt_tos
        )
        silent = drop or fixture.stall_on == "dot"
        reply = None
        if not silent:
            reply = fixture.take(fixture.data_reply, key="data") or "250 2.0.0 OK queued"
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            tls=ssl_object is not None,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            helo=session.host_name,
            auth_login=login.decode() if login is not None else None,
            peer=(str(peer[0]), int(peer[1])),
            reply=reply,
        )
        fixture.record(message, accepted=reply is not None and reply.startswith("2"))
        if reply is None:
            if drop and transport is not None:
                transport.close()
            await _forever()
        assert reply is not None
        if fixture.data_delay > 0:
            await asyncio.sleep(fixture.data_delay)  # the scripted slow peer
        return reply

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay = self.fixture.quit_delay
        if delay > 0:
            await asyncio.sleep(delay)  # the scripted slow peer, not a wait of the test's
        return "221 Bye"  # aiosmtpd's own reply


_DSN_PARAMS = frozenset({"RET", "ENVID", "NOTIFY", "ORCPT"})
_mail_log = logging.getLogger("mail.log")
"""aiosmtpd's logger, which the server's own lines join."""


def _over_tls(server: SMTP) -> bool:
    """Whether the connection is over TLS: after STARTTLS, or from the first byte
    (``implicit_tls``), where aiosmtpd's own mark of TLS, set by STARTTLS alone, is unset."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _SMTP(SMTP):
    """aiosmtpd's server plus what it lacks: stalls, drops, a custom greeting, broken TLS."""

    def __init__(self, handler: _Handler, *, fixture: ReceivingServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._fixture = fixture
        self._greeted = False
        self._counted_in: int | None = None
        self._conversation: Conversation | None = None
        """What the server keeps of this connection for a failed wait's message."""
        self._mails = 0  # MAIL commands this connection has given
        self._on_lost: Callable[[_SMTP], None] | None = None
        """Called once the connection is closed (the controller forgets it)."""
        self._smtp_methods = {
            name: self._wrap(name, method) for name, method in self._smtp_methods.items()
        }

    def _wrap(self, name: str, method: Callable[[str], Any]) -> Callable[[str], Any]:
        async def wrapped(arg: str) -> None:
            fixture = self._fixture
            fixture.commands.append(name)
            if self._conversation is not None:
                self._conversation.said(name, arg)
            if self._reader._buffer:  # type: ignore[attr-defined]
                fixture.pipelined += 1
            if fixture.drop_on == name.lower():
                if self.transport is not None:
                    self.transport.close()
                await _forever()
            if fixture.stall_on == name.lower():
                await _forever()
            await method(arg)

        return wrapped

    async def handle_exception(self, error: Exception) -> str:
        # A client breaking off the TLS handshake (what many tests do on purpose) made
        # aiosmtpd log an ERROR and a traceback: the client's doing, told in one line.
        if isinstance(error, TLSSetupException) and self.session is not None:
            why = error.__cause__ or error
            _mail_log.info("%r TLS handshake failed: %r", self.session.peer, why)
            return "421 4.7.0 TLS handshake failed"  # not sent: aiosmtpd hangs up
        return await super().handle_exception(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the switch to TLS after STARTTLS
            fixture = self._fixture
            fixture.connections += 1
            fixture.connected_at.append(time.time())
            fixture.open_connections += 1
            fixture.peak_connections = max(fixture.peak_connections, fixture.open_connections)
            self._counted_in = fixture.generation
            self._conversation = Conversation(
                fixture.connections, transport.get_extra_info("peername")
            )
            with fixture._condition:  # a failed wait reads them on another thread
                fixture._conversations.append(self._conversation)
        elif self._conversation is not None:
            self._conversation.tls = True  # the handshake after STARTTLS is done
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conversation is not None:
            self._conversation.lost(exc)
        if self._on_lost is not None:
            self._on_lost(self)  # before the count: a test sees 0 open once it is forgotten
        # Only connections counted since the last reset (not the start-up probe's).
        if self._counted_in == self._fixture.generation:
            self._counted_in = None
            self._fixture.open_connections -= 1
        super().connection_lost(exc)

    async def push(self, status: AnyStr) -> None:
        fixture = self._fixture
        if not self._greeted:
            self._greeted = True
            if fixture.drop_on == "greeting" and self.transport is not None:
                self.transport.close()
                await _forever()
            if fixture.stall_on == "greeting":
                await _forever()
            if fixture.greeting is not None:
                self._answered(fixture.greeting)
                await super().push(fixture.greeting.replace("\n", "\r\n").replace("\r\r", "\r"))
                if not fixture.greeting.startswith("2") and self.transport is not None:
                    self.transport.close()
                return
        self._answered(status)
        await super().push(status)

    def _answered(self, status: str | bytes) -> None:
        if self._conversation is not None:
            line = status if isinstance(status, str) else status.decode("utf-8", "replace")
            self._conversation.answered(line.partition("\n")[0].rstrip("\r"))

    async def smtp_MAIL(self, arg: str) -> None:
        fixture = self._fixture
        limit = fixture.messages_per_connection
        if limit is not None and self._mails >= limit:
            if fixture.over_limit_reply is not None:
                await self.push(fixture.over_limit_reply)
            if self.transport is not None:
                self.transport.close()
            await _forever()
        self._mails += 1
        # REQUIRETLS is a parameter aiosmtpd does not know: take it off and note it.
        requiretls = False
        if self._fixture.requiretls and _over_tls(self) and arg:
            words = arg.split(" ")
            kept = [w for w in words if w.upper() != "REQUIRETLS"]
            requiretls = len(kept) != len(words)
            arg = " ".join(kept)
        await super().smtp_MAIL(self._take_dsn("MAIL", arg))
        envelope = self.envelope
        if requiretls and envelope is not None and envelope.mail_from is not None:
            envelope.mail_options.append("REQUIRETLS")

    async def smtp_RCPT(self, arg: str) -> None:
        await super().smtp_RCPT(self._take_dsn("RCPT", arg))

    async def smtp_AUTH(self, arg: str) -> None:
        if self._fixture.auth is None:  # a server without AUTH, as it advertises none
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    def _take_dsn(self, command: str, arg: str) -> str:
        """With ``dsn=True``, record the RFC 3461 parameters of ``arg`` and hand aiosmtpd
        the rest (it refuses parameters it does not know with 555)."""
        if not self._fixture.dsn or not arg:
            return arg
        path, *params = arg.split(" ")
        dsn = tuple(p for p in params if p.partition("=")[0].upper() in _DSN_PARAMS)
        if dsn:
            address = path.partition(":")[2].strip("<>")
            self._fixture.dsn_params.append((command, address, dsn))
        return " ".join([path, *(p for p in params if p not in dsn)])

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self._fixture.starttls_reply
        if reply is not None:
            await self.push(reply)
            if reply.startswith("421") and self.transport is not None:
                self.transport.close()
            return
        if not self._fixture.tls_broken:
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 2.0.0 Ready to start TLS")
        # Answer the ClientHello with bytes that are no TLS record, then hang up: the
        # client's handshake fails as it would against a broken TLS stack.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader.read(1), 5.0)
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).write(b"220 this is not TLS\r\n" * 8)
            self.transport.close()


class _Controller(Controller):
    """A Controller that reports its ephemeral port, builds :class:`_SMTP` and, when
    stopped, closes its connections before its loop so no transport is leaked."""

    def __init__(self, fixture: ReceivingServer, **kwargs: Any) -> None:
        super().__init__(_Handler(fixture), **kwargs)
        self._fixture = fixture
        self._live: set[_SMTP] = set()
        self._stopping: threading.Thread | None = None
        """Finishes a stop whose wait timed out, once the loop is free (see :meth:`stop`)."""

    def factory(self) -> SMTP:
        smtp = _SMTP(self.handler, fixture=self._fixture, loop=self.loop, **self.SMTP_kwargs)
        # Open connections only: kept until stop(), every connection ever accepted stayed
        # in memory with its TLS state, a few hundred kB each, for the server's life.
        smtp._on_lost = self._live.discard
        self._live.add(smtp)
        return smtp

    def start(self) -> None:
        try:
            super().start()
        except BaseException:
            self._clean_up_failed_start()
            raise

    def _clean_up_failed_start(self) -> None:
        """End what aiosmtpd leaves of a start that raised: its event loop open (and its
        self-pipe sockets) when the bind failed, its thread serving when a later step did.
        Left to the garbage collector, they fail some later test that runs with warnings
        as errors ("unclosed event loop")."""
        thread = self._thread
        if thread is not None:
            if thread.is_alive():
                self.loop.call_soon_threadsafe(self.cancel_tasks)  # its thread closes the loop
            thread.join()
            self._thread = None
        if not self.loop.is_closed():
            self.loop.close()

    def _trigger_server(self) -> None:
        server = cast(asyncio.Server, self.server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]

    def stop(self, no_assert: bool = False) -> None:
        async def close_connections() -> None:
            assert self.server is not None
            self.server.close()
            tasks = []
            for smtp in list(self._live):
                if smtp.transport is not None:
                    cast(asyncio.Transport, smtp.transport).abort()
                if smtp._handler_coroutine is not None:
                    tasks.append(smtp._handler_coroutine)
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            await asyncio.sleep(0)

        if self._stopping is not None:  # a stop that timed out, finishing on its own
            self._stopping.join(_STOP_TIMEOUT)
            if self._stopping.is_alive():
                raise self._blocked()
            self._stopping = None
            return
        if self._thread is not None and self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(close_connections(), self.loop)
            try:
                future.result(timeout=_STOP_TIMEOUT)
            except TimeoutError:
                # The loop is blocked (a handler that does not return to it). Raising
                # here, aiosmtpd's stop was never called: the loop ran on in its thread,
                # holding the port, unless the test called stop() again. It is called
                # now on a thread of its own, once the connections are closed.
                self._stopping = threading.Thread(
                    target=self._stop_when_free,
                    args=(future, no_assert),
                    name=f"stopping-smtp-{self.port}",
                    daemon=True,
                )
                self._stopping.start()
                raise self._blocked() from None
        super().stop(no_assert=no_assert)

    def _stop_when_free(self, closing: concurrent.futures.Future[None], no_assert: bool) -> None:
        """aiosmtpd's stop (its loop stopped, its thread joined, the port freed), once
        ``closing``, the connections' closing that waits for the blocked loop, is over."""
        with contextlib.suppress(Exception):
            closing.result()
        super().stop(no_assert=no_assert)

    def _blocked(self) -> TimeoutError:
        return TimeoutError(
            f"the SMTP server on port {self.port} did not stop within {_STOP_TIMEOUT} s: its "
            "event loop is blocked (a handler that does not return to it); it stops, and "
            "frees its port, as soon as the loop is free"
        )


# --- starting servers ----------------------------------------------------------------------


def tls_contexts(
    *names: str, ca: trustme.CA | None = None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context holding a certificate for ``names``, issued by ``ca`` (a new
    throwaway CA by default), and a client context trusting that CA alone."""
    ca = ca or trustme.CA()
    return contexts_for(ca, ca.issue_cert(*names))


def contexts_for(ca: trustme.CA, cert: trustme.LeafCert) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """New contexts for a certificate issued already: a server context holding ``cert``,
    and a client context trusting ``ca`` alone (host names checked, as in
    :func:`ssl.create_default_context`, whose loading of the system's CAs took most of the
    time). Each call gives contexts of their own, which a test may change without
    changing another's."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


ServerFactory = Callable[..., ReceivingServer]
"""A callable starting servers with :func:`start_receiving_server`'s keyword options."""


def start_receiving_server(
    tls_context: ssl.SSLContext,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "mx.test",
    starttls: bool = True,
    require_starttls: bool = False,
    tls_broken: bool = False,
    implicit_tls: bool = False,
    smtputf8: bool = True,
    eightbitmime: bool = True,
    pipelining: bool = True,
    enhancedstatuscodes: bool = True,
    size_limit: int | None = DEFAULT_SIZE_LIMIT,
    auth: tuple[str, str] | None = None,
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
    greeting: str | None = None,
    ehlo_reply: str | None = None,
    stall_on: str | None = None,
    drop_on: str | None = None,
    dsn: bool = False,
    requiretls: bool = False,
) -> ReceivingServer:
    """Start one receiving server (see the module docstring for the options); the caller
    stops it, or uses it as a context manager."""
    stall_on, drop_on = _stall_point(stall_on), _stall_point(drop_on)  # before starting
    fixture = ReceivingServer(
        host=host,
        pipelining=pipelining,
        eightbitmime=eightbitmime,
        enhancedstatuscodes=enhancedstatuscodes,
        tls_broken=tls_broken,
        greeting=greeting,
        ehlo_reply=ehlo_reply,
        auth=auth,
        requiretls=requiretls,
    )
    kwargs: dict[str, Any] = {
        "enable_SMTPUTF8": smtputf8,
        "data_size_limit": size_limit,
        "decode_data": False,
    }
    # Not over implicit TLS: a server must not offer STARTTLS on a connection that is over
    # TLS already (RFC 3207 §4.2), nor demand it (530) there.
    if (starttls or tls_broken) and not implicit_tls:
        kwargs["tls_context"] = tls_context
        kwargs["require_starttls"] = require_starttls
    if auth is not None:
        kwargs["authenticator"] = _authenticator(auth)
        kwargs["auth_require_tls"] = False
        kwargs["auth_exclude_mechanism"] = [
            m for m in ("PLAIN", "LOGIN") if m not in auth_mechanisms
        ]
    controller = _Controller(
        fixture,
        hostname=host,
        port=port,
        server_hostname=name,
        ssl_context=tls_context if implicit_tls else None,
        **kwargs,
    )
    controller.start()
    fixture._controller = controller
    fixture.port = controller.port
    # The controller's own start-up probe is no client of the test's.
    fixture.connections = 0
    fixture.connected_at.clear()
    fixture.open_connections = fixture.peak_connections = 0
    fixture.generation += 1
    fixture.commands.clear()
    with fixture._condition:
        fixture._conversations.clear()
    fixture.stall_on = stall_on
    fixture.drop_on = drop_on
    fixture.dsn = dsn
    return fixture


def _authenticator(credentials: tuple[str, str]) -> Callable[..., AuthResult]:
    user, password = (c.encode() for c in credentials)

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (user, password)
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    return authenticate


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for "connection refused" tests)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
