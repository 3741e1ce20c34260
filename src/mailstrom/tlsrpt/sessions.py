"""What TLS reports (RFC 8460) are made of: counters of TLS sessions, per day and policy.

A worker counts every connection it makes to a domain with a policy — a successful TLS
session, or a failure of one of the RFC 8460 §4.3 types — in memory, and adds the counters
to the store in batches (:class:`~mailstrom.tlsrpt.recorder.SessionRecorder`). ``mailstrom
tlsrpt`` reads one day's counters back and turns them into reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from enum import StrEnum


class PolicyType(StrEnum):
    """RFC 8460 §4.4 ``policy-type``."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY = "no-policy-found"


class ResultType(StrEnum):
    """RFC 8460 §4.3 failure types (the ``result-type`` of a failure detail)."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


MAX_FIELD = 255
"""Octets kept of a host name, address or failure code (they come from peers)."""


def clipped(text: str) -> str:
    """``text`` cut to :data:`MAX_FIELD` octets of UTF-8, at a character's end."""
    if len(text) <= MAX_FIELD // 4:  # no character takes more than 4 octets
        return text
    return text.encode("utf-8", "surrogatepass")[:MAX_FIELD].decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSessions:
    """``count`` sessions of one kind: successful ones when ``result_type`` is empty,
    else failures of that type at one MX host (``receiving_mx``/``receiving_ip``)."""

    day: date
    """The UTC day the sessions belong to."""
    policy_domain: str
    policy_type: PolicyType
    policy_string: str = ""
    """The policy text (lines joined with LF); empty without a policy."""
    result_type: str = ""
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    failure_code: str = ""
    count: int = 1

    @property
    def successful(self) -> bool:
        return not self.result_type

    @property
    def policy_hash(self) -> str:
        """SHA-256 of the policy text: the stores key counters by it, not by the text."""
        return hashlib.sha256(self.policy_string.encode()).hexdigest()

    def key(self) -> tuple[str, ...]:
        """Everything but ``count``: counters with equal keys add up."""
        return (
            self.day.isoformat(),
            self.policy_domain,
            self.policy_type.value,
            self.policy_hash,
            self.result_type,
            self.sending_ip,
            self.receiving_mx,
            self.receiving_ip,
            self.failure_code,
        )
