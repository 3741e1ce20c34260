"""Fixtures shared by integration tests of one feature area (the services themselves are
in tests/fixtures)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailstrom import Email, Mailstrom
from mailstrom.status import RecipientStatus
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import FakeClock, Results, loopback_config

Send = Callable[[str], RecipientStatus]


@pytest.fixture
def dnssec_worker(dns_server: LoopbackDNS) -> Iterator[Callable[..., Send]]:
    """Start a worker that trusts the loopback DNS server's AD bit (DNSSEC, for DANE) and
    delivers to port ``port`` (``overrides`` replace Config fields, ``dns_timeout`` the
    DNS lifetime); the function it returns sends one message to an address and returns
    that recipient's status once recorded, so that messages go one after the other. Every
    worker is stopped when the test ends."""
    started: list[Mailstrom] = []

    def start(port: int, *, dns_timeout: float | None = None, **overrides: Any) -> Send:
        results = Results()
        dns = dataclasses.replace(dns_server.dns_config, dnssec=True)
        if dns_timeout is not None:
            dns = dataclasses.replace(dns, timeout=dns_timeout)
        config = loopback_config(dns_server, port, dns=dns, **overrides)
        ms = Mailstrom(config, store=MemoryStore(), clock=FakeClock(), on_result=results)
        ms.start()
        started.append(ms)

        def send(to: str) -> RecipientStatus:
            mid = ms.send_email(Email(from_="a@sender.test", to=[to], subject="Hi", text="Hello"))
            results.wait_final({to})
            return ms.query_status(mid).recipient(to)

        return send

    yield start
    for ms in started:
        ms.stop(timeout=5)
