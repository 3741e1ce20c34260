"""The delivery engine's own promises, end to end against loopback peers: pipelining across
transactions, the per-item session limit, no head-of-line blocking, and a worker that
rides out a store that fails for a while."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailstrom import Config, Email, Mailstrom, RecipientState, Timeouts
from mailstrom.bounces import verp_address
from mailstrom.errors import SMTPTimeout, StoreLocked, WorkerError
from mailstrom.message import prepare
from mailstrom.runtime import worker as worker_module
from mailstrom.runtime.connection import SMTPConnection, StartTLS
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory
from tests.support.delivery import LOOPS, Results, loopback_config
from tests.support.scripted import scripted_dispatcher, work_item
from tests.support.skew import eventually
from tests.support.stopped_writer import stopped_writer

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)


def hello(to: str, n: int = 0) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject=f"n{n}", text=f"Hello {n}")


def config(dns: LoopbackDNS, port: int, **overrides: Any) -> Config:
    return loopback_config(dns, port, **overrides)


# --- pipelining across transactions ----------------------------------------------------------


async def recording_server(reads: list[bytes]) -> AsyncIterator[int]:
    """A minimal SMTP server that offers PIPELINING, accepts everything, and keeps every
    chunk it reads, so a test can see which commands travelled together."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 rec.test ESMTP\r\n")
        buffer = b""
        in_body = False
        try:
            while chunk := await reader.read(65536):
                reads.append(chunk)
                buffer += chunk
                while True:
                    if in_body:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        buffer = buffer[end + 5 :]
                        in_body = False
                        writer.write(b"250 2.0.0 queued\r\n")
                        continue
                    end = buffer.find(b"\r\n")
                    if end < 0:
                        break
                    line, buffer = buffer[:end], buffer[end + 2 :]
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        writer.write(b"250-rec.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        writer.write(b"354 go\r\n")
                        in_body = True
                    elif verb == b"QUIT":
                        writer.write(b"221 bye\r\n")
                    else:
                        writer.write(b"250 ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_next_envelope_travels_with_the_previous_content() -> None:
    """RFC 2920 §3.1: with transactions queued, the final dot of one and the MAIL, RCPT
    and DATA of the next leave in one write, one round trip per message."""
    reads: list[bytes] = []
    async for port in recording_server(reads):
        conn = await SMTPConnection.open(
            host="rec.test",
            ip="127.0.0.1",
            port=port,
            helo_name="client.test",
            timeouts=FAST,
            starttls=StartTLS.OPPORTUNISTIC,
        )
        futures = [
            conn.submit(
                envelope_from="a@a.test",
                recipients=[f"r{i}@b.test"],
                data=b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i),
                smtputf8=False,
                eightbit=False,
            )
            for i in range(4)
        ]
        results = await asyncio.gather(*futures)
        await conn.close()
    assert [r.final.code if r.final else None for r in results] == [250] * 4
    joined = [r for r in reads if b"\r\n.\r\nMAIL FROM:" in r]
    assert len(joined) == 3, reads  # messages 2, 3 and 4 rode with the dot before them
    assert all(b"RCPT TO:" in r and r.endswith(b"DATA\r\n") for r in joined)


# --- the session limit -------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_an_item_loses_at_most_mx_session_limit_sessions(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, limit: int
) -> None:
    """Hardening #6 / Postfix's smtp_mx_session_limit: a message whose session breaks
    before the final dot is retried on the next MX host, on at most ``limit`` sessions in
    one attempt; the hosts after that never see it."""
    first = smtp_server(host="127.0.0.1", drop_on="data")
    hosts = [first] + [
        smtp_server(host=f"127.0.0.{n}", port=first.port, drop_on="data") for n in (2, 3)
    ]
    dns_server.mx("example.org", [(10, "mx1.test"), (20, "mx2.test"), (30, "mx3.test")])
    for n, host in enumerate(hosts, start=1):
        dns_server.a(f"mx{n}.test", host.host)
    results = Results()
    with Mailstrom(
        config(dns_server, first.port, mx_session_limit=limit),
        store=MemoryStore(),
        on_result=results,
    ) as ms:
        mid = ms.send_email(hello("bob@example.org"))
        [result] = results.wait_count(1)
        status = ms.query_status(mid).recipient("bob@example.org")
    assert result.state is RecipientState.DEFERRED
    assert status.attempts == 1
    assert [h.commands.count("MAIL") for h in hosts] == [1] * limit + [0] * (3 - limit)


