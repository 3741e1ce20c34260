"""The SMTP client session as a sans-IO state machine: bytes in, replies out.

Modelled on h11: the session owns no socket. Each command method checks that the command is
legal now, records that a reply is owed, and returns the bytes to write; the driver writes
them, feeds what it reads to :meth:`ClientSession.receive_data` and takes replies from
:meth:`ClientSession.next_event`, each paired with the command it answers. Legal commands
and the effect of each reply are tables (:data:`_ALLOWED`, :data:`_AFTER_REPLY`), not
if-chains.

>>> s = ClientSession(helo_name="client.example")
>>> s.receive_data(b"220 mx.example ESMTP\\r\\n")
>>> s.next_event().reply.code
220
>>> s.ehlo()
b'EHLO client.example\\r\\n'
>>> s.receive_data(b"250-mx.example\\r\\n250-PIPELINING\\r\\n250 SIZE 1000\\r\\n")
>>> s.next_event().command, s.pipelining, s.max_size
(<Command.EHLO: 'EHLO'>, True, 1000)
>>> s.envelope("a@example.com", ["b@example.org"], size=10)
b'MAIL FROM:<a@example.com> SIZE=10\\r\\nRCPT TO:<b@example.org>\\r\\nDATA\\r\\n'
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import NoReturn

from mailstrom.domains import a_label
from mailstrom.errors import SMTPProtocolError
from mailstrom.smtp.events import NEED_DATA, Command, LocalProtocolError, NeedData, Reply
from mailstrom.smtp.replies import MAX_TEXT, ReplyParser, parse_ehlo, quote_reply
from mailstrom.status import SMTPReply


class State(StrEnum):
    """Where the session stands, as far as the replies received so far tell."""

    GREETING = "greeting"
    """Connected; the server's greeting is due."""
    REFUSED = "refused"
    """The greeting was 4xx/5xx: only QUIT remains (RFC 5321 §3.1)."""
    HELLO = "hello"
    """Greeted (or TLS just started): EHLO or HELO next."""
    READY = "ready"
    """Between transactions."""
    AUTH = "auth"
    """The server sent a 334 challenge; an AUTH response is due."""
    TLS = "tls"
    """STARTTLS accepted: the transport must start TLS, then call ``tls_established``."""
    MAIL = "mail"
    """MAIL accepted: RCPT, DATA or RSET next."""
    DATA = "data"
    """354 received: the content and the final dot are due."""
    CLOSED = "closed"
    """QUIT answered, 421 received, or the peer broke the protocol."""


_C = Command
_S = State

# The state after a reply to each command, by the reply's first digit; ``None`` keeps the
# state. A digit missing here is a reply the command cannot get: a protocol error.
_AFTER_REPLY: dict[Command, dict[int, State | None]] = {
    _C.GREETING: {2: _S.HELLO, 4: _S.REFUSED, 5: _S.REFUSED},
    _C.EHLO: {2: _S.READY, 4: _S.HELLO, 5: _S.HELLO},
    _C.HELO: {2: _S.READY, 4: _S.HELLO, 5: _S.HELLO},
    _C.STARTTLS: {2: _S.TLS, 4: _S.READY, 5: _S.READY},
    _C.AUTH: {2: _S.READY, 3: _S.AUTH, 4: _S.READY, 5: _S.READY},
    _C.MAIL: {2: _S.MAIL, 4: _S.READY, 5: _S.READY},
    _C.RCPT: {2: None, 4: None, 5: None},
    _C.DATA: {3: _S.DATA, 4: _S.READY, 5: _S.READY},
    _C.BODY: {2: _S.READY, 4: _S.READY, 5: _S.READY},
    _C.RSET: {2: _S.READY, 4: None, 5: None},
    _C.NOOP: {2: None, 4: None, 5: None},
    _C.QUIT: {2: _S.CLOSED, 4: _S.CLOSED, 5: _S.CLOSED},
}

