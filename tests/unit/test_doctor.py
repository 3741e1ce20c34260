"""The sender doctor's checks over a dict-backed resolver and a fake network: no sockets.

Each check has passing and failing cases here; tests/cli/test_doctor.py runs the same
checks through the command against the loopback DNS server.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import hypothesis
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import strategies as st
from tests.support.dkim import (
    EC_SECP112R1_SPKI,
    UNSUPPORTED_CURVE_PEMS,
    read_from_fifo,
    unchecked_rsa_pem,
)

from mailstrom.cli.doctor import exit_code
from mailstrom.config import Config, DNSConfig
from mailstrom.dkim import DKIMAlgorithm, DKIMConfig
from mailstrom.dkim import DKIMKey as SigningKey
from mailstrom.dkim.keys import MAX_KEY_FILE, generate_private_key
from mailstrom.doctor import (
    Answer,
    Check,
    DKIMKey,
    DNSResolver,
    DoctorReport,
    Outcome,
    Probe,
    SenderSetup,
    Status,
    dkim_keys,
    extras,
    run_doctor,
)
from mailstrom.doctor import spf as spf_module
from mailstrom.doctor.dkim import check_dkim, parse_tags, public_key, record_for
from mailstrom.doctor.dmarc import (
    aligned,
    check_dmarc,
    is_dmarc,
    organizational_domain,
    parse_dmarc,
)
from mailstrom.doctor.dnsbl import check_dnsbl, query_name
from mailstrom.doctor.fcrdns import check_fcrdns
from mailstrom.doctor.lookup import normal_name, reverse_name
from mailstrom.doctor.mx import check_mx
from mailstrom.doctor.outgoing import (
    Target,
    check_outgoing,
    check_port25,
    find_target,
    split_probe,
)
from mailstrom.doctor.spf import TIME_LIMIT as SPF_TIME_LIMIT
from mailstrom.doctor.spf import (
    _merged,
    check_spf,
    check_spf_helo,
    evaluate,
    publishable,
    spf_records,
    with_mechanism,
)
from mailstrom.errors import ConfigError
from mailstrom.testing.dns import LoopbackDNS

IP = "192.0.2.10"
DOMAIN = "example.com"
HELO = "mail.example.com"

Zone = Mapping[tuple[str, str], "list[str] | str"]


class FakeResolver:
    """Answers from a dict: (name, type) → records, or "nxdomain" / "servfail"."""

    def __init__(self, zone: Zone) -> None:
        self.zone = {(n.lower(), t): v for (n, t), v in zone.items()}
        self.asked: list[tuple[str, str]] = []

    def lookup(self, name: str, rdtype: str) -> Answer:
        key = (name.lower().rstrip("."), rdtype)
        self.asked.append(key)
        value = self.zone.get(key)
        if value == "servfail":
            return Answer(name=name, rdtype=rdtype, outcome=Outcome.ERROR, error="SERVFAIL")
        if value is None or value == "nxdomain":
            exists = any(n == key[0] for n, _ in self.zone)
            outcome = Outcome.NODATA if exists else Outcome.NXDOMAIN
            return Answer(name=name, rdtype=rdtype, outcome=outcome)
        assert not isinstance(value, str)
        return Answer(name=name, rdtype=rdtype, outcome=Outcome.ANSWER, records=tuple(value))


@dataclass
class FakeNetwork:
    local: str = IP
    probe_result: Probe = field(
        default_factory=lambda: Probe(connected=True, greeting="220 mx.example.net ESMTP")
    )
    error: OSError | None = None
    probed: list[tuple[str, int, str | None]] = field(default_factory=list)

    def local_address(self, host: str, port: int, source: str | None) -> str:
        if self.error is not None:
            raise self.error
        return source or self.local

    def probe(self, host: str, port: int, source: str | None, timeout: float) -> Probe:
        self.probed.append((host, port, source))
        return self.probe_result


def rsa_pem(tmp_path: Path, bits: int = 2048, name: str = "key.pem") -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = tmp_path / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rsa_pem(tmp_path_factory.mktemp("keys"))


def good_zone(rsa_key: Path) -> dict[tuple[str, str], list[str] | str]:
    return {
        ("10.2.0.192.in-addr.arpa", "PTR"): [HELO + "."],
        (HELO, "A"): [IP],
        (HELO, "TXT"): ["v=spf1 a -all"],
        (DOMAIN, "TXT"): ["v=spf1 mx ip4:192.0.2.0/24 -all"],
        (DOMAIN, "MX"): ["10 mx.example.com"],
        ("mx.example.com", "A"): ["192.0.2.25"],
        (f"s1._domainkey.{DOMAIN}", "TXT"): [record_for(public_key(rsa_key.read_bytes()))],
        (f"_dmarc.{DOMAIN}", "TXT"): ["v=DMARC1; p=reject; rua=mailto:d@example.com"],
    }


# --- SPF ---------------------------------------------------------------------------------


def test_spf_pass_and_the_evaluation_asks_the_injected_resolver(rsa_key: Path) -> None:
    resolver = FakeResolver(good_zone(rsa_key))
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert (check.status, result) == (Status.PASS, "pass")
    assert (DOMAIN, "TXT") in resolver.asked
    # mx is evaluated before ip4 matches: pyspf's MX lookups went through the fake too
    assert (DOMAIN, "MX") in resolver.asked


@pytest.mark.parametrize(
    ("records", "status", "fix"),
    [
        ([], Status.FAIL, 'publish TXT at example.com: "v=spf1 ip4:192.0.2.10 ~all"'),
        (
            ["v=spf1 ip4:198.51.100.1 ~all"],
            Status.FAIL,
            'replace TXT at example.com "v=spf1 ip4:198.51.100.1 ~all" by '
            '"v=spf1 ip4:192.0.2.10 ip4:198.51.100.1 ~all"',
        ),
        (
            ["v=spf1 ip4:198.51.100.1 -all", "v=spf1 a -all"],
            Status.FAIL,
            "publish exactly one TXT at example.com starting with v=spf1: merge their "
            'mechanisms, e.g. "v=spf1 ip4:192.0.2.10 ip4:198.51.100.1 a -all"',
        ),
        (["v=spf1 moo -all"], Status.FAIL, "correct the TXT record at example.com"),
        ("servfail", Status.UNKNOWN, None),
    ],
)
def test_spf_failures_name_the_record(
    records: list[str] | str, status: Status, fix: str | None
) -> None:
    resolver = FakeResolver({(DOMAIN, "TXT"): records})
    check, _ = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert check.status is status
    if fix is None:
        assert check.fix is None
    else:
        assert check.fix is not None and check.fix.startswith(fix)


@pytest.mark.parametrize(
    "records",
    [
        # RFC 7208 §6: exp= and redirect= may each appear once in a record.
        ["v=spf1 mx exp=why.example.com -all", "v=spf1 a exp=other.example.com ~all"],
        ["v=spf1 redirect=_spf.example.net", "v=spf1 exp=why.example.com redirect=x.example"],
        ["v=spf1 a -all", "v=spf1 mx exp=why.example.com -all", "v=spf1 exp=b.example -all"],
    ],
)
def test_spf_merged_record_of_several_is_one_receivers_take(records: list[str]) -> None:
    # The fix for several SPF records is the one record to publish instead: published,
    # it must pass for the address, not be a permerror of its own.
    zone: dict[tuple[str, str], list[str] | str] = {
        (DOMAIN, "TXT"): records,
        (DOMAIN, "MX"): ["10 mx.example.com"],
        ("_spf.example.net", "TXT"): ["v=spf1 -all"],
        ("x.example", "TXT"): ["v=spf1 -all"],
    }
    check, _ = check_spf(FakeResolver(zone), domain=DOMAIN, ip=IP, helo=HELO)
    assert check.fix is not None and "merge their mechanisms" in check.fix
    merged = check.fix.split('"')[1]
    zone[(DOMAIN, "TXT")] = [merged]
    check, result = check_spf(FakeResolver(zone), domain=DOMAIN, ip=IP, helo=HELO)
    assert (check.status, result) == (Status.PASS, "pass"), (merged, check.summary)


@pytest.mark.parametrize(
    "records",
    [
        ["v=spf1 ip4:198.51.100.1 -all", "v=spf1 redirect=_spf.example.net"],
        ["v=spf1 redirect=_spf.example.net", "v=spf1 ip4:198.51.100.1 -all"],
    ],
)
def test_spf_merged_record_keeps_the_senders_of_each(records: list[str]) -> None:
    # Each record's senders pass the merged one: a redirect= of a record without "all"
    # names its provider's senders, which the merged record must not drop for the
    # other record's -all.
    zone: dict[tuple[str, str], list[str] | str] = {
        (DOMAIN, "TXT"): records,
        ("_spf.example.net", "TXT"): ["v=spf1 ip4:203.0.113.5 -all"],
    }
    check, _ = check_spf(FakeResolver(zone), domain=DOMAIN, ip=IP, helo=HELO)
    assert check.fix is not None and "merge their mechanisms" in check.fix
    merged = check.fix.split('"')[1]
    zone[(DOMAIN, "TXT")] = [merged]
    for sender in (IP, "198.51.100.1", "203.0.113.5"):
        result, _ = evaluate(
            FakeResolver(zone), ip=sender, sender=f"postmaster@{DOMAIN}", helo=HELO
        )
        assert result == "pass", (merged, sender)
    result, _ = evaluate(
        FakeResolver(zone), ip="192.0.2.99", sender=f"postmaster@{DOMAIN}", helo=HELO
    )
    assert result != "pass", merged


def _strings(fix: str, after: str) -> list[str]:
    """The quoted character-strings of the record a fix shows after ``after``."""
    shown = fix.split(after, 1)[1]
    return re.findall(r'"([^"]*)"', shown.split(" (", 1)[0])


def test_spf_merged_record_is_shown_as_strings_a_txt_record_holds() -> None:
    # Two records of 14 addresses each merge into one of some 520 octets: shown as one
    # quoted string, it could not be published (a TXT character-string holds 255 octets,
    # RFC 1035 §3.3), and its answer passes the 450 octets RFC 7208 §3.4 advises.
    records = [
        "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(1, 15)) + " -all",
        "v=spf1 " + " ".join(f"ip4:203.0.113.{i}" for i in range(1, 15)) + " -all",
    ]
    zone: dict[tuple[str, str], list[str] | str] = {(DOMAIN, "TXT"): records}
    check, _ = check_spf(FakeResolver(zone), domain=DOMAIN, ip=IP, helo=HELO)
    assert check.fix is not None
    strings = _strings(check.fix, "e.g. ")
    assert len(strings) > 1, check.fix
    assert all(len(s.encode()) <= 255 for s in strings), strings
    # Receivers join the strings without a separator (RFC 7208 §3.3): the record is the
    # merged one, cut between terms.
    merged = "".join(strings)
    assert merged == _merged(records, f"ip4:{IP}")
    assert all(s.endswith(" ") for s in strings[:-1]), strings
    assert "over the 450" in check.fix and "RFC 7208 §3.4" in check.fix
    zone[(DOMAIN, "TXT")] = [merged]
    check, result = check_spf(FakeResolver(zone), domain=DOMAIN, ip=IP, helo=HELO)
    assert (check.status, result) == (Status.PASS, "pass"), check.summary


def test_spf_record_with_the_address_added_is_shown_as_strings_too() -> None:
    # A published record near 255 octets grows past it with the mechanism put first.
    record = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(100, 112)) + " a mx -all"
    assert 240 < len(record) <= 255
    resolver = FakeResolver({(DOMAIN, "TXT"): [record]})
    check, _ = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert check.fix is not None
    strings = _strings(check.fix, " by ")
    assert [len(s) <= 255 for s in strings] == [True, True], strings
    assert "".join(strings) == with_mechanism(record, f"ip4:{IP}")
    assert "450" not in check.fix  # 250-odd octets with the name: within RFC 7208 §3.4


@pytest.mark.parametrize(
    ("record", "lengths"),
    [
        ("v=spf1 a -all", [13]),
        ("v=spf1 " + "a" * 300, [7, 255, 45]),  # a term longer than a string is cut
        # ... but never inside a character (é is two octets in UTF-8)
        ("v=spf1 " + "a" * 254 + "é" * 3, [7, 254, 6]),
    ],
)
def test_spf_publishable_strings(record: str, lengths: list[int]) -> None:
    shown = publishable("example.com", record)
    strings = re.findall(r'"([^"]*)"', shown.split(" (", 1)[0])
    assert [len(s.encode()) for s in strings] == lengths, strings
    assert "".join(strings) == record


def _merged_as_before(records: list[str], mechanism: str) -> str:
    """The merge advice as it was written first (a list searched for each term): what
    the linear one must still say."""
    terms: list[str] = []
    tail: list[str] = []
    explanation: list[str] = []
    for record in records:
        own = [term for term in record.split(" ") if term][1:]
        has_all = any(term.lower().lstrip("+-~?") == "all" for term in own)
        for term in own:
            lowered = term.lower()
            if lowered.lstrip("+-~?") == "all":
                if not tail:
                    tail.append(term)
            elif lowered.startswith("redirect="):
                include = "include:" + term[len("redirect=") :]
                if not has_all and include not in terms:
                    terms.append(include)
            elif lowered.startswith("exp="):
                if not explanation:
                    explanation.append(term)
            elif term not in terms:
                terms.append(term)
    if mechanism not in terms:
        terms.insert(0, mechanism)
    return " ".join(["v=spf1", *terms, *(tail or ["~all"]), *explanation])


_SPF_TERMS = st.sampled_from(
    [
        "a",
        "A",
        "mx",
        "-all",
        "~all",
        "all",
        "+ALL",
        "ip4:192.0.2.10",
        "ip4:198.51.100.1",
        "include:x.example",
        "redirect=x.example",
        "Redirect=y.example",
        "exp=e.example",
        "EXP=f.example",
        "ptr",
        "",
    ]
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    records=st.lists(
        st.lists(_SPF_TERMS, max_size=8).map(lambda t: " ".join(["v=spf1", *t])),
        min_size=1,
        max_size=4,
    ),
    mechanism=st.sampled_from(["ip4:192.0.2.10", "ip6:2001:db8::1"]),
)
def test_spf_merged_record_is_the_same_advice_as_before(records: list[str], mechanism: str) -> None:
    assert _merged(records, mechanism) == _merged_as_before(records, mechanism)


@pytest.mark.timeout(20)  # the fault was work growing as the square of the terms
def test_spf_merged_record_is_made_in_linear_work() -> None:
    # A 64 KiB answer holds some 30,000 terms: each was looked for in a list of those
    # kept so far, 2.4 s of CPU for one check's advice. Two records of 150,000 terms
    # each took minutes so; now a fraction of a second.
    count = 150_000
    records = [
        "v=spf1 " + " ".join(f"a:h{i}.example" for i in range(count)) + " -all",
        "v=spf1 " + " ".join(f"a:h{i}.example" for i in range(0, 2 * count, 2)) + " ~all",
    ]
    merged = _merged(records, "ip4:192.0.2.10").split(" ")
    assert merged[:3] == ["v=spf1", "ip4:192.0.2.10", "a:h0.example"]
    assert len(merged) == 2 + count + count // 2 + 1
    assert merged[-1] == "-all"


class SlowResolver(FakeResolver):
    """Each answer takes ``delay`` seconds, as a distant or hostile server's may."""

    def __init__(self, zone: Zone, delay: float) -> None:
        super().__init__(zone)
        self.delay = delay

    def lookup(self, name: str, rdtype: str) -> Answer:
        time.sleep(self.delay)
        return super().lookup(name, rdtype)


def test_spf_evaluation_has_a_time_limit_in_all() -> None:
    # Ten mx terms of ten hosts each: 111 lookups, each answered just in time.
    zone: dict[tuple[str, str], list[str] | str] = {
        (DOMAIN, "TXT"): ["v=spf1 " + " ".join(f"mx:m{i}.example.net" for i in range(10)) + " -all"]
    }
    for i in range(10):
        zone[(f"m{i}.example.net", "MX")] = [f"10 h{i}-{j}.example.net" for j in range(10)]
        zone.update({(f"h{i}-{j}.example.net", "A"): ["198.51.100.1"] for j in range(10)})
    resolver = SlowResolver(zone, delay=0.01)
    started = time.monotonic()
    result, explanation = evaluate(
        resolver, ip=IP, sender=f"postmaster@{DOMAIN}", helo=HELO, time_limit=0.1
    )
    assert time.monotonic() - started < 0.5
    assert result == "temperror", explanation
    assert len(resolver.asked) < 30
    assert SPF_TIME_LIMIT == 20.0  # what RFC 7208 §4.6.4 lets receivers stop after


@pytest.mark.timeout(20)  # the fault was CPU growing as the square of the record's length
@pytest.mark.parametrize(
    "term",
    [
        pytest.param("a:x." + "a" * 40_000 + "_", id="long-label"),
        pytest.param("exists:%{d}" + ".a" * 20_000, id="many-labels"),
    ],
)
def test_spf_evaluation_of_a_huge_term_is_linear_work(dns_server: LoopbackDNS, term: str) -> None:
    # A record as long as a DNS answer holds: pyspf's toplabel pattern backtracked over
    # the label (about 40 s of CPU here), and its expansion searched the whole term for a
    # bad macro once per label (about 25 s); the doctor's time limits bound only its DNS.
    dns_server.txt(DOMAIN, f"v=spf1 {term} -all")
    spf, result = check_spf(DNSResolver(dns_server.dns_config), domain=DOMAIN, ip=IP, helo=HELO)
    assert result in ("permerror", "fail"), spf.summary
    assert spf.status is Status.FAIL


