"""The ``failure-reason-code`` a failed TLS session with an MX host is counted under: one
fixed code per kind of failure, never the error's text, which quotes what the peer sent
(the names of its certificate) and what varies from one attempt to the next.

A DANE-TA chain whose leaf was issued for another name was counted with the names the
leaf holds in its code: a host that presents another wrong certificate at each
connection (or several servers behind one name) made each one a failure detail of its
own, and a counter of its own in the worker, up to its bound of 10,000.
"""

from __future__ import annotations

import hashlib
import ssl
from datetime import UTC, datetime

import pytest
import trustme
from tests.support.certs import chain_with_anchor, der

from mailstrom.errors import DeliveryError
from mailstrom.runtime.connection import TLSHandshakeError, TLSVerifyError
from mailstrom.stores import MemoryStore
from mailstrom.tls.danematch import DaneMismatch, match_chain
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement
from mailstrom.tlsrpt.observer import SessionObserver
from mailstrom.tlsrpt.recorder import SessionRecorder
from mailstrom.tlsrpt.report import Reporter, build_report

NOW = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
REPORTER = Reporter(organization="Sender", contact="tls@sender.test", submitter="sender.test")
HOST = "mx.example.org"


async def details(requirement: TLSRequirement, errors: list[DeliveryError]) -> list[object]:
    """The failure details of example.org's report once each of ``errors`` stopped a
    connection to HOST opened under ``requirement``."""
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    observe = SessionObserver(recorder)
    for error in errors:
        observe("example.org", requirement, HOST, "192.0.2.7", error)
    await recorder.flush()
    sessions = store.tls_sessions(NOW.date())
    (policy,) = build_report("example.org", NOW.date(), sessions, REPORTER).document["policies"]
    return list(policy["failure-details"])


def dane_refusal(ca: trustme.CA, *names: str) -> TLSVerifyError:
    """What the connection raises when the server's DANE-TA chain (leaf for ``names``)
    is checked against the record naming ``ca`` for HOST."""
    chain_pem, _ = chain_with_anchor(ca, *names)
    chain = [der(block + b"-----END CERTIFICATE-----\n") for block in _blocks(chain_pem)]
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    record = TLSARecord(usage=2, selector=0, matching=1, data=anchor)
    try:
        match_chain(chain, [record], host=HOST)
    except DaneMismatch as exc:
        error = TLSVerifyError(f"DANE: {exc}", host=HOST)
        error.__cause__ = exc
        return error
    raise AssertionError("a leaf for another name matched")


def _blocks(pem: bytes) -> list[bytes]:
    return [b for b in pem.split(b"-----END CERTIFICATE-----\n") if b.strip()]


async def test_dane_ta_leaves_for_other_names_are_one_failure_detail() -> None:
    ca = trustme.CA()
    anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
    dane = TLSRequirement(
        mode=TLSMode.DANE,
        source=PolicySource.DANE,
        tlsa=(TLSARecord(usage=2, selector=0, matching=1, data=anchor),),
    )
    errors: list[DeliveryError] = [dane_refusal(ca, f"host{n}.elsewhere.example") for n in (1, 2)]
    assert errors[0].text != errors[1].text  # the names the peer's leaf holds
    assert await details(dane, errors) == [
        {
            "result-type": "certificate-host-mismatch",
            "receiving-mx-hostname": HOST,
            "receiving-ip": "192.0.2.7",
            "failed-session-count": 2,
            "failure-reason-code": "dane-ta-certificate-host-mismatch",
        }
    ]


def handshake_error(text: str, cause: BaseException | None) -> TLSHandshakeError:
    error = TLSHandshakeError(text, host=HOST)
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("errors", "code"),
    [
        (
            [
                handshake_error(f"TLS handshake with {HOST} timed out after {s:g}s", TimeoutError())
                for s in (30, 60)
            ],
            "tls-handshake-timeout",
        ),
        (
            [handshake_error(f"{HOST} closed the connection during the TLS handshake", None)] * 2,
            "tls-handshake-closed",
        ),
    ],
)
async def test_handshake_failures_of_one_kind_are_one_failure_detail(
    errors: list[DeliveryError], code: str
) -> None:
    no_policy = TLSRequirement(mode=TLSMode.REQUIRED, source=PolicySource.DEFAULT)
    assert await details(no_policy, errors) == [
        {
            "result-type": "validation-failure",
            "receiving-mx-hostname": HOST,
            "receiving-ip": "192.0.2.7",
            "failed-session-count": 2,
            "failure-reason-code": code,
        }
    ]


async def test_an_openssl_handshake_error_is_counted_under_its_reason() -> None:
    cause = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)")
    cause.reason = "WRONG_VERSION_NUMBER"
    no_policy = TLSRequirement(mode=TLSMode.REQUIRED, source=PolicySource.DEFAULT)
    error = handshake_error(f"TLS handshake with {HOST} failed: {cause}", cause)
    [detail] = await details(no_policy, [error])
    assert detail["failure-reason-code"] == "tls-handshake-wrong-version-number"
