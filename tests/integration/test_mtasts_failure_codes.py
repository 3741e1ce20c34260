"""The ``failure-reason-code`` an MTA-STS policy failure is counted under in TLS reports
(RFC 8460 §4.3): one stable code per kind of failure, never the reason's text, which
names addresses and the time a stalled connection was given.

The reason of a fetch whose connection stalled said how long it was allowed
("connecting took more than 0.27 s"), which depends on the lookup before it and the
deadline: every such fetch was a failure detail of its own in the report, with its own
count, and a counter of its own in the worker.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailstrom import Config
from mailstrom.config import MTASTSConfig
from mailstrom.mtasts.hook import for_worker
from mailstrom.stores import MemoryStore
from mailstrom.tls.decide import Destination
from mailstrom.tlsrpt.recorder import SessionRecorder
from mailstrom.tlsrpt.report import Reporter, build_report
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.https_server import Answer, HTTPSFactory, HTTPSServer

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
REPORTER = Reporter(organization="Sender", contact="tls@sender.test", submitter="sender.test")
DESTINATION = Destination(domain="example.org", mx_host="mx1.example.org")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that takes connections and never answers: handshakes stall."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def zone(dns_server: LoopbackDNS) -> LoopbackDNS:
    dns_server.txt("_mta-sts.example.org", "v=STSv1; id=one;")
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    return dns_server


async def _direct(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return call(*args, **kwargs)


async def fail_fetches(
    zone: LoopbackDNS,
    port: int,
    timeouts: list[float],
    before: Callable[[int], None] = lambda n: None,
    **settings: Any,
) -> dict[str, Any]:
    """Look the policy of example.org up once per timeout (``before(n)`` first), each by
    a worker's MTA-STS source of its own (as workers with other deadlines, or other
    lookups, would), all counting into one recorder; the day's report for example.org."""
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    store_call: Callable[..., Awaitable[Any]] = _direct
    for n, timeout in enumerate(timeouts):
        before(n)
        mta_sts = MTASTSConfig(port=port, timeout=timeout, recheck=0, **settings)
        config = Config(dns=zone.dns_config, allow_loopback=True, mta_sts=mta_sts)
        hook = for_worker(config, store, recorder, store_call=store_call, clock=lambda: NOW)
        assert hook is not None
        assert not await hook.lists_mx_host(DESTINATION)
    await recorder.flush()
    sessions = store.tls_sessions(NOW.date())
    return build_report("example.org", NOW.date(), sessions, REPORTER).document


async def test_stalled_fetches_of_different_timings_are_one_failure_detail(
    zone: LoopbackDNS, silent_port: int
) -> None:
    report = await fail_fetches(zone, silent_port, [0.6, 1.2])
    (policy,) = report["policies"]
    assert policy["summary"]["total-failure-session-count"] == 2
    assert policy["failure-details"] == [
        {
            "result-type": "sts-policy-fetch-error",
            "failed-session-count": 2,
            "failure-reason-code": "sts-fetch-connect-timeout",
        }
    ]


POLICY = "version: STSv1\nmode: enforce\nmx: mx1.example.org\nmax_age: 86400\n"


@pytest.mark.parametrize(
    ("answers", "result_type", "code"),
    [
        (
            [
                Answer(status=301, headers={"Location": f"https://elsewhere.example/{n}"})
                for n in range(2)
            ],
            "sts-policy-fetch-error",
            "sts-fetch-http-redirect",
        ),
        ([Answer(status=404), Answer(status=404)], "sts-policy-fetch-error", "sts-fetch-http-404"),
        (
            [Answer(body=POLICY.replace("enforce", m).encode()) for m in ("strict", "loose")],
            "sts-policy-invalid",
            "sts-policy-invalid-mode",
        ),
        (
            [Answer(body=(POLICY + f"junk line {n}\n").encode()) for n in range(2)],
            "sts-policy-invalid",
            "sts-policy-syntax-error",
        ),
        (
            [
                Answer(body=POLICY.encode(), headers={"Content-Type": f"text/{kind}"})
                for kind in ("html", "css")
            ],
            "sts-policy-invalid",
            "sts-policy-not-text-plain",
        ),
    ],
)
async def test_failures_of_one_kind_with_other_details_are_one_failure_detail(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    answers: list[Answer],
    result_type: str,
    code: str,
) -> None:
    https: HTTPSServer = https_server()

    def serve(n: int) -> None:
        https.routes["/.well-known/mta-sts.txt"] = answers[n]

    report = await fail_fetches(
        zone, https.port, [5.0] * len(answers), serve, tls_context=client_tls_context
    )
    (policy,) = report["policies"]
    assert policy["failure-details"] == [
        {"result-type": result_type, "failed-session-count": 2, "failure-reason-code": code}
    ]


