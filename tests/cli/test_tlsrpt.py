"""``mailstrom check`` reporting MTA-STS, and ``mailstrom tlsrpt`` writing and sending the
daily TLS reports, against loopback DNS, HTTPS and SMTP servers."""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import json
import os
import resource
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest

from mailstrom.stores import SQLiteStore
from mailstrom.testing.smtp import start_receiving_server
from mailstrom.tlsrpt import PolicyType, TLSSessions
from mailstrom.tlsrpt.deliver import MAX_POSTS
from tests.cli.conftest import CLI, MailEnv
from tests.fixtures.https_server import Answer, HTTPSFactory
from tests.support.certs import self_signed, server_context, spki_sha256
from tests.support.report_rows import COUNT_VARIABLE
from tests.unit.test_tlsrpt_report import validate

ROOT = Path(__file__).parents[2]
POLICY = "version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"
DAY = date(2030, 1, 2)


def with_mta_sts(mail_env: MailEnv, https_server: HTTPSFactory, mx: str = "mx.test") -> None:
    https = https_server(names=("mta-sts.example.test",))
    https.policy(POLICY.format(mx=mx))
    mail_env.dns.txt("_mta-sts.example.test", "v=STSv1; id=20300101;")
    mail_env.dns.a("mta-sts.example.test", "127.0.0.1")
    mail_env.cli.env.update(
        MAILSTROM_MTA_STS_PORT=str(https.port),
        MAILSTROM_MTA_STS_CA_FILE=str(mail_env.workdir / "ca.pem"),
    )


def test_check_reports_the_mta_sts_policy(mail_env: MailEnv, https_server: HTTPSFactory) -> None:
    with_mta_sts(mail_env, https_server)
    report = mail_env.cli.ok("check", "--json", "example.test").json()
    sts = report["mta_sts"]
    assert sts["applied"] is True
    assert sts["records"] == ["v=STSv1; id=20300101;"]
    assert (sts["policy_id"], sts["mode"], sts["mx"], sts["max_age"]) == (
        "20300101",
        "enforce",
        ["mx.test"],
        86400,
    )
    assert sts["error"] is None
    [host] = report["hosts"]
    assert host["tls_policy"] == "mta-sts enforce"
    assert "matches mx mx.test" in host["tls_policy_reason"]
    text = mail_env.cli.ok("check", "example.test").out
    assert "MTA-STS (applied by the worker)" in text
    assert "policy:      id 20300101, mode enforce, max_age 86400" in text


