"""The suppression list end to end: a loopback server refuses an address with 550 5.1.1,
the worker suppresses it, and the next message to it fails at once without a connection
while the other recipients are delivered."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import (
    Config,
    Email,
    InvalidSuppression,
    ReasonClass,
    RecipientState,
    Suppression,
    SuppressionSource,
)
from mailstrom.client import AsyncMailstrom, Mailstrom
from mailstrom.config import Lane
from mailstrom.mtasts import CachedPolicy, Mode, Policy
from mailstrom.runtime.worker_screening import MTA_STS_KEPT, PRUNE_BATCH, SUPPRESSION_KEPT
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import Store
from mailstrom.stores.postgres import PostgresStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import FakeClock, Results, loopback_config
from tests.support.waiting import eventually

DELIVERED = RecipientState.DELIVERED
FAILED = RecipientState.FAILED
NO_SUCH_USER = "550 5.1.1 No such user"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def mx(smtp_server: Any, dns_server: LoopbackDNS) -> Any:
    server = smtp_server()
    dns_server.mx("example.org", [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


MakeMailstrom = Callable[..., Mailstrom]


@pytest.fixture
def mailstrom(
    dns_server: LoopbackDNS, mx: Any, clock: FakeClock, results: Results
) -> Iterator[MakeMailstrom]:
    started: list[Mailstrom] = []

    def make(store: Store | None = None, **overrides: Any) -> Mailstrom:
        ms = Mailstrom(
            loopback_config(dns_server, mx.port, **overrides),
            store=store if store is not None else MemoryStore(),
            clock=clock,
            on_result=results,
        )
        ms.start()
        started.append(ms)
        return ms

    yield make
    for ms in started:
        ms.stop(timeout=5)
        ms.store.close()  # a store passed in is the caller's (the test's) to close


def hello(*to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=list(to), subject="Hi", text="Hello")


def test_a_hard_bounce_suppresses_and_the_next_send_makes_no_connection(
    mailstrom: MakeMailstrom, mx: Any, results: Results, tmp_path: Path
) -> None:
    mx.rcpt_replies["nobody@example.org"] = NO_SUCH_USER
    ms = mailstrom(SQLiteStore(tmp_path / "q.db"))
    first = ms.send_email(hello("nobody@example.org"))
    results.wait_count(1)
    assert ms.query_status(first).recipient("nobody@example.org").state is FAILED
    entry = ms.suppressed("Nobody@Example.org")
    assert entry is not None
    assert entry.target == "nobody@example.org"
    assert entry.source is SuppressionSource.HARD_BOUNCE
    assert entry.reply == NO_SUCH_USER
    assert entry.message_id == first
    connections = mx.connections

    second = ms.send_email(hello("nobody@example.org"))
    results.wait_count(2)
    nobody = ms.query_status(second).recipient("nobody@example.org")
    assert nobody.state is FAILED
    assert nobody.reason == f"suppressed since 2026-01-05T12:00:00Z: {NO_SUCH_USER}"
    assert nobody.reason_class is ReasonClass.SUPPRESSED
    assert nobody.mx_host is None
    assert mx.connections == connections  # nothing went out for it


def test_other_recipients_of_the_message_go_on(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    ms = mailstrom()
    ms.suppress("nobody@example.org", "550 5.1.1 earlier bounce")
    mid = ms.send_email(hello("ann@example.org", "nobody@example.org", "bob@example.org"))
    results.wait_final({"ann@example.org", "nobody@example.org", "bob@example.org"})

    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@example.org", "bob@example.org"]
    status = ms.query_status(mid)
    assert status.recipient("ann@example.org").state is DELIVERED
    assert status.recipient("bob@example.org").state is DELIVERED
    nobody = status.recipient("nobody@example.org")
    assert nobody.state is FAILED
    assert nobody.reason.endswith(": 550 5.1.1 earlier bounce")


def test_a_lane_that_bypasses_bounces_delivers_past_a_bounce_only(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    """A password reset to an address suppressed after a bounce, which its user says
    works again: sent in a lane with ``bypass_suppression``, it goes out, and mail of
    other lanes to it stays suppressed; a complaint stops every lane's mail."""
    lanes = (
        Lane(name="account", bypass_suppression=(SuppressionSource.HARD_BOUNCE,)),
        Lane(name="transactional"),
    )
    ms = mailstrom(lanes=lanes)
    ms.suppress("fixed@example.org", NO_SUCH_USER, source=SuppressionSource.HARD_BOUNCE)
    ms.suppress("angry@example.org", "abuse report", source=SuppressionSource.COMPLAINT)
    reset = ms.send_email(hello("fixed@example.org", "angry@example.org"), priority="account")
    news = ms.send_email(hello("fixed@example.org"))
    results.wait_count(3)
    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["fixed@example.org"]
    status = ms.query_status(reset)
    assert status.recipient("fixed@example.org").state is DELIVERED
    angry = status.recipient("angry@example.org")
    assert (angry.state, angry.reason_class) == (FAILED, ReasonClass.SUPPRESSED)
    fixed = ms.query_status(news).recipient("fixed@example.org")
    assert (fixed.state, fixed.reason_class) == (FAILED, ReasonClass.SUPPRESSED)


