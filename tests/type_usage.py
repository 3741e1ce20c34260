"""Type-checked (mypy --strict, in `make test`), not run: the public API as a user writes it.

If a change makes this file fail to type-check, users' code would break the same way.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from mailstrom import (
    AmbiguousMessageId,
    AsyncMailstrom,
    Attachment,
    Config,
    DestinationRule,
    DestinationThrottle,
    DKIMAlgorithm,
    DKIMConfig,
    DKIMKey,
    DKIMStatus,
    DNSConfig,
    Email,
    InvalidAddress,
    InvalidHeaderValue,
    InvalidMessage,
    InvalidShapingRule,
    Mailstrom,
    MessageStatus,
    MTASTSConfig,
    NoDKIMKey,
    RecipientState,
    RetryPolicy,
    ShapeRow,
    ShapingConfig,
    Suspension,
    TLSPolicy,
    prepare,
)
from mailstrom.stores import QueueFilter, SQLiteStore, open_store


def sync_usage() -> None:
    config = Config(
        helo_name="mail.example.com",
        tls=TLSPolicy.VERIFY,
        retry=RetryPolicy(min_delay=timedelta(minutes=1)),
        dns=DNSConfig(nameservers=("127.0.0.1",), port=5353),
    )
    # A store URL (or a path object): the facade opens the store and closes it on exit.
    with Mailstrom(config, store="mail.db") as ms:
        mid: str = ms.send_email(
            Email(
                from_="App <app@example.com>",
                to=["bob@example.org"],
                subject="Hi",
                text="Hello",
                attachments=[Attachment(filename="a.txt", content=b"x", content_type="text/plain")],
            )
        )
        status: MessageStatus = ms.query_status(mid)
        for r in status.recipients:
            if r.state is RecipientState.DEFERRED and r.next_attempt_at is not None:
                print(r.address, r.reason, r.attempts, r.next_attempt_at.isoformat())
        try:
            ms.send_email(b"From: a@b.example\r\n\r\nno recipients\r\n")
        except InvalidAddress as exc:
            print(exc.address)
        except InvalidMessage as exc:
            print(exc.reason)
        ms.retry(mid)
        ms.cancel(mid)
        print(ms.worker_status.running, ms.query_recent(5))
        snap = ms.metrics()
        delay = snap.worker.metrics.queue_delay
        print(snap.worker.metrics.attempts.get(("delivered", "none"), 0), delay and delay.count)
        if snap.queue is not None:
            print(snap.queue.by_state)
        # The operator's methods (issue 14): prefixes, many ids or a filter.
        try:
            full: str = ms.resolve_id(mid[:12])
        except AmbiguousMessageId as exc:
            print(exc.candidates)
        held: int = ms.hold([mid, full]) + ms.release(QueueFilter(held=True))
        print(held, ms.retry_many(mid), ms.cancel_many(QueueFilter(domain="example.org")))
        print(ms.purge(timedelta(days=7), state=RecipientState.DELIVERED))
        rows: list[ShapeRow] = ms.shape()
        ms.suspend("example.org", for_=timedelta(hours=2))
        suspended: list[Suspension] = ms.suspensions()
        print(rows, suspended, ms.resume("example.org"), ms.count(), ms.stats().held)
        final: MessageStatus = ms.wait(mid, timeout=30.0)
        print(final.state, ms.message_data(mid)[:10], ms.query(QueueFilter(limit=5)))


def dkim_usage() -> None:
    config = Config(
        helo_name="mail.example.com",
        message_id_domain="mail.example.com",
        dkim=DKIMConfig(
            keys=[
                DKIMKey(domain="example.com", selector="r", private_key="/etc/dkim/r.pem"),
                DKIMKey(
                    domain="example.com",
                    selector="e",
                    private_key=b"-----BEGIN PRIVATE KEY-----...",
                    algorithm=DKIMAlgorithm.ED25519_SHA256,
                ),
            ],
            required=True,
            expire=timedelta(days=7),
        ),
    )
    email = Email(
        from_="news@example.com",
        to="bob@example.org",
        text="x",
        unsubscribe_url="https://example.com/u?id=1",
        unsubscribe_mailto="unsubscribe@example.com",
        feedback_id="may:c1:news:example",
        auto_submitted="auto-generated",
    )
    try:
        prepared = prepare(email, dkim=config.dkim)
        for signature in prepared.dkim:
            print(signature.domain, signature.selector, signature.algorithm.value)
        print(config.dkim and config.dkim.keys[0].dns_record().strings)
        with Mailstrom(config, store=open_store("memory:")) as ms:
            outcome: DKIMStatus | None = ms.query_status(ms.send_email(email)).dkim
            if outcome is not None and not outcome.signed:
                print(outcome.reason)
            elif outcome is not None:
                print([str(s) for s in outcome.signatures])
    except NoDKIMKey as exc:
        print(exc.domains)
    except InvalidHeaderValue as exc:
        print(exc.header, exc.reason)


def mta_sts_usage() -> None:
    from datetime import UTC, datetime

    from mailstrom.tlsrpt.report import Reporter, build_report

    config = Config(helo_name="mail.example.com", mta_sts=MTASTSConfig(timeout=5.0))
    store = SQLiteStore("mail.db")
    try:
        cached = store.mta_sts_policy("example.org")
        if cached is not None and cached.fresh(datetime.now(UTC)):
            print(cached.policy.mode.value, cached.policy.allows("mx1.example.org"))
        day = datetime.now(UTC).date()
        reporter = Reporter(organization="Example", contact="tls@example.com", submitter="mx")
        report = build_report("example.org", day, store.tls_sessions(day), reporter)
        print(config.mta_sts, report.filename("mx"), len(report.gzipped()))
    finally:
        store.close()


def queue_attribute_usage() -> None:
    from datetime import UTC, datetime

    from mailstrom import InvalidQueueAttribute, Lane, QueueFilter, SuppressionSource

    account = Lane(name="account", bypass_suppression=(SuppressionSource.HARD_BOUNCE,))
    config = Config(
        lanes=(account, Lane(name="transactional"), Lane(name="bulk", share=0.5)),
        default_priority="transactional",
        idempotency_window=timedelta(hours=6),
    )
    with Mailstrom(config, store=Path("/var/lib/app/mail.db")) as ms:
        try:
            mid = ms.send_email(
                Email(from_="a@example.com", to="b@example.org", text="x", tags=["receipt"]),
                metadata={"order": "42"},
                priority="bulk",
                send_at=datetime(2030, 1, 1, 9, 0, tzinfo=UTC),
                max_age=timedelta(hours=2),
                idempotency_key="order-42",
            )
        except InvalidQueueAttribute as exc:
            print(exc.field, exc.reason)
            return
        status = ms.query_status(mid)
        tags: tuple[str, ...] = status.tags
        order: str | None = status.metadata.get("order")
        print(tags, order, status.priority, status.send_at, status.expires_at)
        for found in ms.query(QueueFilter(tag="receipt", limit=10)):
            print(found.id, found.idempotency_key)


async def async_usage() -> None:
    async with AsyncMailstrom(Config(), store="memory:") as ms:
        mid = await ms.send_email(Email(from_="a@example.com", to="b@example.org", text="x"))
        status = await ms.query_status(mid)
        print(status.state.is_final, (await ms.metrics()).worker.transactions)
        waited: MessageStatus = await ms.wait(mid[:12], timeout=5.0)
        changed: int = await ms.hold(mid) + await ms.release([mid])
        print(waited.held, changed, await ms.shape(), await ms.suspensions())


if __name__ == "__main__":
    asyncio.run(async_usage())


def shaping_usage() -> None:
    config = Config(
        helo_name="mail.example.com",
        shaping=ShapingConfig(
            rules=(
                DestinationRule(match="*.google.com", max_connections=5, messages_per_minute=120),
                DestinationRule(match="example.org", messages_per_hour=500.0),
            ),
            pause_first=timedelta(minutes=2),
        ),
    )
    try:
        DestinationRule(match="mail.*.example", max_connections=0)
    except InvalidShapingRule as exc:
        print(exc.pattern, exc.field, exc.reason)
    with Mailstrom(config, store="mail.db") as ms:
        pauses: list[DestinationThrottle] = ms.throttled_destinations()
        for pause in pauses:
            print(pause.destination, pause.until.isoformat(), pause.strikes, pause.reply)
        for r in ms.query_status("0" * 32).recipients:
            if r.throttle is not None:
                print(r.throttle_note, r.throttle.until)


def suppression_and_bounce_usage() -> None:
    from datetime import UTC, datetime

    from mailstrom import DSN, InvalidSuppression, Notify, Return, Suppression, SuppressionSource
    from mailstrom.bounces import apply_report, parse_report

    config = Config(helo_name="mail.example.com", suppress_for=timedelta(days=180))
    with Mailstrom(config, store="mail.db") as ms:
        try:
            entry: Suppression = ms.suppress("bob@example.org", "asked to stop")
        except InvalidSuppression as exc:
            print(exc.reason)
        else:
            print(entry.reason, entry.source is SuppressionSource.MANUAL)
        found: Suppression | None = ms.suppressed("bob@example.org")
        print(found, ms.suppressions(after="", limit=10), ms.unsuppress("bob@example.org"))
        ms.send_email(
            Email(from_="a@example.com", to=["b@example.org"], text="x"),
            envelope_from="bounces+{token}@example.com",
            dsn=DSN(notify=(Notify.FAILURE, Notify.DELAY), ret=Return.HEADERS),
        )
        report = parse_report(b"...")
        if report is not None:
            for outcome in apply_report(ms.store, report, now=datetime.now(UTC)):
                print(outcome.action, outcome.message_id, outcome.suppressed)


async def async_suppression_usage() -> None:
    async with AsyncMailstrom(Config(), worker=None) as ms:
        await ms.suppress("example.net")
        print(await ms.suppressed("a@example.net"), await ms.suppressions())
