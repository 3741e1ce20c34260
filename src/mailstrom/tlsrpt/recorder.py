"""Counting TLS sessions in a worker and adding the counts to the store in batches.

A connection costs no store write: :meth:`SessionRecorder.success` and
:meth:`SessionRecorder.failure` add to counters in memory, and :meth:`SessionRecorder.run`
adds them to the store every ``FLUSH_EVERY`` seconds (and once more when the worker stops),
one transaction for all of them. Counters that cannot be written are kept for the next
turn; a worker that dies loses at most one interval of counts, which a report can bear.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from mailstrom.errors import DeliveryError, StoreError, TLSRequiredError
from mailstrom.safetext import safe_text
from mailstrom.stores.base import Store
from mailstrom.tlsrpt.sessions import MAX_FIELD, PolicyType, ResultType, TLSSessions, clipped

log = logging.getLogger("mailstrom.tlsrpt")

FLUSH_EVERY = 30.0
"""Seconds between two writes of the counters."""
RETENTION = timedelta(days=31)
"""How long a day's counters stay in the store."""
PRUNE_EVERY = 6 * 3600.0
"""Seconds between two prunes of old counters."""
MAX_KEYS = 10_000
"""Distinct counters kept in memory at most between writes (each new key past it is
dropped, with a warning: a bound on what hostile peers can make a worker hold)."""

StoreCall = Callable[..., Awaitable[Any]]

# OpenSSL verification codes (X509_V_ERR_*) and the RFC 8460 §4.3 type they report as.
_VERIFY_TYPES = {
    10: ResultType.CERTIFICATE_EXPIRED,  # CERT_HAS_EXPIRED
    9: ResultType.CERTIFICATE_EXPIRED,  # CERT_NOT_YET_VALID: outside its validity too
    18: ResultType.CERTIFICATE_NOT_TRUSTED,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: ResultType.CERTIFICATE_NOT_TRUSTED,  # SELF_SIGNED_CERT_IN_CHAIN
    20: ResultType.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: ResultType.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    2: ResultType.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    62: ResultType.CERTIFICATE_HOST_MISMATCH,  # HOSTNAME_MISMATCH
}


_DANE_CODES = {
    ResultType.TLSA_INVALID: "no-tlsa-record-matches",
    ResultType.CERTIFICATE_HOST_MISMATCH: "dane-ta-certificate-host-mismatch",
    ResultType.CERTIFICATE_EXPIRED: "dane-ta-certificate-expired",
}
"""The ``failure-reason-code`` of a chain DANE refused, per failure type."""
REFUSED_CODE = "starttls-refused"
"""The ``failure-reason-code`` of a server that offered STARTTLS and then refused it."""
UNCHECKABLE_NAME_CODE = "mx-name-not-checkable"
"""The code of a host whose name no certificate can hold (the check cannot be made)."""


def classify(error: DeliveryError) -> tuple[ResultType, str] | None:
    """The RFC 8460 failure type and reason code of a failed connection, or None when the
    failure had nothing to do with TLS (refused, timed out before STARTTLS...). A
    plaintext connection opened in place of one whose handshake failed, which failed
    too, is that handshake's failure (``tls_fallback``).

    The code is one per kind of failure, never the error's text: that quotes the names
    of the peer's certificate and the handshake timeout, and two failures of one kind
    with other text were two failure details of the report (and two counters here)."""
    found = _classify(error)
    if found is None and error.tls_fallback is not None:
        return _classify(error.tls_fallback)
    return found


def _classify(error: DeliveryError) -> tuple[ResultType, str] | None:
    from mailstrom.runtime.connection import STARTTLSRefused, TLSHandshakeError, TLSVerifyError
    from mailstrom.tls.danematch import DaneMismatch

    if isinstance(error, TLSRequiredError):
        return ResultType.STARTTLS_NOT_SUPPORTED, ""
    if isinstance(error, STARTTLSRefused):
        # Refused and the session ended with it (a 421, or a hang-up after a 454): as
        # much a session without TLS as one that went on in plaintext after the refusal.
        return ResultType.STARTTLS_NOT_SUPPORTED, REFUSED_CODE
    cause = error.__cause__
    if isinstance(error, TLSVerifyError):
        if isinstance(cause, DaneMismatch):
            # RFC 8460 §4.3.2.1: a chain that satisfies none of the TLSA records is the
            # DANE policy's "tlsa-invalid" (none of the records was found valid), not the
            # catch-all "validation-failure"; a DANE-TA chain whose leaf is for another
            # name is §4.3.1's "certificate-host-mismatch" (a certificate that does not
            # adhere to the DANE policy's constraints, the MX host not among its names).
            # A DANE-TA chain that verifies but for a certificate outside its validity
            # is §4.3.1's "certificate-expired", as OpenSSL's verdict is without DANE.
            if cause.host_mismatch:
                kind = ResultType.CERTIFICATE_HOST_MISMATCH
            elif cause.expired:
                kind = ResultType.CERTIFICATE_EXPIRED
            else:
                kind = ResultType.TLSA_INVALID
            return kind, _DANE_CODES[kind]
        if isinstance(cause, ssl.SSLCertVerificationError):
            # OpenSSL's number and its fixed text for it (which names the MX host for a
            # host name mismatch, the host the counter is kept for anyway).
            code = cause.verify_code
            kind = _VERIFY_TYPES.get(code, ResultType.VALIDATION_FAILURE)
            return kind, f"X509_V_ERR {code}: {cause.verify_message}"[:MAX_FIELD]
        return ResultType.VALIDATION_FAILURE, UNCHECKABLE_NAME_CODE
    if isinstance(error, TLSHandshakeError):
        return ResultType.VALIDATION_FAILURE, handshake_code(cause)
    return None


