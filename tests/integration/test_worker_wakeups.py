"""No wake-up is lost to a lease running at the same moment: mail committed just after a
lease looked, whose announcement arrives while that lease still runs (PostgreSQL: a NOTIFY
during the round trip), is leased at once rather than at the next poll."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from mailstrom import Email, Mailstrom
from mailstrom.status import RecipientState
from mailstrom.stores import Lease, MemoryStore, RecipientResult
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import FakeClock, Results, loopback_config


class RoundTripStore(MemoryStore):
    """A memory store called in a thread, as PostgreSQL is; ``meanwhile`` runs once, inside
    the first lease that finds nothing, after it looked: another client's commit."""

    in_process = False

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: Callable[[], None] | None = None

    def record_and_lease(
        self,
        results: Sequence[RecipientResult],
        *,
        now: datetime,
        limit: int,
        lease_for: timedelta,
        **kwargs: Any,
    ) -> tuple[list[RecipientResult], Lease | None]:
        recorded, lease = super().record_and_lease(
            results, now=now, limit=limit, lease_for=lease_for, **kwargs
        )
        meanwhile, self.meanwhile = self.meanwhile, None
        if limit > 0 and lease is None and meanwhile is not None:
            meanwhile()
        return recorded, lease


def test_mail_announced_while_a_lease_runs_is_leased_without_waiting_for_the_poll(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    # A clock that stands still: the new mail is due at the very time the lease looked,
    # which that lease did not see (it was committed after) and took for nothing new.
    clock = FakeClock()
    store = RoundTripStore()
    results = Results()
    config = loopback_config(dns_server, mx.port, poll_interval=60.0)
    email = Email(from_="app@sender.test", to=["bob@example.org"], subject="Hi", text="Hello")
    ms = Mailstrom(config, store=store, worker="thread", clock=clock, on_result=results)
    sent: list[str] = []
    # Set before the worker starts: its first lease, with nothing queued, is the one.
    store.meanwhile = lambda: sent.append(ms.send_email(email))
    with ms:
        [result] = results.wait_final({"bob@example.org"}, timeout=10)
    assert [result.message_id] == sent
    assert result.state is RecipientState.DELIVERED