def limited_per_connection(how: bytes) -> Callable[..., Any]:
    """A peer that takes one message per connection and answers the next MAIL with
    ``how`` (nothing: it just closes), offering PIPELINING."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 one.test ESMTP\r\n")
        taken = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-one.test\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL" and taken:
                writer.write(how)
                await writer.drain()
                return
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                taken += 1
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return handle


@pytest.mark.parametrize("how", [b"421 4.7.0 too many messages in this connection\r\n", b""])
async def test_a_limit_of_messages_per_connection_costs_no_session(
    dns_server: LoopbackDNS, how: bytes
) -> None:
    """A server that takes one message per connection (Exim's "421 too many messages in
    this connection", or a close without a word) ends each connection on the message
    behind the one it took, which was not tried: every message goes, one per connection.
    Before, each such connection counted against ``mx_session_limit`` for every item it
    cut, and the third message, cut twice, was deferred."""
    domain = "one.example"
    items = [work_item(n, domain) for n in range(4)]
    async with scripted_dispatcher(
        dns_server, limited_per_connection(how), domain, max_per_destination=1
    ) as (dispatcher, done):
        for work in items:
            dispatcher.submit(work)
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    assert sorted((r.address, r.state) for r in done) == [
        (f"r{n}@{domain}", RecipientState.DELIVERED) for n in range(4)
    ]


async def test_a_destination_gets_its_sessions_back_once_mail_goes_again(
    dns_server: LoopbackDNS,
) -> None:
    """A session that finds no address to deliver to while another of its destination
    still runs leaves the queue to it, and the destination runs with fewer sessions
    (Postfix's concurrency feedback). Once a connection took mail the sessions come back:
    before, the lowered limit stayed for as long as the destination had work, and a busy
    domain was held to one session for good after one failed connection."""
    domain = "feedback.example"
    connections = 0
    first = asyncio.Event()  # the first connection's reply may go
    release = asyncio.Event()  # and the later ones'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        if number == 2:
            writer.write(b"554 5.7.1 not now\r\n")  # the second session finds no host
            await writer.drain()
            return
        writer.write(b"220 feedback.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-feedback.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                await (first if number == 1 else release).wait()
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    # One message per connection, so that the first session's connection ends with one
    # delivered; held replies must not time out meanwhile.
    timeouts = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_end=60)
    async with scripted_dispatcher(
        dns_server,
        handle,
        domain,
        max_per_destination=2,
        max_messages_per_connection=1,
        timeouts=timeouts,
    ) as (dispatcher, done):
        for n in range(4):  # enough queued for a second session
            dispatcher.submit(work_item(n, domain))
        await eventually(lambda: connections == 2 and dispatcher.sessions == 1, "one session")
        first.set()
        await eventually(lambda: len(done) == 1, "the first message delivered")
        for n in range(4, 12):  # a backlog while the first session still runs
            dispatcher.submit(work_item(n, domain))
        # Before, the one session left carried the whole backlog alone.
        await eventually(lambda: dispatcher.sessions == 2, "a second session again")
        release.set()
        await asyncio.wait_for(dispatcher.idle.wait(), 10)
    assert [r.state for r in done] == [RecipientState.DELIVERED] * 12


# --- no head-of-line blocking ------------------------------------------------------------------


SLOW_GREETING = Timeouts(connect=5, greeting=300, command=30, data_init=30)


def healthy_and_stalled(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> tuple[ReceivingServer, ReceivingServer]:
    """A healthy MX for healthy.example and one that never greets for stalled.example
    (another loopback address, the same port)."""
    healthy = smtp_server()
    stalled = smtp_server(host="127.0.0.2", port=healthy.port, stall_on="greeting")
    dns_server.mx("healthy.example", [(10, "mx.healthy.test")])
    dns_server.a("mx.healthy.test", healthy.host)
    dns_server.mx("stalled.example", [(10, "mx.stalled.test")])
    dns_server.a("mx.stalled.test", stalled.host)
    return healthy, stalled


def test_a_server_that_never_greets_delays_nobody_else(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Engine v2 #7: one message to a server that never greets, then 2,000 to a healthy
    one: the 2,000 are delivered while the first still waits for its greeting (the old
    worker delivered 499, then nothing until the greeting timeout)."""
    healthy, stalled = healthy_and_stalled(smtp_server, dns_server)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    with Mailstrom(
        config(dns_server, healthy.port, timeouts=SLOW_GREETING, lease_batch=100),
        store=store,
        on_result=results,
    ) as ms:
        stuck = ms.send_email(hello("first@stalled.example"))
        ms.send_emails([hello(f"u{i}@healthy.example", i) for i in range(2000)])
        results.wait_count(2000, timeout=90)
        healthy.wait_for_messages(2000, timeout=10)
        assert len(healthy.messages) == 2000
        assert not ms.query_status(stuck).is_final
        assert stalled.connections == 1
        ms.stop(timeout=0.5)
    store.close()  # a store passed in is the caller's to close


def test_many_messages_to_a_server_that_never_greets_hold_only_its_sessions(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Engine v2 #7 with more than one message behind the stalled server: 20 messages to
    a server that never greets (one session: max_per_destination=1), then 20 to a healthy
    one. The 19 waiting behind the stalled session filled the worker's room (16
    recipients), and nothing else was leased until the greeting timed out (300 s here).
    A queue that has not moved for a while goes back to the store once the worker is
    full, so the healthy mail goes out while the greeting is still awaited."""
    monkeypatch.setattr(worker_module, "_STALLED_AFTER", 1.0)
    healthy, stalled = healthy_and_stalled(smtp_server, dns_server)
    results = Results()
    store = SQLiteStore(tmp_path / "q.db")
    settings = config(
        dns_server,
        healthy.port,
        timeouts=SLOW_GREETING,
        max_connections=4,
        max_per_destination=1,
        lease_batch=8,
    )
    with Mailstrom(settings, store=store, on_result=results) as ms:
        stuck = ms.send_emails([hello(f"s{i}@stalled.example", i) for i in range(20)])
        ms.send_emails([hello(f"u{i}@healthy.example", i) for i in range(20)])
        # Well inside the greeting timeout: only the healthy mail has results.
        results.wait_count(20, timeout=60)
        healthy.wait_for_messages(20, timeout=10)
        assert len(healthy.messages) == 20
        assert all(not ms.query_status(mid).is_final for mid in stuck)
        assert stalled.connections == 1
        ms.stop(timeout=0.5)
    store.close()


# --- a store that fails for a while -------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("COMMIT")
    """
)


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another process holds the SQLite write lock of ``path`` until the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline() == "locked\n"
            yield
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_a_store_locked_by_another_process_is_ridden_out(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path, worker: str
) -> None:
    """Engine v2 #7: another process holds the SQLite write lock far longer than the busy
    timeout while the worker delivers. Leases and records fail meanwhile; the worker keeps
    its results, says so in its status, and finishes by itself once the lock is gone:
    every recipient delivered once and recorded once."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    results = Results()
    count = 200
    ids = [store.enqueue(_prepared(i), now=_now()) for i in range(count)]
    with Mailstrom(
        config(dns_server, mx.port, lease_batch=20, max_connections=2, max_per_destination=2),
        store=store,
        on_result=results,
        worker=worker,
    ) as ms:
        mx.wait_for_messages(1, timeout=10)
        with write_lock_held(path):
            troubled = _wait_until(lambda: ms.worker_status.store_error is not None, 10)
            assert troubled, "the worker never noticed the locked store"
            time.sleep(2.0)  # hold the lock well past the busy timeout, many times over
            assert ms.worker_status.running
        results.wait_count(count, timeout=60)
        # (A worker process reports its status twice a second.)
        assert _wait_until(lambda: ms.worker_status.store_error is None, 10)
        assert _wait_until(lambda: ms.worker_status.unrecorded == 0, 10)
    statuses = [store.status(i).recipients[0] for i in ids]
    store.close()
    assert [(s.state, s.attempts) for s in statuses] == [(RecipientState.DELIVERED, 1)] * count
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == sorted(
        f"u{i}@example.org" for i in range(count)
    )


def test_a_worker_thread_rides_out_a_stopped_writer_holding_the_flock(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A process stopped in the middle of a write (SIGSTOP, ``docker pause``) holds the
    flock and SQLite's lock for 1.5 s while a worker thread delivers. Every lease and
    record hung in ``flock`` for as long (and the worker's event loop with it, SQLite
    calls run on it), ``send_email`` too. Now each fails after busy_timeout: the worker
    keeps its results, says so, and finishes by itself once the writer goes, every
    recipient delivered once and recorded once; ``send_email`` raises StoreLocked."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    results = Results()
    count = 100
    ids = [store.enqueue(_prepared(i), now=_now()) for i in range(count)]
    with Mailstrom(
        config(dns_server, mx.port, lease_batch=10, max_connections=2, max_per_destination=2),
        store=store,
        on_result=results,
        worker="thread",
    ) as ms:
        mx.wait_for_messages(1, timeout=10)
        with stopped_writer(path):
            troubled = _wait_until(lambda: ms.worker_status.store_error is not None, 5)
            assert troubled, "the worker never noticed the locked store"
            began = time.monotonic()
            with pytest.raises(StoreLocked, match="nothing was written, try again"):
                ms.send_email(hello("late@example.org"))
            assert time.monotonic() - began < 1.0
            time.sleep(1.0)  # many busy timeouts
            assert ms.worker_status.running
        results.wait_count(count, timeout=60)
        assert _wait_until(lambda: ms.worker_status.store_error is None, 10)
        assert _wait_until(lambda: ms.worker_status.unrecorded == 0, 10)
    statuses = [store.status(i).recipients[0] for i in ids]
    queued = store.stats().messages
    store.close()
    assert queued == count
    assert [(s.state, s.attempts) for s in statuses] == [(RecipientState.DELIVERED, 1)] * count
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == sorted(
        f"u{i}@example.org" for i in range(count)
    )


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_a_worker_starts_while_its_store_is_locked(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path, worker: str
) -> None:
    """A new store (no VERP key made yet), locked by another process past the busy
    timeout as the worker starts: ``start()`` raised WorkerError, because the worker
    made the key before anything else and the child process's open took the write lock.
    Now the worker starts, rides the lock out, and reads the key when a VERP message
    first needs it."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    results = Results()
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker=worker)
    with write_lock_held(path):
        ms.start()
        time.sleep(0.5)  # the worker meets the locked store
        assert ms.worker_status.running
    try:
        mid = ms.send_email(hello("u@example.org"), envelope_from="bounces+{token}@sender.test")
        [result] = results.wait_count(1, timeout=30)
        key = store.verp_key()
    finally:
        ms.stop()
        store.close()
    assert result.state is RecipientState.DELIVERED
    [received] = mx.messages
    assert received.mail_from == verp_address(
        "bounces+{token}@sender.test", mid, "u@example.org", key=key
    )