# The reply class that lets each command go on; used to project the state after commands
# still awaiting replies (pipelining).
_SUCCESS = {_C.DATA: 3}
# The state each command leads to when it succeeds; ``None`` keeps the state.
_ON_SUCCESS: dict[Command, State | None] = {
    command: after[_SUCCESS.get(command, 2)] for command, after in _AFTER_REPLY.items()
}

# Commands each (projected) state accepts.
_ALLOWED: dict[State, frozenset[Command]] = {
    _S.GREETING: frozenset(),
    _S.REFUSED: frozenset({_C.QUIT}),
    _S.HELLO: frozenset({_C.EHLO, _C.HELO, _C.NOOP, _C.QUIT}),
    _S.READY: frozenset(
        {_C.EHLO, _C.HELO, _C.STARTTLS, _C.AUTH, _C.MAIL, _C.RSET, _C.NOOP, _C.QUIT}
    ),
    _S.AUTH: frozenset({_C.AUTH}),
    _S.TLS: frozenset(),
    _S.MAIL: frozenset({_C.RCPT, _C.DATA, _C.RSET, _C.NOOP, _C.QUIT}),
    _S.DATA: frozenset({_C.BODY}),
    _S.CLOSED: frozenset(),
}

# RFC 2920 §3.1: with PIPELINING these may be followed by more commands before their
# replies arrive; the second set may be sent while replies are outstanding, ending a group.
# The message content (BODY) is explicitly allowed to be the first "command" of a group, so
# the next transaction's MAIL, RCPT and DATA can follow the final dot in the same write.
_GROUPABLE = frozenset({_C.RSET, _C.MAIL, _C.RCPT, _C.BODY})
_MAY_FOLLOW = frozenset({_C.RSET, _C.MAIL, _C.RCPT, _C.DATA, _C.NOOP, _C.QUIT})

# Per command, what it adds to the counts kept for can_send while it awaits its reply:
# (1 if it is outside _GROUPABLE, 1 if its success changes the state).
_COUNTS: dict[Command, tuple[int, int]] = {
    command: (int(command not in _GROUPABLE), int(_ON_SUCCESS[command] is not None))
    for command in Command
}
_HELLOS = frozenset({_C.EHLO, _C.HELO})
# The one code of a reply class that some commands can get: EHLO and HELO succeed with 250
# alone (RFC 5321 §4.1.1.1), DATA goes on with 354 alone (§4.3.2), AUTH with 334 alone (RFC
# 4954 §4). Another code of that class is a protocol error: a 220 to EHLO is a greeting
# sent again (after STARTTLS, say), and taken for the reply every reply after it would
# answer the command before its own; a 334 to DATA leaves the server in a state the client
# cannot know, and was recorded as the server's answer to the recipients.
_EXACT: dict[Command, tuple[int, int]] = {
    _C.EHLO: (2, 250),
    _C.HELO: (2, 250),
    _C.DATA: (3, 354),
    _C.AUTH: (3, 334),
}


def encode_body(content: bytes) -> bytes:
    """Dot-stuff ``content`` (RFC 5321 §4.5.2) and append the final dot, for one write.

    ``content`` must already use CRLF line endings. A last line without CRLF gets one
    before the terminator.

    >>> encode_body(b".hidden\\r\\nline\\r\\n.\\r\\nend")
    b'..hidden\\r\\nline\\r\\n..\\r\\nend\\r\\n.\\r\\n'
    """
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if content.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed or stuffed.endswith(b"\r\n"):
        return stuffed + b".\r\n"
    return stuffed + b"\r\n.\r\n"


def content_size(content: bytes) -> int:
    """The octets :func:`encode_body` sends for ``content`` before the final dot, not
    counting the dots it doubles: the message size of RFC 1870 §3 (SIZE), which counts the
    CRLF a last line without one gets.

    >>> content_size(b"a\\r\\n.b"), content_size(b"a\\r\\n"), content_size(b"")
    (7, 3, 0)
    """
    size = len(content)
    return size if not content or content.endswith(b"\r\n") else size + 2


