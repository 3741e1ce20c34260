"""Daily TLS reports (RFC 8460 §4): the JSON, checked field by field against the report
format of §4.4, the rua record of §3, the file name of §5.3 and the mail of §5.3."""

from __future__ import annotations

import gzip
import json
import re
from datetime import date, datetime
from email import message_from_bytes, policy
from typing import Any

import dns.asyncresolver
import pytest

from mailstrom.errors import InvalidAddress, MailstromError
from mailstrom.tlsrpt import PolicyType, ResultType, TLSSessions
from mailstrom.tlsrpt.deliver import post_report, report_message
from mailstrom.tlsrpt.report import (
    MEDIA_TYPE,
    Reporter,
    ReportRecordError,
    build_report,
    mailto_address,
    parse_tlsrpt_record,
)

DAY = date(2030, 1, 2)
STS = "version: STSv1\nmode: testing\nmx: mx1.example.org\nmx: *.example.net\nmax_age: 86400"
REPORTER = Reporter(
    organization="Sender Inc.", contact="tls@sender.test", submitter="mx.sender.test"
)
RESULT_TYPES = {t.value for t in ResultType}
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def sessions() -> list[TLSSessions]:
    base: dict[str, Any] = {
        "day": DAY,
        "policy_domain": "example.org",
        "policy_type": PolicyType.STS,
        "policy_string": STS,
    }
    return [
        TLSSessions(**base, count=120),
        TLSSessions(
            **base,
            result_type="certificate-expired",
            sending_ip="192.0.2.1",
            receiving_mx="mx1.example.org",
            receiving_ip="198.51.100.7",
            failure_code="X509_V_ERR 10: certificate has expired",
            count=3,
        ),
        TLSSessions(
            **base, result_type="starttls-not-supported", receiving_mx="mx2.example.net", count=2
        ),
        TLSSessions(
            day=DAY,
            policy_domain="example.org",
            policy_type=PolicyType.NO_POLICY,
            result_type="sts-policy-fetch-error",
            failure_code="cannot fetch",
            count=1,
        ),
        # Another domain and another day: not in this report.
        TLSSessions(**(base | {"policy_domain": "other.test"}), count=7),
        TLSSessions(**(base | {"day": date(2030, 1, 3)}), count=9),
    ]


