"""A fast SMTP sink in its own process, for benchmarks: it accepts everything and keeps nothing.

It is benchmark infrastructure, not a correctness peer: every command gets a positive reply
(250, or 354 to DATA, 221 to QUIT), message bodies are counted and dropped. It speaks enough
ESMTP for a client to go fast: it advertises PIPELINING, 8BITMIME, SIZE and SMTPUTF8 (no
STARTTLS), handles several pipelined commands arriving in one read and answers them in one
write, multi-recipient transactions, DATA up to ``<CRLF>.<CRLF>``, RSET, NOOP and QUIT.

It runs in a separate process (this file, started with the current interpreter) so that it
does not compete for the benchmarked client's GIL; the parent talks to it over the child's
stdin/stdout, one JSON line per request::

    from benchmarks.sink import SinkProcess

    with SinkProcess(host="127.0.0.1") as sink:   # started; the port is read back
        send_mail_to(sink.host, sink.port)
        sink.count()        # messages received (final dot answered) since start/reset
        sink.stats()        # SinkStats(messages, recipients, connections, cpu_seconds)
        sink.reset()        # zero the counters (and the CPU clock)

``SinkProcess(kind="aiosmtpd")`` runs aiosmtpd's ``SMTP`` server instead (same API, same
counters) — a slower, standards-minded reference that does not offer PIPELINING.

Standalone, for poking at it by hand::

    .venv/bin/python -m benchmarks.sink --port 2525
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SinkProcess", "SinkStats"]

_EHLO = (
    b"250-sink.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-8BITMIME\r\n"
    b"250-SIZE 104857600\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
_OK = b"250 2.0.0 OK\r\n"
_GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_QUEUED = b"250 2.0.0 OK: queued\r\n"
_BYE = b"221 2.0.0 Bye\r\n"
_END = b"\r\n.\r\n"
_MAX_LINE = 64 * 1024
"""A command line longer than this closes the connection (no client of ours sends one)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkStats:
    """What the sink has seen since it started or was last reset."""

    messages: int
    """Messages whose final dot was answered 250."""
    recipients: int
    """RCPT commands in those messages' transactions."""
    connections: int
    """Connections accepted."""
    cpu_seconds: float
    """CPU time used by the sink process (user + system)."""


class _Counters:
    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.connections = 0
        self.cpu_started = time.process_time()

    def reset(self) -> None:
        self.messages = self.recipients = self.connections = 0
        self.cpu_started = time.process_time()

    def snapshot(self) -> SinkStats:
        return SinkStats(
            messages=self.messages,
            recipients=self.recipients,
            connections=self.connections,
            cpu_seconds=time.process_time() - self.cpu_started,
        )


class _SinkProtocol(asyncio.Protocol):
    """One SMTP connection: command lines until DATA, then content until the final dot."""

    def __init__(self, counters: _Counters) -> None:
        self._counters = counters
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._in_data = False
        self._rcpts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._counters.connections += 1
        transport.write(b"220 sink.test ESMTP benchmark sink\r\n")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        closing = False
        while True:
            if self._in_data:
                # The buffer starts with CRLF (added on DATA), so an empty body ends too.
                end = buffer.find(_END)
                if end < 0:
                    # The body is dropped as it comes; keep what may start the terminator.
                    del buffer[: max(0, len(buffer) - (len(_END) - 1))]
                    break
                del buffer[: end + len(_END)]
                self._in_data = False
                self._counters.messages += 1
                self._counters.recipients += self._rcpts
                self._rcpts = 0
                out.append(_QUEUED)
                continue
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > _MAX_LINE:
                    closing = True
                break
            verb = bytes(buffer[:4]).upper()
            del buffer[: newline + 1]
            if verb == b"RCPT":
                self._rcpts += 1
                out.append(_OK)
            elif verb == b"MAIL" or verb == b"RSET":
                self._rcpts = 0
                out.append(_OK)
            elif verb == b"DATA":
                out.append(_GO_AHEAD)
                self._in_data = True
                buffer[:0] = b"\r\n"
            elif verb == b"EHLO":
                out.append(_EHLO)
            elif verb == b"QUIT":
                out.append(_BYE)
                closing = True
                break
            else:  # HELO, NOOP and anything else
                out.append(_OK)
        transport = self._transport
        assert transport is not None
        if out:
            transport.write(b"".join(out))
        if closing:
            transport.close()


