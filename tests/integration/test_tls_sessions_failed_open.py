"""TLS sessions (RFC 8460) of connections that failed to open under opportunistic TLS:
a STARTTLS refused with ``421``, and a handshake failure whose plaintext fallback
connection failed too. Each is a failed TLS session of the MX, counted
under ``no-policy-found``; they were counted as nothing. Beside them, a ``454`` refusal
followed by a hang-up, which comes back from opening and is counted as refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mailstrom import Email, MessageStatus, RecipientState
from mailstrom.client import Mailstrom
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_hostile_peers import Handler, HangUp, peer, scripted
from tests.support.delivery import Results, loopback_config

BOB = "bob@tls.example"
OFFERING = b"250-hostile.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


async def failures_through(
    dns_server: LoopbackDNS, handler: Handler, **overrides: Any
) -> dict[str, int]:
    """Send one message to :data:`BOB`, whose one MX is ``handler``, with ``tlsrpt_record``
    on, from a worker on a loop of its own (``overrides`` go to the config); once it is
    deferred, the day's counters as ``{"result type (failure code)": count}``."""
    dns_server.mx("tls.example", [(10, "mx.tls.test")])
    dns_server.a("mx.tls.test", "127.0.0.1")
    store = MemoryStore()

    def send(port: int) -> MessageStatus:
        results = Results()
        config = loopback_config(dns_server, port, tlsrpt_record=True, **overrides)
        with Mailstrom(config, store=store, on_result=results) as ms:
            mid = ms.send_email(Email(from_="a@sender.test", to=[BOB], text="Hi"))
            results.wait_count(1)
            return ms.query_status(mid)

    async with peer(handler) as port:
        status = (await asyncio.to_thread(send, port)).recipient(BOB)
    assert status.state is RecipientState.DEFERRED, status.reason
    counted: dict[str, int] = {}
    for c in store.tls_sessions(datetime.now(UTC).date()):
        assert c.policy_domain == "tls.example" and c.policy_type.value == "no-policy-found"
        key = f"{c.result_type or 'ok'} ({c.failure_code})"
        counted[key] = counted.get(key, 0) + c.count
    return counted


def on_starttls(answer: bytes | HangUp) -> Handler:
    return scripted(lambda line: answer if line[:8].upper() == b"STARTTLS" else None, ehlo=OFFERING)


async def test_a_454_to_starttls_then_a_hang_up_counts_once_as_starttls_not_supported(
    dns_server: LoopbackDNS,
) -> None:
    """A ``454`` to STARTTLS, then a hang-up: one session without TLS, refused, counted
    once. (The hang-up is read after the connection opened, so the session counts as
    an opened plaintext one that was refused TLS; were it read before, opening would
    fail with the refusal, also counted so. Either way not as nothing, nor twice.)"""
    handler = on_starttls(HangUp(b"454 4.7.0 TLS not available\r\n"))
    counted = await failures_through(dns_server, handler)
    assert counted == {"starttls-not-supported (starttls-refused)": 1}


async def test_a_421_to_starttls_counts_as_starttls_not_supported(
    dns_server: LoopbackDNS,
) -> None:
    """A server that offers STARTTLS and answers it ``421`` gave the session no TLS, as
    one answering ``454``; it failed the connection with a plain TemporaryFailure, which
    counted as nothing (a report of that MX showed no failure at all)."""
    handler = on_starttls(HangUp(b"421 4.7.0 TLS not available, closing\r\n"))
    counted = await failures_through(dns_server, handler)
    assert counted == {"starttls-not-supported (starttls-refused)": 1}


def handshake_then_hang_up() -> Callable[..., object]:
    """A peer whose first connection takes STARTTLS and answers the handshake with text
    (the handshake fails), and whose next connection (the plaintext fallback) is closed
    before its greeting."""
    seen = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        if seen > 1:
            return  # closed unanswered
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await reader.readline():
            if line[:8].upper() == b"STARTTLS":
                writer.write(b"220 go ahead\r\n")
                await writer.drain()
                await reader.read(1)
                writer.write(b"this is no TLS record at all\r\n" * 4)
                await writer.drain()
                await reader.read()
                return
            writer.write(OFFERING)
            await writer.drain()

    return handle


async def test_a_failed_handshake_counts_when_its_plaintext_fallback_fails_too(
    dns_server: LoopbackDNS,
) -> None:
    """The handshake failure was counted only with the plaintext connection that replaced
    it: when that one failed to open, the failure lost said nothing of TLS."""
    counted = await failures_through(dns_server, handshake_then_hang_up())  # type: ignore[arg-type]
    [(key, count)] = counted.items()
    assert key.startswith("validation-failure (tls-handshake-") and count == 1, counted
