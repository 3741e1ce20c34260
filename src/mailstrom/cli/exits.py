"""Exit codes (sysexits.h, as sendmail uses them) and the one place errors become them.

Every failure the user can cause ends as one line on stderr, ``mailstrom: <reason>``, and
the code below — never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys

from mailstrom.errors import (
    AmbiguousMessageId,
    ConfigError,
    InvalidMessage,
    InvalidReport,
    InvalidStoreURL,
    InvalidSuppression,
    MailstromError,
    StoreAccessDenied,
    StoreCorrupt,
    StoreError,
    UnknownMessage,
    UnreadableRow,
)

EX_OK = 0
EX_USAGE = 64
"""Bad command line: unknown option, missing argument."""
EX_DATAERR = 65
"""Bad input data: an invalid address or message."""
EX_NOINPUT = 66
"""An input file cannot be read, or a message id (or prefix) that names no message or
more than one."""
EX_UNAVAILABLE = 69
"""``send --wait``: some recipient failed permanently."""
EX_SOFTWARE = 70
"""A bug in mailstrom."""
EX_CANTCREAT = 73
"""An output file cannot be created (``dkim keygen``: it exists, or its directory does
not; ``tlsrpt``: a report cannot be written, the disk full say)."""
EX_IOERR = 74
"""The store is damaged, is no mailstrom database, has a newer schema, or its file was
deleted or replaced: trying again will not help, so a supervisor should not restart-loop."""
EX_TEMPFAIL = 75
"""Try again later: the store is unreachable, or (``send --wait``) mail is still pending."""
EX_PROTOCOL = 76
"""``sendmail -bs``: the client broke the SMTP dialogue (too many errors or commands that
do nothing, an endless line) and the session was ended with 421."""
EX_CONFIG = 78
"""Bad configuration file, environment variable or store URL, or a database that refuses
the store URL's role (wrong password, unknown role or database, no right to migrate)."""
EX_INTERRUPTED = 130
"""Interrupted (Ctrl-C, SIGINT): 128 + the signal's number, as a shell reports it."""


MAX_REASON = 500
"""Characters of a reason the command itself gives, at most: it quotes what was typed (a
value, a path, argparse's "invalid choice"), and a 10,000-character argument from a
script gone wrong must not become a 10,000-character error line."""


def _bounded(reason: str) -> str:
    """``reason`` cut in the middle past :data:`MAX_REASON` (its start says what was
    wrong, its end how it goes on: argparse puts the choices after the value)."""
    if len(reason) <= MAX_REASON:
        return reason
    half = MAX_REASON // 2
    return f"{reason[:half]}…({len(reason) - MAX_REASON} more)…{reason[-half:]}"


class CLIError(MailstromError):
    """A failure the command itself detects, with its exit code."""

    def __init__(self, reason: str, code: int) -> None:
        reason = _bounded(reason)
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        return self.reason


class UsageError(CLIError):
    """The command line is wrong (raised by our ArgumentParser instead of exiting)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, EX_USAGE)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error that reached the top of a command."""
    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, ConfigError | InvalidStoreURL | StoreAccessDenied):
        return EX_CONFIG
    if isinstance(exc, InvalidMessage | InvalidSuppression | InvalidReport | UnreadableRow):
        return EX_DATAERR
    if isinstance(exc, UnknownMessage):
        return EX_NOINPUT
    if isinstance(exc, StoreCorrupt):
        return EX_IOERR
    if isinstance(exc, StoreError):
        return EX_TEMPFAIL
    return EX_SOFTWARE


def reason_for(exc: BaseException) -> str:
    """One line saying what went wrong (a password in a URL it quotes shown as ``***``,
    control characters it quotes, from a server's reply say, as escapes)."""
    from mailstrom.cli.output import visible

    if isinstance(exc, AmbiguousMessageId):
        # With the candidates: ids as the store gives them back, escaped like the rest.
        return visible(str(exc))
    if isinstance(exc, UnknownMessage):
        # The id is whatever was typed or piped in: quoted cut to 64 characters, with
        # its control characters (a CR, an ESC) as escapes, like every other reason.
        return f"unknown message id: {visible(exc.shown_id)}"
    if isinstance(exc, MailstromError):
        text = str(exc)
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
    return one_line(text) or type(exc).__name__


def one_line(text: str) -> str:
    """``text`` as one line of stderr: its line breaks and runs of space as one space, a
    password in a URL it quotes as ``***``, its control characters as escapes."""
    from mailstrom.cli.output import visible
    from mailstrom.stores.url import redact_url

    return visible(redact_url(" ".join(text.split())))


def fail(exc: BaseException, prog: str = "mailstrom") -> int:
    """Print ``prog: reason`` on stderr and return the exit code."""
    say(f"{prog}: {reason_for(exc)}")
    return exit_code_for(exc)


def say(line: str) -> None:
    """Write ``line`` on stderr, if stderr can be written: a service's is a pipe or a
    socket to its logger (journald, a collector), which breaks when that restarts. The
    write then failed and the command exited 1 instead of its code, which a supervisor
    acts on (74 and 78: do not restart; 75: try again). What cannot be written is lost,
    as a line to a closed stderr is; the interpreter's last flush is pointed at
    /dev/null so that it does not fail again."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # ValueError: the stream was closed
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def reader_gone() -> int:
    """The reader of standard output went away (``mailq | head -1``, a closed ``less``):
    no error worth a message, nor a bug to report. Standard output is pointed at
    /dev/null, so that the interpreter's last flush does not fail again; EX_OK."""
    discard_stdout()
    return EX_OK


def discard_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered for it, and could not
    be written, is written away rather than failing the interpreter's last flush (exit
    120, after the command's own code and line)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