def validate(document: dict[str, Any]) -> None:
    """RFC 8460 §4.4, every field the report must carry, with its JSON type."""
    assert isinstance(document["organization-name"], str) and document["organization-name"]
    window = document["date-range"]
    for key in ("start-datetime", "end-datetime"):
        assert DATETIME.match(window[key]), window[key]
    start = datetime.fromisoformat(window["start-datetime"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(window["end-datetime"].replace("Z", "+00:00"))
    assert start < end
    assert isinstance(document["contact-info"], str) and document["contact-info"]
    assert isinstance(document["report-id"], str) and document["report-id"]
    assert isinstance(document["policies"], list) and document["policies"]
    for entry in document["policies"]:
        p = entry["policy"]
        assert p["policy-type"] in ("tlsa", "sts", "no-policy-found")
        if p["policy-type"] == "no-policy-found":
            assert "policy-string" not in p  # no policy, no policy text
        else:
            assert isinstance(p["policy-string"], list) and p["policy-string"]
            assert all(isinstance(line, str) for line in p["policy-string"])
        assert isinstance(p["policy-domain"], str)
        if "mx-host" in p:
            assert all(isinstance(h, str) for h in p["mx-host"])
        summary = entry["summary"]
        ok = summary["total-successful-session-count"]
        failed = summary["total-failure-session-count"]
        assert isinstance(ok, int) and isinstance(failed, int) and ok >= 0 and failed >= 0
        details = entry.get("failure-details", [])
        assert sum(d["failed-session-count"] for d in details) == failed
        for d in details:
            assert d["result-type"] in RESULT_TYPES
            assert isinstance(d["failed-session-count"], int)
            for key in ("sending-mta-ip", "receiving-mx-hostname", "receiving-ip"):
                assert isinstance(d.get(key, ""), str)
            assert set(d) <= {
                "result-type",
                "sending-mta-ip",
                "receiving-mx-hostname",
                "receiving-mx-helo",
                "receiving-ip",
                "failed-session-count",
                "additional-information",
                "failure-reason-code",
            }


def test_daily_report_has_every_rfc8460_field() -> None:
    report = build_report("example.org", DAY, sessions(), REPORTER, report_id="r1@mx.sender.test")
    document = json.loads(report.json())
    validate(document)
    assert document["organization-name"] == "Sender Inc."
    assert document["contact-info"] == "tls@sender.test"
    assert document["report-id"] == "r1@mx.sender.test"
    assert document["date-range"] == {
        "start-datetime": "2030-01-02T00:00:00Z",
        "end-datetime": "2030-01-02T23:59:59Z",
    }
    sts, none = document["policies"]
    assert sts["policy"] == {
        "policy-type": "sts",
        "policy-string": STS.split("\n"),
        "policy-domain": "example.org",
        "mx-host": ["mx1.example.org", "*.example.net"],
    }
    assert sts["summary"] == {
        "total-successful-session-count": 120,
        "total-failure-session-count": 5,
    }
    expired, stripped = sts["failure-details"]
    assert expired == {
        "result-type": "certificate-expired",
        "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx1.example.org",
        "receiving-ip": "198.51.100.7",
        "failed-session-count": 3,
        "failure-reason-code": "X509_V_ERR 10: certificate has expired",
    }
    assert stripped["result-type"] == "starttls-not-supported"
    assert none["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.org"}
    assert none["summary"]["total-failure-session-count"] == 1


def test_report_without_failures_has_no_failure_details() -> None:
    only_ok = [s for s in sessions() if s.successful]
    document = build_report("example.org", DAY, only_ok, REPORTER).document
    validate(document)
    [entry] = document["policies"]
    assert "failure-details" not in entry


def test_gzip_and_file_name() -> None:
    report = build_report("example.org", DAY, sessions(), REPORTER, report_id="x_abc@h")
    assert json.loads(gzip.decompress(report.gzipped())) == report.document
    name = report.filename("mx.sender.test", gz=True)
    assert name == "mx.sender.test!example.org!1893542400!1893628799!abc.json.gz"


def test_report_mail() -> None:
    report = build_report("example.org", DAY, sessions(), REPORTER)
    msg = report_message(
        report, sender="tls@sender.test", to="tlsrpt@example.org", submitter="mx.sender.test"
    )
    parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "example.org"
    assert parsed["TLS-Report-Submitter"] == "mx.sender.test"
    assert parsed["Subject"].startswith("Report Domain: example.org Submitter: mx.sender.test")
    [attachment] = [p for p in parsed.iter_attachments()]
    assert attachment.get_content_type() == MEDIA_TYPE
    assert json.loads(gzip.decompress(attachment.get_content())) == report.document


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], None),
        (["v=spf1 -all"], None),
        (["v=TLSRPTv1; rua=mailto:tls@example.org"], ["mailto:tls@example.org"]),
        (
            ["v=TLSRPTv1;rua=mailto:a@example.org, https://r.example/x ,ftp://no"],
            ["mailto:a@example.org", "https://r.example/x"],
        ),
    ],
)
def test_rua_records(records: list[str], expected: list[str] | None) -> None:
    assert parse_tlsrpt_record(records) == expected


def test_rua_keeps_uris_only_and_each_once() -> None:
    # Found by tests/unit/test_mtasts_fuzz.py: text that is no URI was kept (a CR LF went
    # into the report mail's To field and raised ValueError out of ``tlsrpt --send``; an
    # ESC reached the output), and a URI given twice got two reports.
    record = (
        "v=TLSRPTv1; rua=mailto:a@example.org,mailto:b@example.org\r\nBcc: c@example.org,"
        "mailto:\x1b[2J@example.org,https://bücher.example/r,mailto:a@example.org"
    )
    assert parse_tlsrpt_record([record]) == ["mailto:a@example.org"]
    with pytest.raises(ReportRecordError, match="no mailto"):
        parse_tlsrpt_record(["v=TLSRPTv1; rua=mailto:a@example.org\u202e"])