class CountingPostgresStore(PostgresStore):
    """Counts the worker's own suppression lookups."""

    lookups = 0

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        self.lookups += 1
        return super().suppressions_for(targets, now=now)


@pytest.mark.parametrize(
    ("unicode_recipient", "worker_lookups"),
    [(None, 0), ("ünal@example.org", 1)],  # ÜNAL@ in the message
    ids=["entries-with-the-lease", "worker-looks-up"],
)
def test_postgres_leases_are_screened_with_their_entries_or_by_the_worker(
    mailstrom: MakeMailstrom,
    mx: Any,
    results: Results,
    postgres_url: str,
    unicode_recipient: str | None,
    worker_lookups: int,
) -> None:
    """PostgreSQL reads the entries of a lease's ASCII addresses with the lease (no second
    round trip); a lease with another address comes without them (SQL would fold its case
    by the server's locale), and the worker looks them up itself before it delivers
    anything of the lease."""
    store = CountingPostgresStore(postgres_url)
    ms = mailstrom(store)
    ms.suppress("Nobody@example.org", "550 5.1.1 earlier bounce")
    ms.suppress("closed.example.org", "closed down")
    refused = ["NOBODY@example.org", "Eve@closed.example.org"]
    if unicode_recipient is not None:
        ms.suppress(unicode_recipient, "550 5.1.1 earlier bounce")
        local, _, domain = unicode_recipient.partition("@")
        refused.append(f"{local.upper()}@{domain}")
    mid = ms.send_email(hello("ann@example.org", *refused))
    results.wait_final({"ann@example.org", *refused})

    [received] = mx.wait_for_messages(1)
    assert list(received.rcpt_tos) == ["ann@example.org"]
    status = ms.query_status(mid)
    assert status.recipient("ann@example.org").state is DELIVERED
    for address in refused:
        assert status.recipient(address).state is FAILED
        assert status.recipient(address).reason_class is ReasonClass.SUPPRESSED
    ms.stop(timeout=5)
    assert store.lookups == worker_lookups
    store.close()


