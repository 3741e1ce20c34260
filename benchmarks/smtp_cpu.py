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
* ``worker``: the whole delivery in the facade's worker thread, as ``benchmarks/e2e.py``'s
  "deliver only, in-process worker" row runs it (SQLite store filled before ``start()``,
  loopback DNS, 10 sessions to smtp-sink): the CPU clock of the ``mailstrom-worker``
  thread from ``start()`` to the last result, per message: the connection stage plus
  the store, dispatcher, outcomes and metrics. CPU rather than wall time, so that other
  processes on a shared machine move the figure little.

    .venv/bin/python benchmarks/smtp_cpu.py [-n 20000] [--repeat 5] [--worker-messages 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.dns_server import LoopbackDNS

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


def worker_stage(sink: PostfixSink, dns: LoopbackDNS, directory: Path, count: int) -> float:
    """µs of CPU per message in the facade's worker thread, for ``count`` messages."""
    from benchmarks.deliver import Outcomes
    from benchmarks.e2e import DOMAIN, HELO, MX_HOST, SESSIONS, make_emails, make_facade
    from mailstrom import Config

    dns.mx(DOMAIN, [(10, MX_HOST)])
    dns.a(MX_HOST, sink.host)
    config = Config(
        helo_name=HELO,
        smtp_port=sink.port,
        dns=dns.dns_config,
        max_connections=SESSIONS,
        max_per_destination=SESSIONS,
        allow_loopback=True,
    )
    outcomes = Outcomes(count)
    path = directory / f"queue-{time.monotonic_ns()}.db"
    ms = make_facade(config, path, "thread", on_result=outcomes)
    try:
        ms.send_emails(make_emails(count))
        ms.start()
        worker = next(t for t in threading.enumerate() if t.name == "mailstrom-worker")
        assert worker.ident is not None
        clock = time.pthread_getcpuclockid(worker.ident)
        if not outcomes.done.wait(120):
            raise RuntimeError("the worker did not deliver every message within 120 s")
        seconds = time.clock_gettime(clock)
    finally:
        ms.stop(timeout=10.0)
        ms.store.close()
    if outcomes.delivered != count:
        raise RuntimeError(f"{outcomes.delivered} of {count} delivered")
    return seconds / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", "--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per stage; median shown")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--worker-messages", type=int, default=5000, help="0: no worker stage")
    args = parser.parse_args()
    rows: list[tuple[str, list[float]]] = []
    rows.append(("session (sans-IO)", [session_stage(args.messages) for _ in range(args.repeat)]))
    missing = missing_tools()
    if missing:
        tools = ", ".join(missing)
        print(f"skipping the connection stage: {tools} not found (apt install postfix)")
    else:
        children = Children()
        with tempfile.TemporaryDirectory() as tmp, LoopbackDNS() as dns:
            sink = PostfixSink(children, Path(tmp)).start()
            try:
                runs = [
                    connection_stage(sink.host, sink.port, args.messages, args.sessions)
                    for _ in range(args.repeat)
                ]
                rows.append((f"connection to smtp-sink ({args.sessions} sessions)", runs))
                if args.worker_messages:
                    n = args.worker_messages
                    runs = [worker_stage(sink, dns, Path(tmp), n) for _ in range(args.repeat)]
                    rows.append((f"worker thread, whole delivery (N={n})", runs))
            finally:
                sink.stop()
                children.stop_all()
    print(f"CPU µs per message (thread CPU clock), N={args.messages}, {args.repeat} runs")
    for label, runs in rows:
        print(
            f"  {label:<40} median {statistics.median(runs):7.1f}"
            f"   min {min(runs):7.1f}   max {max(runs):7.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
