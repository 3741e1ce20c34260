"""Reading a message, or the files it is built from, never past the message size limit.

A message larger than ``max_message_size`` is refused by ``prepare()`` anyway, so there is
no point in holding more than the limit in memory first: ``sendmail -i`` fed an endless
pipe, or ``send --file /dev/zero``, would otherwise read until memory runs out. Each reader
here stops one octet past the limit and raises :class:`~mailstrom.errors.MessageTooLarge`,
the error (and exit code 65) of any message over the limit.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

from mailstrom.cli.exits import EX_NOINPUT, CLIError
from mailstrom.errors import MessageTooLarge


class Readable(Protocol):
    """A binary stream: ``sys.stdin.buffer``, a file opened ``rb``."""

    def read(self, size: int = -1, /) -> bytes: ...


class LineReadable(Readable, Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def stdin_buffer() -> BinaryIO:
    """Standard input, binary; CLIError with EX_NOINPUT (66, no input) when it is closed
    (``<&-``): Python then sets ``sys.stdin`` to None, and ``.buffer`` was an
    AttributeError, an "internal error" (70)."""
    if sys.stdin is None:
        raise CLIError("no standard input (it is closed)", EX_NOINPUT)
    try:
        fd = sys.stdin.fileno()
        blocking = os.get_blocking(fd)
    except (OSError, ValueError):  # no descriptor (io.UnsupportedOperation is both)
        return sys.stdin.buffer
    if blocking:
        return sys.stdin.buffer
    # A descriptor left in non-blocking mode (O_NONBLOCK is shared with whoever holds
    # the same open pipe or terminal): a read with nothing there yet returned None or
    # b"", which the readers took for the end of input, and a message still being
    # written was queued cut short (exit 0). Read it as a blocking one instead, without
    # changing the flag under the other holders' feet.
    return io.BufferedReader(_WaitingReader(fd))


class _WaitingReader(io.RawIOBase):
    """The descriptor ``fd`` (not closed with this object) read as if it blocked: a read
    that finds nothing waits until there is something, or the end of input."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = os.read(self._fd, len(view))
            except BlockingIOError:
                select.select([self._fd], [], [])
                continue
            view[: len(data)] = data
            return len(data)


def too_large(source: str, limit: int) -> MessageTooLarge:
    """The error for input past ``limit`` octets (its real size is unknown: it was not
    read to the end)."""
    return MessageTooLarge(
        f"{source} holds more than the message size limit of {limit} octets (max_message_size)",
        size=limit + 1,
        limit=limit,
    )


@contextlib.contextmanager
def _reading(source: str) -> Iterator[None]:
    """CLIError with EX_NOINPUT for a read of ``source`` that fails: standard input open
    for writing only (EBADF), a terminal hung up (EIO), a socket reset. It was an
    "internal error" (70), which tells a caller to report a bug in mailstrom rather
    than look at what it gave as input."""
    try:
        yield
    except OSError as exc:
        raise unreadable(source, exc) from None


def unreadable(source: str, exc: OSError) -> CLIError:
    """The error for ``source`` that cannot be read (EX_NOINPUT, as for a closed one)."""
    return CLIError(f"cannot read {source}: {exc.strerror or exc}", EX_NOINPUT)


_PIECE = 1 << 20
"""Octets asked for in one read: a read sets aside a buffer of the size asked for before
anything arrives, so ``read(limit + 1)`` with a limit set high to mean "none" (100 GB)
was a MemoryError, and with the largest limit the setting takes an OverflowError."""


def read_limited(stream: Readable, limit: int, *, source: str) -> bytes:
    """``stream`` to its end; MessageTooLarge as soon as it holds more than ``limit``
    octets (``limit + 1`` are read at most), read in pieces of at most :data:`_PIECE`."""
    pieces: list[bytes] = []
    size = 0
    while size <= limit:
        with _reading(source):
            piece = stream.read(min(limit + 1 - size, _PIECE))
        if not piece:
            break
        pieces.append(piece)
        size += len(piece)
    if size > limit:
        raise too_large(source, limit)
    return b"".join(pieces)


_DOT_LINE = len(b".\r\n")


def read_until_dot(stream: LineReadable, limit: int, *, source: str) -> bytes:
    """``stream`` up to a line holding a single ``.`` (not included) or its end;
    MessageTooLarge as soon as the lines before hold more than ``limit`` octets.

    Lines are read with a bound, so a single endless line is not read whole; the bound is
    never below the length of the ``.`` line, so that line is still recognised when the
    message ends just under the limit.
    """
    # One buffer, not a list of lines: each line an object of its own (some 40 octets
    # for one of "a\r\n") made 35 MB of short lines take 1.5 GB, and seconds to free.
    data = bytearray()
    while True:
        with _reading(source):
            line = stream.readline(max(limit - len(data) + 1, _DOT_LINE))
        if not line or line.rstrip(b"\r\n") == b".":
            return bytes(data)
        if len(data) + len(line) > limit:
            raise too_large(source, limit)
        data += line


class FileBudget:
    """The octets that the files one message is built from may hold together.

    A message's encoded size is at least the sum of its parts' contents (transfer encodings
    only add to them), so files that together exceed the message size limit make a message
    that ``prepare()`` would refuse: they are refused while being read instead.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def read(self, stream: Readable, *, source: str) -> bytes:
        """``stream`` to its end, charged to the budget; MessageTooLarge past it."""
        try:
            data = read_limited(stream, self.limit - self.used, source=source)
        except MessageTooLarge:
            together = " with the files before it" if self.used else ""
            raise too_large(f"{source}{together}", self.limit) from None
        self.used += len(data)
        return data
