"""Cancel, hold or suspend while transactions wait on a connection behind the one under
way: those none of whose commands went on the wire must not go (a real worker, an
aiosmtpd receiver that holds its reply to the first message's content)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailstrom import AsyncMailstrom, Email, RecipientState, Timeouts
from mailstrom.stores import MemoryStore
from mailstrom.testing.smtp import ReceivingServer, ServerFactory
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import loopback_config
from tests.support.waiting import logged

SLOW = Timeouts(connect=30, greeting=30, command=30, data_init=30, data_block=30, data_end=30)
MESSAGES = 6


def hello(n: int) -> Email:
    return Email(
        from_="App <app@sender.test>", to=[f"u{n}@one.example"], subject=f"n{n}", text="Hi"
    )


class HoldingFirst:
    """Wraps a receiver's aiosmtpd handler: the reply to the first message's final dot
    waits until ``go_on`` is set (``first_in`` says it arrived); the rest as before."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.first_in = threading.Event()
        self.go_on = threading.Event()
        self._seen = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __dir__(self) -> list[str]:
        # aiosmtpd finds a handler's hooks by dir(): the inner ones count too.
        return sorted({*super().__dir__(), *dir(self._inner)})

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply: str = await self._inner.handle_DATA(server, session, envelope)
        self._seen += 1
        if self._seen == 1:
            self.first_in.set()
            # The server's own loop waits for the test's word (no timer: a hang only).
            await asyncio.get_running_loop().run_in_executor(None, self.go_on.wait, 30)
        return reply


def holding_first(mx: ReceivingServer) -> HoldingFirst:
    controller = mx._controller
    assert controller is not None
    holding = HoldingFirst(controller.handler)
    controller.handler = holding  # read by each connection as it is accepted
    return holding


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("action", ["cancel", "hold", "suspend"])
async def test_transactions_queued_on_a_connection_do_not_go_once_stopped(
    dns_server: LoopbackDNS,
    smtp_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
    action: str,
    pipelining: bool,
) -> None:
    """Was: six messages to one destination, one connection; while the server held its
    reply to the first message's content, the other five were cancelled (held, their
    destination suspended). The worker gave back the three waiting in its queue, but
    the two it had handed to the connection still went: the server received 3
    messages, 2 of them after ``cancel()`` had returned. Now what is queued on the
    connection and not yet written is taken back too. With PIPELINING the second's
    envelope left with the first's content (before the cancel): under way, it finishes,
    as the store's cancel, hold and suspend say."""
    caplog.set_level(logging.WARNING, logger="mailstrom")
    mx = smtp_server(starttls=False, pipelining=pipelining)
    holding = holding_first(mx)
    dns_server.mx("one.example", [(10, "mx.test")])
    dns_server.a("mx.test", "127.0.0.1")
    config = loopback_config(
        dns_server, mx.port, timeouts=SLOW, max_per_destination=1, poll_interval=30
    )
    store = MemoryStore()
    ms = AsyncMailstrom(config, store=store, worker=None)
    ids = [await ms.send_email(hello(n)) for n in range(MESSAGES)]
    under_way = 2 if pipelining else 1  # written before the stop: these go
    try:
        async with AsyncMailstrom(config, store=store, worker="task") as running:
            assert await asyncio.to_thread(holding.first_in.wait, 20)
            if action == "cancel":
                for mid in ids[1:]:
                    assert await running.cancel(mid) == 1
            elif action == "hold":
                assert await running.hold(ids[1:]) == MESSAGES - 1
            else:
                await running.suspend("one.example")
            assert await logged(caplog, "not yet started given back", 20)
            holding.go_on.set()
            for mid in ids[:under_way]:
                status = await running.wait(mid, timeout=20)
                assert status.state is RecipientState.DELIVERED
            for _ in range(2000):  # only a hang waits this out
                if not running.worker_status.in_flight:
                    break
                await asyncio.sleep(0.01)
            sent = [m.rcpt_tos[0] for m in mx.received]
            assert sent == [f"u{n}@one.example" for n in range(under_way)], sent
            # What was stopped is as the operator left it: never attempted.
            for mid in ids[under_way:]:
                r = (await running.query_status(mid)).recipients[0]
                if action == "cancel":
                    assert (r.state, r.error, r.attempts) == (
                        RecipientState.FAILED,
                        "cancelled",
                        0,
                    ), r
                else:
                    assert (r.state, r.attempts) == (RecipientState.QUEUED, 0), r
            if action == "cancel":
                return
            # Let go again, each goes once.
            if action == "hold":
                assert await running.release(ids[1:]) == MESSAGES - under_way
            else:
                assert await running.resume("one.example")
            for mid in ids[under_way:]:
                status = await running.wait(mid, timeout=20)
                assert status.state is RecipientState.DELIVERED
        sent = sorted(m.rcpt_tos[0] for m in mx.received)
        assert sent == sorted(f"u{n}@one.example" for n in range(MESSAGES)), sent
    finally:
        holding.go_on.set()
