"""CPU per message of the SMTP delivery path, stage by stage (µs per message).

Two stages, each timed with this thread's CPU clock (``time.thread_time``), so that other
processes on a shared machine inflate the figures as little as possible:

* ``session``: the sans-IO :class:`~mailstrom.smtp.ClientSession` alone, no I/O. One
  pipelined transaction per message (MAIL, RCPT, DATA, content), fed the replies Postfix's
  ``smtp-sink`` sends, in the segments it sends them (MAIL/RCPT/DATA replies together,
  then the reply to the final dot with the next envelope's replies; the final reply names
  a different queue id each time, as Postfix's does): the encoding of the
  commands, reply parsing and the pairing of replies with commands.
* ``connection``: :class:`~mailstrom.runtime.connection.SMTPConnection` against
  ``smtp-sink`` on loopback (started here), 10 connections with 3 transactions submitted
  each, as the dispatcher keeps them: the session plus the protocol callbacks, the
  transaction machine, futures, the deadline and the event loop's socket work.

The rest of a delivery (store, dispatcher, outcomes) is in ``benchmarks/e2e.py``.

    .venv/bin/python benchmarks/smtp_cpu.py [-n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.postfix import Children, PostfixSink, missing_tools
from mailstrom.config import Timeouts
from mailstrom.runtime.connection import SMTPConnection, StartTLS, TransactionResult
from mailstrom.smtp import NEED_DATA, ClientSession

SENDER = "app@sender.test"
RECIPIENT = "user@example.org"
BODY = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"
# What smtp-sink says (see the module docstring); its EHLO reply ends with a bare "250 ".
GREETING = b"220 smtp-sink ESMTP\r\n"
EHLO = (
    b"250-smtp-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 \r\n"
)
ENVELOPE_REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
# Postfix proper names a new queue id in every final reply (smtp-sink says just "Ok").
FINAL_REPLIES = [b"250 2.0.0 Ok: queued as 4Bx1Yz%05X\r\n" % i for i in range(1000)]


def session_stage(count: int) -> float:
    """µs of CPU per message in the sans-IO session."""
    session = ClientSession(helo_name="bench.test")
    session.receive_data(GREETING)
    session.next_event()
    session.ehlo()
    session.receive_data(EHLO)
    session.next_event()
    size = len(BODY)
    started = time.thread_time()
    out = session.envelope(SENDER, [RECIPIENT], size=size)
    for i in range(count):
        final = FINAL_REPLIES[i % len(FINAL_REPLIES)]
        session.receive_data(ENVELOPE_REPLIES if i == 0 else final + ENVELOPE_REPLIES)
        while session.next_event() is not NEED_DATA:
            pass
        out = session.body(BODY)
        if i + 1 < count:
            out += session.envelope(SENDER, [RECIPIENT], size=size)
    session.receive_data(FINAL_REPLIES[0])
    while session.next_event() is not NEED_DATA:
        pass
    assert out
    return (time.thread_time() - started) / count * 1e6


async def _stream(conn: SMTPConnection, count: int, depth: int) -> int:
    inflight: deque[asyncio.Future[TransactionResult]] = deque()
    sent = done = 0
    while done < count:
        while sent < count and len(inflight) < depth:
            inflight.append(
                conn.submit(
                    envelope_from=SENDER,
                    recipients=[RECIPIENT],
                    data=BODY,
                    smtputf8=False,
                    eightbit=False,
                )
            )
            sent += 1
        result = await inflight.popleft()
        assert result.final is not None and result.final.code == 250, result
        done += 1
    return done


async def _connection_stage(host: str, port: int, count: int, sessions: int) -> float:
    timeouts = Timeouts()
    conns = [
        await SMTPConnection.open(
            host="sink.test",
            ip=host,
            port=port,
            helo_name="bench.test",
            timeouts=timeouts,
            starttls=StartTLS.NEVER,
        )
        for _ in range(sessions)
    ]
    try:
        per = count // sessions
        started = time.thread_time()
        done = await asyncio.gather(*(_stream(c, per, 3) for c in conns))
        seconds = time.thread_time() - started
    finally:
        for conn in conns:
            await conn.close()
    return seconds / sum(done) * 1e6


def connection_stage(host: str, port: int, count: int, sessions: int) -> float:
    """µs of CPU per message in this thread for connections to smtp-sink."""
    return asyncio.run(_connection_stage(host, port, count, sessions))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", "--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per stage; median shown")
    parser.add_argument("--sessions", type=int, default=10)
    args = parser.parse_args()
    rows: list[tuple[str, list[float]]] = []
    rows.append(("session (sans-IO)", [session_stage(args.messages) for _ in range(args.repeat)]))
    missing = missing_tools()
    if missing:
        tools = ", ".join(missing)
        print(f"skipping the connection stage: {tools} not found (apt install postfix)")
    else:
        children = Children()
        with tempfile.TemporaryDirectory() as tmp:
            sink = PostfixSink(children, Path(tmp)).start()
            try:
                runs = [
                    connection_stage(sink.host, sink.port, args.messages, args.sessions)
                    for _ in range(args.repeat)
                ]
            finally:
                sink.stop()
                children.stop_all()
        rows.append((f"connection to smtp-sink ({args.sessions} sessions)", runs))
    print(f"CPU µs per message (thread CPU clock), N={args.messages}, {args.repeat} runs")
    for label, runs in rows:
        print(
            f"  {label:<40} median {statistics.median(runs):7.1f}"
            f"   min {min(runs):7.1f}   max {max(runs):7.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
