"""Daily TLS reports (RFC 8460 §4): from the stored session counters to the JSON a policy
domain asked for in its ``_smtp._tls`` TXT record, pure.

>>> parse_tlsrpt_record(["v=TLSRPTv1; rua=mailto:tls@example.org,https://r.example/tls"])
['mailto:tls@example.org', 'https://r.example/tls']
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from mailstrom.errors import MailstromError
from mailstrom.tlsrpt.sessions import PolicyType, TLSSessions

MEDIA_TYPE = "application/tlsrpt+gzip"
"""RFC 8460 §6.4: the media type of a gzip-compressed report (mail attachment, POST)."""
MAX_RUA = 8
"""Reporting addresses used at most per domain."""
_SCHEMES = ("mailto:", "https://")
_URI = re.compile(r"[!-~]+")
"""What an RFC 3986 URI is made of: printable ASCII, no space. Anything else (a CR LF
that would forge a header of the report mail, an ESC, 8-bit text) is no URI."""


class ReportRecordError(MailstromError, ValueError):
    """A ``_smtp._tls`` TXT record that cannot be used; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_tlsrpt_record(records: Sequence[str]) -> list[str] | None:
    """The ``rua`` URIs of the ``_smtp._tls`` TXT records (RFC 8460 §3), or None when
    there is no TLSRPTv1 record. Only ``mailto:`` and ``https:`` URIs are kept, each once,
    and only those that are URIs (printable ASCII). Raises
    :class:`ReportRecordError` for several TLSRPTv1 records or one without ``rua``."""
    found = [r for r in records if r.split(";", 1)[0].strip() == "v=TLSRPTv1"]
    if not found:
        return None
    if len(found) > 1:
        raise ReportRecordError(f"{len(found)} v=TLSRPTv1 records (exactly one allowed)")
    rua: str | None = None
    for field in found[0].split(";")[1:]:
        key, eq, value = field.partition("=")
        if eq and key.strip() == "rua" and rua is None:
            rua = value.strip()
    if not rua:
        raise ReportRecordError("v=TLSRPTv1 record without rua")
    uris = [u.strip() for u in rua.split(",") if u.strip()]
    # dict: each URI once (one report each), in the record's order.
    kept = {u: None for u in uris if u.lower().startswith(_SCHEMES) and _URI.fullmatch(u)}
    if not kept:
        raise ReportRecordError(f"rua has no mailto: or https: URI: {rua[:100]!r}")
    return list(kept)[:MAX_RUA]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reporter:
    """Who a report says it comes from (RFC 8460 §4.4)."""

    organization: str
    """``organization-name``."""
    contact: str
    """``contact-info``: an address or URL to ask about the report."""
    submitter: str
    """The reporting host's domain, in file names, subjects and report ids."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One domain's report for one day, ready to write or send."""

    policy_domain: str
    day: date
    report_id: str
    document: dict[str, Any]

    def json(self) -> bytes:
        return json.dumps(self.document, indent=2, sort_keys=False).encode()

    def gzipped(self) -> bytes:
        return gzip.compress(self.json(), mtime=0)

    def filename(self, submitter: str, *, gz: bool = False) -> str:
        """RFC 8460 §5.3: ``sender!policy-domain!begin!end!unique-id.json[.gz]``."""
        begin, end = _range(self.day)
        unique = self.report_id.rsplit("_", 1)[-1].partition("@")[0]
        name = (
            f"{submitter}!{self.policy_domain}!{int(begin.timestamp())}!"
            f"{int(end.timestamp())}!{unique}.json"
        )
        return name + ".gz" if gz else name


def _range(day: date) -> tuple[datetime, datetime]:
    begin = datetime.combine(day, time(0, 0), tzinfo=UTC)
    return begin, begin + timedelta(days=1) - timedelta(seconds=1)


def _z(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    policy_domain: str,
    day: date,
    sessions: Iterable[TLSSessions],
    reporter: Reporter,
    *,
    report_id: str | None = None,
) -> Report:
    """The RFC 8460 §4.4 report of ``policy_domain`` for the UTC ``day`` from the
    counters in ``sessions`` (those of other domains or days are ignored)."""
    if report_id is None:
        report_id = f"{day.isoformat()}_{policy_domain}_{os.urandom(6).hex()}@{reporter.submitter}"
    policies: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sessions:
        if s.policy_domain != policy_domain or s.day != day:
            continue
        entry = policies.get((s.policy_type.value, s.policy_string))
        if entry is None:
            lines = [line for line in s.policy_string.split("\n") if line.strip()]
            policy: dict[str, Any] = {"policy-type": s.policy_type.value}
            if s.policy_type is not PolicyType.NO_POLICY:
                # §4.4: the applied policy's text; with no policy found there is none.
                policy["policy-string"] = lines
            policy["policy-domain"] = policy_domain
            if s.policy_type is PolicyType.STS:
                mx = [line.partition(":")[2].strip() for line in lines if line.startswith("mx:")]
                if mx:
                    policy["mx-host"] = mx
            entry = {
                "policy": policy,
                "summary": {
                    "total-successful-session-count": 0,
                    "total-failure-session-count": 0,
                },
                "failure-details": [],
            }
            policies[(s.policy_type.value, s.policy_string)] = entry
        if s.policy_type is PolicyType.TLSA and s.receiving_mx:
            # TLSA records belong to one MX host: it is the policy's mx-host (§4.4).
            hosts = entry["policy"].setdefault("mx-host", [])
            if s.receiving_mx not in hosts:
                hosts.append(s.receiving_mx)
        if s.successful:
            entry["summary"]["total-successful-session-count"] += s.count
            continue
        entry["summary"]["total-failure-session-count"] += s.count
        detail: dict[str, Any] = {"result-type": s.result_type}
        for key, value in (
            ("sending-mta-ip", s.sending_ip),
            ("receiving-mx-hostname", s.receiving_mx),
            ("receiving-ip", s.receiving_ip),
        ):
            if value:
                detail[key] = value
        detail["failed-session-count"] = s.count
        if s.failure_code:
            detail["failure-reason-code"] = s.failure_code
        entry["failure-details"].append(detail)
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    begin, end = _range(day)
    document = {
        "organization-name": reporter.organization,
        "date-range": {"start-datetime": _z(begin), "end-datetime": _z(end)},
        "contact-info": reporter.contact,
        "report-id": report_id,
        "policies": list(policies.values()),
    }
    return Report(policy_domain=policy_domain, day=day, report_id=report_id, document=document)