def test_a_domain_entry_covers_every_address_there_until_removed(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    ms = mailstrom()
    ms.suppress("EXAMPLE.org", "closed down")
    ms.send_email(hello("ann@example.org"))
    results.wait_count(1)
    assert results.all[0].state is FAILED
    assert mx.connections == 0
    assert ms.suppressed("anyone@example.org") is not None
    assert [e.target for e in ms.suppressions()] == ["example.org"]

    assert ms.unsuppress("example.org")
    assert not ms.unsuppress("example.org")
    ms.send_email(hello("ann@example.org"))
    results.wait_count(2)
    assert results.all[1].state is DELIVERED


def test_an_expired_entry_no_longer_applies(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    ms = mailstrom()
    ms.suppress("bob@example.org", expires_at=clock() + timedelta(days=1))
    assert ms.suppressed("bob@example.org") is not None
    clock.advance(timedelta(days=1, seconds=1))
    assert ms.suppressed("bob@example.org") is None
    assert ms.suppressions() == []
    ms.send_email(hello("bob@example.org"))
    results.wait_count(1)
    assert results.all[0].state is DELIVERED


def test_a_worker_prunes_entries_expired_long_ago_a_batch_a_write(
    mailstrom: MakeMailstrom, clock: FakeClock, tmp_path: Path
) -> None:
    """Was: an expired entry stayed in the store for ever. A worker deletes those that
    expired over SUPPRESSION_KEPT ago at its start (here more than one write's worth),
    and keeps the rest: those in force, and recently expired ones ``list --all`` shows."""
    store = SQLiteStore(tmp_path / "queue.db")
    old = clock() - SUPPRESSION_KEPT - timedelta(seconds=1)

    def made(target: str, expires_at: datetime | None) -> Suppression:
        return Suppression(
            target=target,
            source=SuppressionSource.HARD_BOUNCE,
            reply=NO_SUCH_USER,
            created_at=old - timedelta(days=180),
            expires_at=expires_at,
        )

    store.suppress([made(f"u{i:05d}@example.org", old) for i in range(PRUNE_BATCH + 5)])
    recent = made("recent@example.org", clock() - timedelta(days=1))
    kept = [made("forever@example.org", None), recent, made("soon@example.org", clock())]
    store.suppress(kept)
    mailstrom(store)
    assert eventually(lambda: len(store.list_suppressions(limit=10_000)) == 3, within=10)
    assert store.list_suppressions() == sorted(kept, key=lambda e: e.target)


def test_a_worker_prunes_mta_sts_policies_expired_long_ago_a_batch_a_write(
    mailstrom: MakeMailstrom, clock: FakeClock, tmp_path: Path
) -> None:
    """Was: a cached MTA-STS policy was kept for ever, expired or not, one per recipient
    domain that ever published one. A worker deletes those expired over MTA_STS_KEPT ago
    at its start (here more than one write's worth), and keeps the rest."""
    store = SQLiteStore(tmp_path / "queue.db")
    text = "version: STSv1\nmode: enforce\nmx: mx.test\nmax_age: 86400"
    policy = Policy(mode=Mode.ENFORCE, mx=("mx.test",), max_age=86400, text=text)

    def cached(domain: str, expires_at: datetime) -> CachedPolicy:
        return CachedPolicy.of(domain, "1", policy, expires_at - timedelta(days=1))

    old = clock() - MTA_STS_KEPT - timedelta(seconds=1)
    for i in range(PRUNE_BATCH + 5):
        store.save_mta_sts_policy(cached(f"d{i:05d}.example", old))
    kept = ["recent.example", "fresh.example"]
    store.save_mta_sts_policy(cached(kept[0], clock() - MTA_STS_KEPT + timedelta(hours=1)))
    store.save_mta_sts_policy(cached(kept[1], clock() + timedelta(days=1)))
    mailstrom(store)

    def count() -> int:
        with contextlib.closing(sqlite3.connect(tmp_path / "queue.db")) as conn:
            return int(conn.execute("SELECT count(*) FROM mta_sts_policies").fetchone()[0])

    assert eventually(lambda: count() == 2, within=10)
    assert [d for d in kept if store.mta_sts_policy(d) is not None] == kept


def test_a_worker_whose_clock_is_fast_prunes_nothing_still_in_force_in_postgres(
    postgres_url: str, mailstrom: MakeMailstrom, clock: FakeClock
) -> None:
    """Was: a worker pruned by its own clock alone, and one 60 days fast (a host whose
    time synchronisation failed, sharing the PostgreSQL queue with others) deleted every
    entry that expired within 30 days of the true time, entries the other workers still
    applied. It now prunes by the database server's clock where its own is ahead."""
    real = datetime.now(UTC)
    clock.advance(real + timedelta(days=60) - clock())

    def made(target: str, expires_at: datetime) -> Suppression:
        return Suppression(
            target=target,
            source=SuppressionSource.HARD_BOUNCE,
            reply=NO_SUCH_USER,
            created_at=real - timedelta(days=5),
            expires_at=expires_at,
        )

    store = PostgresStore(postgres_url)
    old = made("old@example.org", real - SUPPRESSION_KEPT - timedelta(days=1))
    in_force = made("in-force@example.org", real + timedelta(days=10))
    store.suppress([old, in_force])
    mailstrom(store)
    # Pruned in the same write as the other would be: once it has gone, pruning ran.
    assert eventually(lambda: len(store.list_suppressions()) < 2, within=10)
    assert store.list_suppressions() == [in_force]


def test_hard_bounce_entries_expire_when_configured(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    mx.rcpt_replies["gone@example.org"] = "550 5.2.1 Mailbox disabled"
    ms = mailstrom(suppress_for=timedelta(days=30))
    ms.send_email(hello("gone@example.org"))
    results.wait_count(1)
    entry = ms.suppressed("gone@example.org")
    assert entry is not None and entry.expires_at == clock() + timedelta(days=30)


def test_a_hard_bounce_does_not_shorten_an_entry_added_during_its_delivery(
    mailstrom: MakeMailstrom, mx: Any, results: Results, clock: FakeClock
) -> None:
    """A complaint (no end) or an operator's entry added while a message to the address
    was on its way: the hard bounce that came back replaced it with an entry of
    suppress_for, and when that ran out the address got mail again."""
    mx.data_reply = NO_SUCH_USER
    mx.data_delay = 0.5  # the reply waits: the entry is added meanwhile
    ms = mailstrom(suppress_for=timedelta(days=30))
    ms.send_email(hello("carol@example.org"))
    mx.wait_for_received(1)
    ms.suppress("carol@example.org", "asked to stop", source=SuppressionSource.COMPLAINT)
    results.wait_count(1)
    assert results.all[0].state is FAILED
    entry = ms.suppressed("carol@example.org")
    assert entry is not None
    assert (entry.source, entry.reply, entry.expires_at) == (
        SuppressionSource.COMPLAINT,
        "asked to stop",
        None,
    )
    # An automatic one that ends sooner than the hard bounce's is replaced, as before.
    ms.unsuppress("carol@example.org")
    ms.send_email(hello("carol@example.org"))
    mx.wait_for_received(2)
    day = clock() + timedelta(days=1)
    ms.suppress("carol@example.org", "a day", source=SuppressionSource.COMPLAINT, expires_at=day)
    results.wait_count(2)
    entry = ms.suppressed("carol@example.org")
    assert entry is not None and entry.source is SuppressionSource.HARD_BOUNCE
    assert entry.expires_at == clock() + timedelta(days=30)
    # An operator's stays, however soon it ends: its end is the operator's choice.
    ms.unsuppress("carol@example.org")
    ms.send_email(hello("carol@example.org"))
    mx.wait_for_received(3)
    ms.suppress("carol@example.org", "a day off", expires_at=day)
    results.wait_count(3)
    entry = ms.suppressed("carol@example.org")
    assert entry is not None
    assert (entry.source, entry.reply, entry.expires_at) == (
        SuppressionSource.MANUAL,
        "a day off",
        day,
    )


def test_refusals_outside_the_configured_classes_do_not_suppress(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    mx.rcpt_replies["full@example.org"] = "552 5.2.2 Mailbox full"
    mx.rcpt_replies["spam@example.org"] = "550 5.7.1 Looks like spam"
    mx.rcpt_replies["nobody@example.org"] = NO_SUCH_USER
    ms = mailstrom(suppress_on=("5.7.1",))
    ms.send_email(hello("full@example.org", "spam@example.org", "nobody@example.org"))
    results.wait_count(3)
    assert [e.target for e in ms.suppressions()] == ["spam@example.org"]


@pytest.mark.parametrize("suppress_on", [None, ("5.7.1",)])
def test_qmails_status_ending_a_refusal_without_an_enhanced_code_decides(
    mailstrom: MakeMailstrom, mx: Any, results: Results, suppress_on: tuple[str, ...] | None
) -> None:
    """qmail-smtpd sends no RFC 2034 code but ends its text with one: the refusal of a
    mailbox that does not exist was not suppressed, nor one configured in suppress_on."""
    mx.enhancedstatuscodes = False
    mx.rcpt_replies["nobody@example.org"] = "550 sorry, no mailbox here by that name. (#5.1.1)"
    mx.rcpt_replies["relay@example.org"] = (
        "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
    )
    # Not at the end, or of another class than the reply: no status of this reply.
    mx.rcpt_replies["quoted@example.org"] = "550 sorry (#5.1.1) is what the last hop said"
    mx.rcpt_replies["classless@example.org"] = "550 sorry, no mailbox here by that name. (#4.1.1)"
    overrides = {} if suppress_on is None else {"suppress_on": suppress_on}
    ms = mailstrom(**overrides)
    to = ("nobody", "relay", "quoted", "classless")
    ms.send_email(hello(*(f"{name}@example.org" for name in to)))
    results.wait_count(4)
    expected = ["nobody@example.org"] if suppress_on is None else ["relay@example.org"]
    assert [e.target for e in ms.suppressions()] == expected


def test_exchange_onlines_refusal_of_an_address_it_does_not_have_suppresses(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    """Directory-based edge blocking (AS(201806281)): the recipient does not exist, said
    with 5.4.1, which is otherwise "no answer from host" and says nothing of the address."""
    mx.rcpt_replies["gone@example.org"] = (
        "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"
        " [DM6NAM11FT012.eop-nam11.prod.protection.outlook.com 2024-01-01T00:00:00.000Z]"
    )
    mx.rcpt_replies["other@example.org"] = "550 5.4.1 Unable to relay: no answer from host"
    mx.rcpt_replies["later@example.org"] = "450 4.4.1 Recipient address rejected: Access denied"
    ms = mailstrom()
    ms.send_email(hello("gone@example.org", "other@example.org", "later@example.org"))
    results.wait_count(3)
    assert [e.target for e in ms.suppressions()] == ["gone@example.org"]


def test_yahoos_refusal_of_an_account_it_does_not_have_suppresses(
    mailstrom: MakeMailstrom, mx: Any, results: Results
) -> None:
    """Yahoo and AOL refuse an address they have no account for with a 554 and no
    enhanced code, at the end of DATA ("554 delivery error: dd This user doesn't have a
    yahoo.com account"): the reply table knew it as "no such account: remove the
    address", and the address was never suppressed, getting every later message."""
    mx.enhancedstatuscodes = False
    mx.data_reply = (
        "554 delivery error: dd This user doesn't have a yahoo.com account"
        " (gone@example.org) [0] - mta1234.mail.ne1.yahoo.com"
    )
    mx.rcpt_replies["aol@example.org"] = (
        "554 delivery error: dd This user doesn't have a aol.com account (aol@example.org)"
    )
    mx.rcpt_replies["policy@example.org"] = "554 Message not accepted for policy reasons"
    ms = mailstrom()
    for to in ("gone@example.org", "aol@example.org", "policy@example.org"):
        ms.send_email(hello(to))
    done = results.wait_count(3)
    assert {r.address: r.state for r in done} == {
        "gone@example.org": FAILED,
        "aol@example.org": FAILED,
        "policy@example.org": FAILED,
    }
    assert [e.target for e in ms.suppressions()] == ["aol@example.org", "gone@example.org"]


def test_a_null_mx_domain_suppresses_the_address(
    mailstrom: MakeMailstrom, dns_server: LoopbackDNS, results: Results
) -> None:
    dns_server.mx("nomail.test", [(0, ".")])
    ms = mailstrom()
    ms.send_email(hello("who@nomail.test"))
    results.wait_count(1)
    entry = ms.suppressed("who@nomail.test")
    assert entry is not None
    assert "null MX" in entry.reply


def test_bad_targets_and_expiries_are_refused(mailstrom: MakeMailstrom, clock: FakeClock) -> None:
    ms = mailstrom()
    for bad in ("", "a b@example.org", "@example.org", "bob@", "x" * 400 + "@example.org"):
        with pytest.raises(InvalidSuppression):
            ms.suppress(bad)
    with pytest.raises(InvalidSuppression, match="future"):
        ms.suppress("bob@example.org", expires_at=clock())
    with pytest.raises(InvalidSuppression):
        ms.suppress("bob@example.org", "x" * 5000)
    assert ms.suppressions() == []


async def test_the_async_facade_has_the_same_api(
    dns_server: LoopbackDNS, mx: Any, tmp_path: Path
) -> None:
    config: Config = loopback_config(dns_server, mx.port)
    store = SQLiteStore(tmp_path / "q.db")
    async with AsyncMailstrom(config, store=store, worker=None) as ms:
        entry = await ms.suppress("bob@example.org", "by hand")
        assert entry.source is SuppressionSource.MANUAL
        assert await ms.suppressed("bob@example.org") == entry
        assert await ms.suppressions() == [entry]
        assert await ms.unsuppress("bob@example.org")
        assert await ms.suppressed("bob@example.org") is None
    store.close()  # a store passed in is the caller's to close


def test_an_entry_added_while_leased_mail_waits_for_its_connection_applies(
    mailstrom: MakeMailstrom, mx: Any, clock: FakeClock, results: Results
) -> None:
    """Suppression was looked at when the worker leased the mail only: a recipient put
    on the list while its message waited in the worker for the destination's connection
    (busy with a slow delivery) was sent to all the same, minutes later. A lease waiting
    longer than a minute is looked up again before its next transaction starts."""
    mx.data_delay = 1.0  # a slow delivery holds the destination's one connection
    ms = mailstrom(max_per_destination=1)
    ms.send_email(hello("first@example.org"))
    assert _until(lambda: len(mx.received) == 1)  # on the wire, its reply 1 s away
    waiting = ms.send_email(hello("bob@example.org"))
    assert _until(lambda: ms.worker_status.in_flight == 2)  # leased, queued behind it
    ms.suppress("bob@example.org", "asked to stop")
    clock.advance(timedelta(minutes=2))  # it waited past the minute
    results.wait_final({"first@example.org", "bob@example.org"})
    bob = ms.query_status(waiting).recipient("bob@example.org")
    assert bob.state is FAILED and bob.reason_class is ReasonClass.SUPPRESSED, bob
    assert [m.rcpt_tos for m in mx.received] == [("first@example.org",)]


def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # polling a status; nothing to wait on
    return predicate()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_a_suppressed_recipient_counts_no_attempt_in_its_status_or_event(
    mailstrom: MakeMailstrom, results: Results, tmp_path: Path, request: Any, kind: str
) -> None:
    """No server was asked for a recipient on the list: its status and its event say
    0 attempts and an empty history, as a cancel's does, not 1."""
    if kind == "memory":
        store: Store = MemoryStore()
    elif kind == "sqlite":
        store = SQLiteStore(tmp_path / "q.db")
    else:
        store = PostgresStore(request.getfixturevalue("postgres_url"))
    ms = mailstrom(store, events=True)
    ms.suppress("nobody@example.org", "550 5.1.1 earlier bounce")
    mid = ms.send_email(hello("nobody@example.org"))
    results.wait_final({"nobody@example.org"})

    nobody = ms.query_status(mid).recipient("nobody@example.org")
    assert nobody.reason_class is ReasonClass.SUPPRESSED
    [event] = [e for e in ms.store.read_events() if e.message_id == mid]
    ms.stop(timeout=5)
    store.close()  # before a PostgreSQL database asked for here is dropped
    assert (nobody.attempts, nobody.history) == (0, ())
    assert (event.state, event.attempt) == (FAILED, 0)
