"""What a receiving server is told and what it records: its rules, the messages that
arrived, and the waits for them (:class:`ReceivingServer`, :class:`ReceivedMessage`).

Its SMTP side (:mod:`mailstrom.testing._protocol`) writes here on the server's loop
thread; a test reads and sets from its own. The servers start in
:mod:`mailstrom.testing.smtp`, whose docstring tells every option and rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import TYPE_CHECKING, TypeVar

from mailstrom.testing import _conversation
from mailstrom.testing._conversation import Conversation
from mailstrom.testing._replies import Rule, _rule, _Rules, _stall_point
from mailstrom.testing.outbox import parse_message

if TYPE_CHECKING:
    from mailstrom.testing.smtp import _Controller


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
    """One aiosmtpd server running in its own thread; see :mod:`mailstrom.testing.smtp`."""

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
                + _last(self._rcpt_answers, lambda answer: f"{answer[0]}: {answer[1]!r}")
            )
        if self._received:
            notes.append(
                "arrived: "
                + _last(
                    self._received,
                    lambda m: (
                        f"from {m.envelope_from!r} to {m.envelope_to} "
                        f"{m.message['Subject']!r}, answered {m.reply!r}"
                    ),
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


_Item = TypeVar("_Item")


def _last(items: Sequence[_Item], line: Callable[[_Item], str], shown: int = 10) -> str:
    """The ``line`` of each of the last ``shown`` ``items``, joined, saying how many came
    before them. Only those are made lines: each message that had arrived was parsed
    for its Subject, under the server's lock, to name the last ten (7 s for 10,000 of
    100 kB, while the server's loop waited to record the next)."""
    kept = ", ".join(line(item) for item in items[-shown:])
    return kept if len(items) <= shown else f"({len(items) - shown} earlier), {kept}"
