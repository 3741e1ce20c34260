"""What the SMTP client session hands back: which command a reply answers.

The session is fed bytes and yields :class:`Reply` events, each naming the command it
answers (replies come back in the order the commands were sent, RFC 5321 §4.1 and RFC 2920
§3.1). :data:`NEED_DATA` says no complete reply has arrived yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from mailstrom.errors import MailstromError
from mailstrom.status import SMTPReply


class Command(StrEnum):
    """A client command awaiting a reply; ``GREETING`` stands for the connection itself."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BODY = "BODY"
    """The message content and its final dot; answered by the delivery verdict."""
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """The server's ``reply`` to ``command``; ``argument`` is the address for MAIL/RCPT.

    >>> Reply(command=Command.RCPT, argument="bob@example.org",
    ...       reply=SMTPReply(code=250, enhanced="2.1.5", text="OK"))  # doctest: +ELLIPSIS
    Reply(command=<Command.RCPT: 'RCPT'>, ...)
    """

    command: Command
    reply: SMTPReply
    argument: str | None = None

    @property
    def ok(self) -> bool:
        """A positive completion (2xx) or intermediate (3xx) reply."""
        return 200 <= self.reply.code < 400

    @property
    def closing(self) -> bool:
        """421: the server is closing the connection (RFC 5321 §3.8)."""
        return self.reply.code == 421


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA
"""Returned by :meth:`ClientSession.next_event` while no complete reply is buffered."""

NeedData = _NeedData
"""The type of :data:`NEED_DATA`, for annotations."""


class LocalProtocolError(MailstromError, RuntimeError):
    """The caller asked the session for something the protocol forbids in this state.

    A bug in the driver, never the peer's fault (that is
    :class:`~mailstrom.errors.SMTPProtocolError`), as h11 splits local from remote errors.
    """