def handshake_code(cause: BaseException | None) -> str:
    """The ``failure-reason-code`` of a TLS handshake that failed for ``cause`` (the
    :class:`~mailstrom.runtime.connection.TLSHandshakeError`'s): OpenSSL's reason
    mnemonic when it gave one (a fixed set: ``WRONG_VERSION_NUMBER``...), else the kind
    of failure."""
    if isinstance(cause, TimeoutError):
        return "tls-handshake-timeout"
    if isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "reason", None)
        if isinstance(reason, str) and reason.replace("_", "").isalnum() and len(reason) < 64:
            return "tls-handshake-" + reason.lower().replace("_", "-")
        return "tls-handshake-failed"
    if isinstance(cause, OSError):
        return "tls-handshake-connection-lost"
    if cause is None:
        return "tls-handshake-closed"
    return "tls-handshake-failed"


class SessionRecorder:
    """In-memory TLS session counters of one worker, written to the store in batches."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime],
        store_call: StoreCall | None = None,
        sending_ip: str = "",
    ) -> None:
        self._store = store
        self._clock = clock
        self._store_call = store_call
        self._sending_ip = sending_ip
        self._counts: dict[tuple[str, ...], TLSSessions] = {}
        self._warned = False

    @property
    def pending(self) -> int:
        """Counters not yet written."""
        return len(self._counts)

    def success(
        self, domain: str, policy_type: PolicyType, policy_string: str, *, mx: str = ""
    ) -> None:
        """One successful TLS session with a host of ``domain``'s policy (``mx``: the host,
        for policies of one host such as TLSA records)."""
        self._add(
            TLSSessions(
                day=self._clock().date(),
                policy_domain=domain,
                policy_type=policy_type,
                policy_string=policy_string,
                receiving_mx=clipped(safe_text(mx)),
            )
        )

    def failure(
        self,
        domain: str,
        policy_type: PolicyType,
        policy_string: str,
        result_type: ResultType,
        *,
        mx: str = "",
        ip: str = "",
        code: str = "",
    ) -> None:
        """One failed session (or policy failure) of ``result_type``."""
        # The host, address and reason come from peers (a certificate's names are quoted
        # in a DANE reason): made safe text before they are kept, since PostgreSQL refuses
        # a NUL, and one counter it refuses keeps the whole batch from being written, again
        # at every try; a report and `mailstrom tlsrpt` show them too.
        self._add(
            TLSSessions(
                day=self._clock().date(),
                policy_domain=domain,
                policy_type=policy_type,
                policy_string=policy_string,
                result_type=result_type.value,
                sending_ip=self._sending_ip,
                receiving_mx=clipped(safe_text(mx)),
                receiving_ip=clipped(safe_text(ip)),
                failure_code=clipped(safe_text(code)),
            )
        )

    def _add(self, sessions: TLSSessions) -> None:
        key = sessions.key()
        old = self._counts.get(key)
        if old is not None:
            self._counts[key] = replace(old, count=old.count + sessions.count)
        elif len(self._counts) < MAX_KEYS:
            self._counts[key] = sessions
        elif not self._warned:
            self._warned = True
            log.warning("more than %d TLS session counters between writes; dropping", MAX_KEYS)

    async def flush(self) -> None:
        """Write the counters to the store (kept for the next try if that fails)."""
        if not self._counts:
            return
        batch, self._counts = list(self._counts.values()), {}
        self._warned = False
        try:
            if self._store_call is not None:
                await self._store_call(self._store.add_tls_sessions, batch)
            else:
                self._store.add_tls_sessions(batch)
        except StoreError as exc:
            log.warning("TLS session counters not written (kept for the next try): %s", exc)
            for sessions in batch:
                self._add(sessions)

    async def prune(self) -> None:
        """Delete the counters of days older than :data:`RETENTION` (reports are made
        the day after; a month leaves room to make them again)."""
        before = self._clock().date() - RETENTION
        try:
            if self._store_call is not None:
                await self._store_call(self._store.prune_tls_sessions, before=before)
            else:
                self._store.prune_tls_sessions(before=before)
        except StoreError as exc:
            log.warning("old TLS session counters not pruned: %s", exc)

    async def run(self) -> None:
        """Write the counters every :data:`FLUSH_EVERY` seconds until cancelled (the
        worker calls :meth:`flush` once more when it stops), and prune old days every
        :data:`PRUNE_EVERY` seconds."""
        since_prune = PRUNE_EVERY  # prune once at start
        while True:
            if since_prune >= PRUNE_EVERY:
                since_prune = 0.0
                await self.prune()
            await asyncio.sleep(FLUSH_EVERY)  # a timer, not synchronisation
            since_prune += FLUSH_EVERY
            await self.flush()
