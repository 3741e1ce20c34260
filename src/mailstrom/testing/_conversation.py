"""What a receiving server keeps of each connection, for the message of a failed wait.

The count of connections alone left a test's author blind to every failure before RCPT
(a refused greeting or MAIL, a TLS handshake that failed, a client that left after EHLO),
though the server had the commands and its replies. Bounded: a server keeps the last
:data:`KEPT` connections, each with its last :data:`VERBS` command verbs and its last
:data:`SHOWN` commands with their replies, each line cut at :data:`WIDTH` characters.
"""

from __future__ import annotations

from collections import deque

KEPT = 5
"""Connections a server describes (the last ones; the earlier are counted)."""

VERBS = 12
"""Command verbs kept per connection, the last ones."""

SHOWN = 3
"""Exchanges (a command and its reply) kept per connection, the last ones."""

WIDTH = 100
"""Characters kept of a command line or a reply line."""


def _cut(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


class Conversation:
    """One connection as the server saw it: the verbs it gave, its last :data:`SHOWN`
    exchanges (a command and the first line of its reply), whether TLS came up, whether
    it ended. Written on the server's loop thread only, and read from another thread for
    a failed wait: every field is replaced whole (tuples, not deques, which raise there
    when changed while read)."""

    __slots__ = (
        "command",
        "continued",
        "ended",
        "exchanges",
        "number",
        "peer",
        "tls",
        "tls_asked",
        "verbs",
        "verbs_given",
    )

    def __init__(self, number: int, peer: object) -> None:
        self.number = number
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        self.verbs: tuple[str, ...] = ()
        self.verbs_given = 0
        self.exchanges: tuple[str, ...] = ()
        self.command: str | None = None  # the command given and not answered yet
        self.continued = False  # the last reply line sent was a "250-" one
        self.tls_asked = False  # STARTTLS answered 220
        self.tls = False
        self.ended: str | None = None

    def said(self, verb: str, arg: str | None) -> None:
        """The client gave ``verb`` (an AUTH's credentials are left out)."""
        self.verbs = (*self.verbs[1 - VERBS :], verb)
        self.verbs_given += 1
        if verb == "AUTH" and arg:
            arg = arg.split(" ", 1)[0]
        self.command = f"{verb} {arg}" if arg else verb

    def answered(self, line: str) -> None:
        """The server sent ``line``; the first line of a reply is kept."""
        if not self.continued:
            if self.command is None:
                said = f"{'greeting' if not self.verbs_given else 'reply'} {_cut(line)!r}"
            else:
                said = f"{_cut(self.command)!r} answered {_cut(line)!r}"
                if self.command == "STARTTLS" and line.startswith("220"):
                    self.tls_asked = True
            self.exchanges = (*self.exchanges[1 - SHOWN :], said)
            self.command = None
        self.continued = line[3:4] == "-"

    def lost(self, error: BaseException | None) -> None:
        self.ended = "closed" if error is None else f"closed ({type(error).__name__})"

    def describe(self) -> str:
        earlier = self.verbs_given - len(self.verbs)
        path = " ".join(self.verbs) if self.verbs else "no command"
        notes = [
            f"connection {self.number} from {self.peer}: "
            + (f"({earlier} earlier commands) " if earlier else "")
            + path,
            *self.exchanges,
        ]
        if self.command is not None:
            notes.append(f"{_cut(self.command)!r} unanswered")
        if self.tls_asked and not self.tls:
            notes.append("TLS handshake not completed")
        notes.append(self.ended or "still open")
        return ", ".join(notes)


def describe(conversations: deque[Conversation], connections: int) -> str:
    """The kept ``conversations`` of a server that accepted ``connections``, one clause
    each, saying how many earlier ones are left out."""
    earlier = connections - len(conversations)
    said = [c.describe() for c in conversations]
    if earlier > 0:
        said.insert(0, f"({earlier} earlier connection(s) not shown)")
    return "; ".join(said)