def test_check_shows_the_mx_lines_a_policy_ignores(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # ".example.test" is no pattern (RFC 8461 §3.2): it allows no host, and the policy
    # applies with the rest; check says which lines that was, as the worker logs it.
    with_mta_sts(mail_env, https_server, mx="mx.test\nmx: .example.test")
    sts = mail_env.cli.ok("check", "--json", "example.test").json()["mta_sts"]
    assert (sts["mx"], sts["ignored_mx"], sts["error"]) == (["mx.test"], [".example.test"], None)
    text = mail_env.cli.ok("check", "example.test").out
    assert "mx ignored:  '.example.test' (not a host name or *.name" in text


def test_check_enforce_policy_not_listing_the_mx(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    with_mta_sts(mail_env, https_server, mx="mx.elsewhere.example")
    result = mail_env.cli("check", "example.test")
    assert result.code == 69
    assert "would defer (MTA-STS enforce): mx.test is not listed" in result.out
    # A tls.domains entry is the operator's word: MTA-STS is not asked for that domain.
    mail_env.cli.env["MAILSTROM_TLS_DOMAINS"] = "example.test=opportunistic"
    assert mail_env.cli("check", "example.test").code == 0


def test_check_applies_an_enforce_policy_beside_unusable_tlsa_records(
    mail_env: MailEnv, https_server: HTTPSFactory, tmp_path: Path
) -> None:
    """Validated TLSA records that are all unusable (PKIX-EE) ask for TLS, unauthenticated,
    and leave MTA-STS in force (RFC 8461 §2): the worker applies the enforce policy and
    defers a host whose certificate does not verify. ``check`` took the DANE answer for
    the last word and said the host would get the mail over TLS."""
    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    try:
        mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
        with_mta_sts(mail_env, https_server)
        mail_env.dns.tlsa("_25._tcp.mx.test", (1, 1, 1, spki_sha256(cert)))
        mail_env.dns.authenticated(everything=True)
        mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
        result = mail_env.cli("check", "--json", "example.test")
        assert result.code == 69, result.out
        [host] = result.json()["hosts"]
        assert host["tls_policy"] == "mta-sts enforce"
        [address] = host["addresses"]
        assert not address["usable"]
        assert address["verdict"].startswith("would defer (MTA-STS enforce)")
    finally:
        mx.stop()


def test_check_domain_without_mta_sts(mail_env: MailEnv) -> None:
    report = mail_env.cli.ok("check", "--json", "example.test").json()
    assert report["mta_sts"]["records"] == []
    assert report["mta_sts"]["applied"] is False
    assert "no _mta-sts TXT record" in mail_env.cli.ok("check", "example.test").out


def test_check_domain_whose_mta_sts_records_are_none_of_sts(mail_env: MailEnv) -> None:
    # No ";" after the version: the record is not an STSv1 one (RFC 8461 §3.1), and the
    # worker applies no policy. check printed "policy: id None, mode None, max_age None".
    mail_env.dns.txt("_mta-sts.example.test", "v=STSv1 id=20300101")
    report = mail_env.cli.ok("check", "--json", "example.test").json()
    assert (report["mta_sts"]["records"], report["mta_sts"]["policy_id"]) == (
        ["v=STSv1 id=20300101"],
        None,
    )
    text = mail_env.cli.ok("check", "example.test").out
    assert "TXT:         v=STSv1 id=20300101" in text
    assert "none is a v=STSv1 record: the domain publishes no policy" in text
    assert "id None" not in text


def seed(workdir: Path) -> None:
    store = SQLiteStore(workdir / "queue.db")
    try:
        text = POLICY.format(mx="mx.test").strip()
        store.add_tls_sessions(
            [
                TLSSessions(
                    day=DAY,
                    policy_domain="example.test",
                    policy_type=PolicyType.STS,
                    policy_string=text,
                    count=41,
                ),
                TLSSessions(
                    day=DAY,
                    policy_domain="example.test",
                    policy_type=PolicyType.STS,
                    policy_string=text,
                    result_type="certificate-host-mismatch",
                    receiving_mx="mx.test",
                    receiving_ip="127.0.0.1",
                    count=2,
                ),
                TLSSessions(
                    day=DAY, policy_domain="other.test", policy_type=PolicyType.STS, count=5
                ),
            ]
        )
    finally:
        store.close()


def test_tlsrpt_writes_and_sends_reports(mail_env: MailEnv, https_server: HTTPSFactory) -> None:
    cli, workdir = mail_env.cli, mail_env.workdir
    seed(workdir)
    collector = https_server(names=("127.0.0.1",))
    collector.routes["/tlsrpt"] = Answer(status=201)
    mail_env.dns.txt(
        "_smtp._tls.example.test",
        f"v=TLSRPTv1; rua=mailto:tls@example.test,https://127.0.0.1:{collector.port}/tlsrpt",
    )
    out = workdir / "reports"
    out.mkdir()
    result = cli.ok(
        "tlsrpt",
        "--date",
        DAY.isoformat(),
        "--out",
        str(out),
        "--send",
        "--organization",
        "Client Org",
        "--contact",
        "postmaster@client.test",
        "--json",
    ).json()
    assert result["date"] == "2030-01-02"
    mine, other = result["domains"]
    assert other == {
        "domain": "other.test",
        "rua": [],
        "file": None,
        "report_id": None,
        "problem": "no _smtp._tls record: no report wanted",
        "sent": [],
    }
    assert [d["ok"] for d in mine["sent"]] == [True, True]
    # The file: RFC 8460 JSON with the counts.
    [written] = out.glob("*.json")
    assert written.name.startswith("client.test!example.test!1893542400!1893628799!")
    document = json.loads(written.read_bytes())
    validate(document)
    assert document["organization-name"] == "Client Org"
    [entry] = document["policies"]
    assert entry["summary"] == {
        "total-successful-session-count": 41,
        "total-failure-session-count": 2,
    }
    # The POST: the same report, gzipped.
    [post] = [r for r in collector.requests if r.path == "/tlsrpt"]
    assert post.method == "POST"
    assert post.headers["Content-Type"] == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(post.body)) == document
    # The mail: queued, then delivered by a worker to example.test's MX.
    cli.ok("worker", "--once")
    [received] = mail_env.mx.wait_for_messages(1)
    parsed = message_from_bytes(received.content, policy=policy.default)
    assert parsed["To"] == "tls@example.test"
    assert parsed.get_content_type() == "multipart/report"
    [attachment] = list(parsed.iter_attachments())
    assert json.loads(gzip.decompress(attachment.get_content())) == document


@pytest.mark.parametrize(
    ("options", "submitter"),
    [
        (["--contact", "tls@Reports.Example.org"], "reports.example.org"),
        (["--contact", "https://help.test/", "--from", "TLS <tls@org.test>"], "org.test"),
        # No From with a domain: the HELO name, as before.
        (["--contact", "https://help.test/"], "client.test"),
    ],
)
def test_tlsrpt_names_the_reporting_domain_not_the_helo_name(
    mail_env: MailEnv, https_server: HTTPSFactory, options: list[str], submitter: str
) -> None:
    # RFC 8460 §5.3: the file name starts with the reporting organization's domain, the
    # one TLS-Report-Submitter names and its DKIM signature's d= is of: the From's. It
    # was the HELO name (client.test), one host's, whatever the From said.
    seed(mail_env.workdir)
    collector = https_server(names=("127.0.0.1",))
    collector.routes["/tlsrpt"] = Answer(status=200)
    mail_env.dns.txt(
        "_smtp._tls.example.test",
        f"v=TLSRPTv1; rua=mailto:tls@example.test,https://127.0.0.1:{collector.port}/tlsrpt",
    )
    out = mail_env.workdir / "reports"
    out.mkdir()
    result = mail_env.cli(
        "tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--send", *options, "--json"
    )
    [mine, _] = result.json()["domains"]
    [written] = out.glob("*.json")
    assert written.name.startswith(f"{submitter}!example.test!"), written.name
    document = json.loads(written.read_bytes())
    assert document["report-id"].endswith(f"@{submitter}")
    if "--from" not in options and "@" not in options[1]:
        return  # no mail: the contact is no address to send it from
    assert mine["sent"][0]["ok"], mine
    mail_env.cli.ok("worker", "--once")
    [received] = mail_env.mx.wait_for_messages(1)
    parsed = message_from_bytes(received.content, policy=policy.default)
    assert parsed["TLS-Report-Submitter"] == submitter
    assert f"Submitter: {submitter} " in parsed["Subject"]
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == written.name + ".gz"


def test_tlsrpt_failed_post_exits_75(mail_env: MailEnv, https_server: HTTPSFactory) -> None:
    seed(mail_env.workdir)
    collector = https_server(names=("127.0.0.1",))
    collector.routes["/tlsrpt"] = Answer(status=500)
    mail_env.dns.txt(
        "_smtp._tls.example.test", f"v=TLSRPTv1; rua=https://127.0.0.1:{collector.port}/tlsrpt"
    )
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send")
    assert result.code == 75
    assert "FAILED: HTTP 500" in result.out


def test_tlsrpt_posts_nothing_to_this_host_without_allow_loopback(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # The rua comes from the policy domain's DNS: one naming 127.0.0.1, or a name that
    # resolves there, made ``tlsrpt --send`` POST into the operator's own host (SSRF).
    seed(mail_env.workdir)
    del mail_env.cli.env["MAILSTROM_ALLOW_LOOPBACK"]
    collector = https_server(names=("127.0.0.1", "collector.example.test"))
    collector.routes["/tlsrpt"] = Answer(status=202)
    mail_env.dns.a("collector.example.test", "127.0.0.1")
    mail_env.dns.txt(
        "_smtp._tls.example.test",
        f"v=TLSRPTv1; rua=https://127.0.0.1:{collector.port}/tlsrpt,"
        f"https://collector.example.test:{collector.port}/tlsrpt",
    )
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--json")
    # The policy domain's DNS, which a rerun does not change: failed for good, and no
    # "try again" (75) of the run.
    assert result.code == 0, result.err
    [mine, _] = result.json()["domains"]
    assert [d["permanent"] for d in mine["sent"]] == [True, True]
    assert [d["detail"] for d in mine["sent"]] == [
        "not posted: refused loopback address 127.0.0.1",
        "not posted: collector.example.test has only refused addresses: 127.0.0.1 (loopback)",
    ]
    assert collector.requests == []


def test_tlsrpt_mails_nothing_to_this_host_or_its_network_without_allow_loopback(
    mail_env: MailEnv,
) -> None:
    # A mailto: rua is the policy domain's choice as an https: one is: an address whose
    # domain routes to a private network (or is a literal of one) had the report queued,
    # and the worker delivered it there, into the operator's own network.
    seed(mail_env.workdir)
    del mail_env.cli.env["MAILSTROM_ALLOW_LOOPBACK"]
    mail_env.dns.mx("inside.test", [(10, "mx.inside.test")])
    mail_env.dns.a("mx.inside.test", "10.1.2.3")
    mail_env.dns.txt(
        "_smtp._tls.example.test",
        "v=TLSRPTv1; rua=mailto:tls@inside.test,mailto:tls@[192.168.1.1],mailto:tls@example.test",
    )
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--json")
    assert result.code == 0, result.err
    [mine, _] = result.json()["domains"]
    assert [d["ok"] for d in mine["sent"]] == [False, False, False]
    assert [d["permanent"] for d in mine["sent"]] == [True, True, True]
    details = [d["detail"] for d in mine["sent"]]
    assert "10.1.2.3 (private)" in details[0], details
    assert "192.168.1.1 (private)" in details[1], details
    assert "127.0.0.1 (loopback" in details[2], details
    assert mail_env.cli.ok("queue", "--json", "--state", "any").json() == []


def test_tlsrpt_posts_to_a_named_collector_at_the_address_its_dns_gives(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # The collector's name is looked up through mailstrom's resolver (the loopback DNS
    # server here, which the system resolver does not ask) and checked against its
    # certificate; allow_loopback (set by mail_env) admits 127.0.0.1.
    seed(mail_env.workdir)
    collector = https_server(names=("collector.example.test",))
    collector.routes["/tlsrpt"] = Answer(status=202)
    mail_env.dns.a("collector.example.test", "127.0.0.1")
    mail_env.dns.txt(
        "_smtp._tls.example.test",
        f"v=TLSRPTv1; rua=https://collector.example.test:{collector.port}/tlsrpt",
    )
    out = mail_env.cli.ok("tlsrpt", "--date", DAY.isoformat(), "--send").out
    assert f"https://collector.example.test:{collector.port}/tlsrpt: ok: posted" in out
    [post] = collector.requests
    assert post.headers["Host"] == f"collector.example.test:{collector.port}"


def test_tlsrpt_mailto_without_an_address_fails_that_report_only(mail_env: MailEnv) -> None:
    # "mailto:tls@" raised IndexError out of the email package: exit 70, no report sent.
    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@")
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send")
    assert result.code == 0, result.err  # the record's to mend, not a rerun's: no 75
    assert "mailto:tls@: FAILED for good: invalid address 'tls@'" in result.out


def test_tlsrpt_mailto_is_percent_decoded(mail_env: MailEnv) -> None:
    # RFC 8460 §3's mailto: is RFC 6068's: the report was queued to the undecoded
    # "tls%2Breports@example.test"; a %0D%0A decoding to a header field is refused.
    seed(mail_env.workdir)
    mail_env.dns.txt(
        "_smtp._tls.example.test",
        "v=TLSRPTv1; rua=mailto:tls%2Breports@example.test?subject=x,"
        "mailto:a@example.test%0D%0ABcc:c@example.test",
    )
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send")
    assert result.code == 0, result.err  # the refused URI fails for good, not the run
    assert "mailto:tls%2Breports@example.test?subject=x: ok: queued as" in result.out
    # No dkim.keys here: the report goes, but its receiver will ignore it (RFC 8460 §3).
    assert "(NOT DKIM-signed: receivers ignore unsigned reports; see dkim.keys)" in result.out
    assert "%0D%0ABcc:c@example.test: FAILED for good:" in result.out
    assert "decodes to a control character" in result.out
    mail_env.cli.ok("worker", "--once")
    [received] = mail_env.mx.wait_for_messages(1)
    parsed = message_from_bytes(received.content, policy=policy.default)
    assert parsed["To"] == "tls+reports@example.test"
    assert received.rcpt_tos == ("tls+reports@example.test",)


def seed_domains(workdir: Path, domains: list[str]) -> None:
    store = SQLiteStore(workdir / "queue.db")
    try:
        store.add_tls_sessions(
            [
                TLSSessions(day=DAY, policy_domain=d, policy_type=PolicyType.STS, count=1)
                for d in domains
            ]
        )
    finally:
        store.close()


def no_answer(seconds: str) -> str:
    return f"no answer within {seconds} s (lookup, connection, request and answer head)"


def test_tlsrpt_posts_at_once_each_within_post_timeout(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # The POSTs went one after another, each with 30 s that no option could shorten: 100
    # policy domains whose collectors take the report and never answer held a daily run
    # 50 minutes, into the next one.
    domains = [f"d{i:02}.test" for i in range(16)]
    seed_domains(mail_env.workdir, domains)
    collector = https_server(names=("127.0.0.1",))
    base = f"https://127.0.0.1:{collector.port}"
    for domain in domains:
        collector.routes[f"/{domain}"] = Answer(hang=True)
        mail_env.dns.txt(f"_smtp._tls.{domain}", f"v=TLSRPTv1; rua={base}/{domain}")
    # Two seconds: connecting gets under half of it (CONNECT_SHARE). With 0.5 s the run's
    # first POST, on a loaded machine, gave up connecting and never reached the collector.
    timeout = 2.0
    result = mail_env.cli(
        "tlsrpt", "--date", DAY.isoformat(), "--send", "--post-timeout", f"{timeout}", "--json"
    )
    assert result.code == 75, result.err
    # Several at a time (MAX_POSTS at most), not one after another. (Counted, not timed:
    # a loaded machine stretches the wall time, not how many the collector held at once.)
    assert 1 < collector.most_hanging <= MAX_POSTS, collector.most_hanging
    reported = result.json()["domains"]
    assert [r["domain"] for r in reported] == domains
    for domain, entry in zip(domains, reported, strict=True):
        assert entry["sent"] == [
            {
                "uri": f"{base}/{domain}",
                "ok": False,
                "detail": no_answer(f"{timeout:g}"),
                "permanent": False,
            }
        ]
    assert sorted(r.path for r in collector.requests) == [f"/{d}" for d in domains]


def test_tlsrpt_prints_the_results_in_the_records_order(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # The POSTs finish in any order (the silent one last); the lines keep the domains'
    # order, each record's rua order, and the mailed copy's place among them.
    seed_domains(mail_env.workdir, ["a.test", "b.test"])
    collector = https_server(names=("127.0.0.1",))
    base = f"https://127.0.0.1:{collector.port}"
    collector.routes["/silent"] = Answer(hang=True)
    collector.routes["/ok"] = Answer(status=202)
    collector.routes["/broken"] = Answer(status=500)
    mail_env.dns.txt(
        "_smtp._tls.a.test", f"v=TLSRPTv1; rua={base}/silent,mailto:tls@example.test,{base}/ok"
    )
    mail_env.dns.txt("_smtp._tls.b.test", f"v=TLSRPTv1; rua={base}/broken")
    # A second: the answering collector must answer within it, on a loaded machine too.
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--post-timeout", "1s")
    assert result.code == 75, result.err
    lines = result.out.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == [
        "a.test",
        "b.test",
    ]
    sent = [line.strip() for line in lines if line.startswith(" ")]
    assert sent[0] == f"{base}/silent: FAILED: {no_answer('1')}"
    assert sent[1].startswith("mailto:tls@example.test: ok: queued as ")
    assert sent[2:] == [f"{base}/ok: ok: posted", f"{base}/broken: FAILED: HTTP 500"]


def test_tlsrpt_post_timeout_setting_and_option(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    seed_domains(mail_env.workdir, ["a.test"])
    collector = https_server(names=("127.0.0.1",))
    collector.routes["/silent"] = Answer(hang=True)
    url = f"https://127.0.0.1:{collector.port}/silent"
    mail_env.dns.txt("_smtp._tls.a.test", f"v=TLSRPTv1; rua={url}")
    mail_env.cli.env["MAILSTROM_TLSRPT_POST_TIMEOUT"] = "200ms"
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send")
    assert result.code == 75, result.err
    assert f"{url}: FAILED: {no_answer('0.2')}" in result.out
    # The option wins over the setting.
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--post-timeout", "0.25")
    assert f"{url}: FAILED: {no_answer('0.25')}" in result.out


@pytest.mark.parametrize(
    "value", ["0", "0ms", "-1", "nan", "inf", "1e3", "\u0663", "", "5 x", "9" * 5000 + "x"]
)
def test_tlsrpt_bad_post_timeout_is_a_usage_error(cli: CLI, value: str) -> None:
    result = cli("tlsrpt", "--date", "2030-01-02", f"--post-timeout={value}")
    assert result.code == 64, result.err
    [message] = [line for line in result.err_lines if line.startswith("mailstrom:")]
    assert message.startswith("mailstrom: argument --post-timeout: "), message
    assert len(message) < 200, message  # a long value is quoted in part


def test_tlsrpt_bad_post_timeout_setting_is_a_config_error(cli: CLI) -> None:
    cli.env["MAILSTROM_TLSRPT_POST_TIMEOUT"] = "0"
    result = cli("tlsrpt", "--date", "2030-01-02")
    assert result.code == 78, result.err
    assert "tlsrpt.post_timeout: expected a duration > 0" in result.err


def test_tlsrpt_without_sessions(mail_env: MailEnv) -> None:
    out = mail_env.cli.ok("tlsrpt", "--date", "2030-01-02").out
    assert "no TLS sessions counted" in out


def test_tlsrpt_bad_date(mail_env: MailEnv) -> None:
    result = mail_env.cli("tlsrpt", "--date", "yesterday")
    assert result.code == 64
    assert "YYYY-MM-DD" in result.err


@pytest.mark.parametrize("value", ["20300102", "2030-W01-3", "2030-002", "\uff12030-01-02"])
def test_tlsrpt_date_is_an_iso_calendar_date_only(cli: CLI, value: str) -> None:
    """``--date 20300102`` (and ISO week or ordinal dates, or non-ASCII digits) were
    taken, as Python 3.11's date.fromisoformat() reads them, though --date promises
    YYYY-MM-DD: a typo reported some other day's sessions or none."""
    result = cli("tlsrpt", "--date", value)
    assert result.code == 64, (value, result.err)
    assert "YYYY-MM-DD" in result.err


def deliver_and_report(mail_env: MailEnv) -> dict[str, Any]:
    """Queue a message to bob@example.test, let a worker that counts TLS sessions deliver
    it, and return the report ``mailstrom tlsrpt`` writes for example.test that day."""
    cli = mail_env.cli
    cli.env["MAILSTROM_TLSRPT_RECORD"] = "true"
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    cli.ok("send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x")
    before = datetime.now(UTC).date()
    cli.ok("worker", "--once")
    days = sorted({before, datetime.now(UTC).date()})  # the worker may cross midnight
    out = mail_env.workdir / "reports"
    out.mkdir()
    for day in days:
        cli.ok("tlsrpt", "--date", day.isoformat(), "--out", str(out))
    [written] = out.iterdir()
    assert "!example.test!" in written.name
    document: dict[str, Any] = json.loads(written.read_bytes())
    validate(document)
    return document


def test_tlsrpt_reports_opportunistic_sessions_as_no_policy_found(mail_env: MailEnv) -> None:
    document = deliver_and_report(mail_env)
    [received] = mail_env.mx.wait_for_messages(1)
    assert received.tls
    [entry] = document["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.test"}
    assert entry["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 0,
    }


def test_a_mailed_reports_own_delivery_is_no_session_of_the_next_report(
    mail_env: MailEnv,
) -> None:
    # RFC 8460 §3: a report sent by SMTP is delivered despite TLS failures and its session
    # SHOULD NOT be in the next report. It was counted (no-policy-found, as TLS-Required:
    # No mail is): each day's report to a domain made one about the day's report mail.
    cli, workdir = mail_env.cli, mail_env.workdir
    seed(workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    cli.ok("tlsrpt", "--date", DAY.isoformat(), "--send")
    cli.env["MAILSTROM_TLSRPT_RECORD"] = "true"
    before = datetime.now(UTC).date()
    cli.ok("worker", "--once")
    [received] = mail_env.mx.wait_for_messages(1)
    assert received.tls
    assert "TLS-Report-Domain: example.test" in received.content.decode()
    store = SQLiteStore(workdir / "queue.db")
    try:
        counted = [s for day in {before, datetime.now(UTC).date()} for s in store.tls_sessions(day)]
    finally:
        store.close()
    assert counted == []


def test_tlsrpt_reports_dane_sessions_without_mta_sts(mail_env: MailEnv, tmp_path: Path) -> None:
    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    try:
        mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
        mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
        mail_env.dns.tlsa("_25._tcp.mx.test", (3, 1, 1, spki_sha256(cert)))
        mail_env.dns.authenticated(everything=True)
        document = deliver_and_report(mail_env)
        [received] = mx.wait_for_messages(1)
        assert received.tls
    finally:
        mx.stop()
    [entry] = document["policies"]
    assert entry["policy"] == {
        "policy-type": "tlsa",
        "policy-string": [f"3 1 1 {spki_sha256(cert).hex()}"],
        "policy-domain": "example.test",
        "mx-host": ["mx.test"],
    }
    assert entry["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 0,
    }


def test_tlsrpt_from_without_an_address_fails_the_mailed_copies(mail_env: MailEnv) -> None:
    # "--from tls@" (or tlsrpt.from) raised IndexError out of the email package: exit 70,
    # with the reports of the other domains neither written nor sent.
    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--from", "tls@")
    assert result.code == 75, result.err
    assert "mailto:tls@example.test: FAILED: " in result.out
    assert "tls@" in result.out.partition("FAILED: ")[2]


def test_a_report_signed_by_a_dkim_key_of_its_domain_carries_no_warning(mail_env: MailEnv) -> None:
    """With a key for the From domain the report is signed, and "ok" says all there is."""
    from tests.support.dkim import ED25519, pem

    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    key = mail_env.workdir / "k.pem"
    key.write_bytes(pem(ED25519))
    key.chmod(0o600)
    config = mail_env.workdir / "dkim.toml"
    config.write_text(
        f'[[dkim.keys]]\ndomain = "client.test"\nselector = "s1"\nprivate_key = "{key}"\n'
        'algorithm = "ed25519-sha256"\n'
    )
    result = mail_env.cli(
        "--config",
        str(config),
        "tlsrpt",
        "--date",
        DAY.isoformat(),
        "--send",
        "--from",
        "tls-reports@client.test",
    )
    assert result.code == 0, result.err
    assert "mailto:tls@example.test: ok: queued as " in result.out
    assert "NOT DKIM-signed" not in result.out


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        (
            ("v=TLSRPTv1; rua=mailto:a@example.test", "v=TLSRPTv1; rua=mailto:b@example.test"),
            "2 v=TLSRPTv1 records (exactly one allowed)",
        ),
        (("v=TLSRPTv1; ruf=mailto:a@example.test",), "v=TLSRPTv1 record without rua"),
        (("v=TLSRPTv1; rua=ftp://example.test/",), "rua has no mailto: or https: URI"),
    ],
    ids=["two records", "no rua", "no usable uri"],
)
def test_tlsrpt_unusable_record_is_no_report_wanted_not_a_failure(
    mail_env: MailEnv, records: tuple[str, ...], problem: str
) -> None:
    # RFC 8460 §3: with other than one TLSRPTv1 record, the domain is taken not to do
    # TLSRPT. Such a record (the policy domain's own DNS, which running again does not
    # change) exited 75, "run it again", at every daily run.
    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", *records)
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--json")
    assert result.code == 0, result.err
    mine, other = result.json()["domains"]
    assert mine["problem"].startswith("_smtp._tls record unusable: " + problem), mine
    assert (mine["file"], mine["sent"]) == (None, [])
    assert other["problem"] == "no _smtp._tls record: no report wanted"


def test_tlsrpt_failed_record_lookup_exits_75(mail_env: MailEnv) -> None:
    # Unlike an unusable record, a lookup that failed may work the next time.
    seed(mail_env.workdir)
    mail_env.dns.servfail("_smtp._tls.example.test")
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--json")
    assert result.code == 75, result.err
    mine, _ = result.json()["domains"]
    assert "TXT lookup of _smtp._tls.example.test failed" in mine["problem"]


def test_a_long_policy_domain_gets_its_report_under_a_file_name_that_fits(
    mail_env: MailEnv,
) -> None:
    # The RFC 8460 §5.3 name is the submitter, the domain, two times and an id: for a
    # policy domain over about 200 octets (names may have 253) it passed the 255 octets
    # a file name may have, and the run stopped with a traceback at that domain (exit
    # 70): the reports of the domains after it were never written, nor any https: one
    # of the run posted.
    long_domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "long.test"])
    seed_domains(mail_env.workdir, [long_domain, "other.test"])
    for domain in (long_domain, "other.test"):
        mail_env.dns.txt(f"_smtp._tls.{domain}", "v=TLSRPTv1; rua=mailto:tls@example.test")
    out = mail_env.workdir / "reports"
    out.mkdir()
    result = mail_env.cli(
        "tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--send", "--json"
    )
    assert result.code == 0, result.err
    reported = result.json()["domains"]
    assert [r["domain"] for r in reported] == [long_domain, "other.test"]
    assert [[d["ok"] for d in r["sent"]] for r in reported] == [[True], [True]]
    written = sorted(out.glob("*.json"))
    assert sorted(str(path) for path in written) == sorted(r["file"] for r in reported)
    for path in written:
        assert len(path.name.encode()) <= 255
        assert path.name.startswith("client.test!") and path.name.endswith(".json")
    by_domain = {
        json.loads(p.read_bytes())["policies"][0]["policy"]["policy-domain"] for p in written
    }
    assert by_domain == {long_domain, "other.test"}


def test_each_report_is_built_from_its_own_domains_sessions_only(mail_env: MailEnv) -> None:
    # Every policy domain's report was built from the whole day's counters, each time
    # skipping the other domains' rows: the work grew as domains times rows (4,000
    # reporting domains took 0.7 s; a large sender's tens of thousands, minutes).
    domains = [f"d{i}.test" for i in range(20)]
    seed_domains(mail_env.workdir, domains)
    for domain in domains:
        mail_env.dns.txt(f"_smtp._tls.{domain}", "v=TLSRPTv1; rua=mailto:tls@example.test")
    counts = mail_env.workdir / "rows"
    env = dict(mail_env.cli.env)
    env[COUNT_VARIABLE] = str(counts)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    cli = dataclasses.replace(mail_env.cli, env=env, module="tests.support.report_rows")
    out = mail_env.workdir / "reports"
    out.mkdir()
    cli.ok("tlsrpt", "--date", DAY.isoformat(), "--out", str(out))
    # One row per domain was stored: each report is handed its one row.
    assert counts.read_text().split() == ["1"] * len(domains)
    assert len(list(out.iterdir())) == len(domains)


def test_a_report_that_cannot_be_written_fails_the_run_after_the_others(
    mail_env: MailEnv,
) -> None:
    # Any OSError but a too-long name (disk full, no right to the directory, a file
    # too large) ended the run at that domain as an internal error (exit 70), with
    # the reports of the domains after it never written. Files may not grow past 3,000
    # octets here (as root, permission bits would not stop a write): b.test's report,
    # with its long policy, cannot be written; a.test's and c.test's can.
    long_policy = "version: STSv1\nmode: enforce\n" + "".join(
        f"mx: mx{i}.b.test\n" for i in range(200)
    )
    store = SQLiteStore(mail_env.workdir / "queue.db")
    try:
        store.add_tls_sessions(
            [
                TLSSessions(day=DAY, policy_domain=domain, policy_type=PolicyType.STS)
                for domain in ("a.test", "c.test")
            ]
            + [
                TLSSessions(
                    day=DAY,
                    policy_domain="b.test",
                    policy_type=PolicyType.STS,
                    policy_string=long_policy,
                )
            ]
        )
    finally:
        store.close()
    for domain in ("a.test", "b.test", "c.test"):
        mail_env.dns.txt(f"_smtp._tls.{domain}", "v=TLSRPTv1; rua=mailto:tls@example.test")
    out = mail_env.workdir / "reports"
    out.mkdir()

    json_run = run_with_small_files(
        mail_env.cli, "tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--json"
    )
    assert json_run.returncode == 73, json_run.stderr
    a, b, c = json.loads(json_run.stdout)["domains"]
    assert [a["domain"], b["domain"], c["domain"]] == ["a.test", "b.test", "c.test"]
    assert (b["file"], b["report_id"]) == (None, None)
    assert b["problem"].startswith("report not written: File too large: "), b
    assert str(out) in b["problem"]
    assert not list(out.glob("*!b.test!*"))  # nor half of it, nor its temporary file
    written = sorted(path.name.split("!")[1] for path in out.iterdir())
    assert written == ["a.test", "c.test"]
    assert sorted(Path(r["file"]).name.split("!")[1] for r in (a, c)) == written
    text_run = run_with_small_files(
        mail_env.cli, "tlsrpt", "--date", DAY.isoformat(), "--out", str(out)
    )
    assert text_run.returncode == 73, text_run.stderr
    assert "b.test: report not written: File too large: " in text_run.stdout


def run_with_small_files(cli: CLI, *args: str) -> subprocess.CompletedProcess[str]:
    """The command with files that may not grow past 3,000 octets (RLIMIT_FSIZE: root
    too; Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""

    def small_files() -> None:  # in the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    return subprocess.run(
        [sys.executable, "-m", "mailstrom", *args],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=small_files,
    )


def test_one_unusable_rua_uri_is_no_failure_of_the_run(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    """A ``rua`` naming a bad address, a URL with no valid host name, or a collector that
    answers 404, next to good URIs: running again cannot change them (they are the policy
    domain's to fix, as an unusable record is), and the run exited 75, "try again", every
    day. They are shown as failed for good, and the run exits 0; a collector that answers
    500 (or never) may take the report later, and still fails the run."""
    seed(mail_env.workdir)
    collector = https_server(names=("127.0.0.1",))
    base = f"https://127.0.0.1:{collector.port}"
    collector.routes["/ok"] = Answer(status=202)
    collector.routes["/gone"] = Answer(status=404)
    collector.routes["/broken"] = Answer(status=500)
    rua = f"mailto:tls@,https://-x-.test/x,{base}/gone,mailto:tls@example.test,{base}/ok"
    mail_env.dns.txt("_smtp._tls.example.test", f"v=TLSRPTv1; rua={rua}")
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send", "--json")
    assert result.code == 0, result.out + result.err
    [mine, _] = result.json()["domains"]
    assert [(d["ok"], d["permanent"]) for d in mine["sent"]] == [
        (False, True),
        (False, True),
        (False, True),
        (True, False),
        (True, False),
    ]
    text = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--out", str(mail_env.workdir)).out
    assert "FAILED" not in text  # without --send nothing is sent, nothing fails

    mail_env.dns.txt("_smtp._tls.example.test", f"v=TLSRPTv1; rua=mailto:tls@,{base}/broken")
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--send")
    assert result.code == 75, result.err
    assert "mailto:tls@: FAILED for good: invalid address 'tls@'" in result.out
    assert f"{base}/broken: FAILED: HTTP 500" in result.out


def test_a_rerun_sends_only_to_the_uris_not_done_with_the_same_report(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    """The run that failed to POST (75: run it again) had queued the mailed copy; the
    rerun queued it again, and with a new report id, so the domain counted the day twice.
    A rerun now sends only where the earlier runs did not, the same report (its id kept,
    its file rewritten, not a second one)."""
    seed(mail_env.workdir)
    collector = https_server(names=("127.0.0.1",))
    url = f"https://127.0.0.1:{collector.port}/tlsrpt"
    collector.routes["/tlsrpt"] = Answer(status=503)
    mail_env.dns.txt("_smtp._tls.example.test", f"v=TLSRPTv1; rua=mailto:tls@example.test,{url}")
    out = mail_env.workdir / "reports"
    out.mkdir()
    run = ("tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--send", "--json")
    first = mail_env.cli(*run)
    assert first.code == 75, first.err
    [queued] = mail_env.cli.queue_ids()
    [report_file] = [p for p in out.iterdir() if p.suffix == ".json"]

    collector.routes["/tlsrpt"] = Answer(status=202)
    second = mail_env.cli(*run)
    assert second.code == 0, second.err
    [mine, _] = second.json()["domains"]
    assert [d["ok"] for d in mine["sent"]] == [True, True]
    assert "earlier run" in mine["sent"][0]["detail"]
    assert mail_env.cli.queue_ids() == [queued]  # not mailed twice
    assert [p for p in out.iterdir() if p.suffix == ".json"] == [report_file]
    [_, post] = [r for r in collector.requests if r.path == "/tlsrpt"]
    document = json.loads(report_file.read_bytes())
    assert json.loads(gzip.decompress(post.body))["report-id"] == document["report-id"]

    third = mail_env.cli(*run)  # all done: nothing is sent again
    assert third.code == 0, third.err
    assert len([r for r in collector.requests if r.path == "/tlsrpt"]) == 2
    assert mail_env.cli.queue_ids() == [queued]
    # A record that cannot be read stops the run, rather than send everything again.
    (out / f"tlsrpt-{DAY.isoformat()}.sent").write_text("{not json")
    damaged = mail_env.cli(*run)
    assert damaged.code == 66, damaged.err
    assert "damaged" in damaged.err
    assert mail_env.cli.queue_ids() == [queued]


def test_a_deeply_nested_record_of_sent_reports_is_damaged_not_an_internal_error(
    mail_env: MailEnv,
) -> None:
    """A record (``tlsrpt-DAY.sent``) damaged into deeply nested JSON made json.loads()
    raise RecursionError, which the run reported as an internal error (70) with no word
    of the file. It is a damaged record like any other: 66, naming the file."""
    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    out = mail_env.workdir / "reports"
    out.mkdir()
    record = out / f"tlsrpt-{DAY.isoformat()}.sent"
    record.write_text('{"domains": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--send")
    assert result.code == 66, result.err
    assert str(record) in result.err and "damaged" in result.err
    assert "internal error" not in result.err
    assert mail_env.cli.queue_ids() == []


def test_runs_of_one_day_on_two_hosts_of_one_store_queue_its_mailed_report_once(
    mail_env: MailEnv,
) -> None:
    # The lock and the record of sent reports live in --out, a host's own directory:
    # every host of a shared store running the daily timer queued the day's report mail
    # again, each with a new report id, and the domain counted the sessions as often.
    cli, workdir = mail_env.cli, mail_env.workdir
    seed(workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    ids = []
    for host in ("a", "b"):
        out = workdir / host
        out.mkdir()
        result = cli.ok("tlsrpt", "--date", DAY.isoformat(), "--send", "--out", str(out), "--json")
        [delivery] = result.json()["domains"][0]["sent"]
        assert delivery["ok"], delivery
        ids.append(delivery["detail"].split()[2])
    store = SQLiteStore(workdir / "queue.db")
    try:
        queued = store.recent()
    finally:
        store.close()
    assert len(queued) == 1
    assert ids == [queued[0].id, queued[0].id]


def test_runs_of_one_day_on_two_hosts_of_one_store_post_its_report_once(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # As for the mailed report: the record of what was posted lived in --out alone, so
    # every host of a shared store running the daily timer posted the day's report to
    # each https: URI again, each copy with its own report id, and the domain counted
    # the sessions once per host. The store now holds the claim every host sees.
    cli, workdir = mail_env.cli, mail_env.workdir
    seed(workdir)
    collector = https_server(names=("collector.example.test",))
    collector.routes["/tlsrpt"] = Answer(status=202)
    mail_env.dns.a("collector.example.test", "127.0.0.1")
    url = f"https://collector.example.test:{collector.port}/tlsrpt"
    mail_env.dns.txt("_smtp._tls.example.test", f"v=TLSRPTv1; rua={url}")
    details = []
    for host in ("a", "b"):
        out = workdir / host
        out.mkdir()
        result = cli.ok("tlsrpt", "--date", DAY.isoformat(), "--send", "--out", str(out), "--json")
        [delivery] = result.json()["domains"][0]["sent"]
        assert delivery["ok"], delivery
        details.append(delivery["detail"])
    assert len(collector.requests) == 1, details
    assert details[0] == "posted" and "not posted again" in details[1], details


def test_a_post_that_failed_is_made_by_the_next_run_of_any_host(
    mail_env: MailEnv, https_server: HTTPSFactory
) -> None:
    # The claim is let go when the POST fails: the next run (here another host's) posts.
    cli, workdir = mail_env.cli, mail_env.workdir
    seed(workdir)
    collector = https_server(names=("collector.example.test",))
    collector.routes["/tlsrpt"] = Answer(status=503)
    mail_env.dns.a("collector.example.test", "127.0.0.1")
    url = f"https://collector.example.test:{collector.port}/tlsrpt"
    mail_env.dns.txt("_smtp._tls.example.test", f"v=TLSRPTv1; rua={url}")
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    args = ("tlsrpt", "--date", DAY.isoformat(), "--send", "--out")
    assert cli(*args, str(workdir / "a")).code == 75
    collector.routes["/tlsrpt"] = Answer(status=202)
    assert f"{url}: ok: posted" in cli.ok(*args, str(workdir / "b")).out
    assert len(collector.requests) == 2


def test_a_second_run_for_the_same_day_does_not_send_while_one_is_sending(
    mail_env: MailEnv,
) -> None:
    """Two ``tlsrpt --send`` runs of one day at once (a cron run and one by hand, or a
    timer's run still posting the next time it fires) each read the record of sent
    reports before the other wrote it: both sent every report, and the collectors
    counted the day twice. A run now holds the day's lock file in --out while it sends;
    another finds it held, says so and exits 75 without sending anything."""
    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    out = mail_env.workdir / "reports"
    out.mkdir()
    run = ("tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--send")
    with open(out / f"tlsrpt-{DAY.isoformat()}.lock", "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = mail_env.cli(*run)
    assert busy.code == 75, busy.err
    assert busy.err_lines == [
        f"mailstrom: another tlsrpt --send run is sending the reports of {DAY.isoformat()} "
        f"(it holds {out}/tlsrpt-{DAY.isoformat()}.lock); nothing sent"
    ]
    assert mail_env.cli.queue_ids() == []
    assert not (out / f"tlsrpt-{DAY.isoformat()}.sent").exists()

    done = mail_env.cli(*run)  # the lock is free: the run sends
    assert done.code == 0, done.err
    assert len(mail_env.cli.queue_ids()) == 1


def test_a_sending_run_prunes_the_records_of_days_long_past(mail_env: MailEnv) -> None:
    """Every day's ``--send`` run left its record of sent reports (and now its lock file)
    in --out, for ever: a file a day, never removed. A sending run now removes those of
    days older than the workers keep the day's counters (31 days: past that a rerun has
    nothing to send); its own day's, newer days' and other files stay."""
    seed(mail_env.workdir)
    mail_env.dns.txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls@example.test")
    out = mail_env.workdir / "reports"
    out.mkdir()
    recent = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    old = ["tlsrpt-2020-01-01.sent", "tlsrpt-2020-01-01.lock", "tlsrpt-2019-12-31.sent"]
    kept = [f"tlsrpt-{recent}.sent", f"tlsrpt-{recent}.lock", "tlsrpt-notes.sent", "a.json"]
    for name in old + kept:
        (out / name).write_text('{"domains": {}}')
    result = mail_env.cli("tlsrpt", "--date", DAY.isoformat(), "--out", str(out), "--send")
    assert result.code == 0, result.err
    names = {p.name for p in out.iterdir() if p.suffix != ".json" or p.name == "a.json"}
    day = DAY.isoformat()
    assert names == {*kept, f"tlsrpt-{day}.sent", f"tlsrpt-{day}.lock"}
    # Without --send nothing is written, so nothing is removed either.
    (out / old[0]).write_text('{"domains": {}}')
    mail_env.cli.ok("tlsrpt", "--date", DAY.isoformat(), "--out", str(out))
    assert (out / old[0]).exists()