@pytest.mark.timeout(20)  # the fault was a wait of the whole DNS timeout, here 60 s
def test_spf_evaluation_time_limit_bounds_a_lookup_that_never_returns(
    dns_server: LoopbackDNS,
) -> None:
    # pyspf gives each lookup what is left of the evaluation's time, but the adapter
    # asked the resolver with its own timeout (dns.timeout, 10 s by default): a lookup
    # that got no answer held an evaluation with 0.3 s left for the whole of it.
    dns_server.txt(DOMAIN, "v=spf1 a:silent.example.net -all")
    dns_server.drop("silent.example.net")
    config = replace(dns_server.dns_config, timeout=60.0)
    result, explanation = evaluate(
        DNSResolver(config), ip=IP, sender=f"postmaster@{DOMAIN}", helo=HELO, time_limit=0.3
    )
    assert result == "temperror", explanation


def test_spf_evaluation_looks_up_no_explanation(dns_server: LoopbackDNS) -> None:
    # pyspf looked up every exp= it read, at every level and before any mechanism, though
    # RFC 7208 §6.2 makes the explanation a fail's text to the sender, which the doctor
    # never shows: an exp= name whose server did not answer spent the evaluation's time,
    # and the a: lookup after it was a temperror where receivers pass the mail.
    dns_server.txt(DOMAIN, "v=spf1 a:mail.example.com -all exp=explain.example.com")
    dns_server.a("mail.example.com", IP)
    dns_server.drop("explain.example.com")
    config = replace(dns_server.dns_config, timeout=60.0)
    result, explanation = evaluate(
        DNSResolver(config), ip=IP, sender=f"postmaster@{DOMAIN}", helo=HELO, time_limit=1.0
    )
    assert result == "pass", explanation
    assert dns_server.queries("explain.example.com", "TXT") == 0


@pytest.mark.timeout(20)  # the fault was a wait of the whole DNS timeout, here 60 s
def test_spf_record_lookups_are_bounded_by_the_runs_budget(dns_server: LoopbackDNS) -> None:
    # The TXT lookups that read the domain's and the HELO name's records for the report
    # ran outside the run's SPF budget: each waited the resolver's whole timeout
    # (dns.timeout, 10 s by default), whatever was left of the budget.
    dns_server.drop(DOMAIN)
    dns_server.drop(HELO)
    resolver = DNSResolver(replace(dns_server.dns_config, timeout=60.0))
    spf, result = check_spf(
        resolver, domain=DOMAIN, ip=IP, helo=HELO, budget=spf_module.Budget(0.3)
    )
    assert (spf.status, result) == (Status.UNKNOWN, "temperror"), spf.summary
    assert spf.summary.startswith("temporary error: "), spf.summary
    helo = check_spf_helo(resolver, helo=HELO, ip=IP, budget=spf_module.Budget(0.3))
    assert helo.status is Status.UNKNOWN, helo.summary
    assert helo.summary.startswith("temporary error: "), helo.summary


def test_a_referral_is_a_dns_error_not_a_domain_without_records(
    dns_server: LoopbackDNS,
) -> None:
    # A resolver that does not recurse answers with a referral (NOERROR, no records, NS
    # records in the authority section, RFC 2308 §2.2), which dnspython raises NoAnswer
    # for: the doctor took it for NODATA and failed the domain, "no MX or address record:
    # it takes no mail", when its records were unknown.
    dns_server.referral(DOMAIN)
    resolver = DNSResolver(dns_server.dns_config)
    answer = resolver.lookup(DOMAIN, "MX")
    assert answer.outcome is Outcome.ERROR and "referral" in (answer.error or "")
    mx = check_mx(resolver, domain=DOMAIN)
    assert mx.status is Status.UNKNOWN, mx.summary
    dns_server.mx(DOMAIN, [])  # NODATA: no MX records, and no address either
    assert resolver.lookup(DOMAIN, "MX").outcome is Outcome.NODATA


class SlowDNS(DNSResolver):
    """The loopback server's answers, each ``delay`` seconds late (slow DNS); the names
    asked, in order."""

    def __init__(self, server: LoopbackDNS, delay: float) -> None:
        super().__init__(server.dns_config)
        self.delay = delay
        self.asked: list[str] = []

    def lookup(self, name: str, rdtype: str) -> Answer:
        self.asked.append(name)
        time.sleep(self.delay)
        return super().lookup(name, rdtype)