def test_rua_keeps_each_destination_once() -> None:
    # URI schemes and host names are case-insensitive (RFC 3986 §3.1, §3.2.2), a
    # fragment is never sent, and a mailto: URI's header fields are ignored: each of
    # these spellings was kept as a URI of its own, and the report was sent to the
    # same address or URL once for each.
    record = (
        "v=TLSRPTv1; rua=mailto:tls@example.org,MAILTO:tls@example.org,"
        "mailto:tls@EXAMPLE.org,mailto:tls@example.org?subject=again,"
        "mailto:tls@example.org#x,mailto:%74ls@example.org,mailto:Tls@example.org,"
        "https://r.example/x,HTTPS://R.Example/x,https://r.example/x#y,"
        "https://r.example,https://r.example/"
    )
    assert parse_tlsrpt_record([record]) == [
        "mailto:tls@example.org",
        "mailto:Tls@example.org",  # a local part's case may matter (RFC 5321 §2.4)
        "https://r.example/x",
        "https://r.example",
    ]


@pytest.mark.parametrize("to", ["tls@", "=@", "tls@example.org\r\nBcc: c@example.org"])
def test_report_mail_to_no_address_is_refused(to: str) -> None:
    # Found by tests/unit/test_mtasts_fuzz.py: "mailto:tls@" raised IndexError from the
    # email package, out of ``mailstrom tlsrpt --send`` (exit 70, no other report sent).
    report = build_report("example.org", DAY, sessions(), REPORTER)
    with pytest.raises(InvalidAddress):
        report_message(report, sender="tls@sender.test", to=to, submitter="mx.sender.test")


@pytest.mark.parametrize("sender", ["tls@", "=@", "tls@sender.test\r\nBcc: c@example.org"])
def test_report_mail_from_no_address_is_refused(sender: str) -> None:
    # The sender is tlsrpt.from (--from), else tlsrpt.contact: "tls@" raised IndexError
    # from the email package, a CR LF ValueError, out of ``mailstrom tlsrpt --send``
    # (exit 70, no other report sent).
    report = build_report("example.org", DAY, sessions(), REPORTER)
    with pytest.raises(MailstromError):
        report_message(report, sender=sender, to="tlsrpt@example.org", submitter="mx.sender.test")