class _AiosmtpdHandler:
    def __init__(self, counters: _Counters) -> None:
        self._counters = counters

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._counters.messages += 1
        self._counters.recipients += len(envelope.rcpt_tos)
        return "250 2.0.0 OK: queued"


async def _serve(host: str, port: int, kind: str, *, controlled: bool) -> None:
    loop = asyncio.get_running_loop()
    counters = _Counters()
    factory: Any
    if kind == "asyncio":

        def factory() -> asyncio.Protocol:
            return _SinkProtocol(counters)

    elif kind == "aiosmtpd":
        from aiosmtpd.smtp import SMTP

        handler = _AiosmtpdHandler(counters)

        def factory() -> asyncio.Protocol:
            counters.connections += 1
            return SMTP(handler, hostname="sink.test", enable_SMTPUTF8=True)

    else:
        raise ValueError(f"unknown sink kind {kind!r}")
    server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if not controlled:
        print(f"sink ({kind}) listening on {host}:{bound}", flush=True)
        async with server:
            await server.serve_forever()
        return
    # Controlled by a parent: one JSON request per line on stdin, one reply per line on
    # stdout. End of stdin (the parent went away) stops the sink.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(value: object) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    reply({"port": bound})
    try:
        while line := await reader.readline():
            request = line.decode().strip()
            if request == "stats":
                reply(dataclasses.asdict(counters.snapshot()))
            elif request == "reset":
                counters.reset()
                reply({})
            elif request == "stop":
                break
            else:
                reply({"error": f"unknown request {request!r}"})
    finally:
        server.close()
        # Clients may still hold connections (a pool closing lazily): do not wait for them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()


class SinkProcess:
    """An SMTP sink running in a child process; a context manager.

    ``kind`` is ``"asyncio"`` (the fast built-in sink, default) or ``"aiosmtpd"``. ``port``
    0 picks a free port; read it back from :attr:`port` once started. The child is this
    file run by the current interpreter, so nothing needs to be importable in it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, kind: str = "asyncio") -> None:
        self.host = host
        self.kind = kind
        self._requested_port = port
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> SinkProcess:
        """Start the child and wait until it listens; raise what stopped it otherwise."""
        if self._process is not None:
            raise RuntimeError("sink already started")
        self._process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--host",
                self.host,
                "--port",
                str(self._requested_port),
                "--kind",
                self.kind,
                "--controlled",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        try:
            self.port = int(self._read()["port"])
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._process is None else self._process.pid

    def _read(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"sink process exited with status {code} (see its stderr)")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def _ask(self, request: str) -> dict[str, Any]:
        if self._process is None or self._process.stdin is None:
            raise RuntimeError("sink not started")
        self._process.stdin.write(request + "\n")
        self._process.stdin.flush()
        return self._read()

    def stats(self) -> SinkStats:
        """Counters since start or the last :meth:`reset`."""
        return SinkStats(**self._ask("stats"))

    def count(self) -> int:
        """Messages received (final dot answered) since start or the last :meth:`reset`."""
        return self.stats().messages

    def reset(self) -> None:
        """Zero the counters and restart the CPU clock."""
        self._ask("reset")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child process (kill it if it does not exit in time). Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert process.stdin is not None
            process.stdin.write("stop\n")
            process.stdin.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the benchmark SMTP sink in the foreground.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--kind", choices=("asyncio", "aiosmtpd"), default="asyncio")
    parser.add_argument(
        "--controlled", action="store_true", help="take requests on stdin (SinkProcess)"
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.kind, controlled=args.controlled))


if __name__ == "__main__":
    main()