def test_spf_checks_of_one_run_share_one_time_budget(
    dns_server: LoopbackDNS, rsa_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each SPF evaluation had its own 20 s: the domain's, the HELO name's and the two of
    # each that ask whether the record passes every address, five in all, held a run for
    # nearly two minutes when DNS was slow. They share one budget now (twice one
    # evaluation's limit, the domain's first); what is left when it is spent is not
    # checked, and says so.
    assert spf_module.BUDGET == 2 * SPF_TIME_LIMIT
    many = " ".join(f"mx:m{i}.example.net" for i in range(10))  # 110 lookups to the end
    dns_server.txt(DOMAIN, f"v=spf1 {many} ip4:{IP} -all")
    dns_server.txt(HELO, f"v=spf1 {many} a -all")
    dns_server.a(HELO, IP)
    for i in range(10):
        hosts = [f"h{i}-{j}.example.net" for j in range(10)]
        dns_server.mx(f"m{i}.example.net", [(10, host) for host in hosts])
        for host in hosts:
            dns_server.a(host, "198.51.100.1")
    monkeypatch.setattr(spf_module, "TIME_LIMIT", 0.3)
    monkeypatch.setattr(spf_module, "BUDGET", 0.3, raising=False)
    resolver = SlowDNS(dns_server, delay=0.01)
    report = run_doctor(setup(rsa_key, dnsbls=()), resolver, FakeNetwork())
    [spf], [helo] = report.find("spf"), report.find("spf-helo")
    assert spf.status is Status.UNKNOWN, spf.summary
    assert (helo.status, helo.summary) == (Status.UNKNOWN, "not checked: time budget spent")
    # Every lookup takes 0.01 s: in 0.3 s, some 30 (fewer on a slow machine).
    assert sum(name.endswith(".example.net") for name in resolver.asked) < 40


class SteppedClock:
    """Stands in for pyspf's ``time`` module: the real wall clock plus ``offset`` seconds
    (an operator or NTP may step it either way)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


class SteppingDNS(SlowDNS):
    """:class:`SlowDNS` whose first lookup steps ``clock`` by ``step`` seconds, while the
    evaluation waits for its answer."""

    def __init__(self, server: LoopbackDNS, delay: float, clock: SteppedClock, step: float):
        super().__init__(server, delay)
        self.clock = clock
        self.step = step

    def lookup(self, name: str, rdtype: str) -> Answer:
        if not self.asked:
            self.clock.offset += self.step
        return super().lookup(name, rdtype)


def _stepping(
    dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch, *, delay: float, step: float
) -> SteppingDNS:
    import spf  # type: ignore[import-untyped]

    clock = SteppedClock()
    monkeypatch.setattr(spf, "time", clock)  # pyspf's clock: time.time() from its module
    return SteppingDNS(dns_server, delay, clock, step)


@pytest.mark.timeout(30)
def test_spf_evaluation_time_limit_holds_when_the_clock_steps_back(
    dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pyspf took each lookup's time from the wall clock: stepped back an hour during the
    # first lookup, the evaluation had an hour more, and slow DNS held it past its limit
    # (to its last lookup). Its limit is measured on the monotonic clock now.
    includes = " ".join(f"include:s{i}.example.net" for i in range(8))
    dns_server.txt(DOMAIN, f"v=spf1 {includes} ip4:{IP} -all")
    for i in range(8):
        dns_server.txt(f"s{i}.example.net", "v=spf1 -all")
    resolver = _stepping(dns_server, monkeypatch, delay=0.1, step=-3600.0)
    result, explanation = evaluate(
        resolver, ip=IP, sender=f"postmaster@{DOMAIN}", helo=HELO, time_limit=0.3
    )
    assert result == "temperror", explanation
    assert len(resolver.asked) < 9  # the nine lookups take 0.9 s: it stopped before


def test_spf_evaluation_is_not_cut_short_when_the_clock_steps_forward(
    dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wall clock stepped forward an hour during the first lookup: pyspf counted the
    # hour against the evaluation's 20 s, and its next lookup was a temperror.
    dns_server.txt(DOMAIN, f"v=spf1 include:s0.example.net ip4:{IP} -all")
    dns_server.txt("s0.example.net", "v=spf1 -all")
    resolver = _stepping(dns_server, monkeypatch, delay=0.0, step=3600.0)
    result, explanation = evaluate(resolver, ip=IP, sender=f"postmaster@{DOMAIN}", helo=HELO)
    assert (result, explanation) == ("pass", "sender SPF authorized")
    assert resolver.asked == [DOMAIN, "s0.example.net"]


class WallClockSteppedOnQuery:
    """Stands in for dnspython's resolver's ``time`` module: the real clocks, with the
    wall clock stepped by ``step`` seconds once ``server`` has had a query for ``name``
    (NTP or an operator stepping it while the resolver waits for that answer)."""

    def __init__(self, server: LoopbackDNS, name: str, step: float) -> None:
        self.server, self.name, self.step = server, name, step

    def time(self) -> float:
        stepped = self.server.queries(self.name, "TXT") > 0
        return time.time() + (self.step if stepped else 0.0)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_lookup_is_not_failed_by_a_wall_clock_step(
    dns_server: LoopbackDNS, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    # dnspython measures a lookup's lifetime on the wall clock: stepped during the first
    # query of a lookup that needs a second one (here the TCP query after a truncated UDP
    # answer, as for a long SPF record), the lookup failed at once with "The resolution
    # lifetime expired", and the check was a temporary error.
    import dns.resolver

    record = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(60)) + " -all"
    dns_server.txt(DOMAIN, record)
    monkeypatch.setattr(dns.resolver, "time", WallClockSteppedOnQuery(dns_server, DOMAIN, step))
    answer = DNSResolver(dns_server.dns_config).lookup(DOMAIN, "TXT")
    assert (answer.outcome, answer.records, answer.error) == (Outcome.ANSWER, (record,), None)
    assert dns_server.queries(DOMAIN, "TXT") >= 2  # over UDP, then over TCP


def test_spf_ipv6_mechanism_goes_first() -> None:
    assert with_mechanism("v=spf1 redirect=_spf.example.net", "ip6:2001:db8::1") == (
        "v=spf1 ip6:2001:db8::1 redirect=_spf.example.net"
    )
    resolver = FakeResolver({(DOMAIN, "TXT"): ["v=spf1 -all"]})
    check, result = check_spf(resolver, domain=DOMAIN, ip="2001:db8::1", helo=HELO)
    assert result == "fail"
    assert check.fix is not None and '"v=spf1 ip6:2001:db8::1 -all"' in check.fix


def test_spf_records_are_v_spf1_in_any_case_then_a_space_or_the_end() -> None:
    # RFC 7208 §4.5/§12: "v=spf1" (an ABNF quoted string: any case), ended by SP or the
    # end of the record; a tab, a newline or a no-break space is no SP.
    published = ["V=SPF1 -all", "v=spf1", "v=Spf1 a", "v=spf1\t-all", "v=spf1\u00a0-all"]
    published += ["v=spf1\n", "v=spf1\u2003a", "v=spf10 -all"]
    records, error = spf_records(FakeResolver({(DOMAIN, "TXT"): published}), DOMAIN)
    assert (records, error) == (["V=SPF1 -all", "v=spf1", "v=Spf1 a"], None)


def test_spf_version_matches_ascii_letters_only(dns_server: LoopbackDNS) -> None:
    # Python's case-insensitive matching takes "\u017f" (long s) for "s": "v=\u017fpf1"
    # was counted as a second SPF record, which pyspf (and receivers) do not take, and a
    # record's own permerror was reported as "2 SPF records", with a merged record to
    # publish that kept the bad term.
    dns_server.txt(DOMAIN, "v=spf1 moo -all", "v=\u017fpf1 ip4:192.0.2.10 -all")
    resolver = DNSResolver(dns_server.dns_config)
    records, _ = spf_records(resolver, DOMAIN)
    assert records == ["v=spf1 moo -all"]
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert result == "permerror"
    assert "SPF records" not in check.summary, check.summary
    assert "moo" in check.summary


def test_spf_terms_are_separated_by_spaces_only() -> None:
    # "a\u00a0mx" is one (invalid) term, not two: the fix keeps it as published.
    assert with_mechanism("v=spf1  a\u00a0mx\t-all", "ip4:192.0.2.1") == (
        "v=spf1 ip4:192.0.2.1 a\u00a0mx\t-all"
    )


def test_spf_helo_identity() -> None:
    ok = FakeResolver({(HELO, "TXT"): ["v=spf1 a -all"], (HELO, "A"): [IP]})
    assert check_spf_helo(ok, helo=HELO, ip=IP).status is Status.PASS
    missing = check_spf_helo(FakeResolver({(HELO, "A"): [IP]}), helo=HELO, ip=IP)
    assert missing.status is Status.WARN
    assert missing.fix == f'publish TXT at {HELO}: "v=spf1 a -all" (the host may send as itself)'


@pytest.mark.parametrize(
    "record", ["v=spf1 +all", "v=spf1 a ip4:0.0.0.0/0 -all", "v=spf1 a ip6:::/0 -all"]
)
def test_spf_helo_that_passes_every_address_is_a_warning(record: str) -> None:
    # Receivers check the HELO identity for mail with an empty envelope sender, and DMARC
    # takes it then (its relaxed alignment: mail.example.com for From: ...@example.com).
    # A HELO record open to every address let anyone pass, and the check said "pass".
    resolver = FakeResolver({(HELO, "TXT"): [record], (HELO, "A"): [IP]})
    check = check_spf_helo(resolver, helo=HELO, ip=IP)
    assert check.status is Status.WARN, check.summary
    assert "authorizes every address" in check.summary
    assert check.fix is not None and HELO in check.fix


@pytest.mark.parametrize(
    ("records", "replaced"),
    [
        (["v=spf1 a -all", "v=spf1 mx -all"], "the 2 SPF records at mail.example.com"),
        (["v=spf1 a:%{x}.example -all"], 'TXT at mail.example.com "v=spf1 a:%{x}.example -all"'),
    ],
)
def test_spf_helo_permerror_fix_replaces_the_records_there(
    records: list[str], replaced: str
) -> None:
    # Publishing one more record beside those there (the fix for a name without one)
    # leaves a permerror: several v=spf1 records are one (RFC 7208 §4.5).
    resolver = FakeResolver({(HELO, "TXT"): records, (HELO, "A"): [IP]})
    check = check_spf_helo(resolver, helo=HELO, ip=IP)
    assert check.summary.startswith("permerror"), check.summary
    assert check.fix == f'replace {replaced} by "v=spf1 a -all" (the host may send as itself)'


def test_spf_helo_temporary_error_of_an_include_says_which() -> None:
    # The HELO's record is read; the name it includes fails: no lookup error of its own.
    resolver = FakeResolver(
        {
            (HELO, "TXT"): ["v=spf1 include:spf.example.net -all"],
            ("spf.example.net", "TXT"): "servfail",
        }
    )
    check = check_spf_helo(resolver, helo=HELO, ip=IP)
    assert check.status is Status.UNKNOWN
    assert "None" not in check.summary
    assert "SERVFAIL" in check.summary


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 Redirect=_spf.example.net",
        "v=spf1 REDIRECT=_spf.example.net",
        "v=spf1 ip4:198.51.100.1 ReDiReCt=_spf.example.net",
    ],
)
def test_spf_modifier_names_in_any_case(dns_server: LoopbackDNS, record: str) -> None:
    # RFC 7208 §4.6.1: "mechanism and modifier names are case-insensitive" (§12's ABNF
    # quoted strings). pyspf compares modifier names as written: "Redirect=" was an
    # unknown modifier, ignored, and the doctor failed a record receivers pass.
    dns_server.txt(DOMAIN, record)
    dns_server.txt("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all")
    resolver = DNSResolver(dns_server.dns_config)
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert (check.status, result) == (Status.PASS, "pass"), check.summary
    result, _ = evaluate(resolver, ip="198.51.100.7", sender=f"postmaster@{DOMAIN}", helo=HELO)
    assert result == "fail"
    # Given twice in other cases, it is the same modifier twice: a permerror (RFC 7208 §6).
    dns_server.txt(DOMAIN, "v=spf1 Redirect=_spf.example.net redirect=_spf.example.net")
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert result == "permerror", check.summary


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 exists:%{IR}.list.example.net -all",
        "v=spf1 exists:%{iR}.list.example.net -all",
        "v=spf1 exists:%{i4R}.list.example.net -all",
        "v=spf1 exists:%{ir}.list.example.net -all",
    ],
)
def test_spf_macro_reversal_in_any_case(dns_server: LoopbackDNS, record: str) -> None:
    # RFC 7208 §7.1: transformers = *DIGIT [ "r" ], an ABNF quoted string (any case), and
    # "uppercase macros expand exactly as their lowercase equivalents" (then URL-escaped).
    # pyspf took only "r": %{IR} was not reversed, and the record failed the address.
    dns_server.txt(DOMAIN, record)
    dns_server.a("10.2.0.192.list.example.net", "127.0.0.2")
    resolver = DNSResolver(dns_server.dns_config)
    result, _ = evaluate(resolver, ip=IP, sender=f"postmaster@{DOMAIN}", helo=HELO)
    assert result == "pass"
    assert dns_server.queries("10.2.0.192.list.example.net", "A") == 1


def test_spf_macro_expansion_past_a_names_length_is_truncated_on_the_left(
    dns_server: LoopbackDNS,
) -> None:
    # RFC 7208 §7.3: an expansion over 253 characters "is truncated to fit, by removing
    # successive domain labels" on the left. pyspf removes one: for an IPv6 address (32
    # one-character labels) of a long domain, 257 characters were left, no name DNS can
    # hold, and the exists: never matched: the doctor failed an address receivers pass.
    domain = ".".join(["a" * 60, "b" * 60, "c" * 56, "example"])  # 186 characters
    ip = "2001:db8::25"
    dns_server.txt(domain, "v=spf1 exists:%{ir}.%{v}._spf.%{d} -all")
    nibbles = reverse_name(ip).removesuffix(".ip6.arpa")  # 63 characters, 32 labels
    expansion = f"{nibbles}.ip6._spf.{domain}"
    assert len(expansion) == 259
    dns_server.a(expansion[6:], "127.0.0.2")  # three labels fewer: 253 characters
    resolver = DNSResolver(dns_server.dns_config)
    result, explanation = evaluate(resolver, ip=ip, sender=f"postmaster@{domain}", helo=HELO)
    assert result == "pass", explanation
    assert dns_server.queries(expansion[6:], "A") == 1


def test_spf_redirect_counts_against_the_lookup_limit_only_when_followed(
    dns_server: LoopbackDNS,
) -> None:
    # RFC 7208 §4.6.4: the terms that cause lookups count against the limit of 10 as
    # they are evaluated, and redirect= is evaluated only when no mechanism matched
    # (§6.1). pyspf counts redirect= as it reads the record, before the mechanisms: the
    # tenth "a" was an eleventh lookup, and a record receivers pass was a permerror.
    names = [f"a{i}.example.net" for i in range(10)]
    mechanisms = " ".join(f"a:{name}" for name in names)
    dns_server.txt(DOMAIN, f"v=spf1 {mechanisms} redirect=_spf.example.net")
    for name in names[:-1]:
        dns_server.a(name, "198.51.100.1")
    dns_server.a(names[-1], IP)
    dns_server.txt("_spf.example.net", "v=spf1 ip4:203.0.113.0/24 -all")
    resolver = DNSResolver(dns_server.dns_config)
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert (check.status, result) == (Status.PASS, "pass"), check.summary
    # Followed, the redirect is the eleventh lookup: a permerror, as receivers find it.
    result, explanation = evaluate(
        resolver, ip="203.0.113.5", sender=f"postmaster@{DOMAIN}", helo=HELO
    )
    assert result == "permerror", explanation
    assert "lookups" in explanation.lower(), explanation
    # Nine mechanisms and the redirect are ten: its record decides.
    dns_server.txt(DOMAIN, f"v=spf1 {mechanisms.rpartition(' ')[0]} redirect=_spf.example.net")
    for ip, expected in (("203.0.113.5", "pass"), ("192.0.2.99", "fail")):
        result, _ = evaluate(resolver, ip=ip, sender=f"postmaster@{DOMAIN}", helo=HELO)
        assert result == expected, ip
    # A redirect in an included record counts in the same way, and so does a redirect
    # followed from a redirected record.
    dns_server.txt(
        DOMAIN, f"v=spf1 {' '.join(mechanisms.split()[:8])} include:inc.example.net -all"
    )
    dns_server.txt("inc.example.net", f"v=spf1 a:{names[-1]} redirect=_spf.example.net")
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert result == "pass", check.summary  # 8 + include + a = 10
    result, explanation = evaluate(
        resolver, ip="203.0.113.5", sender=f"postmaster@{DOMAIN}", helo=HELO
    )
    assert result == "permerror", explanation  # and the redirect: 11


@pytest.mark.parametrize(
    ("record", "included"),
    [
        ("v=spf1 ptr -all", None),
        ("v=spf1 ptr:example.com ~all", None),
        ("v=spf1 include:_spf.example.net -all", "v=spf1 ptr:example.com -all"),
        ("v=spf1 exists:%{p}.allowed.example.net -all", None),
    ],
)
def test_spf_pass_that_rests_on_reverse_dns_is_a_warning(
    dns_server: LoopbackDNS, record: str, included: str | None
) -> None:
    # RFC 7208 §5.5: the ptr mechanism "SHOULD NOT be published" (slow, a load on the
    # .arpa servers, and no match when the PTR lookup fails), and §7.3 says the same of
    # the %{p} macro: a pass that needs the address's PTR name is one some receivers do
    # not grant. It was a plain pass.
    dns_server.txt(DOMAIN, record)
    if included is not None:
        dns_server.txt("_spf.example.net", included)
    dns_server.ptr(IP, HELO)
    dns_server.a(HELO, IP)
    dns_server.a(f"{HELO}.allowed.example.net", "127.0.0.2")
    resolver = DNSResolver(dns_server.dns_config)
    check, result = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert (check.status, result) == (Status.WARN, "pass"), check.summary
    assert "RFC 7208 §5.5" in check.summary, check.summary
    assert check.fix == (
        f'replace TXT at {DOMAIN} "{record}" by "{with_mechanism(record, "ip4:" + IP)}"'
        ", then remove its ptr terms once the hosts they stand for are named so"
    )
    # Where the address is named, a ptr term beside it decides nothing: a pass.
    dns_server.txt(DOMAIN, f"v=spf1 ip4:{IP} ptr -all")
    check, _ = check_spf(resolver, domain=DOMAIN, ip=IP, helo=HELO)
    assert check.status is Status.PASS, check.summary
    # The HELO identity's record is judged alike.
    dns_server.txt(HELO, "v=spf1 ptr -all")
    helo_check = check_spf_helo(resolver, helo=HELO, ip=IP)
    assert helo_check.status is Status.WARN, helo_check.summary
    assert "RFC 7208 §5.5" in helo_check.summary


# --- FCrDNS ------------------------------------------------------------------------------


def test_fcrdns_pass(rsa_key: Path) -> None:
    ptr, helo = check_fcrdns(FakeResolver(good_zone(rsa_key)), ip=IP, helo=HELO)
    assert (ptr.status, helo.status) == (Status.PASS, Status.PASS)


def test_fcrdns_failures() -> None:
    nothing = FakeResolver({(HELO, "A"): ["198.51.100.7"]})
    ptr, helo = check_fcrdns(nothing, ip=IP, helo=HELO)
    assert ptr.status is Status.FAIL
    assert ptr.fix is not None and ptr.fix.endswith(f"PTR 10.2.0.192.in-addr.arpa → {HELO}")
    assert helo.status is Status.FAIL
    assert helo.fix == f"publish A record {HELO} → {IP}"

    unconfirmed = FakeResolver({("10.2.0.192.in-addr.arpa", "PTR"): ["h.isp.example"]})
    ptr, _ = check_fcrdns(unconfirmed, ip=IP, helo=HELO)
    assert ptr.status is Status.FAIL
    assert ptr.fix == f"publish A record h.isp.example → {IP}"

    broken = FakeResolver({("10.2.0.192.in-addr.arpa", "PTR"): "servfail"})
    assert check_fcrdns(broken, ip=IP, helo=HELO)[0].status is Status.UNKNOWN

    short = check_fcrdns(FakeResolver({}), ip=IP, helo="localhost")[1]
    assert short.status is Status.FAIL
    assert "fully qualified" in short.summary


@pytest.mark.parametrize(
    ("helo", "status"),
    [
        (f"[{IP}]", Status.WARN),
        ("[198.51.100.7]", Status.FAIL),
        ("[IPv6:2001:db8::1]", Status.FAIL),
    ],
)
def test_helo_name_that_is_an_address_literal(helo: str, status: Status) -> None:
    # RFC 5321 §4.1.3 allows a literal in EHLO (and helo_name takes one), but it is no DNS
    # name: nothing can be published at it, and no SPF check is made of it (RFC 7208 §2.3).
    zone: Zone = {("10.2.0.192.in-addr.arpa", "PTR"): [HELO + "."], (HELO, "A"): [IP]}
    resolver = FakeResolver(zone)
    ptr, helo_check = check_fcrdns(resolver, ip=IP, helo=helo)
    assert ptr.status is Status.PASS
    assert helo_check.status is status, helo_check
    assert "address literal" in helo_check.summary
    assert helo_check.fix is not None and f'set helo_name = "{HELO}"' in helo_check.fix
    spf = check_spf_helo(resolver, helo=helo, ip=IP)
    assert spf.status is Status.WARN
    assert "address literal" in spf.summary
    assert [n for n, _ in resolver.asked if n.startswith("[")] == []
    for check in (helo_check, spf):
        assert "at [" not in (check.fix or "") and "record [" not in (check.fix or "")

    # Without a PTR name to offer, the fix asks for one naming a host, not the literal.
    ptr, helo_check = check_fcrdns(FakeResolver({}), ip=IP, helo=helo)
    assert ptr.fix is not None and ptr.fix.endswith(f"→ a host name that resolves to {IP}")
    assert helo_check.fix is not None and "[" not in helo_check.fix


def test_fcrdns_ptr_naming_the_root_is_no_ptr_name(dns_server: LoopbackDNS) -> None:
    # "PTR ." names no host: the check showed an empty name ("the PTR name  does not
    # resolve back") and its fix was to publish an A record at that empty name.
    dns_server.ptr(IP, ".")
    dns_server.a(HELO, IP)
    ptr, _ = check_fcrdns(DNSResolver(dns_server.dns_config), ip=IP, helo=HELO)
    assert ptr.status is Status.FAIL
    assert "names no host" in ptr.summary, ptr.summary
    assert ptr.fix is not None and ptr.fix.endswith(f"PTR 10.2.0.192.in-addr.arpa → {HELO}")


def test_fcrdns_looks_up_at_most_ten_ptr_names() -> None:
    # Whoever holds the address block may publish any number of PTR names, and each
    # costs a lookup (a dropped one the whole DNS timeout).
    names = [f"h{i}.example.net." for i in range(50)]
    resolver = FakeResolver({("10.2.0.192.in-addr.arpa", "PTR"): names})
    ptr, _ = check_fcrdns(resolver, ip=IP, helo=HELO)
    forward = [name for name, rtype in resolver.asked if rtype == "A" and name != HELO]
    assert len(forward) == 10
    assert ptr.status is Status.FAIL
    assert ptr.details[-1].endswith("40 more names, not looked at")


def test_fcrdns_summaries_quote_a_few_ptr_names_cut_short(dns_server: LoopbackDNS) -> None:
    # Whoever holds the address block names its PTR names: ten of 250 characters made
    # each summary of the ptr and helo checks (one line of the report's table) a line of
    # over 2,500 characters. The details list the names looked at, whole.
    names = [
        ".".join([f"h{i}" + "a" * 57, "b" * 60, "c" * 60, "d" * 60, "example"]) for i in range(10)
    ]
    dns_server.ptr(IP, *names)
    for name in names:
        dns_server.a(name, IP)
    dns_server.a(HELO, IP)
    resolver = DNSResolver(dns_server.dns_config)
    ptr, helo = check_fcrdns(resolver, ip=IP, helo=HELO)
    assert (ptr.status, helo.status) == (Status.PASS, Status.WARN)
    for name in names:
        dns_server.a(name, "198.51.100.7")
    unconfirmed, _ = check_fcrdns(resolver, ip=IP, helo=HELO)
    assert unconfirmed.status is Status.FAIL
    for name in names:
        dns_server.servfail(name)
    failed, _ = check_fcrdns(resolver, ip=IP, helo=HELO)
    assert failed.status is Status.UNKNOWN
    for check in (ptr, helo, unconfirmed, failed):
        assert len(check.summary) < 1000, (check.name, check.summary)  # as the fuzz test asks
        assert "and 7 more" in check.summary, check.summary
    assert sorted(ptr.details) == sorted(f"PTR 10.2.0.192.in-addr.arpa: {n}" for n in names)


def test_names_keep_an_escaped_final_dot() -> None:
    # A PTR name's text form escapes a dot inside a label; stripping it made another
    # name (``mail\\`` is not even one), whose lookup failed as a "temporary" error.
    assert normal_name("mail\\.") == "mail\\."
    assert normal_name("a\\.b.Example.com.") == "a\\.b.example.com"
    assert normal_name("mail\\\\.") == "mail\\\\"  # an escaped backslash, then the final dot
    assert normal_name(" Example.COM.. ") == "example.com"


def test_fcrdns_ipv6() -> None:
    ip = "2001:db8::25"
    reverse = "5.2.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.ip6.arpa"
    resolver = FakeResolver({(reverse, "PTR"): [HELO], (HELO, "AAAA"): ["2001:db8:0::25"]})
    ptr, helo = check_fcrdns(resolver, ip=ip, helo=HELO)
    assert (ptr.status, helo.status) == (Status.PASS, Status.PASS)


# --- DKIM --------------------------------------------------------------------------------


def test_dkim_tag_list() -> None:
    assert parse_tags("v=DKIM1; k=rsa;\n p=MIIB\n IjAN ;") == {
        "v": "DKIM1",
        "k": "rsa",
        "p": "MIIBIjAN",
    }
    with pytest.raises(ValueError, match="twice"):
        parse_tags("p=a; p=b")
    assert parse_tags(" k=rsa; p=a; \r\n") == {"k": "rsa", "p": "a"}
    # RFC 6376 §3.2: one ";" may end the list, none may stand empty; dkimpy fails them.
    for text in ("k=rsa;; p=a", "; k=rsa; p=a", "k=rsa; p=a;;", "k=rsa; \t; p=a"):
        with pytest.raises(ValueError, match="empty tag"):
            parse_tags(text)


def test_dkim_pass_and_mismatch(rsa_key: Path, tmp_path: Path) -> None:
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    check, verifies = check_dkim(FakeResolver(good_zone(rsa_key)), key)
    assert (check.status, verifies) == (Status.PASS, True)

    other = rsa_pem(tmp_path, name="other.pem")
    zone = {(key.record_name, "TXT"): [record_for(public_key(other.read_bytes()))]}
    check, verifies = check_dkim(FakeResolver(zone), key)
    assert (check.status, verifies) == (Status.FAIL, False)
    assert check.fix == (
        f"replace the TXT record at {key.record_name} by "
        f'"{record_for(public_key(rsa_key.read_bytes()))}"'
    )


def test_dkim_accepts_a_pkcs1_published_key(rsa_key: Path) -> None:
    ours = public_key(rsa_key.read_bytes())
    pkcs1 = ours.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    zone = {("s1._domainkey.example.com", "TXT"): [f"p={base64.b64encode(pkcs1).decode()}"]}
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    assert check_dkim(FakeResolver(zone), key)[0].status is Status.PASS


def test_dkim_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "ed.pem"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    record = record_for(public_key(path.read_bytes()))
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    key = DKIMKey(domain=DOMAIN, selector="ed", private_key=str(path), algorithm="ed25519-sha256")
    zone = {(key.record_name, "TXT"): [record]}
    assert check_dkim(FakeResolver(zone), key)[0].status is Status.PASS
    wrong_alg = DKIMKey(domain=DOMAIN, selector="ed", private_key=str(path))
    assert check_dkim(FakeResolver(zone), wrong_alg)[0].status is Status.FAIL


@pytest.mark.parametrize(
    ("record", "status", "words"),
    [
        ("v=DKIM1; k=rsa; t=y; p={p}", Status.WARN, "testing"),
        ("v=DKIM1; k=rsa; t=s : y; p={p}", Status.WARN, "testing"),  # FWS around ':'
        # Values are case-sensitive (§3.2): dkimpy fails k=RSA as an unknown algorithm.
        ("v=DKIM1; k=RSA; p={p}", Status.FAIL, "the record is for k=RSA"),
        # FWS around a list's colons is RFC 6376's, but Mail::DKIM splits at the colons
        # alone and finds no email (nor sha256 below) in the list: every signature fails.
        ("v=DKIM1; k=rsa; s=tlsrpt : email; p={p}", Status.FAIL, "lists several services"),
        ("v=DKIM1; k=rsa; h=sha1; p={p}", Status.FAIL, "excludes sha256"),
        # Case-sensitive too: Mail::DKIM (SpamAssassin's verifier) finds the key record
        # invalid for an rsa-sha256 signature when h= lists SHA256 only.
        ("v=DKIM1; k=rsa; h=SHA256; p={p}", Status.FAIL, "h=SHA256 excludes sha256"),
        ("v=DKIM1; k=rsa; h=sha1 : sha256; p={p}", Status.FAIL, "white space inside its list"),
        # RFC 6376 §3.6.1: mail verifiers ignore a record whose s= lists neither.
        ("v=DKIM1; k=rsa; s=tlsrpt; p={p}", Status.FAIL, "s=tlsrpt excludes email"),
        ("v=DKIM1; k=rsa; s=Email; p={p}", Status.FAIL, "s=Email excludes email"),
        # A list, but dkimpy compares s= whole: it ignores the record, failing every
        # signature.
        ("v=DKIM1; k=rsa; s=tlsrpt:email; p={p}", Status.FAIL, "lists several services"),
        ("v=DKIM1; k=rsa; s=email; p={p}", Status.PASS, "published key matches"),
        ("v=DKIM1; k=rsa; s=*; p={p}", Status.PASS, "published key matches"),
        # RFC 4871's g=: Mail::DKIM still fails a signature without i= unless it is *.
        ("v=DKIM1; k=rsa; g=foo; p={p}", Status.FAIL, "g=foo limits the key"),
        ("v=DKIM1; k=rsa; g=; p={p}", Status.FAIL, "g= limits the key"),
        ("v=DKIM1; k=rsa; g= * ; p={p}", Status.PASS, "published key matches"),
        ("v=DKIM1; k=ed25519; p={p}", Status.FAIL, "k=ed25519"),
        ("v=DKIM1; k=rsa; p=", Status.FAIL, "revoked"),
        ("v=DKIM1; k=rsa p={p}", Status.FAIL, "no p= tag (is a ';' missing?)"),
        ("v=DKIM1; k=rsa; p={p}; p={p}", Status.FAIL, "malformed record: tag p= appears twice"),
        # FWS is SP, HTAB and CRLF (RFC 6376 §2.8), all verifiers strip: an NBSP stays in
        # the value (dkimpy fails k=rsa<NBSP> as an unknown algorithm) or the name.
        ("v=DKIM1; k=rsa\u00a0; p={p}", Status.FAIL, "the record is for k=rsa\u00a0"),
        ("v=DKIM1;\u00a0k=rsa; p={p}", Status.FAIL, "malformed record: tag name"),
        ("v=DKIM1; k=rsa;\r\n\tp={p}", Status.PASS, "published key matches"),
        # FWS may also stand before the '=' (§3.2: tag-spec = [FWS] tag-name [FWS] "="):
        # dkimpy and Mail::DKIM verify with these records.
        ("v=DKIM1; k=rsa; p\t={p}", Status.PASS, "published key matches"),
        ("v=DKIM1; k=rsa; p\r\n\t= {p}", Status.PASS, "published key matches"),
        # tag-name = ALPHA *ALNUMPUNC (§3.2): a record with another is invalid (dkimpy).
        ("v=DKIM1; 1x=y; k=rsa; p={p}", Status.FAIL, "malformed record: tag name '1x'"),
        ("v=DKIM1; x-y=z; k=rsa; p={p}", Status.FAIL, "malformed record: tag name 'x-y'"),
        ("v=DKIM1; x_1=z; k=rsa; p={p}", Status.PASS, "published key matches"),
    ],
)
def test_dkim_record_problems(rsa_key: Path, record: str, status: Status, words: str) -> None:
    p = public_key(rsa_key.read_bytes()).p
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    check, _ = check_dkim(FakeResolver({(key.record_name, "TXT"): [record.format(p=p)]}), key)
    assert check.status is status
    assert words in check.summary


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\x0b", "\x0c", "\x85"])
def test_dkim_key_split_by_other_white_space_than_fws_fails(rsa_key: Path, space: str) -> None:
    # RFC 6376 §3.2: base64 in p= may be folded with FWS (SP, HTAB, CRLF) only. Mail::DKIM
    # finds a record whose key holds a no-break space (pasted from a web page) invalid,
    # as it does a list such as h= with one beside its colon.
    p = public_key(rsa_key.read_bytes()).p
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    for record in (
        f"v=DKIM1; k=rsa; p={p[:40]}{space}{p[40:]}",
        f"v=DKIM1; k=rsa; h=sha1:{space}sha256; p={p}",
    ):
        zone = {(key.record_name, "TXT"): [record]}
        check, verifies = check_dkim(FakeResolver(zone), key)
        assert (check.status, verifies) == (Status.FAIL, False), (record, check.summary)
    assert (
        f"p= holds {space!r}, which is no base64"
        in check_dkim(
            FakeResolver({(key.record_name, "TXT"): [f"p={p[:40]}{space}{p[40:]}"]}), key
        )[0].summary
    )
    for fws in (" ", "\t", "\r\n "):
        zone = {(key.record_name, "TXT"): [f"v=DKIM1; k=rsa; p={p[:40]}{fws}{p[40:]}"]}
        assert check_dkim(FakeResolver(zone), key)[0].status is Status.PASS


@pytest.mark.parametrize(
    ("record", "words"),
    [
        # The key of before a rotation, left in DNS when the key file was replaced.
        ("{old}", "not the public half of the configured private key"),
        # Tag names are case-sensitive (RFC 6376 §3.2): P= is no p=, and the record is
        # there all the same; it is not "no key published".
        ("v=DKIM1; k=rsa; P={p}", "no p= tag"),
        ("v=DKIM1; k=rsa; p=", "revoked"),
        ("v=DKIM1; k=rsa; t=y; p={p}", "testing"),
    ],
)
def test_dkim_record_found_wrong_is_to_be_replaced_not_joined(
    rsa_key: Path, tmp_path: Path, record: str, words: str
) -> None:
    # A selector holds one TXT record (RFC 6376 §3.6.2.2): "publish" the right one beside
    # the wrong one, as the fix said, and receivers use either at random.
    ours = public_key(rsa_key.read_bytes())
    old = record_for(public_key(rsa_pem(tmp_path, name="old.pem").read_bytes()))
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    zone = {(key.record_name, "TXT"): [record.format(p=ours.p, old=old)]}
    check, _ = check_dkim(FakeResolver(zone), key)
    assert words in check.summary
    replace = f'replace the TXT record at {key.record_name} by "{record_for(ours)}"'
    assert check.fix is not None and check.fix.endswith(replace), check.fix
    assert "publish" not in check.fix


def test_dkim_selector_holding_another_record_is_to_be_replaced_not_joined(
    dns_server: LoopbackDNS, rsa_key: Path
) -> None:
    # A TXT record that is no key (a verification token, a wildcard's SPF record) at the
    # selector: "publish" the key beside it, as the fix said, and the selector held two
    # TXT records, which this same check then failed (receivers use one at random).
    ours = public_key(rsa_key.read_bytes())
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    dns_server.txt(key.record_name, "google-site-verification=abc123")
    resolver = DNSResolver(dns_server.dns_config)
    check, _ = check_dkim(resolver, key)
    assert check.status is Status.FAIL, check.summary
    assert "no DKIM key published" in check.summary
    assert check.fix is not None and "publish" not in check.fix, check.fix
    assert check.fix.startswith(f"replace the TXT record at {key.record_name}"), check.fix
    assert f'by "{record_for(ours)}"' in check.fix, check.fix
    assert check.details == (f"TXT {key.record_name}: google-site-verification=abc123",)
    # Done as it says, the key passes.
    dns_server.txt(key.record_name, record_for(ours))
    assert check_dkim(resolver, key)[0].status is Status.PASS


RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBUwIBADANBgkqhkiG9w0BAQEFAASCAT0wggE5AgEAAkEAsM7pxKBD/zA+g0OC
kNF6yT2z2INMi6fQk1iF2MFeZ69151xFOemvgHVpm6L8rHN9XEnUlwulbsL244ot
voA+BwIDAQABAkBaY21e+A/LBf7vXDQDlRQQjVrD9VvMiZ43tam3hiOdHVwhgh59
jSkCZB8m2V+1CT4Ekgpl+CpuafTLXtNg5n4BAiEA5YPgpgKKfpa5cF2FKTggL7QY
fy0abI8vmUWJy9U2ajkCIQDFNgSL5xWLQx+4m9H6dzDtNxt1Qs0ndoagcxAKYSTq
PwIgUbiGObX36CD0wDycWFPiqfmfK1E88mB9Wz62VLyDFokCIFgIZ/knu4dB/HwF
GrOq1y1dJyWuHzRZhXlEQ8nOWZMzAiAgOSGVIaoFFmNlirO+VgonPgTjSnW9+qR/
ctBe3wBoyA==
-----END PRIVATE KEY-----
"""
"""A 512-bit RSA key (openssl genpkey): cryptography makes none under 1024 bits."""


@pytest.mark.parametrize("published", ["none", "other", "ours"])
def test_dkim_key_under_1024_bits_fails_whatever_is_published(published: str) -> None:
    # RFC 8301 §3.2: receivers ignore signatures by such keys, and the signer refuses
    # them. Unpublished (or with another key published), the fix said to publish it.
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=RSA_512)
    records = {
        "none": [],
        "other": ["v=DKIM1; k=rsa; p=MIIB"],
        "ours": [record_for(public_key(RSA_512))],
    }[published]
    check, verifies = check_dkim(FakeResolver({(key.record_name, "TXT"): records}), key)
    assert (check.status, verifies) == (Status.FAIL, False)
    assert "RSA key of 512 bits" in check.summary, check.summary
    assert check.fix is not None and check.fix.startswith("generate a 2048-bit key")
    assert public_key(RSA_512).p not in check.fix