def test_report_mail_from_may_have_a_display_name() -> None:
    report = build_report("example.org", DAY, sessions(), REPORTER)
    msg = report_message(
        report, sender="TLS <tls@sender.test>", to="tlsrpt@example.org", submitter="s.test"
    )
    assert msg["From"] == "TLS <tls@sender.test>"


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("mailto:tls@example.org", "tls@example.org"),
        ("MAILTO:tls@example.org", "tls@example.org"),
        ("mailto:tls%2Breports@example.com", "tls+reports@example.com"),
        ("mailto:tls%2breports@example.com", "tls+reports@example.com"),
        ("mailto:%74ls@example.org", "tls@example.org"),
        ("mailto:tls@b%C3%BCcher.example", "tls@bücher.example"),
        ("mailto:tls@example.org?subject=hello&cc=c@example.org", "tls@example.org"),
        ("mailto:tls@example.org?to=other@example.org", "tls@example.org"),
        # A fragment is no part of the address (RFC 3986 §3.5); a "#" of one is "%23".
        ("mailto:tls@example.org#reports", "tls@example.org"),
        ("mailto:tls@example.org?subject=x#reports", "tls@example.org"),
        ("mailto:tls%23x@example.org", "tls#x@example.org"),
    ],
)
def test_mailto_rua_addresses_are_percent_decoded(uri: str, address: str) -> None:
    """RFC 8460 §3 takes a rua mailto: URI as RFC 6068 has it: percent-encoded. The
    report went to the undecoded 'tls%2Breports@example.com'. Header fields are ignored."""
    assert mailto_address(uri) == address


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("mailto:tls@example.org%0D%0ABcc:%20c@example.org", "control character"),
        ("mailto:tls%0A@example.org", "control character"),
        ("mailto:tls%00@example.org", "control character"),
        ("mailto:tls%1B[2J@example.org", "control character"),
        ("mailto:tls%E2%80%AE@example.org", "control character"),  # U+202E, a bidi override
        ("mailto:tls%FF@example.org", "not UTF-8"),
        ("mailto:tls%C3@example.org", "not UTF-8"),
        ("mailto:tls%2@example.org", "two hex digits"),
        ("mailto:tls%zz@example.org", "two hex digits"),
        ("mailto:a@example.org%2Cb@example.org", "several addresses"),
        ("mailto:", "no address"),
        ("mailto:?to=tls@example.org", "no address"),
        ("https://r.example/tls", "not a mailto"),
    ],
)
def test_mailto_rua_uris_that_decode_to_no_usable_address_are_refused(
    uri: str, reason: str
) -> None:
    with pytest.raises(ReportRecordError, match=reason) as info:
        mailto_address(uri)
    assert "\r" not in str(info.value) and "\n" not in str(info.value)


def test_a_decoded_mailto_address_is_still_validated() -> None:
    report = build_report("example.org", DAY, sessions(), REPORTER)
    to = mailto_address("mailto:tls%20reports@example.org")
    assert to == "tls reports@example.org"
    with pytest.raises(InvalidAddress):
        report_message(report, sender="tls@sender.test", to=to, submitter="mx.sender.test")


NO_DNS = dns.asyncresolver.Resolver(configure=False)
"""A resolver with no nameserver: these POSTs must end before any lookup."""


@pytest.mark.parametrize(
    "url", ["https://xn--/tls", "https://a..b/", "https://[::1/", "https://x.example:99999/"]
)
async def test_post_to_a_url_httpx_cannot_parse_says_so(url: str) -> None:
    # Found by the same fuzz test: an IDNAError (UnicodeError) or InvalidURL escaped.
    report = build_report("example.org", DAY, sessions(), REPORTER)
    problem = await post_report(report, url, resolver=NO_DNS, timeout=1.0)
    assert problem is not None and problem.startswith("invalid URL"), problem


@pytest.mark.parametrize(
    "host", ["exa%20mple.com", "exa%2Emple.com", "ex=ample.com", "a_b.example", "-a.example"]
)
async def test_post_to_a_host_that_is_no_host_name_is_refused(host: str) -> None:
    # An https URL's host is a DNS host name (letters, digits, inner hyphens): these were
    # looked up as written ("exa%20mple.com" is a name DNS can hold) and posted to
    # whatever answered, where the record's mistake should be said.
    report = build_report("example.org", DAY, sessions(), REPORTER)
    problem = await post_report(report, f"https://{host}/tls", resolver=NO_DNS, timeout=1.0)
    assert problem is not None and problem.startswith("invalid URL"), problem
    assert "no valid host name" in problem


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("[fe80::1]", "link-local"),
        ("10.0.0.5", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("[fd00::1]", "private"),
        ("198.18.0.1", "benchmarking"),
        ("[fec0::1]", "site-local"),
        ("192.0.2.1", "documentation"),
        ("224.0.0.1", "multicast"),
    ],
)
async def test_post_to_an_address_of_this_host_or_a_private_network_is_refused(
    host: str, kind: str
) -> None:
    # The rua URL is the policy domain's choice: such a POST went into the sender's own
    # network (SSRF). Refused before connecting (10.0.0.5 would hang until the timeout).
    report = build_report("example.org", DAY, sessions(), REPORTER)
    problem = await post_report(report, f"https://{host}:8443/admin", resolver=NO_DNS)
    assert problem is not None
    assert problem == f"not posted: refused {kind} address {host.strip('[]')}"


