"""A peer's reply text is hostile: a NUL or a terminal escape in it is recorded harmlessly.

PostgreSQL refuses NUL in a text column. A worker that passed a server's "250 queued as
<NUL>abc" through to its store could never record that result: it retried it forever,
leased nothing else, and every restart delivered the message again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailstrom import Email, Mailstrom, RecipientState
from mailstrom.stores import SQLiteStore, Store
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
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