def test_dkim_several_records_at_the_selector_fail(rsa_key: Path, tmp_path: Path) -> None:
    """RFC 6376 §3.6.2.2: a selector's TXT records must be unique, else the result is
    undefined; verifiers use one (dkimpy and Mail::DKIM the first, as DNS orders them),
    so the key left beside the current one after a rotation fails some of the mail."""
    ours = record_for(public_key(rsa_key.read_bytes()))
    old = record_for(public_key(rsa_pem(tmp_path, name="old.pem").read_bytes()))
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    for records in ([old, ours], [ours, old], [ours, "v=spf1 -all"]):
        check, verifies = check_dkim(FakeResolver({(key.record_name, "TXT"): records}), key)
        assert (check.status, verifies) == (Status.FAIL, False), records
        assert f"2 TXT records at {key.record_name}" in check.summary
        assert check.fix == f'keep one TXT record at {key.record_name}: "{ours}"; remove the others'
        assert len(check.details) == 2


def test_dkim_key_the_signer_refuses_as_too_large_fails(
    rsa_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doctor applies the signer's bound on RSA keys (RFC 8301 §3.2): a key it
    passed would then fail to load as a configured key. A 4097-bit key takes seconds to
    make, so the bound is lowered below the test key, for the signer and doctor alike."""
    monkeypatch.setattr("mailstrom.dkim.keys.MAX_RSA_BITS", 1024)
    with pytest.raises(ConfigError, match="receivers need not verify keys over 1024"):
        SigningKey(domain=DOMAIN, selector="s1", private_key=rsa_key.read_bytes())
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    check, verifies = check_dkim(FakeResolver(good_zone(rsa_key)), key)
    assert (check.status, verifies) == (Status.FAIL, False)
    assert "RSA key of 2048 bits: mailstrom signs with keys of at most 1024" in check.summary


def test_dkim_key_far_too_large_is_judged_by_its_size_without_checking_it() -> None:
    """Checking an RSA key tests its primes, which takes minutes for the largest key a
    64 KiB file holds: the doctor reads the size of a key over the signer's bound without
    checking the key (it fails by its size anyway), and checks the others."""
    assert public_key(unchecked_rsa_pem(8192)).bits == 8192
    with pytest.raises(ValueError, match=r"[Ii]nvalid"):
        public_key(unchecked_rsa_pem(2048))


def test_dkim_unreadable_or_unusable_key(tmp_path: Path) -> None:
    missing = DKIMKey(domain=DOMAIN, selector="s", private_key=str(tmp_path / "none.pem"))
    assert "cannot read" in check_dkim(FakeResolver({}), missing)[0].summary
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    bad = DKIMKey(domain=DOMAIN, selector="s", private_key=str(junk))
    check, _ = check_dkim(FakeResolver({}), bad)
    assert check.status is Status.FAIL
    assert "openssl genpkey" in (check.fix or "")


def test_dkim_encrypted_key_is_not_advised_away(tmp_path: Path) -> None:
    """An encrypted key is still the key whose public half is published: the advice is
    to store it unencrypted, not a command that writes a new key over it (after which
    every signature fails against the record in DNS)."""
    path = tmp_path / "ed.pem"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    key = DKIMKey(domain=DOMAIN, selector="s", private_key=str(path), algorithm="ed25519")
    check, verifies = check_dkim(FakeResolver({}), key)
    assert check.status is Status.FAIL and not verifies
    assert "encrypted" in check.summary
    fix = check.fix or ""
    assert "genpkey" not in fix and f"-out {path}" not in fix
    assert f"openssl pkey -in {path}" in fix


def test_dkim_unusable_key_advice_makes_a_key_of_the_configured_algorithm(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    key = DKIMKey(domain=DOMAIN, selector="s", private_key=str(junk), algorithm="ed25519")
    fix = check_dkim(FakeResolver({}), key)[0].fix or ""
    assert "openssl genpkey -algorithm ED25519" in fix and "RSA" not in fix


def test_dkim_key_file_that_is_no_regular_file_or_too_large(tmp_path: Path, rsa_key: Path) -> None:
    """The doctor reads keys as the signer does: never blocked by a FIFO, never reading
    a device or a file larger than any key."""

    def check(path: Path) -> Check:
        return check_dkim(
            FakeResolver({}), DKIMKey(domain=DOMAIN, selector="s", private_key=str(path))
        )[0]

    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo, 0o600)
    fifo_check = read_from_fifo(fifo, check)
    assert fifo_check.status is Status.FAIL and "is a FIFO" in fifo_check.summary

    device = tmp_path / "device.pem"
    device.symlink_to(os.devnull)
    assert "is a character device" in check(device).summary

    large = tmp_path / "large.pem"
    large.write_bytes(rsa_key.read_bytes().ljust(MAX_KEY_FILE + 1, b"\n"))
    large_check = check(large)
    assert large_check.status is Status.FAIL
    assert f"more than {MAX_KEY_FILE} octets" in large_check.summary


@pytest.mark.parametrize("data", UNSUPPORTED_CURVE_PEMS)
def test_dkim_key_on_a_curve_openssl_cannot_load_fails(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(data)
    for source in (str(path), data):
        check, verifies = check_dkim(
            FakeResolver({}), DKIMKey(domain=DOMAIN, selector="s", private_key=source)
        )
        assert (check.status, verifies) == (Status.FAIL, False)
        assert "unsupported kind of key" in check.summary


def test_dkim_published_key_on_a_curve_openssl_cannot_load_is_a_mismatch(
    rsa_key: Path,
) -> None:
    key = DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key))
    p = base64.b64encode(EC_SECP112R1_SPKI).decode()
    check, verifies = check_dkim(FakeResolver({(key.record_name, "TXT"): [f"p={p}"]}), key)
    assert (check.status, verifies) == (Status.FAIL, False)
    assert "not the public half of the configured private key" in check.summary


def test_dkim_keys_come_from_the_signing_configuration(rsa_key: Path) -> None:
    """The doctor checks the keys mailstrom signs with: a key file by its path, a key given
    as PEM bytes without ever printing it."""
    rsa_key.chmod(0o600)
    ed_pem = generate_private_key(DKIMAlgorithm.ED25519_SHA256)
    signing = DKIMConfig(
        keys=(
            SigningKey(domain="Example.COM", selector="s1", private_key=rsa_key),
            SigningKey(domain=DOMAIN, selector="s2", private_key=ed_pem, algorithm="ed25519"),
        )
    )
    assert dkim_keys(None) == ()
    keys = dkim_keys(signing)
    assert keys == (
        DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key)),
        DKIMKey(domain=DOMAIN, selector="s2", private_key=ed_pem, algorithm="ed25519-sha256"),
    )
    assert SenderSetup.from_config(Config(dkim=signing), domain=DOMAIN).dkim_keys == keys

    zone = {
        (f"s1._domainkey.{DOMAIN}", "TXT"): [record_for(public_key(rsa_key.read_bytes()))],
        (f"s2._domainkey.{DOMAIN}", "TXT"): [record_for(public_key(ed_pem))],
    }
    checks = [check_dkim(FakeResolver(zone), k)[0] for k in keys]
    assert [c.status for c in checks] == [Status.PASS, Status.PASS]
    assert str(rsa_key) in checks[0].summary
    assert "the configured private key" in checks[1].summary
    assert "PRIVATE KEY" not in repr(keys) + repr(checks)


# --- DMARC -------------------------------------------------------------------------------


def test_dmarc_parse() -> None:
    record = parse_dmarc("v=DMARC1;p=quarantine;sp=reject;adkim=s;pct=50;rua=mailto:a@x,mailto:b@x")
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == (
        "quarantine",
        "reject",
        "s",
        "r",
        50,
    )
    assert record.rua == ("mailto:a@x", "mailto:b@x")
    for text, reason in [
        ("v=DMARC1; rua=mailto:a@x", "p= tag is missing"),
        ("v=DMARC1; p=maybe", "p=maybe"),
        ("v=DMARC1; p=none; pct=200", "pct=200"),
        ("p=none; v=DMARC1", "v=DMARC1"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_dmarc(text)


def test_dmarc_pct_0_applies_the_policy_to_no_failing_mail(dns_server: LoopbackDNS) -> None:
    """With pct=0 receivers apply the policy to none of the failing mail (RFC 7489
    §6.6.4: the next policy down instead, none for quarantine). The detail said "the
    policy applies to part of failing mail only", as for pct=50."""
    dns_server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=quarantine; pct=0")
    resolver = DNSResolver(dns_server.dns_config)
    check = check_dmarc(resolver, domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN])
    [note] = [d for d in check.details if d.startswith("pct=")]
    assert "none of" in note and "part of" not in note, note
    assert "p=none" in note, note
    dns_server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; pct=50")
    check = check_dmarc(resolver, domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN])
    assert "pct=50: the policy applies to part of failing mail only" in check.details


@pytest.mark.parametrize(
    "text",
    ["V=DMARC1; p=reject", "V = DMARC1 ;p=reject", "v\t=\tDMARC1\t;\tp\t=\treject\t;"],
)
def test_dmarc_version_tag_in_any_case_and_wsp(text: str) -> None:
    # RFC 7489 §6.4: dmarc-version = "v" *WSP "=" *WSP "DMARC1" (in hex: exact case); a
    # quoted ABNF string such as "v" is case-insensitive (RFC 5234 §2.3).
    assert is_dmarc(text)
    assert parse_dmarc(text).p == "reject"