class ClientSession:
    """One SMTP client conversation, without I/O.

    Commands return the bytes to write; :meth:`next_event` returns :class:`Reply` events in
    the order the commands were sent, or :data:`NEED_DATA`. Peer misbehaviour raises
    :class:`~mailstrom.errors.SMTPProtocolError` (and closes the session); asking for a
    command the protocol forbids now raises :class:`LocalProtocolError`.
    """

    def __init__(self, *, helo_name: str) -> None:
        if not helo_name or any(c in helo_name for c in "\r\n "):
            raise ValueError(f"invalid HELO name: {helo_name!r}")
        self.helo_name = helo_name
        # An internationalised name goes out as A-labels (RFC 5321 §4.1.1.1 wants a domain).
        helo = helo_name if helo_name.isascii() else a_label(helo_name)
        self._helo = helo.encode("ascii")
        self._state = State.GREETING
        self._parser = ReplyParser()
        self._pending: deque[tuple[Command, str | None]] = deque()
        # Kept up to date as commands are queued and answered, so that can_send is O(1)
        # however many commands a pipelined batch holds:
        self._ungroupable = 0  # pending commands outside _GROUPABLE
        self._changing = 0  # pending commands whose success changes the state
        self._last_change = State.GREETING  # the state the newest of those leads to
        self._push(Command.GREETING, None)
        self._extensions: dict[str, str] = {}
        self._set_extensions({})
        self._esmtp = False

    # --- what the session knows --------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def outstanding(self) -> tuple[Command, ...]:
        """Commands sent whose replies have not arrived yet, oldest first."""
        return tuple(command for command, _ in self._pending)

    @property
    def awaiting(self) -> Command | None:
        """The command whose reply comes next, or None (O(1), unlike ``outstanding``)."""
        return self._pending[0][0] if self._pending else None

    @property
    def buffered(self) -> int:
        """Octets received that are not part of a reply handed out yet (the start of one)."""
        return self._parser.buffered

    @property
    def extensions(self) -> Mapping[str, str]:
        """EHLO keywords → parameters, e.g. ``{"SIZE": "1000", "AUTH": "PLAIN LOGIN"}``."""
        return self._extensions_view

    @property
    def esmtp(self) -> bool:
        """True when EHLO (not HELO) was accepted."""
        return self._esmtp

    @property
    def pipelining(self) -> bool:
        return self._pipelining

    @property
    def max_size(self) -> int | None:
        """The SIZE limit the server announced (RFC 1870), or None when it set none."""
        return self._max_size

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self._extensions.get("AUTH", "").upper().split())

    def can_send(self, command: Command) -> bool:
        """Whether ``command`` may be sent now."""
        if command not in _ALLOWED[self._last_change if self._changing else self._state]:
            return False
        if not self._pending:
            return True
        return not self._ungroupable and command in _MAY_FOLLOW and self._pipelining

    # --- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the server (any split, even one byte at a time)."""
        try:
            self._parser.feed(data)
        except SMTPProtocolError:
            self._fail()
            raise

    def next_event(self) -> Reply | NeedData:
        """The next reply, paired with the command it answers, or :data:`NEED_DATA`."""
        answer = self.next_answer()
        if answer is None:
            return NEED_DATA
        command, reply, argument = answer
        return Reply(command=command, reply=reply, argument=argument)

    def next_answer(self) -> tuple[Command, SMTPReply, str | None] | None:
        """What :meth:`next_event` says, as a plain (command, reply, argument) tuple, or
        None while no complete reply is buffered: for a driver handling several replies
        per message, without an event object for each."""
        try:
            reply = self._parser.next_reply()
            if reply is None:
                return None
            # The errors below carry no code: the reply answered nothing we asked, and a
            # code would be recorded as the server's reply to the recipients it fails (a
            # "250" on a deferred recipient). Their text quotes its start.
            if not self._pending:
                raise SMTPProtocolError(f"unsolicited reply: {quote_reply(reply)}")
            command, argument = self._pending.popleft()
            ungroupable, changing = _COUNTS[command]
            if ungroupable:
                self._ungroupable -= 1
            if changing:
                self._changing -= 1
            after = _AFTER_REPLY[command]
            code = reply.code
            digit = code // 100
            exact = _EXACT.get(command)
            if digit not in after or (exact is not None and exact[0] == digit and exact[1] != code):
                raise SMTPProtocolError(f"unexpected reply to {command}: {quote_reply(reply)}")
            if code == 421:
                # The server is going away: the replies still owed will never come.
                self._state = State.CLOSED
                self._clear_pending()
            elif (state := after[digit]) is not None:
                self._state = state
            if digit == 2 and command in _HELLOS:
                self._esmtp = command is Command.EHLO
                self._set_extensions(parse_ehlo(reply) if self._esmtp else {})
            if len(reply.text) > MAX_TEXT:
                reply = SMTPReply(code=code, text=reply.text[:MAX_TEXT], enhanced=reply.enhanced)
            if self._state is State.TLS and self._parser.buffered:
                # Bytes after "220 go ahead" arrived in plaintext and would be read as if
                # protected by TLS: the STARTTLS injection bugs
                # of CVE-2011-0411 and kin, seen from the client side.
                raise SMTPProtocolError("data received after the STARTTLS reply")
            return command, reply, argument
        except SMTPProtocolError:
            self._fail()
            raise

    def _fail(self) -> None:
        self._state = State.CLOSED
        self._clear_pending()

    def _set_extensions(self, extensions: dict[str, str]) -> None:
        # What is read per transaction is worked out once per EHLO, not per read.
        self._extensions = extensions
        self._extensions_view = MappingProxyType(extensions)
        self._pipelining = "PIPELINING" in extensions
        value = extensions.get("SIZE", "")
        # RFC 1870: the value is 1 to 20 ASCII digits; str.isdigit() alone also takes "²"
        # or "٣", which int() refuses or reads, and int() refuses more than 4300 digits.
        # Anything else (or 0) announces no limit.
        valid = len(value) <= 20 and value.isascii() and value.isdigit()
        self._max_size = int(value) if valid and int(value) > 0 else None

    def _push(self, command: Command, argument: str | None) -> None:
        self._pending.append((command, argument))
        if command not in _GROUPABLE:
            self._ungroupable += 1
        after = _ON_SUCCESS[command]
        if after is not None:
            self._changing += 1
            self._last_change = after

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._ungroupable = self._changing = 0

    # --- sending -----------------------------------------------------------------------

    def ehlo(self) -> bytes:
        return self._send(Command.EHLO, b"EHLO " + self._helo + b"\r\n")

    def helo(self) -> bytes:
        return self._send(Command.HELO, b"HELO " + self._helo + b"\r\n")

    def starttls(self) -> bytes:
        return self._send(Command.STARTTLS, b"STARTTLS\r\n")

    def tls_established(self) -> None:
        """The transport now speaks TLS: forget the extensions; EHLO must be sent again
        (RFC 3207 §4.2)."""
        if self._state is not State.TLS:
            raise LocalProtocolError(f"no STARTTLS was accepted (state {self._state})")
        self._state = State.HELLO
        self._set_extensions({})
        self._esmtp = False
        self._parser = ReplyParser()

    def auth_plain(self, username: str, password: str) -> bytes:
        """AUTH PLAIN with the initial response (RFC 4616, RFC 4954 §4)."""
        self._require_state(State.READY)
        token = b"\0" + username.encode() + b"\0" + password.encode()
        return self._send(Command.AUTH, b"AUTH PLAIN " + base64.b64encode(token) + b"\r\n")

    def auth_login(self) -> bytes:
        """AUTH LOGIN; answer the two 334 challenges with :meth:`auth_response`."""
        self._require_state(State.READY)
        return self._send(Command.AUTH, b"AUTH LOGIN\r\n")

    def auth_response(self, data: bytes | None) -> bytes:
        """Answer a 334 challenge with ``data`` (base64-encoded here); None cancels."""
        self._require_state(State.AUTH)
        line = b"*" if data is None else base64.b64encode(data)
        return self._send(Command.AUTH, line + b"\r\n")

    def mail(
        self,
        sender: str,
        *,
        size: int | None = None,
        eightbit: bool = False,
        smtputf8: bool = False,
        requiretls: bool = False,
        dsn: bytes = b"",
    ) -> bytes:
        """MAIL FROM with SIZE (if offered), BODY=8BITMIME, SMTPUTF8 and REQUIRETLS (RFC
        8689, if asked for) and the DSN parameters ``dsn`` (`` RET=HDRS ENVID=...``; RFC
        3461, only when offered)."""
        line = self._mail_line(sender, size, eightbit, smtputf8, requiretls, dsn)
        return self._send(Command.MAIL, line, sender)

    def rcpt(self, recipient: str, *, smtputf8: bool = False, dsn: bytes = b"") -> bytes:
        """RCPT TO with the DSN parameters ``dsn`` (`` NOTIFY=... ORCPT=...``), if any."""
        return self._send(Command.RCPT, self._rcpt_line(recipient, smtputf8, dsn), recipient)

    def data(self) -> bytes:
        return self._send(Command.DATA, b"DATA\r\n")

    def body(self, content: bytes) -> bytes:
        """The dot-stuffed content and the final dot, after the 354 reply to DATA."""
        return self._send(Command.BODY, encode_body(content))

    def rset(self) -> bytes:
        return self._send(Command.RSET, b"RSET\r\n")

    def noop(self) -> bytes:
        return self._send(Command.NOOP, b"NOOP\r\n")

    def quit(self) -> bytes:
        return self._send(Command.QUIT, b"QUIT\r\n")

    def envelope(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        size: int | None = None,
        eightbit: bool = False,
        smtputf8: bool = False,
        reset: bool = False,
        requiretls: bool = False,
        dsn_mail: bytes = b"",
        dsn_rcpt: Sequence[bytes] = (),
    ) -> bytes:
        """[RSET,] MAIL, every RCPT and DATA as one pipelined batch (RFC 2920).

        Only when the server offers PIPELINING; the replies then come back in this order.
        ``dsn_mail`` and ``dsn_rcpt`` (one per recipient, or none) are DSN parameters, as
        for :meth:`mail` and :meth:`rcpt`.
        """
        if not self._pipelining:
            raise LocalProtocolError("the server does not offer PIPELINING")
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        if dsn_rcpt and len(dsn_rcpt) != len(recipients):
            raise ValueError("dsn_rcpt needs one entry per recipient")
        # Build every line first, so a bad address leaves the session untouched.
        mail = self._mail_line(sender, size, eightbit, smtputf8, requiretls, dsn_mail)
        rcpts = [
            (r, self._rcpt_line(r, smtputf8, dsn_rcpt[i] if dsn_rcpt else b""))
            for i, r in enumerate(recipients)
        ]
        first = Command.RSET if reset else Command.MAIL
        if not self.can_send(first):
            self._refuse(first)
        # With PIPELINING, once the first command may go, so may the rest: RSET leads to
        # READY, which takes MAIL; MAIL leads to MAIL, which takes RCPT and DATA; all of
        # them may follow unanswered commands, and none but DATA ends a group.
        push = self._push
        out = []
        if reset:
            push(Command.RSET, None)
            out.append(b"RSET\r\n")
        push(Command.MAIL, sender)
        out.append(mail)
        for r, line in rcpts:
            push(Command.RCPT, r)
            out.append(line)
        push(Command.DATA, None)
        out.append(b"DATA\r\n")
        return b"".join(out)

    def _mail_line(
        self,
        sender: str,
        size: int | None,
        eightbit: bool,
        smtputf8: bool,
        requiretls: bool = False,
        dsn: bytes = b"",
    ) -> bytes:
        params = b""
        if size is not None and "SIZE" in self._extensions:
            params += b" SIZE=%d" % size
        if eightbit:
            if "8BITMIME" not in self._extensions:
                raise LocalProtocolError("BODY=8BITMIME but the server does not offer 8BITMIME")
            params += b" BODY=8BITMIME"
        if smtputf8:
            if "SMTPUTF8" not in self._extensions:
                raise LocalProtocolError("SMTPUTF8 but the server does not offer it")
            params += b" SMTPUTF8"
        if requiretls:
            if "REQUIRETLS" not in self._extensions:
                raise LocalProtocolError("REQUIRETLS but the server does not offer it")
            params += b" REQUIRETLS"
        if dsn:
            self.check_dsn(dsn)
            params += dsn
        return b"MAIL FROM:" + encode_path(sender, smtputf8) + params + b"\r\n"

    def _rcpt_line(self, recipient: str, smtputf8: bool, dsn: bytes = b"") -> bytes:
        if not recipient:
            raise ValueError("empty recipient address")
        if dsn:
            self.check_dsn(dsn)
        return b"RCPT TO:" + encode_path(recipient, smtputf8) + dsn + b"\r\n"

    def check_dsn(self, params: bytes) -> None:
        """Raise unless ``params`` (`` RET=HDRS``, `` NOTIFY=NEVER``...) may go on a MAIL or
        RCPT line now: :class:`LocalProtocolError` when the server does not offer DSN,
        ValueError when they are not one line of parameters."""
        # RFC 3461 §4: the parameters only go to a server that offers DSN. They are built
        # from checked values (xtext), so a line break here is a bug, not peer input.
        if "DSN" not in self._extensions:
            raise LocalProtocolError("DSN parameters but the server does not offer DSN")
        if not params.startswith(b" ") or any(c in params for c in b"\r\n\x00"):
            raise ValueError(f"malformed DSN parameters: {params!r}")

    def _require_state(self, state: State) -> None:
        if self._pending or self._state is not state:
            raise LocalProtocolError(f"needs state {state}, not {self._projected_state()}")

    def _projected_state(self) -> State:
        """The state once every outstanding command has succeeded: the state the newest
        state-changing command leads to, or the current one when none is outstanding."""
        return self._last_change if self._changing else self._state

    def _send(self, command: Command, line: bytes, argument: str | None = None) -> bytes:
        if not self.can_send(command):
            self._refuse(command)
        self._push(command, argument)
        return line

    def _refuse(self, command: Command) -> NoReturn:
        raise LocalProtocolError(
            f"cannot send {command} in state {self._projected_state()} "
            f"with {len(self._pending)} replies outstanding"
        )


