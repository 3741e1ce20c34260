"""MTA-STS discovery against a loopback DNS server and a loopback HTTPS server (trustme):
fetch, cache in the store, refetch on a new id, keep the cache when the fetch fails, and
ignore bad policy files with a logged reason."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import mailstrom
from mailstrom import Config
from mailstrom.config import MTASTSConfig
from mailstrom.errors import LocalResourceShortage
from mailstrom.mtasts import CachedPolicy, Mode, PolicyError
from mailstrom.mtasts import https as mtasts_https
from mailstrom.mtasts.policy import parse_policy
from mailstrom.mtasts.source import PolicySource
from mailstrom.routing import make_resolver
from mailstrom.stores import MemoryStore, SQLiteStore, Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import Answer, HTTPSFactory, HTTPSServer
from tests.support.loopback_only import loopback_only

POLICY = "version: STSv1\nmode: enforce\nmx: mx1.test\nmx: *.example.org\nmax_age: 86400\n"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def https(https_server: HTTPSFactory) -> HTTPSServer:
    server = https_server()
    server.policy(POLICY)
    return server


def make_source(
    dns: LoopbackDNS,
    https: HTTPSServer,
    context: ssl.SSLContext,
    clock: Clock,
    store: Store,
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] | None = None,
    recheck_seconds: float = 0,
    *,
    one_clock: bool = False,
) -> PolicySource:
    """``one_clock``: the source's monotonic clock is ``clock`` too (a test moves both)."""
    settings = MTASTSConfig(port=https.port, tls_context=context, recheck=recheck_seconds)
    config = Config(dns=dns.dns_config, allow_loopback=True, mta_sts=settings)
    return PolicySource(
        config,
        store,
        resolver=make_resolver(config.dns),
        clock=clock,
        on_failure=(lambda *a: failures.append(a)) if failures is not None else None,
        monotonic=(lambda: clock.now.timestamp()) if one_clock else time.monotonic,
    )


@pytest.fixture
def zone(dns_server: LoopbackDNS) -> LoopbackDNS:
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    return dns_server


