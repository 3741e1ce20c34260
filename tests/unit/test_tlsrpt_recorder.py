"""TLS session counters in a worker: counted in memory, written in one batch, kept when
the store fails; connection errors classified into RFC 8460 §4.3 failure types."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from mailstrom.errors import SMTPConnectError, StoreError, TLSRequiredError
from mailstrom.runtime.connection import TLSHandshakeError, TLSVerifyError
from mailstrom.stores import MemoryStore
from mailstrom.tls.danematch import DaneMismatch
from mailstrom.tlsrpt import PolicyType, ResultType, TLSSessions
from mailstrom.tlsrpt.recorder import SessionRecorder, classify

NOW = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)


class FlakyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.failing = True
        self.calls = 0

    def add_tls_sessions(self, sessions: Sequence[TLSSessions]) -> None:
        self.calls += 1
        if self.failing:
            raise StoreError("database is locked")
        super().add_tls_sessions(sessions)


async def test_counts_add_up_in_memory_and_are_written_once() -> None:
    store = FlakyStore()
    store.failing = False
    recorder = SessionRecorder(store, clock=lambda: NOW)
    for _ in range(5):
        recorder.success("example.org", PolicyType.STS, "version: STSv1")
    recorder.failure(
        "example.org", PolicyType.STS, "version: STSv1", ResultType.CERTIFICATE_EXPIRED, mx="mx1"
    )
    assert recorder.pending == 2
    await recorder.flush()
    await recorder.flush()  # nothing left: no second write
    assert store.calls == 1
    counts = {(s.result_type, s.receiving_mx): s.count for s in store.tls_sessions(NOW.date())}
    assert counts == {("", ""): 5, ("certificate-expired", "mx1"): 1}


async def test_a_failing_store_keeps_the_counts() -> None:
    store = FlakyStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    recorder.success("example.org", PolicyType.STS, "p")
    await recorder.flush()
    assert recorder.pending == 1
    recorder.success("example.org", PolicyType.STS, "p")
    store.failing = False
    await recorder.flush()
    [row] = store.tls_sessions(NOW.date())
    assert row.count == 2


def verify_error(code: int, message: str) -> TLSVerifyError:
    cause = ssl.SSLCertVerificationError(1, message)
    cause.verify_code = code
    cause.verify_message = message
    error = TLSVerifyError(f"certificate of mx not accepted: {message}", host="mx")
    error.__cause__ = cause
    return error


def dane_error(*, host_mismatch: bool) -> TLSVerifyError:
    """As the connection raises it when the chain fails the host's TLSA records."""
    cause = DaneMismatch("certificate of mx matches none of its TLSA records (3 1 1)")
    cause.host_mismatch = host_mismatch
    error = TLSVerifyError(f"DANE: {cause}", host="mx")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TLSRequiredError("mx does not offer STARTTLS"), ResultType.STARTTLS_NOT_SUPPORTED),
        (verify_error(10, "certificate has expired"), ResultType.CERTIFICATE_EXPIRED),
        (verify_error(18, "self-signed certificate"), ResultType.CERTIFICATE_NOT_TRUSTED),
        (verify_error(20, "unable to get local issuer"), ResultType.CERTIFICATE_NOT_TRUSTED),
        (verify_error(62, "Hostname mismatch"), ResultType.CERTIFICATE_HOST_MISMATCH),
        (verify_error(50, "something else"), ResultType.VALIDATION_FAILURE),
        (TLSHandshakeError("handshake failed"), ResultType.VALIDATION_FAILURE),
        (dane_error(host_mismatch=False), ResultType.TLSA_INVALID),
        (dane_error(host_mismatch=True), ResultType.CERTIFICATE_HOST_MISMATCH),
    ],
)
def test_classify(error: TLSRequiredError | TLSHandshakeError, expected: ResultType) -> None:
    found = classify(error)
    assert found is not None and found[0] is expected


def test_failures_unrelated_to_tls_are_not_counted() -> None:
    assert classify(SMTPConnectError("connection refused")) is None


async def test_prune_drops_days_past_the_retention() -> None:
    from datetime import timedelta

    from mailstrom.tlsrpt.recorder import RETENTION

    store = MemoryStore()
    old = TLSSessions(
        day=NOW.date() - RETENTION - timedelta(days=1),
        policy_domain="example.org",
        policy_type=PolicyType.STS,
    )
    recent = TLSSessions(
        day=NOW.date() - RETENTION, policy_domain="example.org", policy_type=PolicyType.STS
    )
    store.add_tls_sessions([old, recent])
    await SessionRecorder(store, clock=lambda: NOW).prune()
    assert store.tls_sessions(old.day) == []
    assert store.tls_sessions(recent.day) == [recent]


async def test_a_peer_given_field_is_kept_to_255_octets_not_characters() -> None:
    """MAX_FIELD says octets; the fields were cut to 255 characters, so a reason of
    non-ASCII text (a certificate's names quoted in a DANE reason) kept up to 1,020
    octets, and three such fields in one counter's key."""
    store = MemoryStore()
    recorder = SessionRecorder(store, clock=lambda: NOW)
    recorder.failure(
        "example.org",
        PolicyType.TLSA,
        "3 1 1 ab",
        ResultType.VALIDATION_FAILURE,
        mx="mx1",
        code="名" * 300,
    )
    await recorder.flush()
    (kept,) = store.tls_sessions(NOW.date())
    assert len(kept.failure_code.encode()) <= 255
    assert kept.failure_code == "名" * 85  # whole characters only
