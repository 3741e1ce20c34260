"""No wake-up is lost to a lease running at the same moment: mail committed just after a
lease looked, whose announcement arrives while that lease still runs (PostgreSQL: a NOTIFY
during the round trip), is leased at once rather than at the next poll."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from mailstrom import Email, Mailstrom
from mailstrom.status import RecipientState
from mailstrom.stores import Lease
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import FakeClock, Results, loopback_config
from tests.support.stores import LeaseWatchingStore


def round_trip_store(meanwhile: Callable[[], None]) -> LeaseWatchingStore:
    """A store called in a thread, as PostgreSQL is; ``meanwhile`` runs once, inside the
    first lease that finds nothing, after it looked: another client's commit."""
    pending = [meanwhile]

    def after(_now: datetime, limit: int, lease: Lease | None) -> None:
        if limit > 0 and lease is None and pending:
            pending.pop()()

    return LeaseWatchingStore(after, in_process=False)


def test_mail_announced_while_a_lease_runs_is_leased_without_waiting_for_the_poll(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    mx = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", mx.host)
    # A clock that stands still: the new mail is due at the very time the lease looked,
    # which that lease did not see (it was committed after) and took for nothing new.
    clock = FakeClock()
    results = Results()
    config = loopback_config(dns_server, mx.port, poll_interval=60.0)
    email = Email(from_="app@sender.test", to=["bob@example.org"], subject="Hi", text="Hello")
    sent: list[str] = []
    # The worker's first lease, with nothing queued yet, is the one that sends.
    store = round_trip_store(lambda: sent.append(ms.send_email(email)))
    ms = Mailstrom(config, store=store, worker="thread", clock=clock, on_result=results)
    with ms:
        [result] = results.wait_final({"bob@example.org"}, timeout=10)
    assert [result.message_id] == sent
    assert result.state is RecipientState.DELIVERED