_FORBIDDEN_IN_PATH = re.compile(r"[\r\n\x00<>]").search

# Paths already encoded, per smtputf8: an address is checked and encoded several times on
# its way (the dispatcher, SMTPConnection.submit, the MAIL or RCPT line) and the sender is
# the same for most messages. Only good addresses are kept; bounded, emptied when full.
_PATHS_MAX = 4096
_paths: tuple[dict[str, bytes], dict[str, bytes]] = ({}, {})


def encode_path(address: str, smtputf8: bool) -> bytes:
    """``<address>`` for MAIL/RCPT (``<>`` for the null reverse-path); ValueError if it
    holds CR, LF, NUL or angle brackets, or non-ASCII without ``smtputf8``."""
    known = _paths[smtputf8]
    encoded = known.get(address)
    if encoded is not None:
        return encoded
    if _FORBIDDEN_IN_PATH(address) is not None:
        raise ValueError(f"invalid envelope address: {address!r}")
    try:
        encoded = b"<" + address.encode("utf-8" if smtputf8 else "ascii") + b">"
    except UnicodeEncodeError:
        raise ValueError(f"non-ASCII address needs SMTPUTF8: {address!r}") from None
    if len(known) >= _PATHS_MAX:
        known.clear()
    known[address] = encoded
    return encoded


def encode_recipient(address: str, smtputf8: bool) -> bytes:
    """``<address>`` for RCPT TO, as :func:`encode_path` makes it; ValueError for what
    that refuses and for an empty address (``<>`` is the null reverse-path, no recipient),
    as :meth:`ClientSession.rcpt` refuses them."""
    if not address:
        raise ValueError("empty recipient address")
    return encode_path(address, smtputf8)
