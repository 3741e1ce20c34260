"""``sendmail -bs``: SMTP spoken as a server on standard input and output.

Laravel (``/usr/sbin/sendmail -bs -i``) and Symfony Mailer's SendmailTransport
(``sendmail -bs``) hand their mail to sendmail this way, as Postfix's ``sendmail -bs``
takes it: one client, no network, RFC 5321's server side. Each message accepted is queued
as ``sendmail`` queues one (:func:`mailstrom.cli.sendmail.queue_message`), with the
envelope of MAIL and RCPT (never ``-t`` or ``-f``).

Every octet from the client is hostile: command lines, recipients per transaction, the
message, the errors and the commands that do nothing, and the waits for the next line and
for room to write a reply are all bounded (the constants below).
"""

from __future__ import annotations

import os
import re
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mailstrom.cli.exits import (
    EX_DATAERR,
    EX_NOINPUT,
    EX_OK,
    EX_PROTOCOL,
    EX_TEMPFAIL,
    CLIError,
    exit_code_for,
    reader_gone,
    reason_for,
    say,
)
from mailstrom.cli.output import OutputFailed
from mailstrom.cli.reading import unreadable
from mailstrom.cli.trace import SMTPArrival, protocol
from mailstrom.errors import InvalidMessage, MessageTooLarge, StoreError
from mailstrom.settings import Settings

READ_TIMEOUT = 300.0
"""Seconds to wait for the client's next line (Postfix's smtpd_timeout): then 421; and
for room to write a reply (a client that reads none): then the session ends, the client
gone."""
MAX_COMMAND_LINE = 512
"""Octets in a command line with its CRLF (RFC 5321 §4.5.3.1.4): longer is 500 5.5.2."""
MAX_DISCARDED = 8 * MAX_COMMAND_LINE
"""Octets of one overlong command line read and thrown away, with its line end, before
the session is ended with 421: a client streaming octets without a line end would
otherwise hold it, reading, for as long as it sends within :data:`READ_TIMEOUT`."""
MAX_RECIPIENTS = 1000
"""RCPTs per transaction (Postfix's smtpd_recipient_limit) at most, and never more than
``max_recipients`` takes: more get 452 4.5.3."""
MAX_OVERSHOOT = 1000
"""RCPTs past the recipient limit in one transaction refused with 452 without counting
as errors (Postfix's smtpd_recipient_overshoot_limit): a client sends them again in
another transaction (RFC 5321 §4.5.3.1.10). Past these, each counts."""
MAX_ERRORS = 20
"""Error replies in one session, since its last message queued, before it is ended with
421 (Postfix's hard limit)."""
MAX_JUNK = 100
"""NOOP, RSET, VRFY, HELO and EHLO commands in one session, since its last message
queued, before 421 (Postfix's smtpd_junk_command_limit): a client looping on them would
never end the session."""
_PIECE = 65536
_ATOMIC = 512
"""Octets written at most once the output is writable: no more than a pipe's PIPE_BUF
(POSIX: at least 512), so that the write cannot block after select said it would not."""


class _Timeout(Exception):
    pass


class _Stalled(Exception):
    """The client read none of our replies for the timeout: it is gone."""


class LineSource:
    """Lines read from the descriptor ``fd`` each within :data:`READ_TIMEOUT` seconds,
    never more than asked for held at once (a buffer of one read aside)."""

    def __init__(self, fd: int, timeout: float = READ_TIMEOUT) -> None:
        self._fd = fd
        self._timeout = timeout
        self._buffer = bytearray()
        self.eof = False

    def readline(self, limit: int) -> bytes:
        """The next line with its line end, at most ``limit`` octets of it (the rest of a
        longer line comes with the next call); b"" at the end of input."""
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self._buffer) >= limit or self.eof:
                cut = end + 1 if end >= 0 else min(limit, len(self._buffer))
                line = bytes(self._buffer[:cut])
                del self._buffer[:cut]
                return line
            self._fill()

    def _fill(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd], [], [], self._timeout)
            if not ready:
                raise _Timeout
            try:
                data = os.read(self._fd, _PIECE)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                # A client on a socket that closed it with replies unread: gone, as at
                # the end of input (it was an "internal error", 70).
                data = b""
            except OSError as exc:
                # Input open for writing only, a terminal hung up: no client, and no
                # bug of mailstrom's (it was an "internal error", 70).
                raise unreadable("standard input", exc) from None
            if not data:
                self.eof = True
            self._buffer += data
            return


