"""A store that records and leases in transactions of their own (PostgreSQL, memory): when
the lease fails after the record committed, the worker counts the results as recorded.

It used to take the whole call for failed and write the results again; the second write
found them recorded and read them as taken over, so ``on_result`` never heard of them,
no bounce notice was made, and the log said "results ignored: taken over or cancelled".
Seen on PostgreSQL with a table lock held under a running worker."""

from __future__ import annotations

import time
from typing import Any

from mailstrom import Mailstrom
from mailstrom.errors import StoreLocked
from mailstrom.stores.base import RecipientResult
from mailstrom.stores.memory import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import _wait_until, config, hello
from tests.support.delivery import Results

mx = test_worker_modes.mx


class LeaseFailsAfterARecord(MemoryStore):
    """A memory store whose ``record_and_lease``, when it records results and then leases,
    fails the lease as a held lock makes it fail, ``failures`` times in all."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self._recorded_now = False

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        self._recorded_now = False
        return super().record_and_lease(results, **kwargs)

    def record(self, results: Any) -> list[RecipientResult]:
        recorded = super().record(results)
        self._recorded_now = bool(results)
        return recorded

    def lease(self, **kwargs: Any) -> Any:
        if self._recorded_now and self.failures > 0:
            self.failures -= 1
            raise StoreLocked("recipients: lock held by another session")
        return super().lease(**kwargs)


def test_a_lease_failing_after_its_record_loses_no_result(mx: Any, dns_server: LoopbackDNS) -> None:
    store = LeaseFailsAfterARecord(failures=3)
    results = Results()
    sent = 30
    mx.data_delay = 0.02  # deliveries overlap the sends: records come with leases
    with Mailstrom(
        config(dns_server, mx.port), store=store, worker="thread", on_result=results
    ) as ms:
        ids = []
        for n in range(sent):
            # Mail keeps coming while results are written: a write then records and
            # leases in one call, and the first three such leases fail.
            ids.append(ms.send_email(hello(f"u{n}@example.org", n)))
            time.sleep(0.005)
        results.wait_count(sent)
        assert _wait_until(lambda: ms.worker_status.store_error is None, 10)
        time.sleep(0.2)  # a result written twice would reach on_result again by now
        status = ms.worker_status
        histories = [store.status(mid).recipients[0] for mid in ids]
    assert store.failures == 0  # the failures happened
    assert sorted(r.address for r in results.all) == sorted(
        f"u{n}@example.org" for n in range(sent)
    )
    assert status.metrics.ignored_results == 0
    assert status.delivered == sent
    assert [(r.state.value, r.attempts, len(r.history)) for r in histories] == [
        ("delivered", 1, 1)
    ] * sent