@pytest.mark.parametrize(
    "text",
    [
        "v=dmarc1; p=reject",
        "v\u00a0=DMARC1; p=reject",
        "v=DMARC1\u2003; p=reject",
        "v=DMARC1\n; p=reject",
        "v=DMARC1\n",
        "\u00a0v=DMARC1; p=reject",
    ],
)
def test_dmarc_version_is_exact_and_white_space_is_sp_or_htab(text: str) -> None:
    assert not is_dmarc(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("v=DMARC1;\u00a0p=reject", "p= tag is missing"),  # the tag "\u00a0p"
        ("v=DMARC1; p=reject\u3000", "is not one of"),
        ("v=DMARC1; p=none; pct=\u200950", "is not a whole number"),
    ],
)
def test_dmarc_tags_take_no_unicode_white_space(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_dmarc(text)


@pytest.mark.parametrize(
    "pct",
    [
        "\u0663\u0660",  # Arabic-Indic 30: str.isdigit() and int() take it, RFC 7489 does not
        "\u00b2",  # a superscript two: isdigit(), but int() refuses it
        "9" * 5000,  # past int()'s 4300 digits: its own error, quoting nothing useful
        "0100",
    ],
)
def test_dmarc_pct_is_one_to_three_ascii_digits(pct: str) -> None:
    with pytest.raises(ValueError, match="is not a whole number from 0 to 100") as caught:
        parse_dmarc(f"v=DMARC1; p=reject; pct={pct}")
    assert len(str(caught.value)) < 200


def test_dmarc_errors_quote_a_short_piece_of_the_record() -> None:
    for record in (
        "v=DMARC1; p=reject; " + "x" * 5000,
        "v=DMARC1; p=" + "x" * 5000,
        "v=DMARC1; p=none; adkim=" + "s" * 5000,
    ):
        with pytest.raises(ValueError, match=r"…\(\d+ more\)…") as caught:
            parse_dmarc(record)
        assert len(str(caught.value)) < 200, str(caught.value)[:300]
    assert parse_dmarc("v=DMARC1; p=reject; pct=007").pct == 7


def test_organizational_domain_and_alignment() -> None:
    assert organizational_domain("mail.news.example.co.uk") == "example.co.uk"
    assert organizational_domain("Example.COM.") == "example.com"
    assert aligned("news.example.com", "example.com", "r")
    assert not aligned("news.example.com", "example.com", "s")
    assert not aligned("example.net", "example.com", "r")


@pytest.mark.parametrize(
    ("rua", "note"),
    [
        ("mailto:d@example.com", None),
        ("mailto:d@example.com!10m, https://r.example.net/dmarc", None),
        ("d@example.com", "rua= holds no URI"),
        ("d@example.com, r@example.net", "rua= holds no URI"),
        (None, "no rua="),
    ],
)
def test_dmarc_reports_address_without_a_uri_scheme_gets_no_reports(
    dns_server: LoopbackDNS, rua: str | None, note: str | None
) -> None:
    # RFC 7489 §6.4: rua is a list of URIs, mailto: the one every receiver supports. A bare
    # address ("rua=d@example.com", a common slip) is none: receivers send no reports,
    # and the doctor, which notes a missing rua=, said nothing.
    record = "v=DMARC1; p=reject" + (f"; rua={rua}" if rua is not None else "")
    dns_server.txt(f"_dmarc.{DOMAIN}", record)
    check = check_dmarc(
        DNSResolver(dns_server.dns_config), domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN]
    )
    assert check.status is Status.PASS
    notes = [line for line in check.details if "aggregate reports" in line]
    if note is None:
        assert notes == [], check.details
    else:
        assert len(notes) == 1 and notes[0].startswith(note), check.details


def test_dmarc_pass_warn_fail(rsa_key: Path) -> None:
    zone = good_zone(rsa_key)
    resolver = FakeResolver(zone)

    def dmarc(spf: str, dkim: list[str], bulk: bool = False) -> Check:
        return check_dmarc(resolver, domain=DOMAIN, spf_result=spf, dkim_domains=dkim, bulk=bulk)

    assert dmarc("pass", [DOMAIN]).status is Status.PASS
    assert dmarc("fail", ["mail.example.com"]).status is Status.PASS  # relaxed
    assert dmarc("pass", []).status is Status.WARN  # SPF alone
    failing = dmarc("softfail", ["example.net"])
    assert failing.status is Status.FAIL
    assert "d=example.com" in (failing.fix or "")

    resolver.zone[(f"_dmarc.{DOMAIN}", "TXT")] = ["v=DMARC1; p=none"]
    assert dmarc("pass", [DOMAIN]).status is Status.PASS
    bulk = dmarc("pass", [DOMAIN], bulk=True)
    assert bulk.status is Status.WARN
    assert bulk.fix is not None and '"v=DMARC1; p=quarantine"' in bulk.fix

    resolver.zone[(f"_dmarc.{DOMAIN}", "TXT")] = ["v=DMARC1; p=none", "v=DMARC1; p=reject"]
    assert dmarc("pass", [DOMAIN]).status is Status.FAIL

    resolver.zone[(f"_dmarc.{DOMAIN}", "TXT")] = "servfail"
    assert dmarc("pass", [DOMAIN]).status is Status.UNKNOWN

    del resolver.zone[(f"_dmarc.{DOMAIN}", "TXT")]
    missing = dmarc("pass", [DOMAIN])
    assert missing.status is Status.WARN
    assert dmarc("pass", [DOMAIN], bulk=True).status is Status.FAIL
    assert (missing.fix or "").startswith(
        'publish TXT at _dmarc.example.com: "v=DMARC1; p=none; rua=mailto:dmarc@example.com"'
    )


@pytest.mark.parametrize(
    ("rua", "published", "refused"),
    [
        # Another organization's address takes reports only when it says so, at
        # example.com._report._dmarc.<its host> (RFC 7489 §7.1).
        ("mailto:d@reports.example.net", None, ["reports.example.net"]),
        ("mailto:d@reports.example.net!10m", "v=DMARC1", []),
        ("mailto:d@reports.example.net", "v=spf1 -all", ["reports.example.net"]),
        # The domain's own organization needs no such record.
        ("mailto:d@example.com, mailto:e@mail.example.com", None, []),
        ("mailto:d@example.com,mailto:x@other.example", None, ["other.example"]),
    ],
)
def test_dmarc_reports_to_another_domain_need_its_consent(
    dns_server: LoopbackDNS, rua: str, published: str | None, refused: list[str]
) -> None:
    # Receivers send no aggregate report to a destination outside the policy domain's
    # organization that has not published its consent; the doctor said nothing of it.
    dns_server.txt(f"_dmarc.{DOMAIN}", f"v=DMARC1; p=reject; rua={rua}")
    if published is not None:
        dns_server.txt(f"{DOMAIN}._report._dmarc.reports.example.net", published)
    check = check_dmarc(
        DNSResolver(dns_server.dns_config), domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN]
    )
    assert check.status is Status.PASS
    notes = [line for line in check.details if "_report._dmarc" in line]
    assert [host for host in refused if any(host in line for line in notes)] == refused
    assert len(notes) == len(refused), check.details
    for line in notes:
        assert "receivers send no reports" in line


@pytest.mark.parametrize(
    "record",
    [
        "v=DMARC1; p=rejekt",
        "v=DMARC1; adkim=s",
        # Without a report URI, receivers apply no DMARC to a record without a valid p=.
        "v=DMARC1; p=rejekt; rua=d@example.com",
        "v=DMARC1; p=reject; pct=abc",
        # A rua= URI makes receivers read p= as none (RFC 7489 §6.6.3), not another error.
        "v=DMARC1; rua=mailto:d@example.com; pct=abc",
    ],
)
def test_dmarc_invalid_record_fix_replaces_it(record: str) -> None:
    # One more record beside the invalid one makes two, and receivers apply neither
    # (RFC 7489 §6.6.3): following the fix must leave one valid record.
    zone: dict[tuple[str, str], list[str] | str] = {(f"_dmarc.{DOMAIN}", "TXT"): [record]}
    check = check_dmarc(FakeResolver(zone), domain=DOMAIN, spf_result="pass", dkim_domains=[])
    assert check.summary.startswith("invalid DMARC record"), check.summary
    assert check.fix == (
        f"replace the TXT record at _dmarc.{DOMAIN} that starts with v=DMARC1 by a valid "
        f'one, e.g. "v=DMARC1; p=none; rua=mailto:dmarc@{DOMAIN}"'
    )
    # A subdomain's own record, beside the organizational domain's invalid one, is new.
    check = check_dmarc(
        FakeResolver(zone), domain=f"news.{DOMAIN}", spf_result="pass", dkim_domains=[]
    )
    assert (check.fix or "").startswith(f'publish TXT at _dmarc.news.{DOMAIN}: "v=DMARC1;')


@pytest.mark.parametrize(
    ("record", "fixed"),
    [
        ("v=DMARC1; rua=mailto:d@example.com", "v=DMARC1; p=none; rua=mailto:d@example.com"),
        (
            "v=DMARC1; p=rejekt; rua=mailto:d@example.com",
            "v=DMARC1; p=none; rua=mailto:d@example.com",
        ),
        (
            "v=DMARC1;p=reject;sp=all;rua=mailto:d@example.com",
            "v=DMARC1;p=reject;rua=mailto:d@example.com",
        ),
        # Only the first of a tag counts: a second, left in, would count once it is gone.
        (
            "v=DMARC1; p=x; sp=all; p=y; sp=all; rua=mailto:d@example.com",
            "v=DMARC1; p=none; rua=mailto:d@example.com",
        ),
    ],
)
def test_dmarc_record_without_a_valid_policy_but_with_reports_is_read_as_p_none(
    dns_server: LoopbackDNS, record: str, fixed: str
) -> None:
    # RFC 7489 §6.6.3, step 6: a record without a valid p= (or with an invalid sp=) whose
    # rua= holds a report URI is applied as if it said p=none. The doctor failed it as
    # invalid, as if receivers ignored it: mail that passes DMARC is a warning, with the
    # record that says what receivers read.
    dns_server.txt(f"_dmarc.{DOMAIN}", record)
    resolver = DNSResolver(dns_server.dns_config)
    check = check_dmarc(resolver, domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN])
    assert check.status is Status.WARN, check.summary
    assert "receivers read it as p=none" in check.summary
    assert "(p=none)" in check.summary
    assert check.fix == f'replace the TXT record at _dmarc.{DOMAIN} by "{fixed}"'
    assert any("RFC 7489 §6.6.3" in line for line in check.details)
    # Mail that fails it still fails (p=none asks for nothing, but it is a DMARC fail).
    check = check_dmarc(resolver, domain=DOMAIN, spf_result="fail", dkim_domains=[])
    assert check.status is Status.FAIL
    assert check.summary.startswith(f"mail From {DOMAIN} from this setup would fail DMARC")
    # The fix, published, is a valid record with the same reports.
    dns_server.txt(f"_dmarc.{DOMAIN}", fixed)
    check = check_dmarc(resolver, domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN])
    assert "p=none" not in check.summary or "(p=none)" in check.summary
    assert "invalid" not in check.summary, check.summary