class ReplySink:
    """Replies written to the descriptor ``fd``, each piece within ``timeout`` seconds
    (:data:`READ_TIMEOUT`), as Postfix's smtpd bounds its writes: a client that reads
    none, its pipe or socket full, held the session for ever."""

    def __init__(self, fd: int, timeout: float = READ_TIMEOUT) -> None:
        self._fd = fd
        self._timeout = timeout

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self._fd], [], self._timeout)
            if not ready:
                raise _Stalled
            try:
                view = view[os.write(self._fd, view[:_ATOMIC]) :]
            except (BrokenPipeError, ConnectionResetError):
                raise  # the client gone: Session.run() knows it
            except OSError as exc:
                # Output open for reading only, a full disk under ``> file``: no bug of
                # mailstrom's (it was an "internal error", 70); 73 as for any command's
                # standard output that cannot be written.
                raise OutputFailed(exc) from None

    def flush(self) -> None:
        pass


class Output(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def flush(self) -> None: ...


@dataclass
class _Transaction:
    sender: str
    utf8: bool = False
    """MAIL said SMTPUTF8: its addresses may be non-ASCII (RFC 6531)."""
    recipients: list[str] = field(default_factory=list)
    overshoot: int = 0
    """RCPTs refused for the recipient limit (:attr:`Session.max_recipients`)."""


Queue = Callable[[bytes, str, list[str], SMTPArrival], str]
"""Queue a message (data, envelope sender, recipients, how it came: for its Received
field) and return its id; raises as ``sendmail`` fails."""
Check = Callable[[str], None]
"""Validate the address of a MAIL or RCPT as queueing it would: InvalidMessage if bad,
:class:`Unusable` if well formed but going nowhere mail can be sent."""


class Unusable(Exception):
    """A well-formed recipient that cannot be used: ``reply`` is the refusal's code and
    enhanced code (RFC 5321 §4.2.2, 550 or 553, never 501: the client's syntax was
    right), the message the reason."""

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply


def _accept(address: str) -> None:
    pass


@dataclass
class Session:
    source: LineSource
    out: Output
    helo_name: str
    max_size: int
    queue: Queue
    check_sender: Check = _accept
    check_recipient: Check = _accept
    max_recipients: int = MAX_RECIPIENTS
    """RCPTs taken per transaction: :data:`MAX_RECIPIENTS`, or the ``max_recipients``
    setting when lower (past it prepare() refuses the whole message)."""
    greeted: bool = False
    client_name: str = ""
    """The name the client gave in its last HELO or EHLO, for the Received field."""
    extended: bool = False
    """That greeting was EHLO."""
    transaction: _Transaction | None = None
    errors: int = 0
    junk: int = 0
    crlf: bool = True
    """The last command line ended with CRLF: the client speaks SMTP's line end, so its
    data ends only at CRLF "." CRLF (see :meth:`_read_data`)."""
    code: int = EX_OK
    """The exit code: that of the last failure (a transaction that was not queued, a
    local failure at MAIL or RCPT, the session ended with 421), else 0."""

    def reply(self, text: str) -> None:
        self.out.write(text.encode("utf-8", "replace") + b"\r\n")
        self.out.flush()

    def error(self, text: str) -> bool:
        """Reply ``text`` (an error); False when the session must end for too many."""
        self.reply(text)
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            return self.end("too many errors")
        return True

    def end(self, why: str) -> bool:
        """End the session the client broke (421): the exit code says so, EX_PROTOCOL,
        for a wrapper that reads only that. False."""
        self.reply(f"421 4.7.0 {self.helo_name} Error: {why}")
        self.code = EX_PROTOCOL
        return False

    def lost(self, where: str) -> bool:
        """The input ended with a message under way (``where``): it is not queued, and
        the exit code says so, EX_PROTOCOL, for a client that reads only that. False."""
        say(f"mailstrom: the input ended {where} without QUIT: not queued")
        self.code = EX_PROTOCOL
        return False

    def run(self) -> int:
        try:
            try:
                self.reply(f"220 {self.helo_name} ESMTP mailstrom")
                while self._step():
                    pass
            except _Timeout:
                self.code = EX_TEMPFAIL  # the client may try again, as after any 4xx
                self.reply(f"421 4.4.2 {self.helo_name} Error: timeout exceeded")
        except (_Stalled, BrokenPipeError, ConnectionResetError):  # the client went away
            reader_gone()
            if self.transaction is not None:
                say("mailstrom: the client went away with a message under way: not queued")
                self.code = EX_PROTOCOL
        return self.code

    def _step(self) -> bool:
        line = self.source.readline(MAX_COMMAND_LINE)
        if not line:
            # Between transactions nothing is lost; after MAIL, the message is.
            return False if self.transaction is None else self.lost("after MAIL")
        if not line.endswith(b"\n"):
            if len(line) < MAX_COMMAND_LINE:
                # A last QUIT without its CRLF, every message queued, ends as QUIT: a
                # caller retrying on 76 queued those messages again.
                if self.transaction is None and line.rstrip(b"\r").upper() == b"QUIT":
                    return self.quit("")
                return self.lost("inside a command line")
            discarded = len(line)
            while not line.endswith(b"\n"):
                if discarded >= MAX_DISCARDED:
                    return self.end("line too long")
                line = self.source.readline(min(_PIECE, MAX_DISCARDED - discarded))
                if not line:
                    return self.lost("inside a command line")
                discarded += len(line)
            return self.error("500 5.5.2 Error: line too long")
        self.crlf = line.endswith(b"\r\n")
        # Octets that are no UTF-8 are kept as surrogates, never replaced by U+FFFD: an
        # address holding them is refused at its MAIL or RCPT (501), not queued mangled.
        text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None:
            return self.error("502 5.5.1 Error: command not recognized")
        if verb in ("NOOP", "RSET", "VRFY", "HELO", "EHLO"):
            self.junk += 1
            if self.junk > MAX_JUNK:
                return self.end("too many commands")
        return handler(self, arg.strip())

    def helo(self, arg: str, *, extended: bool) -> bool:
        if not arg:
            return self.error("501 5.5.4 Syntax: HELO hostname")
        self.greeted = True
        self.client_name, self.extended = arg, extended
        self.transaction = None
        if not extended:
            self.reply(f"250 {self.helo_name}")
            return True
        lines = [
            self.helo_name,
            "PIPELINING",
            f"SIZE {self.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        for line in lines[:-1]:
            self.reply(f"250-{line}")
        self.reply(f"250 {lines[-1]}")
        return True

    def mail(self, arg: str) -> bool:
        if not self.greeted:
            return self.error("503 5.5.1 Error: send HELO/EHLO first")
        if self.transaction is not None:
            return self.error("503 5.5.1 Error: nested MAIL command")
        parsed = _path(arg, "FROM:")
        if parsed is None:
            return self.error("501 5.5.4 Syntax: MAIL FROM:<address>")
        sender, params = parsed
        utf8 = False
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            # ASCII digits (RFC 1870's size-value): str.isdigit() alone also takes "²",
            # which int() raises ValueError for, and Arabic-Indic digits, which it reads.
            if key == "SIZE" and value.isascii() and value.isdigit() and len(value) <= 20:
                if int(value) > self.max_size:
                    return self.error("552 5.3.4 Message size exceeds fixed limit")
            elif (key, value.upper()) not in _KNOWN_PARAMETERS:
                return self.error(f"555 5.5.4 Unsupported option: {param[:64]}")
            utf8 = utf8 or key == "SMTPUTF8"
        refusal = self._refusal(self.check_sender, sender, "501 5.1.7 Bad sender address syntax")
        if refusal or not (utf8 or sender.isascii()):
            return self.error(refusal or _NEEDS_SMTPUTF8)
        self.transaction = _Transaction(sender, utf8)
        self.reply("250 2.1.0 Ok")
        return True

    def rcpt(self, arg: str) -> bool:
        if self.transaction is None:
            return self.error("503 5.5.1 Error: need MAIL command")
        parsed = _path(arg, "TO:")
        if parsed is None or not parsed[0]:
            return self.error("501 5.5.4 Syntax: RCPT TO:<address>")
        address, params = parsed
        if params:
            return self.error(f"555 5.5.4 Unsupported option: {params[0][:64]}")
        if len(self.transaction.recipients) >= self.max_recipients:
            # No error of the client's: counted as one, the 20th of these ended the
            # session with 421, and the recipients taken lost their message.
            self.transaction.overshoot += 1
            if self.transaction.overshoot > MAX_OVERSHOOT:
                return self.error("452 4.5.3 Error: too many recipients")
            self.reply("452 4.5.3 Error: too many recipients")
            return True
        bad = "501 5.1.3 Bad recipient address syntax"
        refusal = self._refusal(self.check_recipient, address, bad)
        if refusal or not (self.transaction.utf8 or address.isascii()):
            return self.error(refusal or _NEEDS_SMTPUTF8)
        self.transaction.recipients.append(address)
        self.reply("250 2.1.5 Ok")
        return True

    def _refusal(self, check: Check, address: str, bad: str) -> str | None:
        """The error reply when ``check`` refuses ``address`` (``bad`` and the reason),
        None when it takes it; 451 when it cannot tell (no usable origin, the aliases
        file unreadable, a bug). That one is a local failure, as a 451 at the end of DATA
        is: the exit code says which (78 for the configuration), for a caller that reads
        only that, where a refused address is the client's to handle from the reply."""
        try:
            check(address)
        except Unusable as exc:
            return f"{exc.reply} {_one_line(str(exc))}"
        except InvalidMessage as exc:
            return f"{bad}: {_one_line(reason_for(exc))}"
        except Exception as exc:
            say(f"mailstrom: {reason_for(exc)}")
            self.code = exit_code_for(exc)
            return "451 4.3.0 Error: local error, try again later"
        return None

    def data(self, arg: str) -> bool:
        if arg:
            return self.error("501 5.5.4 Syntax: DATA")
        if self.transaction is None or not self.transaction.recipients:
            return self.error("503 5.5.1 Error: need RCPT command")
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        message = self._read_data()
        transaction, self.transaction = self.transaction, None
        if message is None:
            if self.source.eof:
                return self.lost("inside DATA")
            self.code = EX_DATAERR  # as sendmail exits for a message over the limit
            return self.error("552 5.3.4 Error: message file too big")
        used = protocol(extended=self.extended, utf8=transaction.utf8)
        arrival = SMTPArrival(helo=self.client_name, protocol=used)
        try:
            queue_id = self.queue(message, transaction.sender, transaction.recipients, arrival)
        except MessageTooLarge:
            self.code = EX_DATAERR
            return self.error("552 5.3.4 Error: message file too big")
        except (InvalidMessage, CLIError) as exc:
            self.code = exit_code_for(exc)
            return self.error(f"554 5.6.0 Error: {_one_line(reason_for(exc))}")
        except Exception as exc:  # the store unavailable, damaged, or a bug: try later
            self.code = exit_code_for(exc)
            kind = "queue unavailable" if isinstance(exc, StoreError) else "local error"
            say(f"mailstrom: {reason_for(exc)}")
            return self.error(f"451 4.3.0 Error: {kind}, try again later")
        # A message received forgives what came before it, as Postfix's smtpd does: the
        # bounds are for a client that never gets anywhere, and one that keeps a session
        # for many messages (Symfony's, up to 100) made them count across all of them.
        self.errors = self.junk = 0
        self.reply(f"250 2.0.0 Ok: queued as {queue_id}")
        return True

    def _read_data(self) -> bytes | None:
        """The message up to the line ``.``, unstuffed; None when it is larger than the
        limit (read on to its end) or the input ends before that line.

        A client whose DATA ended with CRLF starts lines only after CRLF (RFC 5321
        §2.3.8): a bare LF inside its data is text, and so is a "." after one. Symfony's
        client stuffs dots only after CRLF, so ``\n.\n`` in a body it sent ended the data
        and what followed ran as commands: a second message of the body's choosing
        (SMTP smuggling, CVE-2023-51764). A client speaking bare LF throughout (a person
        at a terminal) ends lines, and its data, at LF."""
        eol = b"\r\n" if self.crlf else b"\n"
        # One buffer, not a list of lines: each line an object of its own (some 40
        # octets for one of "a\r\n") made 35 MB of short lines take 1.5 GB.
        message = bytearray()
        size = 0
        # The last octets read, to tell whether a piece begins a line: a CRLF may be
        # split between two pieces of a too long line.
        tail = eol
        while True:
            # Bounded as sendmail's read_until_dot() bounds it: a line over 998 octets is
            # read whole (build() encodes its body), never past the size limit.
            bound = max(self.max_size - size + 1, 3) if size >= 0 else _PIECE
            line = self.source.readline(bound)
            if not line:
                return None
            # Only a whole line is the end of data or dot-stuffed: a piece of a longer
            # line that starts with a dot (".\r\n" at the end of a 64 KiB piece of a
            # too large message) is message text, never commands to read after it.
            at_start = tail.endswith(eol)
            tail = (tail + line[-2:])[-2:]
            if at_start and line in (b".\r\n", b"." + eol):
                return bytes(message) if size >= 0 else None
            if size < 0:
                continue  # too large already: read to the end, keep nothing
            if at_start and line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size > self.max_size:
                message = bytearray()
                size = -1
                continue
            message += line

    def rset(self, arg: str) -> bool:
        self.transaction = None
        self.reply("250 2.0.0 Ok")
        return True

    def noop(self, arg: str) -> bool:
        self.reply("250 2.0.0 Ok")
        return True

    def vrfy(self, arg: str) -> bool:
        if not arg:
            return self.error("501 5.5.4 Syntax: VRFY address")
        self.reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")
        return True

    def quit(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return False


_COMMANDS: dict[str, Callable[[Session, str], bool]] = {
    "HELO": lambda s, a: s.helo(a, extended=False),
    "EHLO": lambda s, a: s.helo(a, extended=True),
    "MAIL": Session.mail,
    "RCPT": Session.rcpt,
    "DATA": Session.data,
    "RSET": Session.rset,
    "NOOP": Session.noop,
    "VRFY": Session.vrfy,
    "QUIT": Session.quit,
}

_KNOWN_PARAMETERS = frozenset({("BODY", "7BIT"), ("BODY", "8BITMIME"), ("SMTPUTF8", "")})
"""The MAIL parameters taken besides SIZE (RFC 6152, RFC 6531): any other is 555."""
_NEEDS_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
"""A non-ASCII address in a transaction whose MAIL did not say SMTPUTF8 (RFC 6531
§3.4), refused as Postfix's smtpd refuses it; one that is no UTF-8 is 501 before."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _path(arg: str, prefix: str) -> tuple[str, list[str]] | None:
    """``FROM:<address> PARAM...`` → the address (a source route dropped, RFC 5321
    §4.1.2) and the parameters; None when it is no such thing."""
    if arg[: len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    quoted = False
    escaped = False  # the character after a backslash in a quoted string (RFC 5321 §4.1.2)
    end = -1
    for i, char in enumerate(rest[1:], 1):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            end = i
            break
    if end < 0:
        return None
    address = rest[1:end]
    if address.startswith("@") and ":" in address:
        address = address.partition(":")[2]
    tail = rest[end + 1 :]
    if (tail and not tail.startswith(" ")) or _CONTROL.search(address):
        return None
    return address, tail.split()


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def serve(
    settings: Settings,
    queue: Queue,
    *,
    check_sender: Check = _accept,
    check_recipient: Check = _accept,
) -> int:
    """Run one SMTP session on standard input and output; the exit code."""
    if sys.stdin is None or sys.stdout is None:
        raise CLIError("-bs needs standard input and output", EX_NOINPUT)
    session = Session(
        source=LineSource(sys.stdin.fileno()),
        out=ReplySink(sys.stdout.fileno()),
        helo_name=settings.config.helo_name,
        max_size=settings.config.max_message_size,
        queue=queue,
        check_sender=check_sender,
        check_recipient=check_recipient,
        # Past max_recipients the message was refused whole at the end of DATA (554,
        # for good), after each RCPT had been taken: 452 tells the client to send the
        # rest in another transaction (RFC 5321 §4.5.3.1.10).
        max_recipients=min(MAX_RECIPIENTS, settings.config.max_recipients),
    )
    return session.run()