@pytest.mark.parametrize(
    "records",
    [
        ["v=TLSRPTv1; rua=mailto:a@x", "v=TLSRPTv1; rua=mailto:b@x"],
        ["v=TLSRPTv1;"],
        ["v=TLSRPTv1; rua=ftp://x"],
    ],
)
def test_unusable_rua_records(records: list[str]) -> None:
    with pytest.raises(ReportRecordError):
        parse_tlsrpt_record(records)


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2003"])
def test_rua_records_are_trimmed_of_wsp_only(space: str) -> None:
    """RFC 8460 §3's delimiters are *WSP: str.strip() also took a no-break space, U+3000
    or an EM SPACE, so "v=TLSRPTv1<U+3000>" was a record and "rua=<U+00A0>mailto:..."
    its address."""
    wsp = "v=TLSRPTv1 ;\trua= mailto:a@example.org\t, mailto:b@example.org ;"
    assert parse_tlsrpt_record([wsp]) == ["mailto:a@example.org", "mailto:b@example.org"]
    assert parse_tlsrpt_record([f"v=TLSRPTv1{space}; rua=mailto:a@example.org"]) is None
    with pytest.raises(ReportRecordError, match="no mailto"):
        parse_tlsrpt_record([f"v=TLSRPTv1; rua={space}mailto:a@example.org"])
    with pytest.raises(ReportRecordError, match="without rua"):
        parse_tlsrpt_record([f"v=TLSRPTv1; {space}rua=mailto:a@example.org"])


def test_tlsa_policy_names_its_mx_host() -> None:
    records = "3 1 1 ab12"
    tlsa: dict[str, Any] = {
        "day": DAY,
        "policy_domain": "example.org",
        "policy_type": PolicyType.TLSA,
        "policy_string": records,
        "receiving_mx": "mx1.example.org",
    }
    rows = [
        TLSSessions(**tlsa, count=9),
        TLSSessions(**tlsa, result_type="validation-failure", receiving_ip="192.0.2.9", count=1),
    ]
    document = build_report("example.org", DAY, rows, REPORTER).document
    validate(document)
    [entry] = document["policies"]
    assert entry["policy"] == {
        "policy-type": "tlsa",
        "policy-string": ["3 1 1 ab12"],
        "policy-domain": "example.org",
        "mx-host": ["mx1.example.org"],
    }
    assert entry["summary"] == {
        "total-successful-session-count": 9,
        "total-failure-session-count": 1,
    }


def test_file_name_unique_id_survives_an_underscore_in_the_submitter() -> None:
    # The default report-id ends in "_<random>@<submitter>"; a submitter with a "_" (as
    # a host name may have in DNS) must not cut the file name's unique-id out of it.
    reporter = Reporter(organization="S", contact="tls@s.test", submitter="mx_1.s.test")
    report = build_report("example.org", DAY, sessions(), reporter)
    unique = report.filename("mx_1.s.test").split("!")[-1].removesuffix(".json")
    assert re.fullmatch(r"[0-9a-f]{12}", unique), unique


def test_rua_with_https_default_port_written_out_is_the_same_destination() -> None:
    # ":443" in an https URL names the scheme's default port (RFC 3986 §6.2.3: the same
    # resource as without it), and so does an empty port: each spelling was a URL of its
    # own, and the collector got the day's report two or three times.
    record = (
        "v=TLSRPTv1; rua=https://r.example/tls,https://r.example:443/tls,"
        "https://R.example:/tls,https://r.example:8443/tls,https://[2001:db8::1]:443/r,"
        "https://[2001:db8::1]/r"
    )
    assert parse_tlsrpt_record([record]) == [
        "https://r.example/tls",
        "https://r.example:8443/tls",
        "https://[2001:db8::1]:443/r",
    ]
