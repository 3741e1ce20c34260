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
from urllib.parse import unquote

from mailstrom.errors import MailstromError
from mailstrom.message.chars import shorten
from mailstrom.safetext import is_safe
from mailstrom.tlsrpt.sessions import PolicyType, TLSSessions

MEDIA_TYPE = "application/tlsrpt+gzip"
"""RFC 8460 §6.4: the media type of a gzip-compressed report (mail attachment, POST)."""
MAX_RUA = 8
"""Reporting addresses used at most per domain."""
_SCHEMES = ("mailto:", "https://")
_URI = re.compile(r"[!-~]+")
"""What an RFC 3986 URI is made of: printable ASCII, no space. Anything else (a CR LF
that would forge a header of the report mail, an ESC, 8-bit text) is no URI."""
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
"""A ``%`` that does not start a percent-encoded octet (RFC 3986 §2.1)."""
_WSP = " \t"
"""RFC 5234's WSP, the only white space of RFC 8460 §3's record (``field-delim = *WSP ";"
*WSP``, ``*WSP "," *WSP`` between URIs); ``str.strip()`` would also take a no-break
space, U+3000 and the like."""


class ReportRecordError(MailstromError, ValueError):
    """A ``_smtp._tls`` TXT record that cannot be used; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_tlsrpt_record(records: Sequence[str]) -> list[str] | None:
    """The ``rua`` URIs of the ``_smtp._tls`` TXT records (RFC 8460 §3), or None when
    there is no TLSRPTv1 record. Only ``mailto:`` and ``https:`` URIs are kept, and only
    those that are URIs (printable ASCII); of several naming one destination (``MAILTO:``
    and ``mailto:``, the same address with other header fields, the same URL with another
    fragment, host name case or default port), the first. Raises
    :class:`ReportRecordError` for several TLSRPTv1 records or one without ``rua``."""
    found = [r for r in records if r.split(";", 1)[0].strip(_WSP) == "v=TLSRPTv1"]
    if not found:
        return None
    if len(found) > 1:
        raise ReportRecordError(f"{len(found)} v=TLSRPTv1 records (exactly one allowed)")
    rua: str | None = None
    for field in found[0].split(";")[1:]:
        key, eq, value = field.partition("=")
        if eq and key.strip(_WSP) == "rua" and rua is None:
            rua = value.strip(_WSP)
    if not rua:
        raise ReportRecordError("v=TLSRPTv1 record without rua")
    uris = [u.strip(_WSP) for u in rua.split(",") if u.strip(_WSP)]
    # Each destination once (one report each), as first spelled, in the record's order.
    kept: dict[tuple[str, ...], str] = {}
    for uri in uris:
        if uri.lower().startswith(_SCHEMES) and _URI.fullmatch(uri):
            kept.setdefault(_destination(uri), uri)
    if not kept:
        raise ReportRecordError(f"rua has no mailto: or https: URI: {shorten(rua, 100)}")
    return list(kept.values())[:MAX_RUA]


_AUTHORITY = re.compile(r"//([^/?]*)(.*)", re.DOTALL)


def _destination(uri: str) -> tuple[str, ...]:
    """Where the ``mailto:`` or ``https:`` ``uri`` sends a report, for keeping each once:
    the scheme and the host name in any case are one (RFC 3986 §3.1, §3.2.2), and what
    is never used is left out: the fragment (§3.5, not sent), a ``mailto:`` URI's header
    fields and percent-encoding (:func:`mailto_address`), an empty https path ("/"), and
    an https port that is the default one (443) or empty."""
    scheme, _, rest = uri.partition(":")
    rest = rest.partition("#")[0]
    if scheme.lower() == "mailto":
        try:
            local, _, domain = mailto_address(uri).rpartition("@")
        except ReportRecordError:
            return ("mailto", rest)  # its send fails, once
        return ("mailto", local, domain.lower())  # a local part's case may matter
    authority = _AUTHORITY.fullmatch(rest)
    if authority is None:
        return ("https", rest)
    userinfo, at, host = authority[1].rpartition("@")
    # The default port written out, or an empty one, is no other port (RFC 3986 §3.2.3,
    # §6.2.3): "r.example:443" and "r.example:" are "r.example". (An IPv6 address is in
    # brackets, so its own colons end no port.)
    name, colon, port = host.rpartition(":")
    if colon and not name.endswith(("[", ":")) and port in ("", "443"):
        host = name
    path = authority[2] if authority[2].startswith("/") else "/" + authority[2]
    return ("https", userinfo + at + host.lower(), path)


def mailto_address(uri: str) -> str:
    """The address a ``mailto:`` ``rua`` URI sends reports to, percent-decoded (RFC 8460
    §3 takes the URI as RFC 6068 defines it): ``mailto:tls%2Breports@example.com`` is
    ``tls+reports@example.com``. Raises :class:`ReportRecordError` for a URI that names
    no usable address; whether the address is valid is the caller's to check.

    What RFC 6068 allows beyond one address, and what is done with it:

    - A ``#fragment`` is left out, as it is by whoever follows a URI.
    - ``hfields`` (``?subject=...&cc=...&body=...``, ``?to=``) are ignored: RFC 8460 §5.3
      sets the report mail's subject and fields, and a DNS record may not add recipients
      or header fields to mail we sign and send.
    - Several addresses: a literal ``,`` never reaches here, since it separates the
      record's ``rua`` URIs (``rua=mailto:a@x,mailto:b@y`` is two URIs). A ``%2C`` that
      decodes to one is refused rather than guessed at (RFC 6068 reads it as part of one
      address, many mail programs as a separator); a domain lists each address as its
      own URI.
    - What decodes to a control character (``%0D%0A`` would start a header field of its
      own, ``%00`` cannot be stored), a bidi control, or octets that are not UTF-8 (RFC
      6068 §2 encodes text as UTF-8) is refused; so is a ``%`` not followed by two hex
      digits.

    >>> mailto_address("mailto:tls%2Breports@example.com?subject=ignored")
    'tls+reports@example.com'
    """
    scheme, rest = uri[:7], uri[7:]
    if scheme.lower() != "mailto:":
        raise ReportRecordError(f"not a mailto: URI: {shorten(uri)}")
    # A fragment is no part of the address (RFC 3986 §3.5: it ends the URI, after any
    # "?" header fields); a "#" of the address is written "%23" (RFC 6068 §2).
    to = rest.partition("#")[0].partition("?")[0]
    if _BAD_PERCENT.search(to):
        raise ReportRecordError(
            f"{shorten(uri)} has a % that is not followed by two hex digits (RFC 3986 §2.1)"
        )
    try:
        address = unquote(to, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ReportRecordError(
            f"{shorten(uri)} has percent-encoded octets that are not UTF-8"
        ) from None
    if not address:
        raise ReportRecordError(f"{shorten(uri)} names no address before any '?'")
    if not is_safe(address):
        raise ReportRecordError(f"{shorten(uri)} decodes to a control character")
    if "," in address:
        raise ReportRecordError(
            f"{shorten(uri)} decodes to several addresses; give each its own rua URI"
        )
    return address


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
        # The id's own part: after its last "_", before the "@submitter" that follows
        # it (cut first, since a submitter's name may have a "_" of its own).
        local = self.report_id.rpartition("@")[0] or self.report_id
        unique = local.rsplit("_", 1)[-1]
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
