"""Cancelling or holding a message its worker has leased but not started sending: the
cancel or hold must stop it, not only the status (a real worker delivering to a scripted
loopback peer)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from mailstrom import AsyncMailstrom, Email, RecipientState, Timeouts
from mailstrom.stores import MemoryStore, SQLiteStore, open_store
from mailstrom.stores.base import Lease, RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_hostile_peers import Handler, peer
from tests.support.delivery import loopback_config
from tests.support.waiting import logged

SLOW = Timeouts(connect=30, greeting=30, command=30, data_init=30, data_block=30, data_end=30)


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


def holding_envelopes(
    mails: list[bytes], envelope_in: asyncio.Event, go_on: asyncio.Event
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A pipelining peer that keeps each MAIL line in ``mails``, sets ``envelope_in`` once
    an envelope has arrived, and answers it only once ``go_on`` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-slow.test\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                mails.append(line)
                while (line := await reader.readline())[:4].upper() == b"RCPT":
                    pass
                envelope_in.set()
                await go_on.wait()
                writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return handle


@pytest.mark.parametrize(
    ("method", "elsewhere"),
    [("cancel", False), ("cancel_many", False), ("cancel", True), ("cancel_many", True)],
)
async def test_a_cancelled_message_leased_but_not_started_is_not_sent(
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    method: str,
    elsewhere: bool,
) -> None:
    """Two messages to two destinations, one connection at a time: the first is on the
    wire (the server holds its envelope's replies), the second waits for its turn, leased.
    Cancelling the second (through the worker's facade, or ``elsewhere``: another store
    object, as ``mailstrom cancel`` in another process) said "cancelled" at once, but the
    worker learnt it only at its next heartbeat (lease_for / 3, five minutes by default):
    it sent the message once the first was done, and its result was ignored, so the
    status said cancelled of mail that went out after the cancel."""
    envelope_in = asyncio.Event()
    go_on = asyncio.Event()
    mails: list[bytes] = []

    handle = holding_envelopes(mails, envelope_in, go_on)
    for n, host in (("one", "127.0.0.1"), ("two", "127.0.0.2")):
        dns_server.mx(f"{n}.example", [(10, f"mx.{n}.test")])
        dns_server.a(f"mx.{n}.test", host)
    caplog.set_level(logging.WARNING, logger="mailstrom")
    async with peer(handle) as port, peer(handle, "127.0.0.2", port):
        config = loopback_config(
            dns_server, port, timeouts=SLOW, max_connections=1, poll_interval=30
        )
        ms = AsyncMailstrom(config, store=SQLiteStore(tmp_path / "queue.db"), worker=None)
        other = SQLiteStore(tmp_path / "queue.db")
        first = await ms.send_email(hello("a@one.example"))
        second = await ms.send_email(hello("b@two.example"))
        async with AsyncMailstrom(config, store=ms.store) as running:
            await asyncio.wait_for(envelope_in.wait(), 20)
            if not elsewhere:
                assert await getattr(running, method)(second) == 1
            elif method == "cancel":
                assert other.cancel(second, now=datetime.now(UTC)) == 1
            else:
                assert other.cancel_many([second], now=datetime.now(UTC)) == 1
            # The worker gives back what it had leased of the message and not started.
            for _ in range(500):
                if "not yet started given back" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            go_on.set()
            status = await running.wait(first, timeout=20)
            assert status.state is RecipientState.DELIVERED
        cancelled = ms.store.status(second)
        other.close()
        ms.store.close()
    assert len(mails) == 1, mails
    assert cancelled.recipients[0].state is RecipientState.FAILED
    assert cancelled.recipients[0].error == "cancelled"
    assert cancelled.recipients[0].attempts == 0


@pytest.mark.parametrize(
    ("method", "elsewhere"),
    [("hold", False), ("hold", True), ("set_held", True)],
)
async def test_a_held_message_leased_but_not_started_is_not_sent(
    dns_server: LoopbackDNS,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    method: str,
    elsewhere: bool,
) -> None:
    """As above, but the second message is held: its status said held, and the worker
    sent it all the same once the first was done (the hold reached only the lease of the
    next look), so mail an operator had stopped went out. It is given back unsent now,
    and goes once released."""
    caplog.set_level(logging.WARNING, logger="mailstrom")
    envelope_in = asyncio.Event()
    go_on = asyncio.Event()
    mails: list[bytes] = []

    handle = holding_envelopes(mails, envelope_in, go_on)
    for n, host in (("one", "127.0.0.1"), ("two", "127.0.0.2")):
        dns_server.mx(f"{n}.example", [(10, f"mx.{n}.test")])
        dns_server.a(f"mx.{n}.test", host)
    async with peer(handle) as port, peer(handle, "127.0.0.2", port):
        config = loopback_config(
            dns_server, port, timeouts=SLOW, max_connections=1, poll_interval=30
        )
        ms = AsyncMailstrom(config, store=SQLiteStore(tmp_path / "queue.db"), worker=None)
        other = SQLiteStore(tmp_path / "queue.db")
        first = await ms.send_email(hello("a@one.example"))
        second = await ms.send_email(hello("b@two.example"))
        async with AsyncMailstrom(config, store=ms.store) as running:
            await asyncio.wait_for(envelope_in.wait(), 20)
            if not elsewhere:
                assert await running.hold(second) == 1
            elif method == "hold":
                assert other.hold_many([second], True) == 1
            else:
                other.set_held(second, True)
            # The worker gives back what it had leased of the message and not started.
            for _ in range(500):
                if "not yet started given back" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            go_on.set()
            status = await running.wait(first, timeout=20)
            assert status.state is RecipientState.DELIVERED
            held = await running.query_status(second)
            assert len(mails) == 1, mails
            assert held.held
            assert held.recipients[0].state is RecipientState.QUEUED
            assert held.recipients[0].attempts == 0
            # Released, it goes (once).
            assert await running.release(second) == 1
            released = await running.wait(second, timeout=20)
        other.close()
        ms.store.close()
    assert released.state is RecipientState.DELIVERED
    assert len(mails) == 2, mails


def answering(
    lines: list[bytes], ehlo_in: asyncio.Event, go_on: asyncio.Event | None = None
) -> Handler:
    """A pipelining peer that takes every message and keeps every line it reads in
    ``lines``; it sets ``ehlo_in`` once EHLO has arrived, and answers it once ``go_on``
    is set (at once when None)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                ehlo_in.set()
                if go_on is not None:
                    await go_on.wait()
                writer.write(b"250-peer.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return handle


@pytest.mark.postgres
async def test_a_message_cancelled_is_not_started_while_the_store_confirms_it(
    dns_server: LoopbackDNS, caplog: pytest.LogCaptureFixture, postgres_url: str
) -> None:
    """Was: ``cancel()`` returned, and the worker went on starting transactions until its
    heartbeat, told of the cancel, had asked the store which leased recipients were still
    its own (a NOTIFY and a round trip per lease on PostgreSQL, longer when the store is
    busy): a session that reached the cancelled message meanwhile sent it. Here the
    store is slow to extend the lease (a lock is held on a row of it, another message's),
    and the cancelled message's session, whose server was slow to answer EHLO, is ready
    to send just after the cancel has returned."""
    ehlo_in = asyncio.Event()
    go_on = asyncio.Event()
    lines: list[bytes] = []
    other_lines: list[bytes] = []
    for n, host in (("two", "127.0.0.2"), ("three", "127.0.0.3")):
        dns_server.mx(f"{n}.example", [(10, f"mx.{n}.test")])
        dns_server.a(f"mx.{n}.test", host)
    caplog.set_level(logging.WARNING, logger="mailstrom")
    async with (
        peer(answering(lines, ehlo_in, go_on), "127.0.0.2") as port,
        peer(answering(other_lines, asyncio.Event()), "127.0.0.3", port),
    ):
        config = loopback_config(
            dns_server, port, timeouts=SLOW, max_connections=1, poll_interval=30
        )
        store = open_store(postgres_url)
        ms = AsyncMailstrom(config, store=store, worker=None)
        cancelled = await ms.send_email(hello("b@two.example"))
        other = await ms.send_email(hello("c@three.example"))
        # In this process: a worker process hears of the cancel through the store's
        # NOTIFY, which may come after the cancel returned, however the worker heeds it.
        async with AsyncMailstrom(config, store=store, worker="task") as running:
            await asyncio.wait_for(ehlo_in.wait(), 20)
            with psycopg.connect(postgres_url) as lock:
                # The heartbeat's extension of the lease waits for this.
                lock.execute("SELECT 1 FROM recipients WHERE message_id = %s FOR UPDATE", [other])
                assert await running.cancel(cancelled) == 1
                go_on.set()  # EHLO answered: the next command would be the MAIL
                for _ in range(50):
                    await asyncio.sleep(0)  # its reply read, a MAIL would come
            for _ in range(500):
                if "not yet started given back" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            status = await running.wait(other, timeout=20)
            assert status.state is RecipientState.DELIVERED
        gone = store.status(cancelled)
        store.close()
    assert [line[:4] for line in lines] == [b"EHLO", b"QUIT"], lines
    assert gone.recipients[0].state is RecipientState.FAILED
    assert gone.recipients[0].attempts == 0


class WritingSlowly(MemoryStore):
    """A memory store called from threads, as PostgreSQL is, whose write of the results of
    ``slow_for`` waits for ``go_write`` before it changes anything (a write under way)."""

    in_process = False

    def __init__(self) -> None:
        super().__init__()
        self.slow_for: str | None = None
        self.writing = threading.Event()
        self.go_write = threading.Event()
        self.extended = threading.Event()

    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        if any(r.message_id == self.slow_for for r in results):
            self.writing.set()
            assert self.go_write.wait(20)
        return super().record(results)

    def extend(self, lease: Lease, *, until: datetime) -> int:
        held = super().extend(lease, until=until)
        if self.writing.is_set():
            self.extended.set()
        return held


async def test_a_cancel_while_the_lease_writes_results_stops_its_other_mail(
    dns_server: LoopbackDNS, caplog: pytest.LogCaptureFixture
) -> None:
    """One lease of two messages: the first is delivered and its result being written (the
    store slow to commit it) when the second, its server slow to greet, is cancelled. The
    heartbeat asked at once found one recipient fewer held than it counted: the cancel, or
    the result being written, which it could not tell apart; it took it for the write and
    withdrew nothing, and the cancelled message went out once its server greeted, after
    ``cancel()`` had said it would not."""
    caplog.set_level(logging.WARNING, logger="mailstrom")
    greet = asyncio.Event()
    lines: list[bytes] = []
    ehlo_in = asyncio.Event()

    async def greeting_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet.wait()
        await answering(lines, ehlo_in)(reader, writer)

    for n, host in (("one", "127.0.0.1"), ("two", "127.0.0.2")):
        dns_server.mx(f"{n}.example", [(10, f"mx.{n}.test")])
        dns_server.a(f"mx.{n}.test", host)
    store = WritingSlowly()
    async with (
        peer(answering([], asyncio.Event())) as port,
        peer(greeting_late, "127.0.0.2", port),
    ):
        config = loopback_config(dns_server, port, timeouts=SLOW, poll_interval=30)
        ms = AsyncMailstrom(config, store=store, worker=None)
        first = await ms.send_email(hello("a@one.example"))
        second = await ms.send_email(hello("b@two.example"))
        store.slow_for = first
        async with AsyncMailstrom(config, store=store, worker="task") as running:
            try:
                assert await asyncio.to_thread(store.writing.wait, 20)
                assert await running.cancel(second) == 1
                # The heartbeat the cancel asked for has asked the store and judged: it
                # says so once it gave the cancelled message back (its answer comes from
                # a thread, which a number of loop turns did not wait for under load).
                assert await asyncio.to_thread(store.extended.wait, 20)
                assert await logged(caplog, "not yet started given back", 20)
                greet.set()
                await asyncio.wait_for(ehlo_in.wait(), 20)
                for _ in range(50):
                    await asyncio.sleep(0)  # EHLO answered: a MAIL would come now
            finally:
                store.go_write.set()
            status = await running.wait(first, timeout=20)
            assert status.state is RecipientState.DELIVERED
    assert [line[:4] for line in lines] == [b"EHLO", b"QUIT"], lines
    gone = store.status(second)
    assert gone.recipients[0].state is RecipientState.FAILED
    assert gone.recipients[0].attempts == 0


async def test_a_message_cancelled_on_the_wire_and_accepted_reads_delivered(
    dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Cancelled while its transaction is on the wire (the server holds the replies to
    its envelope), the message is then accepted by the server: it went out. Its result
    was ignored (the cancel had ended the lease), so the status said "failed:
    cancelled", no attempt, of mail the recipient got."""
    envelope_in = asyncio.Event()
    go_on = asyncio.Event()
    mails: list[bytes] = []
    dns_server.mx("one.example", [(10, "mx.one.test")])
    dns_server.a("mx.one.test", "127.0.0.1")
    async with peer(holding_envelopes(mails, envelope_in, go_on)) as port:
        config = loopback_config(dns_server, port, timeouts=SLOW, poll_interval=30)
        ms = AsyncMailstrom(config, store=SQLiteStore(tmp_path / "queue.db"), worker=None)
        mid = await ms.send_email(hello("a@one.example"))
        async with AsyncMailstrom(config, store=ms.store) as running:
            await asyncio.wait_for(envelope_in.wait(), 20)
            assert await running.cancel(mid) == 1
            go_on.set()
            for _ in range(2000):  # only a hang waits this out
                status = ms.store.status(mid)
                if status.recipients[0].state is RecipientState.DELIVERED:
                    break
                await asyncio.sleep(0.01)
        ms.store.close()
    assert len(mails) == 1
    r = status.recipients[0]
    assert (r.state, r.error, r.attempts) == (RecipientState.DELIVERED, None, 1), r
