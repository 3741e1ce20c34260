"""Traffic shaping against real peers: aiosmtpd receivers and the loopback DNS server.

A throttling server pauses its whole destination (and gets no connection until the pause
ends) while other destinations go on; connection limits hold over every domain of a rule;
a rate holds within 10 % over a minute, across two workers of one PostgreSQL store."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import DestinationRule, Email, Mailstrom, RecipientState, ShapingConfig
from mailstrom.message import prepare
from mailstrom.routing import Router
from mailstrom.runtime.dispatch import Dispatcher
from mailstrom.runtime.outcomes import Outcomes
from mailstrom.runtime.shaper import Shaper
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from mailstrom.stores.base import Lease, RecipientResult, WorkItem
from mailstrom.stores.postgres import PostgresStore
from mailstrom.testing import smtp as smtp_testing
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_hostile_peers import peer
from tests.support.delivery import FakeClock, Results, loopback_config
from tests.support.scripted import NOW, work_item
from tests.support.skew import eventually
from tests.support.waiting import eventually as eventually_sync

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
PAUSE = timedelta(seconds=2)


def hello(*to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=list(to), subject="Hi", text="Hello")


def shaping(*rules: DestinationRule, pause: timedelta = PAUSE) -> ShapingConfig:
    return ShapingConfig(
        rules=rules, provider_defaults=False, pause_first=pause, pause_max=4 * pause, refresh=0.2
    )


class ObservedStore(MemoryStore):
    """A memory store that tells the test how many recipients were recorded or postponed
    (postponing makes no result the test could wait for)."""

    def __init__(self) -> None:
        super().__init__()
        self.leased = 0
        self.settled = 0
        self.postponed = 0
        self.changed = threading.Condition()

    def lease(self, **kwargs: Any) -> Lease | None:
        lease = super().lease(**kwargs)
        if lease is not None:
            with self.changed:
                self.leased += sum(len(item.recipients) for item in lease.items)
        return lease

    def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        recorded = super().record(results)
        self._count(len(recorded))
        return recorded

    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        postponed = super().postpone(items, until=until, destination=destination)
        self.postponed += postponed
        self._count(postponed)
        return postponed

    def _count(self, n: int) -> None:
        with self.changed:
            self.settled += n
            self.changed.notify_all()

    def wait_settled(self, count: int, timeout: float = 15.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.settled >= count, timeout)

    def wait_placed(self, count: int, ms: Mailstrom, timeout: float = 15.0) -> None:
        """Until ``count`` recipients were leased and each leased one is recorded, given
        back (postponed) or held by the worker's dispatcher: none is on its way between
        (screened, or being written back)."""

        def placed() -> bool:
            with self.changed:
                before = (self.leased, self.settled)
            in_flight = ms.worker_status.in_flight
            with self.changed:  # nothing moved while in_flight was read
                leased, settled = self.leased, self.settled
            return leased >= count and (leased, settled) == before and settled + in_flight == leased

        assert eventually_sync(placed, timeout), (self.leased, self.settled)


def start(config: Any, store: Store, results: Results) -> Mailstrom:
    ms = Mailstrom(config, store=store, on_result=results, worker="thread")
    ms.start()
    return ms


def test_a_throttling_greeting_pauses_the_destination_and_not_the_others(
    smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    slow = smtp_server(host="127.0.0.21", greeting="421 4.7.28 Too much mail from you - gsmtp")
    backup = smtp_server(host="127.0.0.22", port=slow.port)
    fine = smtp_server(host="127.0.0.23", port=slow.port)
    dns_server.mx("slow.test", [(10, "mx1.slow.test"), (20, "mx2.slow.test")])
    dns_server.a("mx1.slow.test", slow.host)
    dns_server.a("mx2.slow.test", backup.host)
    dns_server.mx("fine.test", [(10, "mx.fine.test")])
    dns_server.a("mx.fine.test", fine.host)
    config = loopback_config(
        dns_server, slow.port, shaping=shaping(DestinationRule(match="*.slow.test"))
    )
    results = Results()
    store = SQLiteStore(str(tmp_path / "queue.db"))
    ms = start(config, store, results)
    try:
        first = ms.send_email(hello("a@slow.test"))
        results.wait_final({"a@slow.test"})
        [pause] = ms.throttled_destinations()
        assert (pause.destination, pause.strikes) == ("*.slow.test", 1)
        a = ms.query_status(first).recipient("a@slow.test")
        assert a.state is DEFERRED and a.reply is not None and a.reply.code == 421
        assert a.next_attempt_at == pause.until  # the pause, not a backoff of its own
        assert a.throttle == pause
        # The backup MX shares the limit: no connection to it either.
        assert (slow.connections, backup.connections) == (1, 0)

        later = ms.send_email(hello("b@slow.test", "c@fine.test"))
        for i in range(3):
            ms.send_email(hello(f"f{i}@fine.test"))
        fine.wait_for_messages(4)
        assert time.time() < pause.until.timestamp()  # the healthy domain went on at once
        b = ms.query_status(later).recipient("b@slow.test")
        assert (b.state, b.attempts, b.next_attempt_at) == (
            RecipientState.QUEUED,
            0,
            pause.until,
        )
        assert b.throttle_note is not None
        assert b.throttle_note.startswith("destination *.slow.test throttled until ")

        slow.greeting = None  # the server takes mail again
        slow.wait_for_messages(2, timeout=20)
        results.wait_for(
            lambda rs: (
                {r.address for r in rs if r.state is DELIVERED} >= {"a@slow.test", "b@slow.test"}
            )
        )
    finally:
        ms.stop(timeout=5)
        store.close()
    assert slow.connected_at[1:], "delivered after the pause"
    assert min(slow.connected_at[1:]) >= pause.until.timestamp()
    assert backup.connections == 0


def test_a_backup_mx_at_a_provider_does_not_put_the_domain_under_its_rule(
    smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """A domain that receives on its own server and keeps a backup MX at a provider
    (legacy, or a migration half done) was matched by that backup host to the provider's
    rule: a 421 from its own server's greeting paused the provider's whole shape, and
    every other domain hosted there (Gmail, each Google Workspace domain) waited out a
    pause the provider never asked for. The rule comes from the preferred MX hosts."""
    own = smtp_server(host="127.0.0.24", greeting="421 4.3.2 Service not available")
    provider = smtp_server(host="127.0.0.25", port=own.port)
    dns_server.mx("mixed.test", [(10, "mail.mixed.test"), (20, "mx.provider.test")])
    dns_server.a("mail.mixed.test", own.host)
    dns_server.mx("hosted.test", [(10, "mx.provider.test")])
    dns_server.a("mx.provider.test", provider.host)
    config = loopback_config(
        dns_server, own.port, shaping=shaping(DestinationRule(match="*.provider.test"))
    )
    results = Results()
    store = SQLiteStore(str(tmp_path / "queue.db"))
    ms = start(config, store, results)
    try:
        ms.send_email(hello("a@mixed.test"))
        results.wait_final({"a@mixed.test"})
        [pause] = ms.throttled_destinations()
        assert pause.destination == "mixed.test"  # its own server said 421, not the provider
        ms.send_email(hello("b@hosted.test"))
        results.wait_for(
            lambda rs: any(r.address == "b@hosted.test" and r.state is DELIVERED for r in rs)
        )
        assert time.time() < pause.until.timestamp()  # the provider's domains went on
    finally:
        ms.stop(timeout=5)
        store.close()


@pytest.mark.parametrize(
    ("greeting", "mail_reply"),
    [
        ("421 4.7.0 Too many connections", None),
        (None, "421 4.7.28 Our system has detected an unusual rate of mail - gsmtp"),
    ],
    ids=["greeting", "mail"],
)
def test_a_421_from_a_backup_mx_outside_the_rule_does_not_pause_the_provider(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    tmp_path: Path,
    greeting: str | None,
    mail_reply: str | None,
) -> None:
    """A domain hosted at a provider whose backup MX is elsewhere (its own server, or one
    its owner makes say anything): with the provider's host out of reach, the backup's
    421 paused the provider's whole shape, and every domain hosted there (Gmail, each
    Google Workspace domain) waited out a pause the provider never asked for; any
    recipient domain could do so at will. A throttling reply pauses the rule only when
    it comes from a host under the rule (or the domain's own rule)."""
    own = smtp_server(host="127.0.0.42", greeting=greeting)
    own.mail_reply = mail_reply
    provider = smtp_server(host="127.0.0.43", port=own.port)
    dns_server.mx("mixed.test", [(10, "mx1.provider.test"), (20, "backup.mixed.test")])
    dns_server.a("mx1.provider.test", "127.0.0.41")  # nothing listens there: refused
    dns_server.a("backup.mixed.test", own.host)
    dns_server.mx("hosted.test", [(10, "mx2.provider.test")])
    dns_server.a("mx2.provider.test", provider.host)
    config = loopback_config(
        dns_server, own.port, shaping=shaping(DestinationRule(match="*.provider.test"))
    )
    results = Results()
    store = SQLiteStore(str(tmp_path / "queue.db"))
    ms = start(config, store, results)
    try:
        ms.send_email(hello("a@mixed.test"))
        results.wait_final({"a@mixed.test"})
        assert own.connections == 1
        assert [p.destination for p in ms.throttled_destinations()] == []
        ms.send_email(hello("b@hosted.test"))
        results.wait_for(
            lambda rs: any(r.address == "b@hosted.test" and r.state is DELIVERED for r in rs)
        )
        assert provider.connections == 1
    finally:
        ms.stop(timeout=5)
        store.close()


def test_a_421_to_starttls_moves_on_to_the_next_host_without_a_pause(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """A 421 to STARTTLS (not a rate limit) ends that session, as any failed TLS
    negotiation does: the next MX host gets the mail. Only a 421 to the greeting or EHLO
    (or one classed as a rate limit) pauses the whole destination."""
    closing = smtp_server(host="127.0.0.25")
    closing.starttls_reply = "421 4.3.2 Service shutting down"
    backup = smtp_server(host="127.0.0.26", port=closing.port)
    dns_server.mx("tls421.test", [(10, "mx1.tls421.test"), (20, "mx2.tls421.test")])
    dns_server.a("mx1.tls421.test", closing.host)
    dns_server.a("mx2.tls421.test", backup.host)
    config = loopback_config(dns_server, closing.port, shaping=shaping())
    results = Results()
    ms = start(config, MemoryStore(), results)
    try:
        mid = ms.send_email(hello("a@tls421.test"))
        results.wait_final({"a@tls421.test"})
        a = ms.query_status(mid).recipient("a@tls421.test")
        assert (a.state, a.mx_host) == (DELIVERED, "mx2.tls421.test")
        assert ms.throttled_destinations() == []
        assert closing.commands.count("STARTTLS") == 1
    finally:
        ms.stop(timeout=5)


def test_a_421_to_ehlo_still_pauses_the_destination(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    busy = smtp_server(host="127.0.0.27", ehlo_reply="421 4.3.2 Too busy, try later")
    backup = smtp_server(host="127.0.0.28", port=busy.port)
    dns_server.mx("ehlo421.test", [(10, "mx1.ehlo421.test"), (20, "mx2.ehlo421.test")])
    dns_server.a("mx1.ehlo421.test", busy.host)
    dns_server.a("mx2.ehlo421.test", backup.host)
    config = loopback_config(dns_server, busy.port, shaping=shaping())
    results = Results()
    ms = start(config, MemoryStore(), results)
    try:
        mid = ms.send_email(hello("a@ehlo421.test"))
        results.wait_final({"a@ehlo421.test"})
        a = ms.query_status(mid).recipient("a@ehlo421.test")
        assert a.state is DEFERRED and a.reply is not None and a.reply.code == 421
        [pause] = ms.throttled_destinations()
        assert pause.destination == "ehlo421.test"
        assert backup.connections == 0
    finally:
        ms.stop(timeout=5)


def test_a_rate_limit_reply_in_a_transaction_pauses_the_queue_behind_it(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    mx = smtp_server(host="127.0.0.24")
    mx.mail_reply = [
        "451 4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to"
        " IP reputation.",
        "250 2.1.0 OK",
    ]
    dns_server.mx("ms.test", [(10, "mx.ms.test")])
    dns_server.a("mx.ms.test", mx.host)
    config = loopback_config(dns_server, mx.port, shaping=shaping(), max_per_destination=1)
    results = Results()
    store = ObservedStore()
    ms = start(config, store, results)
    try:
        ids = ms.send_emails([hello(f"r{i}@ms.test") for i in range(6)])
        store.wait_settled(6)  # each recorded (attempted) or postponed
        [pause] = ms.throttled_destinations()
        assert pause.destination == "ms.test"  # no rule: the recipient domain
        assert "4.7.650" in pause.reply
        statuses = [ms.query_status(i).recipients[0] for i in ids]
        in_flight = sum(r.state is DELIVERED for r in statuses)
        assert in_flight <= 2  # pipelined behind the throttled one: they were on the wire
        deferred = [r for r in statuses if r.state is DEFERRED]
        postponed = [r for r in statuses if r.state is RecipientState.QUEUED]
        assert [r.attempts for r in deferred] == [1]
        assert len(postponed) >= 3 and all(r.attempts == 0 for r in postponed)
        for r in deferred + postponed:  # all come back together, at the end of the pause
            assert r.next_attempt_at == pause.until
            assert r.throttle == pause
        mx.wait_for_messages(6, timeout=20)
    finally:
        ms.stop(timeout=5)
    late = mx.arrivals[in_flight:]
    assert len(late) == 6 - in_flight
    assert all(t >= pause.until.timestamp() for t in late)


def test_results_are_recorded_when_the_pause_cannot_be_made(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    # A pause that raises (as next_pause's overflow did) once lost the transaction's
    # results and those pipelined behind it: left leased, they were sent again later.
    class BrokenPauses(ObservedStore):
        def throttle(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in the pause")

    mx = smtp_server(host="127.0.0.28")
    mx.mail_reply = ["451 4.7.650 The mail server has been temporarily rate limited", "250 OK"]
    dns_server.mx("broken.test", [(10, "mx.broken.test")])
    dns_server.a("mx.broken.test", mx.host)
    config = loopback_config(dns_server, mx.port, shaping=shaping(), max_per_destination=1)
    store = BrokenPauses()
    ms = start(config, store, Results())
    try:
        ids = ms.send_emails([hello(f"r{i}@broken.test") for i in range(6)])
        store.wait_settled(6)
        statuses = [ms.query_status(i).recipients[0] for i in ids]
        states = Counter(r.state for r in statuses)
        assert states == {DELIVERED: 5, DEFERRED: 1}
        assert ms.throttled_destinations() == []  # not paused: the store could not
    finally:
        ms.stop(timeout=5)
    assert len(mx.messages) == 5  # each once


def test_mail_a_rate_would_hold_for_long_goes_back_to_the_store(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """40 messages at 60 a minute: the worker keeps 10 s worth and gives the rest back,
    due about when the rate allows them, so another destination is not held up."""
    mx = smtp_server(host="127.0.0.28")
    other_mx = smtp_server(host="127.0.0.29", port=mx.port)
    for domain, server in (("slowrate.test", mx), ("other.test", other_mx)):
        dns_server.mx(domain, [(10, f"mx.{domain}")])
        dns_server.a(f"mx.{domain}", server.host)
    rule = DestinationRule(match="slowrate.test", messages_per_minute=60)
    config = loopback_config(dns_server, mx.port, shaping=shaping(rule))
    store = ObservedStore()
    results = Results()
    ms = start(config, store, results)
    try:
        sent_at = datetime.now(UTC)
        ids = ms.send_emails([hello(f"r{i}@slowrate.test") for i in range(40)])
        store.wait_settled(25)
        assert store.postponed >= 25
        other = ms.send_email(hello("x@other.test"))
        results.wait_final({"x@other.test"}, timeout=5)  # not behind the rate-limited mail
        waits = sorted(
            (r.next_attempt_at - sent_at).total_seconds()
            for r in (ms.query_status(i).recipients[0] for i in ids)
            if r.state is RecipientState.QUEUED and r.next_attempt_at is not None
        )
        assert ms.query_status(other).state is DELIVERED
    finally:
        ms.stop(timeout=5)
    late = [w for w in waits if w >= 9]
    assert len(late) >= 25
    assert max(late) <= 42  # spread over what the rate needs, not all at one time
    assert len(set(round(w) for w in late)) >= 20


@pytest.mark.parametrize("limited", [True, False])
def test_max_connections_hold_over_every_domain_of_a_rule(
    smtp_server: Any, dns_server: LoopbackDNS, limited: bool
) -> None:
    mx = smtp_server(host="127.0.0.25")
    domains = ["one.test", "two.test", "three.test"]
    for domain in domains:
        dns_server.mx(domain, [(10, "mx.shared.test")])
    dns_server.a("mx.shared.test", mx.host)
    rules = (DestinationRule(match="*.shared.test", max_connections=2),) if limited else ()
    config = loopback_config(dns_server, mx.port, shaping=shaping(*rules))
    results = Results()
    ms = start(config, MemoryStore(), results)
    try:
        ms.send_emails([hello(f"r{i}@{d}") for d in domains for i in range(12)])
        mx.wait_for_messages(36, timeout=30)
    finally:
        ms.stop(timeout=5)
    if limited:
        assert mx.peak_connections <= 2
    else:  # the check can fail: without the rule the worker opens more
        assert mx.peak_connections > 2


def test_messages_per_connection_of_a_rule(smtp_server: Any, dns_server: LoopbackDNS) -> None:
    mx = smtp_server(host="127.0.0.26")
    dns_server.mx("cap.test", [(10, "mx.cap.test")])
    dns_server.a("mx.cap.test", mx.host)
    rule = DestinationRule(match="cap.test", max_connections=1, messages_per_connection=3)
    config = loopback_config(dns_server, mx.port, shaping=shaping(rule))
    ms = start(config, MemoryStore(), Results())
    try:
        ms.send_emails([hello(f"r{i}@cap.test") for i in range(9)])
        mx.wait_for_messages(9)
    finally:
        ms.stop(timeout=5)
    # Three connections of three messages each. (Their overlap is not measured here: the
    # server notices a closed TLS connection a moment after the client opened the next.)
    assert mx.connections == 3
    assert sorted(Counter(m.peer for m in mx.messages).values()) == [3, 3, 3]


@pytest.mark.slow
@pytest.mark.postgres
def test_a_rate_holds_within_ten_percent_over_a_minute_across_two_workers(
    smtp_server: Any, dns_server: LoopbackDNS, postgres_url: str
) -> None:
    """120 messages a minute to one destination, two workers on one PostgreSQL store:
    they draw from one bucket in the store, so together they keep to the rate."""
    mx = smtp_server(host="127.0.0.27")
    dns_server.mx("rate.test", [(10, "mx.rate.test")])
    dns_server.a("mx.rate.test", mx.host)
    rule = DestinationRule(match="*.rate.test", messages_per_minute=120)
    # Small leases, so that both workers hold work for the destination all along.
    config = loopback_config(
        dns_server, mx.port, shaping=shaping(rule), max_connections=5, lease_batch=10
    )
    stores = [PostgresStore(postgres_url) for _ in range(2)]
    results = [Results(), Results()]
    workers: list[Mailstrom] = []
    try:
        now = datetime.now(UTC)
        stores[0].enqueue_many([prepare(hello(f"r{i}@rate.test")) for i in range(200)], now=now)
        workers = [start(config, s, r) for s, r in zip(stores, results, strict=True)]
        mx.wait_for_received(126, timeout=90)  # about 61.5 s after the first
    finally:
        for worker in workers:
            worker.stop(timeout=5)
        for store in stores:
            store.close()
    first = mx.arrivals[0]
    in_a_minute = sum(1 for t in mx.arrivals if t - first <= 60.0)
    print(f"rate 120/min, 2 workers: {in_a_minute} messages in the first 60 s")
    assert 108 <= in_a_minute <= 132, in_a_minute
    delivered = [sum(r.state is DELIVERED for r in rs.all) for rs in results]
    assert all(n > 10 for n in delivered), delivered  # both workers took part


def test_the_rate_horizon_counts_every_domain_of_a_rule(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Four domains behind one rule's MX host share its rate, so the worker keeps 10 s of
    that rate over all of them, not 10 s for each: the rest goes back to the store."""
    mx = smtp_server(host="127.0.0.30")
    domains = [f"d{i}.test" for i in range(4)]
    for domain in domains:
        dns_server.mx(domain, [(10, "mx.sharedrate.test")])
    dns_server.a("mx.sharedrate.test", mx.host)
    rule = DestinationRule(match="*.sharedrate.test", messages_per_minute=120)
    config = loopback_config(dns_server, mx.port, shaping=shaping(rule))
    store = ObservedStore()
    results = Results()
    ms = start(config, store, results)
    try:
        # The rule is found through the MX host: once each domain's route is known.
        ms.send_emails([hello(f"first@{d}") for d in domains])
        results.wait_final({f"first@{d}" for d in domains})
        ms.send_emails([hello(f"r{i}@{d}") for d in domains for i in range(30)])
        store.wait_placed(4 + 120, ms)
        kept = 120 - store.postponed
    finally:
        ms.stop(timeout=5)
    # 10 s of the rate is 20 messages (and a second's worth of tokens besides).
    assert kept <= 30, f"{kept} messages held in memory for a rate of 2 a second"


def test_a_pause_does_not_hold_a_message_past_its_expiry(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """A pause longer than a message's life: the deferred recipient and those given back
    come back at their expiry (and fail as expired then), not at the end of the pause."""
    mx = smtp_server(host="127.0.0.31")
    mx.mail_reply = "451 4.7.650 The mail server has been temporarily rate limited."
    dns_server.mx("brief.test", [(10, "mx.brief.test")])
    dns_server.a("mx.brief.test", mx.host)
    config = loopback_config(
        dns_server,
        mx.port,
        shaping=shaping(pause=timedelta(minutes=10)),
        max_per_destination=1,
    )
    results = Results()
    store = ObservedStore()
    ms = start(config, store, results)
    try:
        ids = [
            ms.send_email(hello(f"r{i}@brief.test"), max_age=timedelta(seconds=30 + i))
            for i in range(4)
        ]
        store.wait_settled(4)  # each recorded (attempted) or postponed
        [pause] = ms.throttled_destinations()
        statuses = [ms.query_status(i) for i in ids]
    finally:
        ms.stop(timeout=5)
    assert all(s.expires_at is not None and s.expires_at < pause.until for s in statuses)
    for status in statuses:
        [r] = status.recipients
        assert r.state in (DEFERRED, RecipientState.QUEUED)
        assert r.next_attempt_at == status.expires_at, (r.address, r.next_attempt_at)


def test_a_pause_does_not_keep_a_recipient_past_the_retry_max_age(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: deferred until the end of a ten-minute pause, though the retry policy gives
    up on it a minute after it was queued (its own backoff of a second was within that),
    and attempted once more then. A retry that would fall past ``retry.max_age`` gives
    up now, with the last reason, whatever put it there."""
    from mailstrom import RetryPolicy

    mx = smtp_server(host="127.0.0.32")
    mx.mail_reply = "451 4.7.650 The mail server has been temporarily rate limited."
    dns_server.mx("aged.test", [(10, "mx.aged.test")])
    dns_server.a("mx.aged.test", mx.host)
    config = loopback_config(
        dns_server,
        mx.port,
        shaping=shaping(pause=timedelta(minutes=10)),
        retry=RetryPolicy(min_delay=timedelta(seconds=1), jitter=0, max_age=timedelta(minutes=1)),
    )
    results = Results()
    ms = start(config, MemoryStore(), results)
    try:
        mid = ms.send_email(hello("r@aged.test"))
        results.wait_count(1)
        [pause] = ms.throttled_destinations()
        [r] = ms.query_status(mid).recipients
    finally:
        ms.stop(timeout=5)
    assert pause.until > r.first_attempt_at + timedelta(minutes=1)  # type: ignore[operator]
    assert (r.state, r.next_attempt_at) == (RecipientState.FAILED, None)
    assert "4.7.650" in r.reason


def test_a_pause_fails_unattempted_work_the_retry_policy_gives_up_on_before_it_ends(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: the recipients queued behind the throttled one went back to the store until
    the end of the ten-minute pause, though the retry policy gives up on them a minute
    after they were queued, and were attempted then. Like the throttled recipient
    itself, they fail now (class ``expired``), without another attempt."""
    from mailstrom import RetryPolicy
    from mailstrom.status import ReasonClass

    mx = smtp_server(host="127.0.0.33")
    mx.mail_reply = "451 4.7.650 The mail server has been temporarily rate limited."
    dns_server.mx("aged2.test", [(10, "mx.aged2.test")])
    dns_server.a("mx.aged2.test", mx.host)
    config = loopback_config(
        dns_server,
        mx.port,
        shaping=shaping(pause=timedelta(minutes=10)),
        retry=RetryPolicy(min_delay=timedelta(seconds=1), jitter=0, max_age=timedelta(minutes=1)),
        max_per_destination=1,
    )
    results = Results()
    store = ObservedStore()
    ms = start(config, store, results)
    try:
        ids = ms.send_emails([hello(f"r{i}@aged2.test") for i in range(8)])
        store.wait_settled(8)
        statuses = [ms.query_status(i).recipients[0] for i in ids]
    finally:
        ms.stop(timeout=5)
    assert store.postponed == 0
    assert [r.state for r in statuses] == [RecipientState.FAILED] * 8
    unattempted = [r for r in statuses if r.reason_class is ReasonClass.EXPIRED]
    assert len(unattempted) >= 4  # behind the three the session had pipelined
    assert all("retry.max_age" in r.reason for r in unattempted)
    assert all((r.attempts, r.history) == (0, ()) for r in unattempted)  # none counted
    assert len(mx.received) == 0


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "stepwise"])
def test_a_throttling_421_to_rcpt_pauses_the_destination(
    smtp_server: Any, dns_server: LoopbackDNS, pipelining: bool
) -> None:
    """Was: Gmail's ``421 4.7.28 ... gsmtp`` to RCPT (it closes the connection there) cut
    the transaction like any broken session: the destination was not paused, and the
    recipient came back after a backoff of its own, while the rest of the destination's
    queue went on to the server that had just said to slow down. A throttling reply pauses
    the destination wherever in the transaction it comes."""
    mx = smtp_server(host="127.0.0.34", pipelining=pipelining)
    mx.rcpt_replies["r@cut.test"] = "421 4.7.28 Too much mail from you, closing. - gsmtp"
    dns_server.mx("cut.test", [(10, "mx.cut.test")])
    dns_server.a("mx.cut.test", mx.host)
    config = loopback_config(dns_server, mx.port, shaping=shaping(pause=timedelta(minutes=10)))
    results = Results()
    ms = start(config, MemoryStore(), results)
    try:
        mid = ms.send_email(hello("r@cut.test"))
        results.wait_count(1)
        paused = ms.throttled_destinations()
        r = ms.query_status(mid).recipient("r@cut.test")
    finally:
        ms.stop(timeout=5)
    assert [p.destination for p in paused] == ["cut.test"], paused
    assert "4.7.28" in paused[0].reply
    assert (r.state, r.attempts) == (DEFERRED, 1)
    assert r.reply is not None and r.reply.code == 421
    assert r.next_attempt_at == paused[0].until  # the pause, not a backoff of its own
    assert mx.connections == 1


def test_a_higher_lane_message_is_not_held_behind_a_lower_lanes_rate_backlog(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: a transactional message to a rate-limited destination that the worker held
    10 s of bulk mail for went back to the store due after the whole bulk backlog's
    schedule (40 s here, hours with a real backlog), though in the worker's queue it goes
    ahead of every bulk message: the lane promise ("goes out next") broke under a rate.
    Only the mail that would go before it counts against it."""

    class Seen(ObservedStore):
        """Which messages were postponed, and which recorded."""

        def __init__(self) -> None:
            super().__init__()
            self.postponed_ids: set[str] = set()
            self.recorded_ids: set[str] = set()

        def record(self, results: Sequence[RecipientResult]) -> list[RecipientResult]:
            self.recorded_ids.update(r.message_id for r in results)
            return super().record(results)

        def postpone(
            self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
        ) -> int:
            self.postponed_ids.update(i.message_id for i in items)
            return super().postpone(items, until=until, destination=destination)

    mx = smtp_server(host="127.0.0.35")
    dns_server.mx("lanes.test", [(10, "mx.lanes.test")])
    dns_server.a("mx.lanes.test", mx.host)
    rule = DestinationRule(match="lanes.test", messages_per_minute=60)
    config = loopback_config(dns_server, mx.port, shaping=shaping(rule))
    store = Seen()
    results = Results()
    ms = start(config, store, results)
    try:
        bulk = [
            Email(
                from_="App <app@sender.test>",
                to=[f"n{i}@lanes.test"],
                subject="News",
                text="Hello",
                priority="bulk",
            )
            for i in range(40)
        ]
        ms.send_emails(bulk)
        store.wait_settled(25)  # the bulk mail past the worker's 10 s went back
        reset = ms.send_email(hello("reset@lanes.test"))
        with store.changed:  # sent, or given back to the store: whichever comes first
            assert store.changed.wait_for(
                lambda: reset in store.recorded_ids | store.postponed_ids, 15
            )
        postponed = reset in store.postponed_ids
        status = ms.query_status(reset)
    finally:
        ms.stop(timeout=5)
    assert not postponed, status
    assert status.state is DELIVERED


class PostponeCrashes(MemoryStore):
    """A memory store whose postponements raise what no store error is (a bug below the
    store, or "can't start new thread" from the thread a PostgreSQL call runs in)."""

    def __init__(self) -> None:
        super().__init__()
        self.crashed = threading.Event()

    def postpone(
        self, items: Sequence[WorkItem], *, until: datetime, destination: str | None = None
    ) -> int:
        self.crashed.set()
        raise RuntimeError("a bug in postpone")


def test_a_postponement_that_crashes_ends_the_worker_and_says_why(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """A postponement (mail a rate would hold for long, given back to the store) that
    raised anything but a StoreError ended unseen: its recipients, out of delivery and
    never given back, stayed leased to a worker that went on extending their lease for as
    long as it ran, its status without an error. The bug ends the worker now, as one in
    its record or lease does, and its status says so."""
    mx = smtp_server(host="127.0.0.28")
    dns_server.mx("slowrate.test", [(10, "mx.slowrate.test")])
    dns_server.a("mx.slowrate.test", mx.host)
    rule = DestinationRule(match="slowrate.test", messages_per_minute=60)
    config = loopback_config(dns_server, mx.port, shaping=shaping(rule))
    store = PostponeCrashes()
    ms = start(config, store, Results())
    try:
        ms.send_emails([hello(f"r{i}@slowrate.test") for i in range(40)])
        assert store.crashed.wait(10)
        assert ms.worker.wait_stopped(timeout=10)
        status = ms.worker_status
        assert status.dead and "a bug in postpone" in (status.error or ""), status
    finally:
        ms.stop(timeout=0)


def test_mail_a_rate_would_hold_past_the_retry_max_age_fails_now(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: mail a rate would hold for long went back to the store due when the rate
    lets it go, even when that fell past ``retry.max_age`` from when it was queued, and
    was attempted once more then, after the retry policy had given up on it. As for a
    pause, it fails now (class ``expired``), without an attempt; what the rate lets go
    within its retries still goes back to the store."""
    from mailstrom import RetryPolicy
    from mailstrom.status import ReasonClass

    mx = smtp_server(host="127.0.0.34")
    dns_server.mx("agedrate.test", [(10, "mx.agedrate.test")])
    dns_server.a("mx.agedrate.test", mx.host)
    rule = DestinationRule(match="agedrate.test", messages_per_minute=60)
    config = loopback_config(
        dns_server,
        mx.port,
        shaping=shaping(rule),
        retry=RetryPolicy(max_age=timedelta(seconds=30)),
    )
    store = ObservedStore()
    ms = start(config, store, Results())
    try:
        queued_at = datetime.now(UTC)
        ids = ms.send_emails([hello(f"r{i}@agedrate.test") for i in range(80)])
        store.wait_settled(60)  # all but those the rate lets go at once
        statuses = [ms.query_status(i).recipients[0] for i in ids]
    finally:
        ms.stop(timeout=0)
    given_up = [r for r in statuses if r.state is RecipientState.FAILED]
    assert given_up, "none given up"
    for r in given_up:
        assert r.reason_class is ReasonClass.EXPIRED
        assert "retry.max_age" in r.reason
        assert (r.attempts, r.history) == (0, ())  # given up without an attempt
    later = [r.next_attempt_at for r in statuses if r.state is RecipientState.QUEUED]
    assert store.postponed >= 10 and later
    last = queued_at + timedelta(seconds=31)  # max_age, and the clock's second
    assert all(at is not None and at <= last for at in later), max(later)  # type: ignore[type-var]


def test_mail_pipelined_behind_a_throttling_reply_waits_for_the_pause_unattempted(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: a 421 4.7.28 to a final dot ends the session, and the transactions pipelined
    behind it broke with it. With the item's ``mx_session_limit`` reached by that broken
    session (1 here; the default 2 after one other), each was deferred with an attempt
    counted and a backoff of its own, rather than given back, unattempted, to wait for
    the pause with the rest of its destination."""
    mx = smtp_server(host="127.0.0.35")
    mx.data_reply = ["421 4.7.28 Too much mail from you, closing. - gsmtp", "250 2.0.0 OK"]
    dns_server.mx("behind.test", [(10, "mx.behind.test")])
    dns_server.a("mx.behind.test", mx.host)
    config = loopback_config(
        dns_server,
        mx.port,
        shaping=shaping(pause=timedelta(minutes=10)),
        max_per_destination=1,
        mx_session_limit=1,
    )
    store = ObservedStore()
    ms = start(config, store, Results())
    try:
        ids = ms.send_emails([hello(f"r{i}@behind.test") for i in range(3)])
        store.wait_settled(3)
        [pause] = ms.throttled_destinations()
        statuses = [ms.query_status(i).recipients[0] for i in ids]
    finally:
        ms.stop(timeout=5)
    assert [(r.state, r.attempts) for r in statuses] == [
        (DEFERRED, 1),
        (RecipientState.QUEUED, 0),
        (RecipientState.QUEUED, 0),
    ]
    assert all(r.next_attempt_at == pause.until for r in statuses)
    assert mx.connections == 1


def test_a_throttling_421_to_rset_pauses_the_destination(
    smtp_server: Any, dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: a server that answers the next command on a reused connection with a rate
    limit and closes (``421 4.7.28`` to RSET, RFC 5321 §3.8 lets it answer any command
    so) broke the session like any other: the destination was not paused, and its mail
    went at once on a new connection to the server that had just said to slow down."""

    async def rset_throttled(self: Any, arg: str) -> None:
        await self.push("421 4.7.28 Too much mail from you, closing. - gsmtp")
        self.transport.close()

    monkeypatch.setattr(smtp_testing._SMTP, "smtp_RSET", rset_throttled)
    mx = smtp_server(host="127.0.0.36")
    dns_server.mx("rset.test", [(10, "mx.rset.test")])
    dns_server.a("mx.rset.test", mx.host)
    config = loopback_config(
        dns_server, mx.port, shaping=shaping(pause=timedelta(minutes=10)), connection_idle=30.0
    )
    store = ObservedStore()
    results = Results()
    ms = start(config, store, results)
    try:
        ms.send_email(hello("first@rset.test"))
        results.wait_final({"first@rset.test"})  # its connection is kept for reuse
        later = ms.send_email(hello("later@rset.test"))
        store.wait_settled(2)
        paused = ms.throttled_destinations()
        r = ms.query_status(later).recipient("later@rset.test")
    finally:
        ms.stop(timeout=5)
    assert [p.destination for p in paused] == ["rset.test"], paused
    assert "4.7.28" in paused[0].reply
    assert r.state is not DELIVERED and r.next_attempt_at == paused[0].until
    assert mx.commands.count("RSET") == 1
    assert mx.connections == 1  # no new connection to the server that said to slow down


def test_mail_arriving_while_a_throttle_is_recorded_is_postponed_unattempted(
    smtp_server: Any, dns_server: LoopbackDNS
) -> None:
    """Was: a 421 greeting deferred, with an attempt, whatever sat in the destination's
    queue once the pause was written, read after the store's answer. A store that answers
    from another thread (PostgreSQL) let the worker take more mail for the destination
    meanwhile: never sent to that server, it was counted as attempted and its status did
    not say which pause held it back."""
    entered, release = threading.Event(), threading.Event()

    class SlowPauses(ObservedStore):
        in_process = False  # its calls go to a thread, as PostgreSQL's do

        def throttle(self, *args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(10)
            return super().throttle(*args, **kwargs)

    mx = smtp_server(host="127.0.0.37", greeting="421 4.7.28 Too much mail from you - gsmtp")
    dns_server.mx("slowpause.test", [(10, "mx.slowpause.test")])
    dns_server.a("mx.slowpause.test", mx.host)
    config = loopback_config(dns_server, mx.port, shaping=shaping(pause=timedelta(minutes=10)))
    store = SlowPauses()
    ms = start(config, store, Results())
    try:
        first = ms.send_email(hello("first@slowpause.test"))
        assert entered.wait(10)
        later = ms.send_email(hello("later@slowpause.test"))
        deadline = time.monotonic() + 10
        while ms.worker_status.in_flight < 2:  # taken by the worker, queued behind
            assert time.monotonic() < deadline, ms.worker_status
            time.sleep(0.01)
        release.set()
        store.wait_settled(2)
        [pause] = ms.throttled_destinations()
        a = ms.query_status(first).recipient("first@slowpause.test")
        b = ms.query_status(later).recipient("later@slowpause.test")
    finally:
        release.set()
        ms.stop(timeout=5)
    assert (a.state, a.attempts, a.next_attempt_at) == (DEFERRED, 1, pause.until)
    assert (b.state, b.attempts, b.next_attempt_at) == (RecipientState.QUEUED, 0, pause.until)
    assert b.throttle == pause
    assert mx.connections == 1


async def test_tokens_that_lapsed_while_the_session_connected_are_not_sent(
    dns_server: LoopbackDNS,
) -> None:
    """A session takes a second's worth of message tokens before it connects, and used
    them once connected however long connecting took (a slow greeting, a wait for the
    connection rate): the store's bucket had refilled meanwhile, and the session's ten
    went out on top of the ten it gave again, twice the rate at once. Tokens that lapsed
    while it connected are dropped; it takes fresh ones."""
    rule = DestinationRule(match="rate.example", messages_per_minute=600)  # ten a second
    store = MemoryStore()
    clock = FakeClock(NOW)
    connected = asyncio.Event()
    greet = asyncio.Event()
    sent = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        connected.set()
        await greet.wait()  # the test moves the clock past the tokens' lapse first
        writer.write(b"220 rate.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-rate.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                sent += 1
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    dns_server.mx("rate.example", [(10, "mx.rate.example")])
    dns_server.a("mx.rate.example", "127.0.0.1")
    done: list[RecipientResult] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, shaping=shaping(rule), max_connections=1)
        shaper = Shaper(config, store, store_call=_direct, clock=clock)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=done.extend,
            shaper=shaper,
        )
        try:
            for n in range(10):
                dispatcher.submit(work_item(n, "rate.example", address="to@rate.example"))
            await asyncio.wait_for(connected.wait(), 10)
            clock.advance(timedelta(seconds=2))  # the greeting took longer than they last
            greet.set()
            await asyncio.wait_for(dispatcher.idle.wait(), 10)
        finally:
            await dispatcher.close()
    assert sent == 10 and [r.state for r in done] == [DELIVERED] * 10
    at_once = (
        sent
        + store.take_tokens(
            shaper.for_route("rate.example", []).message_buckets, want=100, now=clock()
        ).granted
    )
    assert at_once == 10  # the bucket's second's worth, no more


async def _direct(method: Any, *args: Any, **kwargs: Any) -> Any:
    return method(*args, **kwargs)


@pytest.mark.parametrize("takes_no_slot", ["route fails", "paused"])
async def test_a_woken_destination_that_takes_no_slot_wakes_the_next(
    dns_server: LoopbackDNS, takes_no_slot: str
) -> None:
    """Three domains under one rule of one connection: b and c park while a holds the
    slot, and a's end wakes b alone (its session takes the slot once its route is known).
    When b's session took no slot (its route failed, or the rule was paused meanwhile),
    c was woken by nobody: its mail stayed in the worker, leased, for as long as no other
    session of the rule ran. Now c's session starts: it delivers, or is given back."""
    rule = DestinationRule(match="*.shared.example", max_connections=1)
    store = MemoryStore()
    clock = FakeClock(NOW)
    monotonic = [1000.0]  # the router's clock: moved past b's cached route below
    connected = asyncio.Event()
    greet = asyncio.Event()
    throttle = takes_no_slot == "paused"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await greet.wait()  # b and c park first
        writer.write(b"220 mx.shared.example ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.shared.example\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL" and throttle:
                writer.write(b"451 4.7.650 temporarily rate limited due to IP reputation\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    for domain in ("a.example", "b.example", "c.example"):
        dns_server.mx(domain, [(10, "mx.shared.example")], ttl=60)
    dns_server.a("mx.shared.example", "127.0.0.1")
    done: list[RecipientResult] = []
    postponed: list[str] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, shaping=shaping(rule))
        shaper = Shaper(config, store, store_call=_direct, clock=clock)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True, clock=lambda: monotonic[0]),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=done.extend,
            shaper=shaper,
            on_postpone=lambda items, _until, _dest: postponed.extend(
                i.recipients[0].address for i in items
            ),
        )
        shape = shaper.for_route("a.example", ["mx.shared.example"])
        try:
            dispatcher.submit(work_item(0, "a.example"))
            await asyncio.wait_for(connected.wait(), 10)
            dispatcher.submit(work_item(1, "b.example"))
            dispatcher.submit(work_item(2, "c.example"))
            await eventually(lambda: len(shape.parked) == 2, "b and c to park")
            if not throttle:
                dns_server.servfail("b.example", "MX")
                monotonic[0] += 120  # b's route is looked up again: SERVFAIL
            greet.set()
            await asyncio.wait_for(dispatcher.idle.wait(), 10)
        finally:
            await dispatcher.close()
    states = {r.address: r.state for r in done}
    if throttle:
        assert states == {"r0@a.example": DEFERRED}
        assert sorted(postponed) == ["r1@b.example", "r2@c.example"]
    else:
        assert states == {
            "r0@a.example": DELIVERED,
            "r1@b.example": DEFERRED,
            "r2@c.example": DELIVERED,
        }
        assert postponed == []


async def test_relief_gives_back_the_mail_parked_behind_a_stalled_session(
    dns_server: LoopbackDNS,
) -> None:
    """A server that never greets holds a rule's only connection slot; the rule's other
    domains wait parked behind it. The worker, full, gives back the work waiting behind a
    destination that does not move (Dispatcher.relieve), but took only the stalled
    domain's queue: a parked domain has no session, so its mail went on holding the
    worker's room for as long as the stalled server's timeouts."""
    rule = DestinationRule(match="*.shared.example", max_connections=1)
    store = MemoryStore()
    clock = FakeClock(NOW)
    connected = asyncio.Event()
    released = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await released.wait()  # never greets

    for domain in ("a.example", "b.example"):
        dns_server.mx(domain, [(10, "mx.shared.example")])
    dns_server.a("mx.shared.example", "127.0.0.1")
    postponed: list[str] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, shaping=shaping(rule))
        shaper = Shaper(config, store, store_call=_direct, clock=clock)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=lambda results: None,
            shaper=shaper,
            on_postpone=lambda items, _until, _dest: postponed.extend(
                i.recipients[0].address for i in items
            ),
        )
        shape = shaper.for_route("a.example", ["mx.shared.example"])
        try:
            dispatcher.submit(work_item(0, "a.example"))
            dispatcher.submit(work_item(1, "a.example"))  # waits behind the one connecting
            await asyncio.wait_for(connected.wait(), 10)
            dispatcher.submit(work_item(2, "b.example"))
            await eventually(lambda: len(shape.parked) == 1, "b to park")
            assert dispatcher.relieve(0.0, timedelta(seconds=60)) == 3
            assert sorted(postponed) == ["r0@a.example", "r1@a.example", "r2@b.example"]
            assert dispatcher.in_flight == 0
        finally:
            released.set()
            await dispatcher.close()


async def test_a_stop_does_not_count_a_421_to_mail_behind_an_answered_message(
    dns_server: LoopbackDNS,
) -> None:
    """A 421 to MAIL (not a throttle) on a connection that had answered a message closes
    the channel without refusing the message (RFC 5321 §3.8): the session sends it on a
    new connection, uncounted. A stop that cut the session while it paused the rule for
    the message ahead (a store call) reported it as an attempt, deferred."""
    rule = DestinationRule(match="*.shared.example", max_connections=1)
    store = MemoryStore()
    clock = FakeClock(NOW)
    pausing = asyncio.Event()
    never = asyncio.Event()

    async def store_call(method: Any, *args: Any, **kwargs: Any) -> Any:
        if method.__name__ == "throttle":
            pausing.set()
            await never.wait()  # the stop comes while the pause is being made
        return method(*args, **kwargs)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.shared.example ESMTP\r\n")
        dotted = False
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.shared.example\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL" and dotted:
                # The first message's reply (a throttle) and this one's, at once.
                writer.write(
                    b"451 4.7.650 temporarily rate limited due to IP reputation\r\n"
                    b"421 4.3.2 Service shutting down\r\n"
                )
                await writer.drain()
                writer.close()
                return
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                dotted = True  # answered with the next MAIL's reply
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    dns_server.mx("a.example", [(10, "mx.shared.example")])
    dns_server.a("mx.shared.example", "127.0.0.1")
    done: list[RecipientResult] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, shaping=shaping(rule))
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=done.extend,
            shaper=Shaper(config, store, store_call=store_call, clock=clock),
            on_postpone=lambda items, _until, _dest: None,
        )
        try:
            dispatcher.submit(work_item(0, "a.example"))
            dispatcher.submit(work_item(1, "a.example"))
            await asyncio.wait_for(pausing.wait(), 10)
        finally:
            await dispatcher.close()  # the worker stops
    assert [(r.address, r.state) for r in done] == [("r0@a.example", DEFERRED)], done


async def test_a_woken_destination_withdrawn_while_it_waits_for_a_session_wakes_the_next(
    dns_server: LoopbackDNS,
) -> None:
    """b and c park behind a, the only connection of their rule; a's end wakes b alone,
    and b waits for a session (the worker's connections are all in use, y's next). Its
    lease was taken over meanwhile (withdrawn: its queue is empty): its turn came and
    was skipped, and the slot it was woken for passed to nobody. c stayed parked, its
    mail leased in the worker, for as long as no other session of the rule ran."""
    rule = DestinationRule(match="*.shared.example", max_connections=1)
    store = MemoryStore()
    clock = FakeClock(NOW)
    rule_connected = asyncio.Event()
    greet = asyncio.Event()
    others_connected: list[int] = []
    release_others = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async def rule_mx(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rule_connected.set()
        await greet.wait()
        await answer(reader, writer)

    async def other_mx(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        others_connected.append(1)
        await release_others.wait()
        await answer(reader, writer)

    for domain in ("a.example", "b.example", "c.example"):
        dns_server.mx(domain, [(10, "mx.shared.example")])
    dns_server.a("mx.shared.example", "127.0.0.1")
    for domain in ("x.example", "z.example", "y.example"):
        dns_server.mx(domain, [(10, "mx.other.test")])
    dns_server.a("mx.other.test", "127.0.0.2")
    done: list[RecipientResult] = []
    postponed: list[str] = []
    async with peer(rule_mx) as port, peer(other_mx, "127.0.0.2", port):
        config = loopback_config(dns_server, port, shaping=shaping(rule), max_connections=3)
        shaper = Shaper(config, store, store_call=_direct, clock=clock)
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=done.extend,
            shaper=shaper,
            on_postpone=lambda items, _until, _dest: postponed.extend(
                i.recipients[0].address for i in items
            ),
        )
        shape = shaper.for_route("a.example", ["mx.shared.example"])
        try:
            dispatcher.submit(work_item(0, "a.example"))
            await asyncio.wait_for(rule_connected.wait(), 10)
            dispatcher.submit(work_item(1, "b.example"))
            dispatcher.submit(work_item(2, "c.example"))
            await eventually(lambda: len(shape.parked) == 2, "b and c to park")
            dispatcher.submit(work_item(3, "x.example"))
            dispatcher.submit(work_item(4, "z.example"))
            await eventually(lambda: len(others_connected) == 2, "x and z to connect")
            dispatcher.submit(work_item(5, "y.example"))  # waits for a session
            greet.set()  # a goes; its end wakes b, which waits behind y
            await eventually(lambda: len(others_connected) == 3, "y to connect")
            assert [r.address for r in done] == ["r0@a.example"]
            assert dispatcher.withdraw("lease-1") == 1  # b's lease taken over
            release_others.set()
            await asyncio.wait_for(dispatcher.idle.wait(), 10)
        finally:
            await dispatcher.close()
    assert postponed == ["r1@b.example"]
    assert {r.address: r.state for r in done} == {
        "r0@a.example": DELIVERED,
        "r2@c.example": DELIVERED,
        "r3@x.example": DELIVERED,
        "r4@z.example": DELIVERED,
        "r5@y.example": DELIVERED,
    }


async def test_a_stop_does_not_count_a_421_to_mail_once_the_connection_took_a_message(
    dns_server: LoopbackDNS,
) -> None:
    """As above, but the message ahead of the 421 was refused at MAIL (a throttle, no
    reply to content) and the one answered came earlier, its results reported already:
    the stop's count of what the connection took saw only the transactions still in
    flight, and reported the 421 as an attempt, deferred with its backoff."""
    rule = DestinationRule(match="*.shared.example", max_connections=1)
    store = MemoryStore()
    clock = FakeClock(NOW)
    pausing = asyncio.Event()
    closed = asyncio.Event()
    never = asyncio.Event()

    async def store_call(method: Any, *args: Any, **kwargs: Any) -> Any:
        if method.__name__ == "throttle":
            pausing.set()
            await never.wait()  # the stop comes while the pause is being made
        return method(*args, **kwargs)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.shared.example ESMTP\r\n")
        mails = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.shared.example\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                mails += 1
                if mails == 3:
                    writer.write(b"421 4.3.2 Service shutting down\r\n")
                    await writer.drain()
                    writer.close()
                    closed.set()
                    return
                if mails == 2:
                    writer.write(b"451 4.7.650 temporarily rate limited due to IP reputation\r\n")
                else:
                    writer.write(b"250 ok\r\n")
            elif verb in (b"RCPT", b"DATA") and mails == 2:
                writer.write(b"503 5.5.1 Error: need MAIL command\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    dns_server.mx("a.example", [(10, "mx.shared.example")])
    dns_server.a("mx.shared.example", "127.0.0.1")
    done: list[RecipientResult] = []
    async with peer(handle) as port:
        config = loopback_config(dns_server, port, shaping=shaping(rule))
        dispatcher = Dispatcher(
            config,
            router=Router(config.dns, allow_loopback=True),
            outcomes=Outcomes(config, clock=clock, rng=random.Random(1)),
            on_done=done.extend,
            shaper=Shaper(config, store, store_call=store_call, clock=clock),
            on_postpone=lambda items, _until, _dest: None,
        )
        try:
            for n in range(3):
                dispatcher.submit(work_item(n, "a.example"))
            await asyncio.wait_for(pausing.wait(), 10)
            await asyncio.wait_for(closed.wait(), 10)
            for _ in range(20):
                await asyncio.sleep(0)  # the 421 read
        finally:
            await dispatcher.close()  # the worker stops
    assert [(r.address, r.state) for r in done] == [
        ("r0@a.example", DELIVERED),
        ("r1@a.example", DEFERRED),
    ], done
