"""DSN parameters on the wire (RFC 3461): sent as the message asks to a server that offers
DSN (an aiosmtpd server configured to advertise it), never to one that does not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailstrom import DSN, Email, Notify, RecipientState, Return
from mailstrom.client import Mailstrom
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results, loopback_config


@pytest.fixture
def results() -> Results:
    return Results()


def start(
    smtp_server: Any, dns_server: LoopbackDNS, results: Results, store: Store, **server: Any
) -> tuple[Any, Mailstrom]:
    mx = smtp_server(**server)
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    ms = Mailstrom(loopback_config(dns_server, mx.port), store=store, on_result=results)
    ms.start()
    return mx, ms


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "q.db")
    yield store
    store.close()


def hello(*to: str, **kw: Any) -> Email:
    return Email(from_="App <app@sender.test>", to=list(to), subject="Hi", text="Hello", **kw)


@pytest.mark.parametrize("pipelining", [True, False])
def test_parameters_go_to_a_server_offering_dsn(
    smtp_server: Any, dns_server: LoopbackDNS, results: Results, store: Store, pipelining: bool
) -> None:
    mx, ms = start(smtp_server, dns_server, results, store, dsn=True, pipelining=pipelining)
    try:
        dsn = DSN(notify=(Notify.FAILURE, Notify.DELAY), ret=Return.HEADERS)
        mid = ms.send_email(hello("ann@example.org", "Bob@example.org", dsn=dsn))
        results.wait_count(2)
    finally:
        ms.stop(timeout=5)
    assert [r.state for r in results.all] == [RecipientState.DELIVERED] * 2
    assert mx.dsn_params == [
        ("MAIL", "app@sender.test", ("RET=HDRS", f"ENVID={mid}")),
        ("RCPT", "ann@example.org", ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;ann@example.org")),
        ("RCPT", "Bob@example.org", ("NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Bob@example.org")),
    ]


def test_send_email_options_and_an_envid_of_ones_own(
    smtp_server: Any, dns_server: LoopbackDNS, results: Results, store: Store
) -> None:
    mx, ms = start(smtp_server, dns_server, results, store, dsn=True)
    try:
        ms.send_email(
            hello("ann@example.org"), dsn=DSN(notify=(Notify.NEVER,), envid="order-42", orcpt=False)
        )
        results.wait_count(1)
    finally:
        ms.stop(timeout=5)
    assert mx.dsn_params == [
        ("MAIL", "app@sender.test", ("ENVID=order-42",)),
        ("RCPT", "ann@example.org", ("NOTIFY=NEVER",)),
    ]


def test_never_to_a_server_without_dsn(
    smtp_server: Any, dns_server: LoopbackDNS, results: Results, store: Store
) -> None:
    # aiosmtpd without DSN answers 555 to parameters it does not know: delivery shows
    # that none went.
    mx, ms = start(smtp_server, dns_server, results, store)
    try:
        ms.send_email(hello("ann@example.org", dsn=DSN(notify=(Notify.FAILURE,))))
        results.wait_count(1)
    finally:
        ms.stop(timeout=5)
    assert results.all[0].state is RecipientState.DELIVERED
    [received] = mx.messages
    # SIZE (RFC 1870), which the server advertises, is all that went.
    assert received.mail_options == (f"SIZE={len(received.content)}",)
    assert received.rcpt_options == ()
    assert mx.dsn_params == []


def test_no_request_no_parameters(
    smtp_server: Any, dns_server: LoopbackDNS, results: Results, store: Store
) -> None:
    mx, ms = start(smtp_server, dns_server, results, store, dsn=True)
    try:
        ms.send_email(hello("ann@example.org"))
        results.wait_count(1)
    finally:
        ms.stop(timeout=5)
    assert results.all[0].state is RecipientState.DELIVERED
    assert mx.dsn_params == []
