"""A peer's reply text is hostile: a NUL or a terminal escape in it is recorded harmlessly.

PostgreSQL refuses NUL in a text column. A worker that passed a server's "250 queued as
<NUL>abc" through to its store could never record that result: it retried it forever,
leased nothing else, and every restart delivered the message again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom import AsyncMailstrom, Email, Mailstrom, RecipientState
from mailstrom.status import RecipientStatus
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from mailstrom.stores.base import MAX_REPLY_TEXT, RecipientResult
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.integration.test_hostile_peers import peer
from tests.support.delivery import Results, loopback_config


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        opened: Store = PostgresStore(request.getfixturevalue("postgres_url"))
    else:
        opened = SQLiteStore(tmp_path / "q.db")
    try:
        yield opened
    finally:
        opened.close()


def hello(to: str) -> Email:
    return Email(from_="app@sender.test", to=[to], subject="hi", text="Hello")


def test_control_characters_in_replies_are_recorded_harmlessly(
    store: Store, smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    mx = smtp_server()
    mx.data_reply = "250 2.0.0 queued as \x00abc"
    mx.rcpt_replies["gone@peer.example"] = "550 5.1.1 no\x00such \x1b[31muser"
    dns_server.mx("peer.example", [(10, "mx.peer.test")])
    dns_server.a("mx.peer.test", mx.host)
    results = Results()
    with Mailstrom(loopback_config(dns_server, mx.port), store=store, on_result=results) as ms:
        ok = ms.send_email(hello("ok@peer.example"))
        gone = ms.send_email(hello("gone@peer.example"))
        results.wait_final({"ok@peer.example", "gone@peer.example"})
        [delivered] = ms.query_status(ok).recipients
        [failed] = ms.query_status(gone).recipients
        # The worker goes on: the next message is delivered and recorded too.
        after = ms.send_email(hello("after@peer.example"))
        results.wait_final({"after@peer.example"})
        assert ms.query_status(after).state is RecipientState.DELIVERED
    assert delivered.state is RecipientState.DELIVERED
    assert delivered.reply is not None and delivered.reply.text == "queued as \ufffdabc"
    assert failed.state is RecipientState.FAILED
    assert failed.reply is not None and failed.reply.text == "no\ufffdsuch \ufffd[31muser"


def test_a_megabyte_reply_is_cut_before_it_is_logged_or_reported(
    dns_server: LoopbackDNS, caplog: pytest.LogCaptureFixture
) -> None:
    """A server may send a reply of up to a megabyte (4,096 lines) to every RCPT. The
    store keeps 2,048 octets of it, but the result went whole to the attempt log (one
    line of a megabyte per recipient) and to ``on_result``, which then showed another
    reply than ``query_status``."""
    line = b"550-5.1.1 " + b"x" * 240 + b"\r\n"
    huge = line * 4000 + b"550 5.1.1 no such user\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        while command := await reader.readline():
            if command.startswith(b"EHLO"):
                writer.write(b"250 peer.test\r\n")
            elif command.startswith(b"RCPT"):
                writer.write(huge)
            elif command.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async def run() -> tuple[list[RecipientResult], RecipientStatus]:
        results = Results()
        async with peer(handle) as port:
            config = loopback_config(dns_server, port)
            async with AsyncMailstrom(config, store=MemoryStore(), on_result=results) as ms:
                mid = await ms.send_email(hello("gone@peer.example"))
                done = await asyncio.to_thread(results.wait_count, 1)
                status = (await ms.query_status(mid)).recipients[0]
        return done, status

    dns_server.mx("peer.example", [(10, "mx.peer.test")])
    dns_server.a("mx.peer.test", "127.0.0.1")
    with caplog.at_level(logging.INFO, logger="mailstrom.attempts"):
        [result], status = asyncio.run(run())
    assert status.state is RecipientState.FAILED
    reply = result.attempt.reply
    assert reply is not None and reply.code == 550
    assert len(reply.text.encode()) <= MAX_REPLY_TEXT
    assert reply == status.reply  # what on_result was told is what the store shows
    [record] = [r for r in caplog.records if r.name == "mailstrom.attempts"]
    assert len(record.getMessage()) < 2 * MAX_REPLY_TEXT
