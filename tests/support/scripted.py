"""The worker's own dispatcher against a raw loopback server a test scripts."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from mailstrom.routing import Router
from mailstrom.runtime.dispatch import Dispatcher, Postpone
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.stores.base import LeasedRecipient, RecipientResult, WorkItem
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_hostile_peers import Handler, peer
from tests.support.delivery import loopback_config

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
"""The time the dispatcher's outcomes are read at."""


def work_item(n: int | str, domain: str, *, address: str | None = None) -> WorkItem:
    """A one-recipient message ``m{n}`` to ``r{n}@domain`` (or ``address``), leased under
    ``lease-{n}``, never attempted."""
    return WorkItem(
        message_id=f"m{n}",
        lease_token=f"lease-{n}",
        domain=domain,
        envelope_from="a@sender.test",
        recipients=(
            LeasedRecipient(
                address=address or f"r{n}@{domain}",
                attempts=0,
                first_attempt_at=None,
                created_at=NOW,
            ),
        ),
        data=b"Subject: hi\r\n\r\nhello\r\n",
        smtputf8=False,
        eightbit=False,
    )


@asynccontextmanager
async def scripted_dispatcher(
    dns: LoopbackDNS,
    handle: Handler,
    domain: str,
    /,
    outcomes: type[Outcomes] = Outcomes,
    on_postpone: Postpone | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Dispatcher, list[RecipientResult]]]:
    """A dispatcher delivering ``domain`` to ``handle`` run on 127.0.0.1 (its one MX);
    yields it and the results it reports, and closes it at the end. ``overrides`` go to
    :func:`~tests.support.delivery.loopback_config`."""
    dns.mx(domain, [(10, f"mx.{domain}")])
    dns.a(f"mx.{domain}", "127.0.0.1")
    done: list[RecipientResult] = []
    async with peer(handle) as port:
        config = loopback_config(dns, port, **overrides)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=outcomes(config, clock=lambda: NOW, rng=random.Random(1)),
            on_done=done.extend,
            on_postpone=on_postpone,
        )
        try:
            yield dispatcher, done
        finally:
            await dispatcher.close()