def test_stop_returns_while_the_store_blocks_the_worker_thread(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``stop(timeout)`` waits for a worker thread at most STOP_GRACE past ``timeout``,
    as it already did for a worker process (which it kills). A worker thread whose store
    calls block (a write lock held by another process, a long busy timeout) held
    ``stop(timeout=1)`` for 41 s. The thread is left to end by itself, and the facade
    will not start another worker while it lives."""
    from mailstrom.client import sync

    monkeypatch.setattr(sync, "STOP_GRACE", 1.0)
    mx = smtp_server(stall_on="dot")
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path, busy_timeout=5)
    ms = Mailstrom(config(dns_server, mx.port, timeouts=FAST), store=store, worker="thread")
    ms.start()
    for i in range(3):
        ms.send_email(hello(f"u{i}@example.org", i))
    assert _wait_until(lambda: len(mx.received) >= 1, 10)
    with write_lock_held(path):
        began = time.monotonic()
        ms.stop(timeout=0.5)
        took = time.monotonic() - began
        stuck = ms._stuck
        assert stuck is not None and stuck.is_alive()
        with pytest.raises(WorkerError, match="has not ended yet"):
            ms.start()
    stuck.join(30)
    store.close()
    assert took < 4, took
    assert "the worker thread did not stop within 1.5 s" in caplog.text
    assert not stuck.is_alive()


def _refuse_attempts(path: Path, when: str) -> None:
    """Make the database itself refuse to record some attempts: a trigger, as an
    operator's own constraint or a value no column holds would."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON attempts WHEN {when}"
            " BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )
    conn.close()


REFUSE_POISON_PG = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.reply_text LIKE '%poison%' THEN
        RAISE check_violation USING MESSAGE = 'refused by a trigger';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE INSERT ON attempts FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


@pytest.mark.parametrize(
    ("kind", "worker"),
    [
        ("sqlite", "thread"),
        ("sqlite", "process"),
        pytest.param("postgres", "thread", marks=pytest.mark.postgres),
    ],
)
def test_a_result_the_store_refuses_is_recorded_bare(
    smtp_server: ServerFactory,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    kind: str,
    worker: str,
) -> None:
    """A result the store refuses to write (here a trigger refuses a reply text) used to
    be retried for ever, in the transaction that also leases: one such result stopped
    the worker's leasing and recording for good. The batch is now written one result at a
    time, the refused one without its details; everything else goes on."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    mx.rcpt_replies["poison@example.org"] = "550 5.1.1 poison"
    store: Store
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        store = PostgresStore(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(REFUSE_POISON_PG)
    else:
        store = SQLiteStore(tmp_path / "q.db")
        _refuse_attempts(tmp_path / "q.db", "NEW.reply_text LIKE '%poison%'")
    count = 60
    ids = [store.enqueue(_prepared(i), now=_now()) for i in range(count)]
    poisoned = store.enqueue(prepare(hello("poison@example.org")), now=_now())
    ids += [store.enqueue(_prepared(i), now=_now()) for i in range(count, 2 * count)]
    results = Results()
    with Mailstrom(
        config(dns_server, mx.port), store=store, on_result=results, worker=worker
    ) as ms:
        results.wait_count(2 * count + 1, timeout=30)
        assert ms.worker_status.running
        assert _wait_until(lambda: ms.worker_status.store_error is None, 10)
    [bare] = store.status(poisoned).recipients
    statuses = [store.status(i).recipients[0] for i in ids]
    suppressed = store.suppressions_for(["poison@example.org"], now=_now())
    store.close()
    assert bare.state is RecipientState.FAILED and bare.reply is None
    assert bare.error is not None
    assert bare.error.startswith(
        "the store refused this attempt's details (the server replied 550)"
    )
    assert "refused by a trigger" in bare.error
    assert suppressed  # the hard bounce still counts
    assert {s.state for s in statuses} == {RecipientState.DELIVERED}
    assert len(mx.messages) == 2 * count


def test_a_store_that_refuses_even_a_bare_result_stops_the_worker(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A store that refuses a result with no details at all is broken for good (its
    schema is not mailstrom's): the worker stops and says why, as for a damaged file,
    instead of retrying for ever."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    _refuse_attempts(
        path,
        "NEW.recipient_id IN (SELECT id FROM recipients WHERE address = 'poison@example.org')",
    )
    store.enqueue(prepare(hello("poison@example.org")), now=_now())
    with Mailstrom(config(dns_server, mx.port), store=store) as ms:
        assert _wait_until(lambda: not ms.worker_status.running, 30)
        error = ms.worker_status.error
    store.close()
    assert error is not None and "refuses even a bare result" in error


def _prepared(i: int) -> Any:
    from mailstrom.message import prepare

    return prepare(hello(f"u{i}@example.org", i))


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # polling a status snapshot; nothing to wait on
    return predicate()


# --- when results are written ------------------------------------------------------------------


def test_an_idle_workers_result_is_written_at_once(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results gather for a moment so that one write records several; with no other
    delivery in flight none is coming to join them, so the result of a lone delivery is
    written (and reaches on_result) without that wait. The gather is made a minute long
    here: a worker that waited for it would miss the test's deadline."""
    from mailstrom.runtime import worker

    monkeypatch.setattr(worker, "_RECORD_AFTER", 60.0)
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    results = Results()
    with Mailstrom(config(dns_server, mx.port), store=MemoryStore(), on_result=results) as ms:
        for n in range(2):  # twice: the first result, and one after the worker was idle
            ms.send_email(hello("u@example.org", n))
            [result] = results.wait_count(n + 1, timeout=15)[n:]
            assert result.state is RecipientState.DELIVERED


# --- event loops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_the_worker_runs_on_the_loop_configured(
    smtp_server: ServerFactory, dns_server: LoopbackDNS, loop: str
) -> None:
    """Engine v2 #4: uvloop when asked for (or installed, under "auto"); asyncio's own loop
    stays supported: the same delivery, STARTTLS and pipelining included, on both."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    loops: list[str] = []
    results = Results()

    def on_result(result: Any) -> None:
        # The package of the loop class mailstrom's own (runtime/loops.py) derives from.
        kinds = (c.__module__.split(".")[0] for c in type(asyncio.get_running_loop()).__mro__)
        loops.append(next(k for k in kinds if k in ("asyncio", "uvloop")))
        results(result)

    with Mailstrom(
        config(dns_server, mx.port, event_loop=loop, max_per_destination=1),
        store=MemoryStore(),
        on_result=on_result,
    ) as ms:
        ms.send_emails([hello(f"u{i}@example.org", i) for i in range(5)])
        results.wait_count(5)
    assert {r.state for r in results.all} == {RecipientState.DELIVERED}
    assert set(loops) == {loop}
    assert mx.connections == 1
    assert all(m.tls for m in mx.messages)


# --- the data-block timeout ------------------------------------------------------------------


async def test_a_server_that_stops_reading_the_content_times_out() -> None:
    """RFC 5321 §4.5.3.2.5: the content must keep moving (3 min a block by default). A
    server that answers 354 and then reads nothing fills our buffers; the transfer is
    given up after ``data_block`` without progress, as not delivered (the dot never
    left), not uncertain."""
    accepted = asyncio.Event()
    finished = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 slow.test ESMTP\r\n")
            await reader.readline()
            writer.write(b"250-slow.test\r\n250 PIPELINING\r\n")
            for _ in range(3):  # MAIL, RCPT, DATA (pipelined)
                await reader.readline()
            writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
            accepted.set()
            await finished.wait()  # reads nothing more: the client's writes back up
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        stall = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=0.5)
        conn = await SMTPConnection.open(
            host="slow.test",
            ip="127.0.0.1",
            port=port,
            helo_name="client.test",
            timeouts=stall,
            starttls=StartTLS.NEVER,
        )
        body = (b"x" * 998 + b"\r\n") * 20_000  # 20 MB: far more than the socket buffers
        started = time.monotonic()
        with pytest.raises(SMTPTimeout, match="take the message"):
            await conn.send(
                envelope_from="a@a.test",
                recipients=["b@b.test"],
                data=body,
                smtputf8=False,
                eightbit=False,
            )
        assert accepted.is_set()
        assert time.monotonic() - started < 10
        await conn.close()
        finished.set()
        await asyncio.sleep(0)  # let the handler close its side


# --- coalesced writes ------------------------------------------------------------------------


class CountingStore(MemoryStore):
    """Counts the worker's write calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        self.writes += 1
        return super().record_and_lease(results, **kwargs)


def test_a_stream_of_send_email_does_not_cost_a_write_each(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Engine v2 #2: with the worker busy, leases and records are gathered: far fewer
    worker write transactions than messages (it used to be a lease and a record each)."""
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    store = CountingStore()
    results = Results()
    count = 400
    with Mailstrom(config(dns_server, mx.port), store=store, on_result=results) as ms:
        for i in range(count):
            ms.send_email(hello(f"u{i}@example.org", i))
        results.wait_count(count, timeout=60)
    assert {r.state for r in results.all} == {RecipientState.DELIVERED}
    assert store.writes <= count // 2, store.writes