async def test_policy_fetched_cached_and_reused(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    store = MemoryStore()
    source = make_source(zone, https, client_tls_context, clock, store)
    cached = await source.policy("example.org")
    assert cached is not None
    assert cached.policy_id == "one"
    assert cached.policy.mode is Mode.ENFORCE
    assert cached.policy.allows("mx1.test")
    assert store.mta_sts_policy("example.org") == cached
    request = https.requests[0]
    assert request.headers["Host"] == f"mta-sts.example.org:{https.port}"
    # Same id, policy fresh: no second fetch, even for another worker sharing the store.
    other = make_source(zone, https, client_tls_context, clock, store)
    assert await other.policy("example.org") == cached
    assert await source.policy("example.org") == cached
    assert https.count() == 1


async def test_new_id_is_refetched(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    store = MemoryStore()
    source = make_source(zone, https, client_tls_context, clock, store)
    await source.policy("example.org")
    zone.txt("_mta-sts.example.org", "v=STSv1; id=two;")
    https.policy(POLICY.replace("enforce", "testing"))
    cached = await source.policy("example.org")
    assert cached is not None and cached.policy_id == "two"
    assert cached.policy.mode is Mode.TESTING
    assert https.count() == 2


async def test_aged_out_policy_is_refetched(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    source = make_source(zone, https, client_tls_context, clock, MemoryStore())
    await source.policy("example.org")
    clock.now += timedelta(seconds=86401)
    await source.policy("example.org")
    assert https.count() == 2


async def test_cached_policy_used_when_https_server_is_down(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    https = https_server()
    https.policy(POLICY)
    store = MemoryStore()
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, store, failures)
    first = await source.policy("example.org")
    https.stop()
    zone.txt("_mta-sts.example.org", "v=STSv1; id=two;")  # forces a refresh, which fails
    with caplog.at_level(logging.WARNING, logger="mailstrom.mtasts"):
        again = await source.policy("example.org")
    assert again == first
    assert store.mta_sts_policy("example.org") == first
    [(domain, error, applied)] = failures
    assert (domain, error.result_type, applied) == ("example.org", "sts-policy-fetch-error", first)
    assert "cached policy (id one) still applies" in caplog.text


async def test_no_record_no_policy_no_fetch(
    dns_server: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    source = make_source(dns_server, https, client_tls_context, clock, MemoryStore())
    assert await source.policy("example.org") is None
    assert https.count() == 0


async def test_dns_failure_keeps_the_cached_policy(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    source = make_source(zone, https, client_tls_context, clock, MemoryStore())
    first = await source.policy("example.org")
    zone.servfail("_mta-sts.example.org")
    fresh = make_source(zone, https, client_tls_context, clock, source._store)  # type: ignore[arg-type]
    assert await fresh.policy("example.org") == first


async def test_a_failed_lookup_of_one_address_family_leaves_the_other_to_fetch_from(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """The AAAA query of mta-sts.<domain> failing (SERVFAIL: a broken DNSSEC signature
    on one type, a middlebox dropping AAAA) ended the fetch, though the A query had
    found the host: the policy went unused for as long as the AAAA lookup kept failing.
    The fetch tries the addresses that were found; a failed lookup matters only when
    nothing else was found (as for an MX host's addresses)."""
    zone.servfail("mta-sts.example.org", "AAAA")
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, MemoryStore(), failures)
    cached = await source.policy("example.org")
    assert failures == []
    assert cached is not None and cached.policy.mode is Mode.ENFORCE
    assert https.count() == 1


async def test_a_failed_address_lookup_with_nothing_else_found_says_so(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    zone.delete("mta-sts.example.org")
    zone.servfail("mta-sts.example.org", "A")
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, MemoryStore(), failures)
    assert await source.policy("example.org") is None
    [(_, error, _)] = failures
    assert "address lookup of mta-sts.example.org failed" in error.reason, error.reason
    assert https.count() == 0


async def test_a_referral_for_the_record_is_a_failed_lookup(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """A server that does not resolve recursively answers with a referral (NOERROR, no
    records, NS records in the authority section), which says nothing of whether the
    record exists: read as "no _mta-sts record", the domain had no policy, and a
    REQUIRETLS message to it went without waiting for the one it may have (RFC 8689
    §4.2.1). It is a failed lookup, as SERVFAIL is."""
    zone.referral("_mta-sts.example.org")
    source = make_source(zone, https, client_tls_context, clock, MemoryStore())
    assert await source.policy("example.org") is None
    unknown = source.unknown("example.org")
    assert unknown is not None and "referral" in unknown, unknown
    assert https.count() == 0


async def test_a_referral_for_the_policy_hosts_addresses_is_a_failed_lookup(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """As for the record: a referral for mta-sts.<domain> is no "no address" but a
    lookup that failed, and the fetch says so."""
    zone.delete("mta-sts.example.org")
    zone.referral("mta-sts.example.org")
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, MemoryStore(), failures)
    assert await source.policy("example.org") is None
    [(_, error, _)] = failures
    assert "address lookup of mta-sts.example.org failed" in error.reason, error.reason
    assert "referral" in error.reason, error.reason
    assert https.count() == 0


@pytest.mark.parametrize(
    ("answer", "result_type", "reason"),
    [
        (Answer(body=POLICY.replace("STSv1", "STSv2").encode()), "sts-policy-invalid", "version"),
        (Answer(body=POLICY.replace("enforce", "strict").encode()), "sts-policy-invalid", "mode"),
        (Answer(body=POLICY.encode() + b"#" * 70_000), "sts-policy-invalid", "larger than"),
        (
            Answer(status=301, headers={"Location": "https://elsewhere.example/p.txt"}),
            "sts-policy-fetch-error",
            "redirect",
        ),
        (Answer(status=404), "sts-policy-fetch-error", "HTTP 404"),
        (
            Answer(body=POLICY.encode(), headers={"Content-Type": "text/html"}),
            "sts-policy-invalid",
            "text/plain",
        ),
        # Never inflated (a few KB of "gzip, gzip" are gigabytes), though we asked identity.
        (
            Answer(
                body=gzip.compress(POLICY.encode()),
                headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
            ),
            "sts-policy-fetch-error",
            "Content-Encoding 'gzip'",
        ),
    ],
)
async def test_bad_policy_files_are_ignored_with_a_reason(
    zone: LoopbackDNS,
    https: HTTPSServer,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    answer: Answer,
    result_type: str,
    reason: str,
) -> None:
    https.routes["/.well-known/mta-sts.txt"] = answer
    store = MemoryStore()
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, store, failures)
    with caplog.at_level(logging.WARNING, logger="mailstrom.mtasts"):
        assert await source.policy("example.org") is None
    assert store.mta_sts_policy("example.org") is None
    [(_, error, _)] = failures
    assert error.result_type == result_type
    assert reason in error.reason
    assert "MTA-STS policy of example.org ignored" in caplog.text
    assert https.count() == 1  # the redirect was not followed


async def test_certificate_for_another_name_is_refused(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
) -> None:
    https = https_server(names=("mta-sts.other.test",))
    https.policy(POLICY)
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, MemoryStore(), failures)
    assert await source.policy("example.org") is None
    [(_, error, _)] = failures
    assert error.result_type == "sts-webpki-invalid"


async def test_untrusted_certificate_is_refused(
    zone: LoopbackDNS, https: HTTPSServer, clock: Clock
) -> None:
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, ssl.create_default_context(), clock, MemoryStore(), failures)
    assert await source.policy("example.org") is None
    [(_, error, _)] = failures
    assert error.result_type == "sts-webpki-invalid"


async def test_unicode_domain_is_looked_up_as_its_a_label(
    dns_server: LoopbackDNS, https_server: HTTPSFactory, client_tls_context: ssl.SSLContext
) -> None:
    https = https_server(names=("mta-sts.xn--bcher-kva.example",))
    https.policy(POLICY)
    dns_server.txt("_mta-sts.xn--bcher-kva.example", "v=STSv1; id=one;")
    dns_server.a("mta-sts.xn--bcher-kva.example", "127.0.0.1")
    store = MemoryStore()
    source = make_source(dns_server, https, client_tls_context, Clock(), store)
    cached = await source.policy("bücher.example")
    assert cached is not None and cached.domain == "xn--bcher-kva.example"
    assert store.mta_sts_policy("xn--bcher-kva.example") == cached
    assert await source.policy("[127.0.0.1]") is None


async def test_domains_without_a_record_are_remembered_for_recheck(
    dns_server: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext
) -> None:
    source = make_source(
        dns_server, https, client_tls_context, Clock(), MemoryStore(), recheck_seconds=300
    )
    for _ in range(3):
        assert await source.policy("example.org") is None
    assert dns_server.queries("_mta-sts.example.org", "TXT") == 1


async def test_a_domain_too_long_for_an_mta_sts_record_has_none(
    dns_server: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext
) -> None:
    """A 247-character domain is a name (it has MX records), but "_mta-sts." before it
    makes one over 255 octets: no record can exist. That was a failed lookup, so a
    REQUIRETLS message to the domain waited for a policy that cannot be."""
    domain = ".".join(["a" * 60] * 4)[:243] + ".org"
    assert len(domain) == 247
    source = make_source(
        dns_server, https, client_tls_context, Clock(), MemoryStore(), recheck_seconds=300
    )
    assert await source.policy(domain) is None
    assert source.unknown(domain) is None
    assert https.count() == 0


async def test_a_remembered_policy_is_not_applied_past_its_max_age(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """A worker remembers its answer for ``recheck`` seconds; a policy whose max_age is
    shorter was applied for all of them, after it had expired and with no fetch since."""
    https.policy(POLICY.replace("max_age: 86400", "max_age: 600"))
    zone.txt("_mta-sts.example.org", "v=STSv1; id=one;", ttl=86400)
    source = make_source(
        zone, https, client_tls_context, clock, MemoryStore(), recheck_seconds=3600, one_clock=True
    )
    cached = await source.policy("example.org")
    assert cached is not None and cached.expires_at == clock.now + timedelta(seconds=600)
    https.stop()
    clock.now += timedelta(seconds=601)
    assert await source.policy("example.org") is None  # expired, and no fetch works


async def test_policy_is_refreshed_before_it_expires(
    zone: LoopbackDNS, https_server: HTTPSFactory, client_tls_context: ssl.SSLContext
) -> None:
    https = https_server()
    https.policy(POLICY)  # max_age 86400: refreshed after half a day, id unchanged
    clock = Clock()
    store = MemoryStore()
    source = make_source(zone, https, client_tls_context, clock, store)
    first = await source.policy("example.org")
    assert first is not None
    clock.now += timedelta(hours=11)
    assert await source.policy("example.org") == first
    assert https.count() == 1
    clock.now += timedelta(hours=2)
    again = await source.policy("example.org")
    assert https.count() == 2
    assert again is not None and again.fetched_at == clock.now
    assert store.mta_sts_policy("example.org") == again
    # A refresh that fails keeps the policy, which still applies until it expires.
    https.stop()
    clock.now += timedelta(hours=13)
    assert await source.policy("example.org") == again
    clock.now += timedelta(hours=12)
    assert await source.policy("example.org") is None  # expired, and no fetch works


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_policy_cached_by_a_clock_since_set_back_lapses_its_max_age_after_now(
    zone: LoopbackDNS,
    https: HTTPSServer,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
    tmp_path: Path,
    kind: str,
) -> None:
    """A policy fetched while the clock was a year ahead (set back since) was really
    fetched before now, so its max_age (a day) lets it apply a day from now at most. While
    its refresh failed, it applied until the expiry the wrong clock gave it: a year on."""
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    ahead = CachedPolicy.of(
        "example.org", "one", parse_policy(POLICY.encode()), clock.now + timedelta(days=365)
    )
    store.save_mta_sts_policy(ahead)
    https.stop()
    source = make_source(zone, https, client_tls_context, clock, store)
    kept = await source.policy("example.org")
    assert kept is not None and kept.policy == ahead.policy  # applies: the refresh failed
    assert kept.expires_at == clock.now + timedelta(days=1)
    assert store.mta_sts_policy("example.org") == kept  # so for every worker
    clock.now += timedelta(hours=23)
    assert await source.policy("example.org") == kept
    clock.now += timedelta(hours=1)
    assert await source.policy("example.org") is None
    # A worker started now (on the same database) finds it expired too.
    reopened = store if kind == "memory" else SQLiteStore(tmp_path / "q.db")
    restarted = make_source(zone, https, client_tls_context, clock, reopened)
    assert await restarted.policy("example.org") is None
    for each in {id(store): store, id(reopened): reopened}.values():
        each.close()


async def test_a_set_back_policy_whose_refresh_failed_is_fetched_again_after_recheck(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """Kept with its expiry bounded once its refresh failed, a policy a clock since set
    back fetched is still due for one: the next ``recheck`` fetches it again (the domain's
    new MX host, under the same id), not half its lifetime (12 hours) later."""
    store = MemoryStore()
    policy = parse_policy(POLICY.encode())
    store.save_mta_sts_policy(
        CachedPolicy.of("example.org", "one", policy, clock.now + timedelta(days=365))
    )
    https.policy(POLICY, status=503)
    source = make_source(
        zone, https, client_tls_context, clock, store, recheck_seconds=300, one_clock=True
    )
    kept = await source.policy("example.org")
    assert kept is not None and kept.expires_at == clock.now + timedelta(days=1)
    assert https.count() == 1
    # A second failure moves the expiry no further.
    clock.now += timedelta(seconds=301)
    assert await source.policy("example.org") == kept
    assert https.count() == 2 and store.mta_sts_policy("example.org") == kept
    https.policy(POLICY.replace("mx: mx1.test", "mx: mx2.test"))
    clock.now += timedelta(seconds=301)
    again = await source.policy("example.org")
    assert https.count() == 3
    assert again is not None and again.fetched_at == clock.now
    assert again.policy.allows("mx2.test") and not again.policy.allows("mx1.test")


async def test_a_set_back_policy_kept_is_not_saved_over_one_another_worker_fetched(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """The rebased policy is saved only over the row it came from: another worker whose
    fetch succeeded while this one's failed saved the newer policy, which stays."""
    store = MemoryStore()
    policy = parse_policy(POLICY.encode())
    ahead = CachedPolicy.of("example.org", "one", policy, clock.now + timedelta(days=365))
    store.save_mta_sts_policy(ahead)
    newer = CachedPolicy.of("example.org", "two", policy, clock.now)
    reads = 0

    async def store_call(method: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        if method == store.mta_sts_policy:
            reads += 1
            if reads == 2:  # after this worker's fetch failed
                store.save_mta_sts_policy(newer)
        return method(*args, **kwargs)

    https.stop()
    settings = MTASTSConfig(port=https.port, tls_context=client_tls_context, recheck=0)
    config = Config(dns=zone.dns_config, allow_loopback=True, mta_sts=settings)
    source = PolicySource(
        config, store, resolver=make_resolver(config.dns), clock=clock, store_call=store_call
    )
    kept = await source.policy("example.org")
    assert kept is not None and kept.expires_at == clock.now + timedelta(days=1)
    assert store.mta_sts_policy("example.org") == newer
    assert reads == 2


@pytest.mark.parametrize("record", [None, "v=STSv1; id=a;|v=STSv1; id=b;"])
async def test_policy_is_refreshed_before_it_expires_without_its_record(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, record: str | None
) -> None:
    """RFC 8461 §3.3: senders SHOULD refresh cached policies before they expire, and §8.3
    withdraws a policy with mode none, not by removing the record, which §10.2 says an
    attacker who blocks DNS can suppress. With the record gone (or unusable), the cached
    policy was applied but never refreshed, so it lapsed at max_age though the policy
    host still served it."""
    clock = Clock()
    store = MemoryStore()
    source = make_source(zone, https, client_tls_context, clock, store)
    first = await source.policy("example.org")
    assert first is not None
    if record is None:
        zone.delete("_mta-sts.example.org")
    else:
        zone.txt("_mta-sts.example.org", *record.split("|"))
    clock.now += timedelta(hours=11)
    assert await source.policy("example.org") == first
    assert https.count() == 1
    clock.now += timedelta(hours=2)
    again = await source.policy("example.org")
    assert https.count() == 2
    assert again is not None and again.fetched_at == clock.now and again.policy_id == "one"
    assert store.mta_sts_policy("example.org") == again
    clock.now += timedelta(hours=20)  # past the first fetch's max_age
    assert await source.policy("example.org") is not None
    # A policy host that answers no more lets the policy lapse at its max_age.
    https.stop()
    clock.now += timedelta(days=2)
    assert await source.policy("example.org") is None


async def test_a_record_reached_through_a_cname_is_remembered_no_longer_than_the_cname(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext, clock: Clock
) -> None:
    """A domain whose MTA-STS is run by a provider points ``_mta-sts`` at the provider's
    record with a CNAME; the answer is remembered for its shortest TTL, the CNAME's. It
    was remembered for the TXT record's own TTL (up to ``recheck``), so a moved CNAME (a
    new policy id) went unseen for as long."""
    zone.cname("_mta-sts.example.org", "_mta-sts.old.provider.test", ttl=60)
    zone.txt("_mta-sts.old.provider.test", "v=STSv1; id=one;", ttl=86400)
    zone.txt("_mta-sts.new.provider.test", "v=STSv1; id=two;", ttl=86400)
    source = make_source(
        zone, https, client_tls_context, clock, MemoryStore(), recheck_seconds=3600, one_clock=True
    )
    first = await source.policy("example.org")
    assert first is not None and first.policy_id == "one"
    zone.cname("_mta-sts.example.org", "_mta-sts.new.provider.test", ttl=60)
    https.policy(POLICY.replace("enforce", "testing"))
    clock.now += timedelta(seconds=59)
    assert await source.policy("example.org") == first
    clock.now += timedelta(seconds=2)
    moved = await source.policy("example.org")
    assert moved is not None and moved.policy_id == "two"
    assert moved.policy.mode is Mode.TESTING


@pytest.mark.parametrize("address", ["10.0.0.5", "192.168.1.1", "fd00::1"])
async def test_a_policy_host_on_a_private_network_is_refused_without_connecting(
    dns_server: LoopbackDNS, clock: Clock, address: str
) -> None:
    """The policy host is the recipient domain's to name: mta-sts.<domain> on 10.0.0.5
    had the worker fetch from its own network, and the outcome of that connection went
    into the failure reason, which TLS reports send back to that domain (a scanner of the
    sender's network). Refused as TLS report POSTs are, before connecting."""
    dns_server.txt("_mta-sts.evil.test", "v=STSv1; id=one;")
    if ":" in address:
        dns_server.aaaa("mta-sts.evil.test", address)
    else:
        dns_server.a("mta-sts.evil.test", address)
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    config = Config(dns=dns_server.dns_config, mta_sts=MTASTSConfig(port=8443, recheck=0))
    source = PolicySource(
        config,
        MemoryStore(),
        resolver=make_resolver(config.dns),
        clock=clock,
        on_failure=lambda *a: failures.append(a),
    )
    with loopback_only():
        assert await source.policy("evil.test") is None
    [(_, error, _)] = failures
    assert f"{address} (private)" in error.reason, error.reason


async def test_a_policy_with_a_bom_a_long_max_age_and_a_bad_mx_line_still_applies(
    zone: LoopbackDNS,
    https: HTTPSServer,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each of these refused the whole policy: the domain had none, so mail went to any
    # MX host over any TLS. What is lenient now loosens nothing: the BOM means nothing,
    # the lifetime is capped at the RFC's largest, and the bad pattern allows no host.
    https.policy(
        b"\xef\xbb\xbfversion: STSv1\r\nmode: enforce\r\nmx: .example.org\r\n"
        b"mx: mx1.test\r\nmax_age: 99999999\r\n"
    )
    store = MemoryStore()
    failures: list[tuple[str, PolicyError, CachedPolicy | None]] = []
    source = make_source(zone, https, client_tls_context, clock, store, failures)
    with caplog.at_level(logging.WARNING, logger="mailstrom.mtasts"):
        cached = await source.policy("example.org")
    assert failures == []
    assert cached is not None and cached.policy.mode is Mode.ENFORCE
    assert cached.policy.mx == ("mx1.test",)
    assert cached.policy.allows("mx1.test") and not cached.policy.allows("mx.example.org")
    assert cached.expires_at == clock.now + timedelta(seconds=31_557_600)
    assert store.mta_sts_policy("example.org") == cached
    assert "ignored" in caplog.text and "'.example.org'" in caplog.text


def source_for(
    dns: LoopbackDNS,
    port: int,
    context: ssl.SSLContext,
    clock: Clock,
    source_address: str | None = None,
) -> PolicySource:
    settings = MTASTSConfig(port=port, tls_context=context, recheck=0)
    config = Config(
        dns=dns.dns_config, allow_loopback=True, mta_sts=settings, source_address=source_address
    )
    return PolicySource(config, MemoryStore(), resolver=make_resolver(config.dns), clock=clock)


@pytest.mark.parametrize(
    "answer",
    [
        Answer(status=404, body=b"not here"),
        Answer(status=503, body=b"maintenance"),
        Answer(status=301, headers={"Location": "https://elsewhere.example/"}),
    ],
)
async def test_a_non_200_answer_at_one_address_leaves_the_next_to_fetch_from(
    dns_server: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
    answer: Answer,
) -> None:
    # RFC 8461 §3.3: a non-200 answer is no policy from that server, a failed fetch.
    # Failed connections went on to the host's next address, but a node that answered
    # 404 or 503 (one of a load-balanced pair in maintenance, say) ended the fetch: the
    # domain had no policy for this worker (enforce skipped) while its other node served one.
    good = https_server()
    good.policy(POLICY)
    bad = https_server(host="127.0.0.2", port=good.port)
    bad.routes["/.well-known/mta-sts.txt"] = answer
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.2", "127.0.0.1")
    source = source_for(dns_server, good.port, client_tls_context, clock)
    found = await source.policy("example.org")
    assert found is not None and found.policy.mode is Mode.ENFORCE
    assert (bad.count(), good.count()) == (1, 1)


async def test_every_non_200_answer_is_a_fetch_error_naming_the_last(
    dns_server: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
) -> None:
    first = https_server()
    first.routes["/.well-known/mta-sts.txt"] = Answer(status=503)
    second = https_server(host="127.0.0.2", port=first.port)  # 404 for every path
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.1", "127.0.0.2")
    failures: list[PolicyError] = []
    settings = MTASTSConfig(port=first.port, tls_context=client_tls_context, recheck=0)
    config = Config(dns=dns_server.dns_config, allow_loopback=True, mta_sts=settings)
    source = PolicySource(
        config,
        MemoryStore(),
        resolver=make_resolver(config.dns),
        clock=clock,
        on_failure=lambda _, error, __: failures.append(error),
    )
    assert await source.policy("example.org") is None
    [error] = failures
    assert error.result_type == "sts-policy-fetch-error"
    assert "HTTP 404" in error.reason, error.reason
    assert (first.count(), second.count()) == (1, 1)


async def test_the_fetch_keeps_to_the_source_address_and_its_ip_version(
    dns_server: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    clock: Clock,
) -> None:
    # source_address binds every outgoing connection, and routes keep to its IP version.
    # The policy fetch did neither: with source_address ::1 it fetched from the policy
    # host's IPv4 address, over a route (and from an address) the operator did not give.
    ipv6 = https_server(host="::1")
    ipv6.policy(POLICY)
    ipv4 = https_server(port=ipv6.port)
    ipv4.policy(POLICY.replace("enforce", "testing"))
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    dns_server.aaaa("mta-sts.example.org", "::1")
    source = source_for(dns_server, ipv6.port, client_tls_context, clock, source_address="::1")
    found = await source.policy("example.org")
    assert found is not None and found.policy.mode is Mode.ENFORCE
    assert (ipv4.count(), ipv6.count()) == (0, 1)
    # Bound to it: the server sees the request come from the source address.
    ipv4.policy(POLICY)
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=two;")
    source = source_for(dns_server, ipv4.port, client_tls_context, clock, "127.0.0.5")
    found = await source.policy("example.org")
    assert found is not None and found.policy.mode is Mode.ENFORCE
    assert [r.client for r in ipv4.requests] == ["127.0.0.5"]


async def test_policy_is_refreshed_before_it_expires_while_its_record_cannot_be_looked_up(
    zone: LoopbackDNS, https: HTTPSServer, client_tls_context: ssl.SSLContext
) -> None:
    """RFC 8461 §3.3 asks senders to refresh a cached policy before it expires, and §10.2
    names an attacker who blocks DNS. With the ``_mta-sts`` lookup failing (SERVFAIL), the
    cached policy was applied but never refreshed, so it lapsed at its max_age although
    the policy host still served it. It is refreshed under its id, as without a record;
    a policy past its max_age is not applied (§5.1), whatever DNS does."""
    clock = Clock()
    store = MemoryStore()
    source = make_source(zone, https, client_tls_context, clock, store)
    first = await source.policy("example.org")
    assert first is not None
    zone.servfail("_mta-sts.example.org", "TXT")
    clock.now += timedelta(hours=11)
    assert await source.policy("example.org") == first
    assert https.count() == 1
    clock.now += timedelta(hours=2)
    again = await source.policy("example.org")
    assert https.count() == 2
    assert again is not None and again.fetched_at == clock.now and again.policy_id == "one"
    assert store.mta_sts_policy("example.org") == again
    clock.now += timedelta(hours=20)  # past the first fetch's max_age
    assert await source.policy("example.org") is not None
    # A policy host that answers no more lets the policy lapse at its max_age.
    https.stop()
    clock.now += timedelta(days=2)
    assert await source.policy("example.org") is None
    assert source.unknown("example.org") is not None


def _short_of_descriptors(ca_file: str | None = None) -> ssl.SSLContext:
    raise LocalResourceShortage(
        "reading the CA certificates", OSError(errno.EMFILE, "Too many open files")
    )


async def test_a_fetch_short_of_descriptors_applies_a_fresh_cached_policy_and_tells_nothing(
    zone: LoopbackDNS,
    https: HTTPSServer,
    client_tls_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The system's CAs not read for want of a descriptor (EMFILE) when a refresh is
    due: the shortage escaped the source, so the fresh cached policy was not applied,
    where a TXT lookup short of descriptors applies it. It applies; nothing is reported
    or remembered; with no policy cached the shortage is raised (the delivery waits)."""
    clock = Clock()
    store = MemoryStore()
    cached = await make_source(zone, https, client_tls_context, clock, store).policy("example.org")
    assert cached is not None
    monkeypatch.setattr(mtasts_https, "default_context", _short_of_descriptors)
    settings = MTASTSConfig(port=https.port, recheck=0)
    config = Config(dns=zone.dns_config, allow_loopback=True, mta_sts=settings)
    failures: list[Any] = []
    for policy_store in (store, MemoryStore()):
        source = PolicySource(
            config,
            policy_store,
            resolver=make_resolver(config.dns),
            clock=clock,
            on_failure=lambda *a: failures.append(a),
        )
        clock.now = datetime(2030, 1, 1, 13, tzinfo=UTC)  # the cached one's refresh is due
        if policy_store is store:
            assert await source.policy("example.org") == cached
        else:
            with pytest.raises(LocalResourceShortage, match="Too many open files"):
                await source.policy("example.org")
        assert source.known("example.org") == (False, None)
        assert source.unknown("example.org") is None
    assert failures == []
    assert https.count() == 1


_SHORT_FETCH = """
import asyncio, os, resource, sys
from mailstrom.config import DNSConfig, MTASTSConfig
from mailstrom.errors import LocalResourceShortage
from mailstrom.mtasts.fetch import fetch_policy
from mailstrom.mtasts.policy import PolicyError
from mailstrom.routing import make_resolver
from mailstrom.routing.policy import RoutePolicy
import httpx, httpcore, anyio  # loaded while descriptors last

async def main() -> None:
    resolver = make_resolver(DNSConfig(nameservers=("127.0.0.1",), port=int(sys.argv[1])))
    settings = MTASTSConfig(port=int(sys.argv[2]), timeout=5)
    policy = RoutePolicy(allow_loopback=True)
    try:  # a fetch first, which loads what one needs
        await fetch_policy("example.org", resolver=resolver, config=settings, route_policy=policy)
    except PolicyError:
        pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        await fetch_policy("example.org", resolver=resolver, config=settings, route_policy=policy)
    except LocalResourceShortage as exc:
        print("shortage:", exc)
    except PolicyError as exc:
        print("policy error:", exc.code, exc.reason)

asyncio.run(main())
"""


def test_a_fetch_with_no_descriptor_for_its_lookup_is_a_shortage_not_the_domains_failure(
    zone: LoopbackDNS, https: HTTPSServer, tmp_path: Path
) -> None:
    """Out of descriptors, the policy host's address lookup has no socket: that was
    "sts-fetch-no-address", counted against the domain and, with no policy cached,
    remembered as none (mail then went as if the domain had no policy). It is this
    host's shortage."""
    script = tmp_path / "short.py"
    script.write_text(_SHORT_FETCH)
    done = subprocess.run(
        [sys.executable, str(script), str(zone.port), str(https.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(mailstrom.__file__).parents[1])},
    )
    assert done.stdout.startswith("shortage: local resource shortage: MTA-STS: address lookup"), (
        done.stdout + done.stderr
    )


def test_a_connection_with_no_socket_is_told_as_a_shortage() -> None:
    """httpx says "All connection attempts failed" when no socket could be made (EMFILE),
    the OSError its cause: this host's shortage, not the policy host's connect error."""
    from mailstrom.mtasts.fetch import _raise_if_short

    failed = httpx.ConnectError("All connection attempts failed")
    failed.__cause__ = OSError(errno.EMFILE, "Too many open files")
    with pytest.raises(LocalResourceShortage, match="Too many open files"):
        _raise_if_short(failed, "MTA-STS: connecting to mta-sts.example.org at 192.0.2.1")
    _raise_if_short(httpx.ConnectError("refused"), "not a shortage")  # nothing raised