def test_dmarc_subdomain_uses_the_organizational_record() -> None:
    resolver = FakeResolver({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; sp=quarantine"]})
    check = check_dmarc(
        resolver, domain="news.example.com", spf_result="pass", dkim_domains=["example.com"]
    )
    assert check.subject == "_dmarc.example.com"
    assert "p=quarantine" in check.summary
    assert resolver.asked == [("_dmarc.news.example.com", "TXT"), ("_dmarc.example.com", "TXT")]


@pytest.mark.parametrize(
    ("domain", "record", "tag", "fixed"),
    [
        # Tag names and policy values are in any case (RFC 7489 §6.4: ABNF strings).
        (DOMAIN, "v=DMARC1; P = None; rua=mailto:d@example.com", "p", "v=DMARC1; P = quarantine;"),
        # A subdomain under the organizational record: sp= is the policy to change.
        ("news.example.com", "v=DMARC1; p=reject; sp=none", "sp", "p=reject; sp=quarantine"),
        ("news.example.com", "v=DMARC1; p=none; sp=NONE", "sp", "p=none; sp=quarantine"),
        ("news.example.com", "v=DMARC1; p=none", "p", "v=DMARC1; p=quarantine"),
    ],
)
def test_dmarc_bulk_fix_changes_the_policy_in_effect(
    domain: str, record: str, tag: str, fixed: str
) -> None:
    resolver = FakeResolver({("_dmarc.example.com", "TXT"): [record]})
    check = check_dmarc(
        resolver, domain=domain, spf_result="pass", dkim_domains=[DOMAIN], bulk=True
    )
    assert check.status is Status.WARN
    assert f"{tag}=none asks receivers" in check.summary
    assert fixed in (check.fix or ""), check.fix


@pytest.mark.parametrize(
    ("domain", "record", "fixed"),
    [
        (
            DOMAIN,
            "v=DMARC1; p=quarantine; pct=0; rua=mailto:d@example.com",
            "v=DMARC1; p=quarantine; rua=mailto:d@example.com",
        ),
        (DOMAIN, "v=DMARC1; p=quarantine; t=y", "v=DMARC1; p=quarantine"),
        (DOMAIN, "v=DMARC1; p=QUARANTINE; T=Y; pct=0; t=n", "v=DMARC1; p=QUARANTINE"),
        # A From on a subdomain is governed by the organizational record's sp=.
        (
            "news.example.com",
            "v=DMARC1; p=reject; sp=quarantine; pct=0",
            "v=DMARC1; p=reject; sp=quarantine",
        ),
    ],
)
def test_dmarc_quarantine_sampling_no_mail_is_no_enforcement_for_bulk_senders(
    domain: str, record: str, fixed: str
) -> None:
    """``p=quarantine`` with ``pct=0`` (or DMARCbis's ``t=y``) samples no failing mail:
    receivers apply the next policy down, none (RFC 7489 §6.6.4). For a bulk sender that
    is p=none's case, which gets a warning and a fix; it passed without one."""
    resolver = FakeResolver({("_dmarc.example.com", "TXT"): [record]})
    check = check_dmarc(
        resolver, domain=domain, spf_result="pass", dkim_domains=[DOMAIN], bulk=True
    )
    assert check.status is Status.WARN, check
    assert "asks receivers to do nothing with mail that fails" in check.summary
    assert f'"{fixed}"' in (check.fix or ""), check.fix
    # Not a bulk sender: no warning, as for p=none.
    quiet = check_dmarc(resolver, domain=domain, spf_result="pass", dkim_domains=[DOMAIN])
    assert quiet.status is Status.PASS, quiet


@pytest.mark.parametrize(
    "record",
    [
        "v=DMARC1; p=reject; pct=0",  # quarantine to receivers: still enforced
        "v=DMARC1; p=reject; t=y",
        "v=DMARC1; p=quarantine; pct=1",
        "v=DMARC1; p=quarantine; t=n",
        "v=DMARC1; p=quarantine; t=maybe",  # no valid t=: not testing
    ],
)
def test_dmarc_enforcing_record_gets_no_bulk_warning(record: str) -> None:
    resolver = FakeResolver({("_dmarc.example.com", "TXT"): [record]})
    check = check_dmarc(
        resolver, domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN], bulk=True
    )
    assert check.status is Status.PASS, check


def test_dmarc_testing_flag_is_described() -> None:
    resolver = FakeResolver({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; t=y"]})
    check = check_dmarc(resolver, domain=DOMAIN, spf_result="pass", dkim_domains=[DOMAIN])
    [note] = [d for d in check.details if d.startswith("t=y")]
    assert "p=quarantine" in note, note


# --- blocklists --------------------------------------------------------------------------


def test_dnsbl_names() -> None:
    assert query_name("192.0.2.10", "zen.spamhaus.org") == "10.2.0.192.zen.spamhaus.org"
    assert query_name("2001:db8::1", "bl.example.") == (
        "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.example"
    )
    # Such a name could only fail every lookup, each seen as a temporary DNS error.
    for zone in ("zen..spamhaus.org", "zen spamhaus.org", "a" * 64 + ".example"):
        with pytest.raises(ValueError, match="not a letter-digit-hyphen domain name"):
            query_name("192.0.2.10", zone)


@pytest.mark.parametrize(
    ("zone", "status", "words"),
    [
        ({}, Status.PASS, "not listed"),
        (
            {
                ("10.2.0.192.bl.example", "A"): ["127.0.0.2"],
                ("10.2.0.192.bl.example", "TXT"): ["spam source, see https://bl.example/r"],
            },
            Status.FAIL,
            "LISTED (127.0.0.2): spam source",
        ),
        (
            {
                ("10.2.0.192.bl.example", "A"): ["127.0.0.2"],
                # A third party's text: escape sequences and octets that are not UTF-8
                # (the lookup keeps those as surrogates) reach the operator harmless.
                ("10.2.0.192.bl.example", "TXT"): ["Listed \x1b]0;owned\x07 \udcff see"],
            },
            Status.FAIL,
            "LISTED (127.0.0.2): Listed \ufffd]0;owned\ufffd \ufffd see",
        ),
        ({("10.2.0.192.bl.example", "A"): ["127.255.255.254"]}, Status.WARN, "refused"),
        # A refused or failed query at lists such as URIBL, never a listing.
        ({("10.2.0.192.bl.example", "A"): ["127.0.0.1"]}, Status.WARN, "no listing code"),
        (
            {("10.2.0.192.bl.example", "A"): ["127.0.0.1", "127.0.0.4"]},
            Status.FAIL,
            "LISTED (127.0.0.4)",
        ),
        ({("10.2.0.192.bl.example", "A"): ["203.0.113.80"]}, Status.WARN, "rewrite"),
        ({("10.2.0.192.bl.example", "A"): "servfail"}, Status.UNKNOWN, "could not query"),
    ],
)
def test_dnsbl(zone: Zone, status: Status, words: str) -> None:
    check = check_dnsbl(FakeResolver(zone), ip=IP, zone="bl.example")
    assert check.status is status
    assert words in check.summary


@pytest.mark.parametrize(
    ("code", "words", "advice"),
    [
        ("127.255.255.252", "not a name the list serves", "check the zone name"),
        ("127.255.255.254", "relayed by public resolvers", "your own recursive resolver"),
        ("127.255.255.255", "too many queries", "registered query service"),
    ],
)
def test_dnsbl_error_codes_each_say_what_went_wrong(
    dns_server: LoopbackDNS, code: str, words: str, advice: str
) -> None:
    """Spamhaus answers 127.255.255.252 for a query of a zone name it does not serve (a
    typing error), .254 for one relayed by a public resolver and .255 for a querier over
    its volume limit. All three said "does not answer queries relayed by public
    resolvers", with the advice to use one's own resolver: for a mistyped zone or a rate
    limit, advice that changes nothing."""
    dns_server.a("10.2.0.192.bl.example", code)
    check = check_dnsbl(DNSResolver(dns_server.dns_config), ip=IP, zone="bl.example")
    assert check.status is Status.WARN, check.summary
    assert words in check.summary and code in check.summary, check.summary
    assert check.fix is not None and advice in check.fix, check.fix


# --- outgoing address and port 25 --------------------------------------------------------


def test_split_probe() -> None:
    assert split_probe("gmail.com", 25) == ("gmail.com", 25)
    assert split_probe("127.0.0.1:2525", 25) == ("127.0.0.1", 2525)
    assert split_probe("[::1]:2525", 25) == ("::1", 2525)
    assert split_probe("::1", 25) == ("::1", 25)
    for bad in ("host:0", "host:x", ":25"):
        with pytest.raises(ValueError, match=r"port|HOST"):
            split_probe(bad, 25)
    # What follows the bracket is ":PORT" or nothing: a mistyped port is not dropped (the
    # probe went to the default port), nor a missing bracket overlooked.
    for bad in ("[::1]2525", "[::1]:", "[::1", "[::1]x:25", "host:"):
        with pytest.raises(ValueError, match=r"port|HOST"):
            split_probe(bad, 25)


def test_probe_target_is_the_best_mx() -> None:
    resolver = FakeResolver(
        {
            ("gmail.com", "MX"): ["20 alt.mx.example", "5 first.mx.example"],
            ("first.mx.example", "A"): ["198.51.100.25"],
        }
    )
    target = find_target(resolver, "gmail.com", 25)
    assert target == Target(name="first.mx.example", address="198.51.100.25", port=25)
    missing = find_target(FakeResolver({}), "nowhere.example", 25)
    assert isinstance(missing, Check) and missing.status is Status.FAIL


def test_probe_target_is_the_best_mx_host_with_an_address() -> None:
    # The router tries the next MX host when one has no address: so does the probe. The
    # doctor gave up at the first and said "no MX or address record" of a domain that has
    # both, a failure of port 25 that was none.
    resolver = FakeResolver(
        {
            ("gmail.com", "MX"): ["5 gone.mx.example", "10 backup.mx.example"],
            ("backup.mx.example", "A"): ["198.51.100.26"],
        }
    )
    target = find_target(resolver, "gmail.com", 25)
    assert target == Target(name="backup.mx.example", address="198.51.100.26", port=25)
    # With none that has an address, the summary says so, not that there is no MX record.
    resolver = FakeResolver({("gmail.com", "MX"): ["5 gone.mx.example", "10 gone2.mx.example"]})
    found = find_target(resolver, "gmail.com", 25)
    assert isinstance(found, Check) and found.status is Status.FAIL, found
    assert "no MX or address record" not in found.summary, found.summary
    assert "gone.mx.example, gone2.mx.example" in found.summary, found.summary


def test_probe_domain_whose_mx_lookup_failed_is_not_probed_at_its_address() -> None:
    # Only a domain without MX records has its own address stand in (RFC 5321 §5.1); one
    # whose MX lookup failed has an MX host, unknown for now: gmail.com's web server is
    # no SMTP server, and probing it would blame this machine's port 25.
    resolver = FakeResolver({("gmail.com", "MX"): "servfail", ("gmail.com", "A"): ["192.0.2.80"]})
    found = find_target(resolver, "gmail.com", 25)
    assert isinstance(found, Check), found
    assert found.status is Status.UNKNOWN
    assert "SERVFAIL" in found.summary
    # Nor is a failed address lookup of the MX host "no MX or address record".
    resolver = FakeResolver(
        {("gmail.com", "MX"): ["5 mx.example"], ("mx.example", "A"): "servfail"}
    )
    found = find_target(resolver, "gmail.com", 25)
    assert isinstance(found, Check) and found.status is Status.UNKNOWN, found


def test_a_probe_target_unknown_for_now_leaves_the_outgoing_address_unknown(
    rsa_key: Path,
) -> None:
    # Without --ip the address is found by routing towards the probe target: when the
    # target's lookup failed for now, so did finding the address; nothing failed outright
    # (exit 75, run again later), and the checks of the address are skipped.
    zone = good_zone(rsa_key)
    zone[("gmail.com", "MX")] = "servfail"
    report = run_doctor(setup(rsa_key, probe="gmail.com"), FakeResolver(zone), FakeNetwork())
    status = {c.name: c.status for c in report.checks}
    assert status["outgoing-ip"] is status["port-25"] is Status.UNKNOWN, report.checks
    assert report.worst is Status.UNKNOWN
    assert exit_code(report) == 75


@pytest.mark.parametrize(
    ("given", "exit_status"),
    [
        # Relay mode without --ip: the relay's address, which SPF judges, is not known.
        ({"relay": "smtp.example.net:587"}, 1),
        # The outgoing address is unknown for now: so is SPF's verdict (exit 75).
        ({"probe": "gmail.com"}, 75),
    ],
)
def test_dmarc_without_an_spf_verdict_is_not_a_failure(
    rsa_key: Path, given: dict[str, object], exit_status: int
) -> None:
    # Without a DKIM key, DMARC passes or fails by SPF alone; with no address to judge,
    # SPF was skipped, and "would fail DMARC" (exit 2) claimed what nobody checked.
    zone = good_zone(rsa_key)
    zone[("gmail.com", "MX")] = "servfail"
    report = run_doctor(setup(rsa_key, dkim_keys=(), **given), FakeResolver(zone), FakeNetwork())
    assert report.ip is None
    [dmarc] = report.find("dmarc")
    assert dmarc.status is Status.WARN, dmarc
    assert "not checked" in dmarc.summary
    assert "SPF: not checked (no outgoing address to judge)" in dmarc.details
    assert exit_code(report) == exit_status


@pytest.mark.parametrize("null", ["0 .", "0 "])
def test_probe_domain_with_a_null_mx_is_no_target(null: str) -> None:
    # RFC 7505: the domain takes no mail; its address (a web server, say) is no SMTP
    # server, and a refused probe there would blame this machine's port 25.
    resolver = FakeResolver(
        {("nomail.example", "MX"): [null], ("nomail.example", "A"): ["198.51.100.80"]}
    )
    found = find_target(resolver, "nomail.example", 25)
    assert isinstance(found, Check), found
    assert found.status is Status.FAIL
    assert "null MX" in found.summary


def test_probe_domain_with_a_null_mx_beside_others_is_probed_at_those() -> None:
    # RFC 7505 §3 forbids the mix, but mail goes to the real MX hosts (the router drops
    # the null MX): they are the probe target. Was: "accepts no mail (null MX)", FAIL,
    # because the null MX (preference 0) sorted first.
    resolver = FakeResolver(
        {
            ("mixed.example", "MX"): ["0 .", "10 mx.mixed.example"],
            ("mx.mixed.example", "A"): ["198.51.100.25"],
        }
    )
    found = find_target(resolver, "mixed.example", 25)
    assert found == Target(name="mx.mixed.example", address="198.51.100.25", port=25), found


def test_probe_domain_whose_mx_records_name_only_address_literals_is_no_target(
    dns_server: LoopbackDNS,
) -> None:
    # An exchange written as an address literal names no host (RFC 5321 §5.1): the router
    # skips it, as Postfix does, so such a domain takes no mail. The probe looked up the
    # name "[192.0.2.25]" and failed with "no MX or address record", which the domain has.
    dns_server.mx("literal.example", [(10, "[192.0.2.25]")])
    found = find_target(DNSResolver(dns_server.dns_config), "literal.example", 25)
    assert isinstance(found, Check), found
    assert found.status is Status.FAIL
    assert "accepts no mail" in found.summary, found.summary
    assert "address literal" in found.summary and "[192.0.2.25]" in found.summary, found
    # Beside a host name, the literal is skipped, as the router skips it, however
    # preferred: the host is the target.
    dns_server.mx("literal.example", [(5, "[192.0.2.25]"), (10, "mx.literal.example")])
    dns_server.a("mx.literal.example", "127.0.0.25")
    resolver = DNSResolver(dns_server.dns_config)
    found = find_target(resolver, "literal.example", 25, allow_loopback=True)  # as a router's
    assert found == Target(name="mx.literal.example", address="127.0.0.25", port=25), found


def test_probe_domain_whose_mx_record_names_an_address_is_probed_there(
    dns_server: LoopbackDNS,
) -> None:
    # "MX 10 192.0.2.25" spells an address where a name belongs (RFC 5321 §5.1), but the
    # router delivers there, as Postfix does: it is the probe target. Looked up as a name,
    # it was "cannot find the probe target: no MX or address record".
    dns_server.mx("numeric.example", [(10, "127.0.0.25")])
    resolver = DNSResolver(dns_server.dns_config)
    found = find_target(resolver, "numeric.example", 25, allow_loopback=True)  # as a router's
    assert found == Target(name="127.0.0.25", address="127.0.0.25", port=25), found
    # Without allow_loopback, the router delivers no mail to it, nor is it probed.
    refused = find_target(resolver, "numeric.example", 25)
    assert isinstance(refused, Check) and "127.0.0.25 (loopback)" in refused.summary, refused


def test_an_ipv4_mapped_address_is_judged_as_the_ipv4_address(rsa_key: Path) -> None:
    # "::ffff:192.0.2.10" is how a dual-stack socket shows an IPv4 peer; on the wire, and
    # to receivers, it is 192.0.2.10: its PTR, A record and blocklist entries are IPv4's.
    zone = good_zone(rsa_key)
    zone[("10.2.0.192.bl.example", "A")] = ["127.0.0.2"]
    for given, local in (("::ffff:192.0.2.10", IP), (None, "::ffff:192.0.2.10")):
        report = run_doctor(setup(rsa_key, ip=given), FakeResolver(zone), FakeNetwork(local=local))
        assert report.ip == IP
        status = {c.name: c.status for c in report.checks}
        assert status["ptr"] is status["helo"] is Status.PASS, report.checks
        assert status["dnsbl"] is Status.FAIL  # listed as 192.0.2.10


def test_a_routed_address_is_judged_without_its_zone_index() -> None:
    # getsockname() gives a link-local address with its zone, which has no reverse name.
    network = FakeNetwork(local="fe80::1%eth0")
    setup = SenderSetup(domain=DOMAIN, helo_name=HELO, probe="[fe80::2%eth0]:25", dnsbls=())
    report = run_doctor(setup, FakeResolver({}), network)
    assert report.ip == "fe80::1"
    [outgoing] = report.find("outgoing-ip")
    assert outgoing.status is Status.WARN
    assert [c.status for c in report.find("ptr")] == [Status.FAIL]


@pytest.mark.parametrize("local", ["198.18.0.5", "fec0::5", "64:ff9b:1::5", "::ffff:10.0.0.5"])
def test_outgoing_addresses_behind_a_translator_are_warned_of(local: str) -> None:
    # The doctor kept a copy of the route policy's private networks that lacked the
    # NAT64 local-use prefix, and neither knew benchmarking nor site-local addresses,
    # which networks number their own hosts from: receivers see another address.
    target = Target(name="mx", address="198.51.100.25", port=25)
    check, _ = check_outgoing(FakeNetwork(local=local), target, given=None, source=None)
    assert check.status is Status.WARN, check.summary


def test_outgoing_address() -> None:
    target = Target(name="mx", address="198.51.100.25", port=25)
    check, ip = check_outgoing(FakeNetwork(), target, given=None, source=None)
    assert (check.status, ip) == (Status.PASS, IP)
    check, ip = check_outgoing(FakeNetwork(local="10.0.0.5"), target, given=None, source=None)
    assert (check.status, ip) == (Status.WARN, "10.0.0.5")
    assert "private" in check.summary
    unreachable = FakeNetwork(error=OSError(101, "Network is unreachable"))
    check, ip = check_outgoing(unreachable, target, given=None, source=None)
    assert (check.status, ip) == (Status.FAIL, None)
    check, ip = check_outgoing(unreachable, target, given="203.0.113.9", source=None)
    assert (check.status, ip) == (Status.PASS, "203.0.113.9")


@pytest.mark.parametrize(
    ("probe", "status", "words"),
    [
        (Probe(connected=True, greeting="220 mx ESMTP"), Status.PASS, "answered: 220"),
        (
            Probe(connected=False, timed_out=True, error="no answer within 10 s"),
            Status.FAIL,
            "looks blocked",
        ),
        (Probe(connected=False, error="Connection refused"), Status.FAIL, "refused"),
        (
            Probe(connected=True, timed_out=True, error="connected, but no greeting"),
            Status.FAIL,
            "intercepts",
        ),
        (Probe(connected=True, greeting="554 5.7.1 blocked"), Status.WARN, "refuses"),
        # Nothing but a line break before the close is no greeting either.
        (Probe(connected=True, greeting=""), Status.FAIL, "no SMTP greeting came"),
    ],
)
def test_port25(probe: Probe, status: Status, words: str) -> None:
    target = Target(name="mx.example", address="198.51.100.25", port=25)
    check = check_port25(FakeNetwork(probe_result=probe), target, source=None, timeout=10)
    assert check.status is status
    assert words in check.summary
    if status is Status.FAIL:
        assert "relay.host" in (check.fix or "")


# --- the whole run -----------------------------------------------------------------------


def setup(rsa_key: Path, **given: object) -> SenderSetup:
    values: dict[str, object] = {
        "domain": DOMAIN,
        "helo_name": HELO,
        "probe": "198.51.100.25",
        "dkim_keys": (DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key)),),
        "dnsbls": ("bl.example",),
    }
    values.update(given)
    return SenderSetup(**values)  # type: ignore[arg-type]


def test_run_doctor_all_pass(rsa_key: Path) -> None:
    network = FakeNetwork()
    report = run_doctor(setup(rsa_key), FakeResolver(good_zone(rsa_key)), network)
    assert [c.name for c in report.checks] == [
        "outgoing-ip",
        "port-25",
        "ptr",
        "helo",
        "spf",
        "spf-helo",
        "mx",
        "dkim",
        "dmarc",
        "dnsbl",
    ]
    assert report.worst is Status.PASS, report.checks
    assert report.ip == IP
    assert network.probed == [("198.51.100.25", 25, None)]
    assert exit_code(report) == 0


LONG = "x" * 5000
"""Far more than a summary line should hold; a TXT record may hold 64 KiB."""


@pytest.mark.parametrize(
    "zone",
    [
        {(DOMAIN, "TXT"): [f"v=spf1 {LONG} -all"]},  # pyspf's permerror quotes the term
        {(HELO, "TXT"): [f"v=spf1 {LONG} -all"]},
        {(f"s1._domainkey.{DOMAIN}", "TXT"): [f"v=DKIM1; {LONG}; p=MII"]},
        {(f"s1._domainkey.{DOMAIN}", "TXT"): [f"v={LONG}; p=MII"]},
        {(f"s1._domainkey.{DOMAIN}", "TXT"): [f"v=DKIM1; h={LONG}; p=MII"]},
        {(f"s1._domainkey.{DOMAIN}", "TXT"): [f"v=DKIM1; {i}; p=MII" for i in range(300)]},
        {(f"_dmarc.{DOMAIN}", "TXT"): [f"v=DMARC1; p={LONG}"]},
        {(f"_dmarc.{DOMAIN}", "TXT"): [f"v=DMARC1; p=none; {LONG}"]},
        {
            ("10.2.0.192.bl.example", "A"): ["127.0.0.2"],
            ("10.2.0.192.bl.example", "TXT"): [LONG],
        },
        {("10.2.0.192.bl.example", "A"): [f"127.0.{i // 256}.{i % 256}" for i in range(1000)]},
        {(HELO, "A"): [f"198.51.{i // 256}.{i % 256}" for i in range(1000)]},
    ],
)
def test_summaries_quote_a_short_piece_of_what_dns_said(
    rsa_key: Path, zone: dict[tuple[str, str], list[str]]
) -> None:
    report = run_doctor(setup(rsa_key), FakeResolver(zone), FakeNetwork())
    longest = max(report.checks, key=lambda c: len(c.summary))
    assert len(longest.summary) < 500, (longest.name, longest.summary[:300])


MANY = 1000
"""Records of one RRset: a 64 KiB answer holds thousands of short TXT records."""


@pytest.mark.parametrize(
    "zone",
    [
        {(DOMAIN, "TXT"): [f"v=spf1 ip4:198.51.100.{i % 256} -all" for i in range(MANY)]},
        {(HELO, "TXT"): [f"v=spf1 a:{i}.example.net -all" for i in range(MANY)]},
        {(f"s1._domainkey.{DOMAIN}", "TXT"): [f"v=DKIM1; p=MII{i}" for i in range(MANY)]},
        {(f"_dmarc.{DOMAIN}", "TXT"): [f"v=DMARC1; p=none; ri={i}" for i in range(MANY)]},
        {(HELO, "A"): [f"198.51.{i // 256}.{i % 256}" for i in range(MANY)]},
        {(DOMAIN, "MX"): [f"{i} mx{i}.example.net" for i in range(MANY)]},
    ],
)
def test_details_show_a_few_of_many_records_and_count_the_rest(
    rsa_key: Path, zone: dict[tuple[str, str], list[str]]
) -> None:
    # A detail line per record listed every record of an RRset, and the text report
    # printed each under its fix: a thousand lines for one check, the rest scrolled away.
    report = run_doctor(setup(rsa_key), FakeResolver({**good_zone(rsa_key), **zone}), FakeNetwork())
    longest = max(report.checks, key=lambda c: len(c.details))
    assert len(longest.details) <= 15, (longest.name, len(longest.details))
    if longest.name != "mx":  # which passes: its hosts are as good as any
        assert any(f"{MANY - 10} more" in line for line in longest.details), longest.details


def test_run_doctor_relay_mode(rsa_key: Path) -> None:
    network = FakeNetwork()
    report = run_doctor(
        setup(rsa_key, relay="smtp.example.net:587"), FakeResolver(good_zone(rsa_key)), network
    )
    assert network.probed == []
    assert report.ip is None
    assert {c.name: c.status for c in report.checks if c.status is Status.SKIP}.keys() == {
        "port-25",
        "outgoing-ip",
        "ptr",
        "helo",
        "spf",
        "spf-helo",
    }
    assert report.find("dnsbl") == []


@pytest.mark.parametrize("domain", ["Example.COM", "example.com.", "EXAMPLE.com."])
def test_run_doctor_takes_the_domain_in_any_case_and_with_a_final_dot(
    rsa_key: Path, domain: str
) -> None:
    # The subdomain policy differs, so taking the domain for a subdomain shows.
    zone = good_zone(rsa_key)
    zone[(f"_dmarc.{DOMAIN}", "TXT")] = ["v=DMARC1; p=reject; sp=none"]
    report = run_doctor(setup(rsa_key, domain=domain), FakeResolver(zone), FakeNetwork())
    assert report.domain == DOMAIN
    assert report.worst is Status.PASS, [c for c in report.checks if c.status != "pass"]
    [dmarc] = report.find("dmarc")
    assert "(p=reject)" in dmarc.summary


@pytest.mark.parametrize("keys", ["none", "other domain"])
def test_bulk_sender_without_dkim_for_the_domain_fails(
    dns_server: LoopbackDNS, rsa_key: Path, keys: str
) -> None:
    # Gmail and Yahoo require bulk senders to authenticate with both SPF and DKIM, and
    # Gmail blocks their unsigned mail (5.7.26) even when SPF and DMARC pass: with
    # --bulk, mail that goes out unsigned is a failure, not a warning (exit 1).
    dns_server.ptr(IP, HELO)
    dns_server.a(HELO, IP)
    dns_server.txt(HELO, "v=spf1 a -all")
    dns_server.txt(DOMAIN, "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; rua=mailto:d@example.com")
    dns_server.txt("s1._domainkey.example.org", record_for(public_key(rsa_key.read_bytes())))
    dns_server.mx(DOMAIN, [(10, "mx.example.com")])
    dns_server.a("mx.example.com", "192.0.2.25")
    resolver = DNSResolver(dns_server.dns_config)
    dkim = (
        ()
        if keys == "none"
        else (DKIMKey(domain="example.org", selector="s1", private_key=str(rsa_key)),)
    )
    given = {"ip": IP, "dkim_keys": dkim}
    for bulk, status, code in ((False, Status.WARN, 1), (True, Status.FAIL, 2)):
        report = run_doctor(setup(rsa_key, bulk=bulk, **given), resolver, FakeNetwork())
        unsigned = [c for c in report.find("dkim") if c.subject == DOMAIN]
        assert [c.status for c in unsigned] == [status], report.checks
        assert exit_code(report) == code, [c for c in report.checks if c.status != "pass"]


@pytest.mark.parametrize(
    ("mail", "status", "words"),
    [
        ("mx", Status.PASS, "takes mail at mx.example.com"),
        ("address", Status.PASS, "implicit MX"),
        ("null mx", Status.FAIL, "null MX"),
        ("nothing", Status.FAIL, "no MX or address record"),
    ],
)
def test_sending_domain_that_takes_no_mail_fails(
    dns_server: LoopbackDNS, rsa_key: Path, mail: str, status: Status, words: str
) -> None:
    # Receivers refuse mail whose envelope sender (mailstrom's: the From address) is in a
    # domain that takes no mail: a null MX (RFC 7505 §4.2-4.3, 550 5.7.27), or neither MX
    # nor address (Postfix's reject_unknown_sender_domain). Every check passed for it.
    dns_server.ptr(IP, HELO)
    dns_server.a(HELO, IP)
    dns_server.txt(HELO, "v=spf1 a -all")
    dns_server.txt(DOMAIN, "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; rua=mailto:d@example.com")
    dns_server.txt(f"s1._domainkey.{DOMAIN}", record_for(public_key(rsa_key.read_bytes())))
    if mail == "mx":
        dns_server.mx(DOMAIN, [(10, "mx.example.com")])
        dns_server.a("mx.example.com", "192.0.2.25")
    elif mail == "address":
        dns_server.a(DOMAIN, "192.0.2.80")
    elif mail == "null mx":
        dns_server.null_mx(DOMAIN)
        dns_server.a(DOMAIN, "192.0.2.80")  # its web server: no stand-in for a null MX
    report = run_doctor(setup(rsa_key, ip=IP), DNSResolver(dns_server.dns_config), FakeNetwork())
    [check] = report.find("mx")
    assert check.status is status, check.summary
    assert words in check.summary
    assert exit_code(report) == (0 if status is Status.PASS else 2), report.checks


def test_run_doctor_takes_a_dkim_key_domain_in_any_case(rsa_key: Path) -> None:
    # The signer takes d= as a lower-case A-label; so must the doctor, or the key counts
    # for no From domain (and DMARC passes "by SPF alone").
    key = DKIMKey(domain="Example.COM.", selector="s1", private_key=str(rsa_key))
    assert key.domain == DOMAIN
    assert key.record_name == f"s1._domainkey.{DOMAIN}"
    report = run_doctor(
        setup(rsa_key, dkim_keys=(key,)), FakeResolver(good_zone(rsa_key)), FakeNetwork()
    )
    assert report.worst is Status.PASS, [c for c in report.checks if c.status != "pass"]


def test_setup_from_config() -> None:
    config = Config(helo_name=HELO, source_address="192.0.2.10", dns=DNSConfig())
    s = SenderSetup.from_config(config, domain="Example.COM.", ip=None, bulk=True)
    assert (s.domain, s.helo_name, s.source_address, s.bulk, s.dkim_keys) == (
        "example.com",
        HELO,
        "192.0.2.10",
        True,
        (),
    )


@pytest.mark.parametrize(
    ("settings", "bulk", "status", "named", "fix"),
    [
        ({}, False, None, "", ""),
        ({"tls": "none"}, False, Status.WARN, "gmail.com", 'tls = "opportunistic"'),
        ({"tls": "none"}, True, Status.FAIL, "yahoo.com", 'tls = "opportunistic"'),
        ({"tls_domains": {"gmail.com": "none"}}, False, Status.WARN, "gmail.com",
         'remove tls.domains entry "gmail.com"'),
        ({"tls_domains": {"*.com": "none"}}, True, Status.FAIL, "yahoo.com",
         'tls.domains "gmail.com" = "opportunistic", tls.domains "yahoo.com"'),
        # The operator's word for a domain wins over the global level, either way.
        ({"tls": "none", "tls_domains": {"*.com": "verify"}}, False, None, "", ""),
        ({"tls_domains": {"gmail.com": "required", "yahoo.com": "none"}}, False, Status.WARN,
         "yahoo.com", "yahoo.com"),
    ],
)  # fmt: skip
def test_mail_to_the_big_providers_in_plaintext_is_reported(
    rsa_key: Path,
    settings: dict[str, object],
    bulk: bool,
    status: Status | None,
    named: str,
    fix: str,
) -> None:
    # Gmail's and Yahoo's sender requirements (Feb 2024) ask every sender to use TLS; a
    # setup whose tls level (or tls_domains entry) is "none" for their domains sends
    # them plaintext, and the doctor said "every check passed".
    config = Config(helo_name=HELO, **settings)  # type: ignore[arg-type]
    given = setup(rsa_key, bulk=bulk)
    sender = SenderSetup.from_config(
        config,
        domain=DOMAIN,
        probe=given.probe,
        dkim_keys=given.dkim_keys,
        dnsbls=given.dnsbls,
        bulk=bulk,
    )
    report = run_doctor(sender, FakeResolver(good_zone(rsa_key)), FakeNetwork())
    found = report.find("tls")
    if status is None:
        assert found == [], found
        assert report.worst is Status.PASS, [c for c in report.checks if c.status != "pass"]
        return
    [check] = found
    assert check.status is status, check
    assert named in check.summary, check.summary
    assert "TLS" in check.summary, check.summary
    assert fix in (check.fix or ""), check.fix
    # In relay mode the relay talks to receivers: its TLS is not this machine's to judge.
    relayed = run_doctor(
        replace(sender, relay="smtp.example.net:587"),
        FakeResolver(good_zone(rsa_key)),
        FakeNetwork(),
    )
    assert relayed.find("tls") == []


@pytest.mark.parametrize("domain", ["", "user@", "..", "ex;ample.com", "a" * 64 + ".com", "com"])
def test_setup_refuses_what_is_no_sending_domain(domain: str) -> None:
    with pytest.raises(ValueError, match="domain name"):
        SenderSetup.from_config(Config(helo_name=HELO), domain=domain)
    with pytest.raises(ValueError, match="domain name"):
        SenderSetup(domain=domain, helo_name=HELO)


@pytest.mark.parametrize("ip", ["fe80::1%eth0", "192.0.2.300", "example.com"])
def test_setup_refuses_what_is_no_address_receivers_see(ip: str) -> None:
    with pytest.raises(ValueError, match="address"):
        SenderSetup(domain=DOMAIN, helo_name=HELO, ip=ip)


def test_exit_codes() -> None:
    def report(*statuses: Status) -> DoctorReport:
        r = DoctorReport(domain=DOMAIN, helo_name=HELO)
        r.add([Check(name="x", subject="y", status=s, summary="") for s in statuses])
        return r

    assert exit_code(report(Status.PASS, Status.SKIP)) == 0
    assert exit_code(report(Status.PASS, Status.WARN)) == 1
    assert exit_code(report(Status.WARN, Status.UNKNOWN)) == 75
    assert exit_code(report(Status.UNKNOWN, Status.FAIL)) == 2


def test_missing_extra(monkeypatch: pytest.MonkeyPatch, rsa_key: Path) -> None:
    assert extras.missing() == []
    monkeypatch.setitem(__import__("sys").modules, "publicsuffixlist", None)
    assert extras.missing() == ["publicsuffixlist"]
    with pytest.raises(extras.MissingExtra, match=r"pip install 'mailstrom\[doctor\]'"):
        run_doctor(setup(rsa_key), FakeResolver({}), FakeNetwork())


@pytest.mark.parametrize(
    ("zone", "fix"),
    [
        (
            {(DOMAIN, "TXT"): ["v=spf1 mx +all"]},
            'replace TXT at example.com "v=spf1 mx +all" by "v=spf1 ip4:192.0.2.10 mx ~all"',
        ),
        (
            {(DOMAIN, "TXT"): ["v=spf1 ip4:192.0.2.10 all"]},
            'replace TXT at example.com "v=spf1 ip4:192.0.2.10 all" by '
            '"v=spf1 ip4:192.0.2.10 ~all"',
        ),
        (
            {
                (DOMAIN, "TXT"): ["v=spf1 include:_spf.example.net -all"],
                ("_spf.example.net", "TXT"): ["v=spf1 +all"],
            },
            "remove from TXT at example.com the term that matches every address",
        ),
        (
            {(DOMAIN, "TXT"): ["v=spf1 ip4:0.0.0.0/0 -all"]},
            "remove from TXT at example.com the term that matches every address",
        ),
    ],
)
def test_spf_that_passes_every_address_is_a_warning(
    zone: dict[tuple[str, str], list[str] | str], fix: str
) -> None:
    check, result = check_spf(FakeResolver(zone), domain=DOMAIN, ip=IP, helo=HELO)
    # pyspf's verdict stays pass (DMARC is judged on it), the check says what it means.
    assert result == "pass"
    assert check.status is Status.WARN
    assert "authorizes every address" in check.summary
    assert check.fix is not None and check.fix.startswith(fix)


@pytest.mark.parametrize(
    ("ip", "record"),
    [
        ("2001:db8::1", "v=spf1 ip6:2001:db8::/32 ip4:0.0.0.0/0 -all"),
        (IP, f"v=spf1 ip4:{IP} ip6:::/0 -all"),
    ],
)
def test_spf_open_to_the_other_address_family_is_a_warning(ip: str, record: str) -> None:
    # Anyone sending over the family the outgoing address is not of passes SPF as the
    # domain all the same: the record authorizes every address of that family.
    check, result = check_spf(
        FakeResolver({(DOMAIN, "TXT"): [record]}), domain=DOMAIN, ip=ip, helo=HELO
    )
    assert result == "pass"
    assert check.status is Status.WARN
    assert "authorizes every address" in check.summary
    assert check.fix is not None
    assert check.fix.startswith("remove from TXT at example.com the term that matches")


def test_spf_that_names_its_senders_is_no_warning(rsa_key: Path) -> None:
    check, _ = check_spf(FakeResolver(good_zone(rsa_key)), domain=DOMAIN, ip=IP, helo=HELO)
    assert check.status is Status.PASS
    ipv6 = {(DOMAIN, "TXT"): ["v=spf1 ip6:2001:db8::/32 -all"]}
    check, _ = check_spf(FakeResolver(ipv6), domain=DOMAIN, ip="2001:db8::1", helo=HELO)
    assert check.status is Status.PASS


def test_run_doctor_does_not_count_an_ed25519_signature_alone_for_dmarc(
    rsa_key: Path,
) -> None:
    # Microsoft's and Yahoo's receivers (and others) do not verify Ed25519 (RFC 8463): to
    # them mail signed by Ed25519 keys alone is unsigned, and with SPF failing it fails
    # DMARC (p=reject: refused). The doctor passed both the DKIM and the DMARC check.
    ed_pem = generate_private_key(DKIMAlgorithm.ED25519_SHA256)
    ed_key = DKIMKey(domain=DOMAIN, selector="ed", private_key=ed_pem, algorithm="ed25519")
    zone = good_zone(rsa_key)
    zone[(DOMAIN, "TXT")] = ["v=spf1 ip4:198.51.100.1 -all"]  # not this address
    zone[(ed_key.record_name, "TXT")] = [record_for(public_key(ed_pem))]
    report = run_doctor(setup(rsa_key, dkim_keys=(ed_key,)), FakeResolver(zone), FakeNetwork())
    [dmarc] = report.find("dmarc")
    assert dmarc.status is Status.FAIL, dmarc
    warned = [c for c in report.find("dkim") if c.status is Status.WARN]
    assert len(warned) == 1 and "Ed25519" in warned[0].summary, report.find("dkim")
    assert "RSA" in (warned[0].fix or "")
    # Signed with an RSA key as well, the mail passes everywhere: no warning.
    both = (ed_key, DKIMKey(domain=DOMAIN, selector="s1", private_key=str(rsa_key)))
    report = run_doctor(setup(rsa_key, dkim_keys=both), FakeResolver(zone), FakeNetwork())
    assert [c.status for c in report.find("dkim")] == [Status.PASS, Status.PASS]
    assert report.find("dmarc")[0].status is Status.PASS


def test_run_doctor_does_not_let_a_dkim_key_in_testing_mode_pass_dmarc_quietly(
    dns_server: LoopbackDNS, rsa_key: Path
) -> None:
    # RFC 6376 §3.6.1: "Verifiers MUST NOT treat messages from Signers in testing mode
    # differently from unsigned email". A key whose record says t=y was counted as an
    # aligned signature, and DMARC passed (p=reject) for mail such receivers fail.
    published = record_for(public_key(rsa_key.read_bytes()))
    dns_server.txt(f"s1._domainkey.{DOMAIN}", f"{published}; t=y")
    dns_server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; rua=mailto:d@example.com")
    dns_server.txt(DOMAIN, "v=spf1 ip4:198.51.100.1 -all")  # not this address
    resolver = DNSResolver(dns_server.dns_config)
    run = setup(rsa_key, ip=IP, dnsbls=())
    report = run_doctor(run, resolver, FakeNetwork())
    [dkim], [dmarc] = report.find("dkim"), report.find("dmarc")
    assert dkim.status is Status.WARN and "t=y" in dkim.summary, dkim.summary
    assert dmarc.status is Status.WARN, dmarc.summary
    assert "only by a DKIM key in testing mode (t=y)" in dmarc.summary
    assert (dmarc.fix or "").startswith("drop t=y")
    # SPF passing for the address, DMARC passes by SPF alone: a warning too.
    dns_server.txt(DOMAIN, f"v=spf1 ip4:{IP} -all")
    [dmarc] = run_doctor(run, resolver, FakeNetwork()).find("dmarc")
    assert dmarc.status is Status.WARN, dmarc.summary
    assert "passes by SPF alone where a DKIM key in testing mode" in dmarc.summary
    # Without t=y the key counts, and DMARC passes.
    dns_server.txt(f"s1._domainkey.{DOMAIN}", published)
    report = run_doctor(run, resolver, FakeNetwork())
    assert [c.status for c in report.find("dkim")] == [Status.PASS]
    assert report.find("dmarc")[0].status is Status.PASS, report.find("dmarc")[0].summary


def test_a_lookup_that_failed_for_now_leaves_dmarc_unknown_not_failed(
    dns_server: LoopbackDNS, rsa_key: Path
) -> None:
    # The SPF record's lookup failed for now (SERVFAIL): SPF was "temporary error"
    # (unknown), but DMARC said "would fail DMARC" with a fix to publish, and the run
    # failed (exit 2: "receivers will reject or junk this mail") over a transient error.
    dns_server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; rua=mailto:d@example.com")
    dns_server.mx(DOMAIN, [(10, "mx.example.com")])
    dns_server.a("mx.example.com", "192.0.2.25")
    dns_server.ptr(IP, HELO)
    dns_server.a(HELO, IP)
    dns_server.txt(HELO, "v=spf1 a -all")
    dns_server.servfail(DOMAIN, "TXT")
    resolver = DNSResolver(dns_server.dns_config)
    report = run_doctor(setup(rsa_key, ip=IP, dnsbls=(), dkim_keys=()), resolver, FakeNetwork())
    [spf], [dmarc] = report.find("spf"), report.find("dmarc")
    assert spf.status is Status.UNKNOWN, spf.summary
    assert dmarc.status is Status.UNKNOWN, dmarc.summary
    assert "not known now: SPF could not be evaluated" in dmarc.summary
    assert exit_code(report) == 75  # a lookup failed, nothing failed: run again later
    # The DKIM record's lookup failing, with SPF failing for the address: unknown too.
    dns_server.delete(DOMAIN)  # ends the SERVFAIL of its TXT records
    dns_server.mx(DOMAIN, [(10, "mx.example.com")])
    dns_server.txt(DOMAIN, "v=spf1 ip4:198.51.100.1 -all")
    dns_server.servfail(f"s1._domainkey.{DOMAIN}")
    report = run_doctor(setup(rsa_key, ip=IP, dnsbls=()), resolver, FakeNetwork())
    [spf], [dkim], [dmarc] = report.find("spf"), report.find("dkim"), report.find("dmarc")
    assert spf.status is Status.FAIL, spf.summary
    assert dkim.status is Status.UNKNOWN, dkim.summary
    assert dmarc.status is Status.UNKNOWN, dmarc.summary
    assert dmarc.summary.endswith(f"now: the DKIM record of d={DOMAIN} could not be looked up")
    # Once it answers, and holds no key, the mail fails DMARC.
    dns_server.txt(f"s1._domainkey.{DOMAIN}", "v=spf1 -all")
    report = run_doctor(setup(rsa_key, ip=IP, dnsbls=()), resolver, FakeNetwork())
    assert report.find("dmarc")[0].status is Status.FAIL


def test_a_null_mx_among_other_mx_records_is_a_warning(dns_server: LoopbackDNS) -> None:
    """RFC 7505 §3 forbids a null MX beside other MX records, but a sender seeing the mix
    can only deliver to the real hosts (our router drops the null MX and uses them): the
    domain takes mail and gets its bounces. Was: FAIL "publishes a null MX: it takes no
    mail", telling the operator to publish the MX records already published."""
    import asyncio

    from mailstrom.doctor.mx import check_mx
    from mailstrom.routing import Router

    dns_server.mx(DOMAIN, [(0, "."), (10, "mx.example.com")])
    dns_server.a("mx.example.com", "192.0.2.25")
    route = asyncio.run(Router(dns_server.dns_config).route(DOMAIN))
    assert [h.name for h in route.hosts] == ["mx.example.com"]  # raises for a null MX
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.WARN, check.summary
    assert "mx.example.com" in check.summary and "null MX" in check.summary, check.summary
    assert check.fix is not None and "remove the null MX" in check.fix, check.fix


def test_mx_records_naming_address_literals_alone_take_no_mail(dns_server: LoopbackDNS) -> None:
    """An MX record's exchange is a host name (RFC 5321 §5.1), and "[192.0.2.25]." is
    none: our router skips such records, as Postfix does, and bounces a domain left with
    no other (5.4.4), so the domain gets no bounces. The doctor passed it: "takes mail at
    [192.0.2.25]"."""
    from mailstrom.doctor.mx import check_mx
    from mailstrom.errors import PermanentFailure
    from mailstrom.routing import Router

    dns_server.mx(DOMAIN, [(10, "[192.0.2.25]")])
    with pytest.raises(PermanentFailure):
        asyncio.run(Router(dns_server.dns_config).route(DOMAIN))
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.FAIL, check.summary
    assert "address literal" in check.summary and "[192.0.2.25]" in check.summary, check
    dns_server.mx(DOMAIN, [(10, "[192.0.2.25]"), (20, "mx.example.com")])
    dns_server.a("mx.example.com", "192.0.2.25")
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.PASS and "mx.example.com" in check.summary, check.summary


def test_mx_hosts_without_any_address_take_no_mail(dns_server: LoopbackDNS) -> None:
    """An MX host whose name has no A or AAAA record is no place mail can go: the router
    finds no route (mail to the domain waits, then bounces) and the domain's mail gets no
    bounces. The doctor passed it: "takes mail at mx.example.com"."""
    from mailstrom.doctor.lookup import MOST_MX_HOSTS
    from mailstrom.doctor.mx import check_mx
    from mailstrom.errors import TemporaryFailure
    from mailstrom.routing import Router

    dns_server.mx(DOMAIN, [(10, "mx.example.com"), (20, "mx2.example.com")])
    with pytest.raises(TemporaryFailure):
        asyncio.run(Router(dns_server.dns_config).route(DOMAIN))
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.FAIL, check.summary
    assert "no address" in check.summary and "mx2.example.com" in check.summary, check
    assert check.fix is not None and "mx.example.com" in check.fix, check.fix
    dns_server.a("mx2.example.com", "192.0.2.25")  # one host with an address is enough
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.PASS, check.summary
    # Past the hosts looked up, one may have an address: a warning, not a verdict.
    dns_server.mx(DOMAIN, [(i, f"mx{i}.none.example") for i in range(MOST_MX_HOSTS + 2)])
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.WARN and "2 others were not looked up" in check.summary


def test_mx_host_whose_address_lookup_failed_is_unknown_not_taking_mail(
    dns_server: LoopbackDNS,
) -> None:
    """The address lookup of the only MX host failed (SERVFAIL): whether the domain takes
    mail is not known now. The doctor passed it: "takes mail at mx.example.com"."""
    from mailstrom.doctor.mx import check_mx

    dns_server.mx(DOMAIN, [(10, "mx.example.com")])
    dns_server.servfail("mx.example.com")
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.UNKNOWN, check.summary
    assert "mx.example.com" in check.summary, check.summary
    # Another host with an address takes the mail whatever the failed lookup would say.
    dns_server.mx(DOMAIN, [(10, "mx.example.com"), (20, "mx2.example.com")])
    dns_server.a("mx2.example.com", "192.0.2.25")
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.PASS, check.summary


@dataclass
class DualStackNetwork(FakeNetwork):
    """Routes from 192.0.2.10 over IPv4 and 2001:db8::10 over IPv6 (``v6`` None: no
    IPv6 route); the port 25 probe of each version answers as ``probes`` says."""

    v6: str | None = "2001:db8::10"
    probes: dict[int, Probe] = field(default_factory=dict)

    def local_address(self, host: str, port: int, source: str | None) -> str:
        if ":" not in host:
            return source or self.local
        if self.v6 is None:
            raise OSError(101, "Network is unreachable")
        return source or self.v6

    def probe(self, host: str, port: int, source: str | None, timeout: float) -> Probe:
        self.probed.append((host, port, source))
        return self.probes.get(6 if ":" in host else 4, self.probe_result)


def dual_zone(rsa_key: Path) -> dict[tuple[str, str], list[str] | str]:
    zone = good_zone(rsa_key)
    zone[("mx.probe.example", "A")] = ["198.51.100.25"]
    zone[("mx.probe.example", "AAAA")] = ["2001:db8::25"]
    zone[(HELO, "AAAA")] = ["2001:db8::10"]
    zone[(DOMAIN, "TXT")] = ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/64 -all"]
    return zone


def test_a_dual_stack_host_is_judged_by_each_address(rsa_key: Path) -> None:
    zone = dual_zone(rsa_key)
    network = DualStackNetwork()
    report = run_doctor(setup(rsa_key, probe="mx.probe.example"), FakeResolver(zone), network)
    assert report.ips == (IP, "2001:db8::10") and report.ip == IP
    assert [c.subject for c in report.find("ptr")] == [IP, "2001:db8::10"]
    assert [p[0] for p in network.probed] == ["198.51.100.25", "2001:db8::25"]
    assert len(report.find("spf")) == len(report.find("dnsbl")) == 2
    # 2001:db8::10 has no PTR: Gmail refuses its IPv6 mail.
    ptr = {c.subject: c.status for c in report.find("ptr")}
    assert ptr == {IP: Status.PASS, "2001:db8::10": Status.FAIL}
    [v6] = [c for c in report.find("ptr") if c.status is Status.FAIL]
    assert v6.fix is not None and v6.fix.endswith(
        f'or send from {IP} only: source_address = "{IP}"'
    )
    # DMARC by the worst SPF result of the two: mail over IPv6 fails SPF here.
    zone[(DOMAIN, "TXT")] = ["v=spf1 ip4:192.0.2.0/24 -all"]
    report = run_doctor(
        setup(rsa_key, probe="mx.probe.example", dkim_keys=()), FakeResolver(zone), network
    )
    [dmarc] = report.find("dmarc")
    assert "SPF: fail" in " ".join(dmarc.details), dmarc.details


def test_a_dual_stack_target_without_an_ipv6_route_is_judged_over_ipv4(rsa_key: Path) -> None:
    # No IPv6 route: the mail goes out over IPv4 only, no failure of the setup.
    network = DualStackNetwork(v6=None)
    report = run_doctor(
        setup(rsa_key, probe="mx.probe.example"), FakeResolver(dual_zone(rsa_key)), network
    )
    assert report.ips == (IP,)
    statuses = [c.status for c in report.find("outgoing-ip")]
    assert statuses == [Status.PASS, Status.SKIP], report.find("outgoing-ip")
    [skipped] = [c for c in report.find("outgoing-ip") if c.status is Status.SKIP]
    assert "no IPv6 mail leaves this machine" in skipped.summary
    assert exit_code(report) == 0, report.checks


def test_port_25_blocked_over_one_ip_version_is_a_warning(rsa_key: Path) -> None:
    # Delivery falls back to the version that answers: mail flows, a warning.
    blocked = Probe(connected=False, timed_out=True, error="no answer within 10 s")
    for version in (4, 6):
        network = DualStackNetwork(probes={version: blocked})
        report = run_doctor(
            setup(rsa_key, probe="mx.probe.example"), FakeResolver(dual_zone(rsa_key)), network
        )
        statuses = sorted(c.status for c in report.find("port-25"))
        assert statuses == [Status.PASS, Status.WARN], report.find("port-25")
    network = DualStackNetwork(probes={4: blocked, 6: blocked})
    report = run_doctor(
        setup(rsa_key, probe="mx.probe.example"), FakeResolver(dual_zone(rsa_key)), network
    )
    assert {c.status for c in report.find("port-25")} == {Status.FAIL}


@pytest.mark.parametrize(
    "zone",
    [
        {("probe.example", "MX"): ["5 localhost", "10 backup.mx.example"]},
        {("probe.example", "MX"): ["5 mail.localhost", "10 backup.mx.example"]},
        {
            ("probe.example", "MX"): ["5 first.mx.example", "10 backup.mx.example"],
            ("first.mx.example", "A"): ["127.0.0.1"],
            ("first.mx.example", "AAAA"): ["::1"],
        },
    ],
)
def test_probe_domain_mx_hosts_of_this_host_are_passed_over(zone: Zone) -> None:
    # The router takes "localhost" (and names under it) as 127.0.0.1 and ::1 without a
    # query (RFC 6761 §6.3), and refuses loopback targets: a probe there tested this
    # host's own port 25, and blamed or passed it for the Internet's.
    zone = {**zone, ("backup.mx.example", "A"): ["198.51.100.26"], ("localhost", "A"): ["10.9.9.9"]}
    target = find_target(FakeResolver(zone), "probe.example", 25)
    assert target == Target(name="backup.mx.example", address="198.51.100.26", port=25), target
    near = find_target(FakeResolver(zone), "probe.example", 25, allow_loopback=True)
    assert isinstance(near, Target) and near.address in ("127.0.0.1", "::1"), near


@pytest.mark.parametrize(
    ("zone", "shown"),
    [
        ({(DOMAIN, "MX"): ["10 localhost"]}, "localhost"),
        ({(DOMAIN, "MX"): ["10 mx.localhost."]}, "mx.localhost"),
        (
            {(DOMAIN, "MX"): ["10 mx.example.com"], ("mx.example.com", "A"): ["127.0.0.2"]},
            "127.0.0.2",
        ),
        ({(DOMAIN, "A"): ["127.0.0.1"]}, "127.0.0.1"),
    ],
)
def test_mx_hosts_on_this_host_take_no_mail(zone: Zone, shown: str) -> None:
    """ "MX 10 localhost." (an old way of saying "no mail here") or an MX host at
    127.0.0.2 is one senders' routers do not deliver to, as ours does not (RFC 6761 §6.3,
    loopback targets refused): the domain gets no bounces. The doctor passed it."""
    from mailstrom.doctor.mx import check_mx

    check = check_mx(FakeResolver(zone), domain=DOMAIN)
    assert check.status is Status.FAIL, check.summary
    assert shown in check.summary and "loopback" in check.summary, check.summary
    assert check_mx(FakeResolver(zone), domain=DOMAIN, allow_loopback=True).status is Status.PASS


def test_mx_hosts_are_judged_and_named_in_preference_order(dns_server: LoopbackDNS) -> None:
    """Senders try MX hosts lowest preference first (RFC 5321 §5.1), whatever order the
    answer lists them in. The doctor took the first 5 in answer order: a domain whose
    preferred hosts come last warned "first 5 MX hosts have no address" about its backups
    (where the router delivers to the preferred ones), and named the backups first."""
    from mailstrom.doctor.lookup import MOST_MX_HOSTS
    from mailstrom.doctor.mx import check_mx
    from mailstrom.routing import Router

    backups = [(50 + i, f"backup{i}.none.example") for i in range(MOST_MX_HOSTS)]
    dns_server.mx(DOMAIN, [*backups, (20, "mx-b.example.com"), (10, "mx-a.example.com")])
    dns_server.a("mx-a.example.com", "192.0.2.25")
    route = asyncio.run(Router(dns_server.dns_config).route(DOMAIN))
    assert route.hosts[0].name == "mx-a.example.com"
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.PASS, check.summary
    assert check.summary.endswith(
        "mx-a.example.com, mx-b.example.com, backup0.none.example and 4 more"
    ), check.summary
    assert check.details[0] == f"MX {DOMAIN}: 10 mx-a.example.com", check.details
    # Equal preferences are named by name, so that two runs report alike.
    dns_server.mx(DOMAIN, [(10, "mx-c.example.com"), (10, "mx-a.example.com")])
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.summary.endswith("mx-a.example.com, mx-c.example.com"), check.summary


def test_a_null_mx_beside_hosts_without_an_address_takes_no_mail(dns_server: LoopbackDNS) -> None:
    """A null MX beside other MX records is a warning when those hosts take the mail;
    when none of them has an address, the router finds no route (the null MX dropped, as
    RFC 7505 §3 forbids the mix) and the domain takes no mail at all. The doctor warned
    only of the mix: "senders deliver its mail to mx.example.com"."""
    from mailstrom.doctor.mx import check_mx
    from mailstrom.errors import TemporaryFailure
    from mailstrom.routing import Router

    dns_server.mx(DOMAIN, [(0, "."), (10, "mx.example.com")])
    with pytest.raises(TemporaryFailure):
        asyncio.run(Router(dns_server.dns_config).route(DOMAIN))
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.FAIL, check.summary
    assert "no address" in check.summary and "null MX" in check.summary, check.summary
    assert check.fix is not None and "remove the null MX" in check.fix, check.fix
    dns_server.a("mx.example.com", "127.0.0.1")  # nor where the router does not deliver
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.FAIL and "loopback" in check.summary, check.summary
    dns_server.servfail("mx.example.com")
    check = check_mx(DNSResolver(dns_server.dns_config), domain=DOMAIN)
    assert check.status is Status.UNKNOWN, check.summary