async def test_a_certificate_refused_is_counted_under_its_openssl_error(
    zone: LoopbackDNS, https_server: HTTPSFactory
) -> None:
    # The client trusts no CA of the server's: certificate-not-trusted, X509_V_ERR 20.
    https = https_server()
    report = await fail_fetches(zone, https.port, [5.0], tls_context=ssl.create_default_context())
    (policy,) = report["policies"]
    assert policy["failure-details"] == [
        {
            "result-type": "sts-webpki-invalid",
            "failed-session-count": 1,
            "failure-reason-code": "sts-certificate-error-20",
        }
    ]


async def test_an_unusable_record_and_a_failed_refresh_are_one_failure(
    zone: LoopbackDNS, https_server: HTTPSFactory, client_tls_context: ssl.SSLContext
) -> None:
    """A lookup that finds the record unusable, then fails to refresh the cached policy
    under its id, is one failed policy discovery: it was counted twice, the record's
    failure and the fetch's, so a report showed two failed sessions for one lookup (and
    one when the refresh was not due yet). It is the record's, found first, counted at
    every such lookup whether or not a refresh is due; the failed fetch is logged."""
    https: HTTPSServer = https_server()
    https.policy(POLICY)
    clock = [NOW - timedelta(hours=13)]
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    mta_sts = MTASTSConfig(port=https.port, recheck=0, tls_context=client_tls_context)
    config = Config(dns=zone.dns_config, allow_loopback=True, mta_sts=mta_sts)
    hook = for_worker(config, store, recorder, store_call=_direct, clock=lambda: clock[0])
    assert hook is not None
    assert await hook.lists_mx_host(DESTINATION)  # fetched and cached, 13 hours ago
    zone.txt("_mta-sts.example.org", "v=STSv1; id=one;", "v=STSv1; id=two;")
    https.stop()
    clock[0] = NOW  # past half the policy's max_age: a refresh is due, and fails
    assert await hook.lists_mx_host(DESTINATION)  # the cached policy still applies
    await recorder.flush()
    report = build_report("example.org", NOW.date(), store.tls_sessions(NOW.date()), REPORTER)
    (policy,) = report.document["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["summary"]["total-failure-session-count"] == 1, policy
    assert policy["failure-details"] == [
        {
            "result-type": "sts-policy-invalid",
            "failed-session-count": 1,
            "failure-reason-code": "sts-record-multiple",
        }
    ]


@pytest.mark.parametrize("cached", [False, True])
async def test_a_failed_record_lookup_is_a_policy_fetch_error(
    zone: LoopbackDNS,
    https_server: HTTPSFactory,
    client_tls_context: ssl.SSLContext,
    cached: bool,
) -> None:
    """RFC 8460 §4.3.2.2: a policy that could not be retrieved is an
    ``sts-policy-fetch-error``. A ``_mta-sts`` lookup that failed (SERVFAIL: a broken
    DNSSEC signature, an attacker who blocks DNS, RFC 8461 §10.2) was only logged, so the
    day's report for the domain said nothing, though its policy went unseen (or was not
    refreshed). It is counted once per lookup, under the cached policy when one applies."""
    https: HTTPSServer = https_server()
    https.policy(POLICY)
    clock = [NOW - timedelta(hours=1)]
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    mta_sts = MTASTSConfig(port=https.port, recheck=0, tls_context=client_tls_context)
    config = Config(dns=zone.dns_config, allow_loopback=True, mta_sts=mta_sts)
    hook = for_worker(config, store, recorder, store_call=_direct, clock=lambda: clock[0])
    assert hook is not None
    if cached:
        assert await hook.lists_mx_host(DESTINATION)  # fetched an hour ago, still fresh
    zone.servfail("_mta-sts.example.org", "TXT")
    clock[0] = NOW
    assert await hook.lists_mx_host(DESTINATION) is cached
    await recorder.flush()
    report = build_report("example.org", NOW.date(), store.tls_sessions(NOW.date()), REPORTER)
    (policy,) = report.document["policies"]
    assert policy["policy"]["policy-type"] == ("sts" if cached else "no-policy-found")
    assert policy["summary"]["total-failure-session-count"] == 1, policy
    assert policy["failure-details"] == [
        {
            "result-type": "sts-policy-fetch-error",
            "failed-session-count": 1,
            "failure-reason-code": "sts-record-lookup-failed",
        }
    ]
