"""No DNS data makes the sender doctor, or DANE's TLSA handling, misbehave.

Every record the doctor reads is published by someone else: the domain's SPF, DMARC and
DKIM TXT records (and those of every name an SPF record includes), the address's PTR
names, the HELO name's addresses, a blocklist's codes and reasons. Here a real DNS server
on loopback (:class:`~mailstrom.testing.dns.LoopbackDNS`) serves a hypothesis-generated
zone: SPF records with include/redirect chains and loops, macros (valid, unknown, huge
lengths), too many lookups; DMARC records with odd case, whitespace, duplicate tags and
``pct``/``ri`` values out of range or in other scripts' digits; DKIM records with broken
or huge base64; many PTR names, odd labels (``a\\.b``, ``\\000``), SERVFAIL and dropped
queries; any text (control characters, terminal escapes, octets that are not UTF-8) in
records split into many character-strings. Then :func:`run_doctor` judges the domain:

1. it returns a report, never raises, and ends within a bound set by the (short) DNS
   timeout, having asked a bounded number of queries;
2. every check has a status and a one-line summary of bounded length;
3. the text report shows no control character a terminal would obey, and the JSON
   report is valid UTF-8 JSON;
4. ``mailstrom doctor`` itself (in this process, the DNS timeout 0.1 s) exits with a
   verdict (0, 1, 2, or 75 for a failed lookup), never an internal error, within the
   same bound.

Pure parsers (DMARC, DKIM tag lists, DNS names, TLSA matching) are fuzzed directly, and
TLSA records of any usage, selector, matching type and length go through the server to
:func:`~mailstrom.tls.dane.lookup_tlsa` and a certificate check, which either matches or
raises :class:`~mailstrom.tls.danematch.DaneMismatch`; a malformed record (a digest of
the wrong length, which dnspython refuses with the whole answer) is left out and counted,
the others used (RFC 7672 §2.2: unusable).

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (100 by default), for a longer
search by hand: ``MAILSTROM_FUZZ_EXAMPLES=3000 pytest --timeout=0
tests/integration/test_doctor_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import dns.name
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.cli import main as cli_main
from mailstrom.cli.doctor import print_report
from mailstrom.cli.output import print_json, to_jsonable
from mailstrom.doctor import DKIMKey, DNSResolver, Probe, SenderSetup, Status, run_doctor
from mailstrom.doctor.dkim import parse_tags, public_key, published_matches, record_for
from mailstrom.doctor.dmarc import parse_dmarc
from mailstrom.doctor.lookup import normal_name
from mailstrom.routing import make_resolver
from mailstrom.testing.dns import LoopbackDNS
from mailstrom.tls.dane import lookup_tlsa, requirement_for, tlsa_name
from mailstrom.tls.danematch import DaneMismatch, match_chain
from mailstrom.tls.requirement import TLSARecord
from tests.support.certs import der

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "100"))
TIMEOUT = 0.1
"""DNS seconds per query (``DNSConfig.timeout``): what a dropped query costs."""
BOUND = 2.0
"""Longest one doctor run may take: a few dropped queries plus room for a loaded machine."""
LONGEST_SUMMARY = 1000
"""A summary is one line: it quotes a short piece of a record, never the whole record."""
MOST_QUERIES = 300
"""(name, type) pairs one run may ask: RFC 7208's limits for the two SPF evaluations (10
terms, 10 MX or PTR names each), 10 PTR names, and a handful for DKIM, DMARC and DNSBL."""

DOMAIN = "sender.test"
HELO = "mail.sender.test"
IP = "192.0.2.10"
ZONE = "bl.test"
LISTED = "10.2.0.192.bl.test"
SELECTOR = "s1"
DKIM_NAME = f"{SELECTOR}._domainkey.{DOMAIN}"
PTR_NAME = "10.2.0.192.in-addr.arpa"
INCLUDES = tuple(f"n{i}.{DOMAIN}" for i in range(5))
ODD_NAMES = (
    "a\\.b.sender.test",  # a label holding a dot
    "mail\\.",  # a one-label name ending in an escaped dot
    "\\000.sender.test",
    "-.sender.test",
    "\\195\\169\\032.sender.test",
    "x" * 63 + ".sender.test",
    "absent.test",  # never in the zone: NXDOMAIN
)
NAMES = (DOMAIN, HELO, *INCLUDES, *ODD_NAMES)

KEY = ed25519.Ed25519PrivateKey.generate()
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
OURS = public_key(KEY_PEM)
CONTROLS = "\x00\x07\x08\t\n\r\x1b[31m\x1b]8;;http://x\x07\x7f\x85\x9b\u2028\u202e\u2066"


# --- record text -----------------------------------------------------------------------------


def _control_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.sampled_from(CONTROLS) | st.characters(codec="utf-8"), max_size=max_size)


hostile_text = st.one_of(
    st.text(max_size=80),
    _control_text(80),
    st.sampled_from(("", " ", ";", "=", "v=spf1", "v=DMARC1", "\x1b[2J\x1b[H", "x" * 300)),
)
hostile_bytes = st.binary(max_size=120) | st.just(b"v=spf1 \xff\xfe -all")

names = st.sampled_from(NAMES)
targets = st.sampled_from(INCLUDES) | names
MACROS = (
    "%{s}",
    "%{l}",
    "%{o}",
    "%{d}",
    "%{d2}",
    "%{dr}",
    "%{l1r-}",
    "%{i}",
    "%{ir}",
    "%{v}",
    "%{h}",
    "%{p}",
    "%{c}",
    "%{r}",
    "%{t}",
    "%{d999999999999}",
    "%{d0}",
    "%{ir.-+,/_=}",
    "%{x}",
    "%{",
    "%",
    "%%",
    "%_",
    "%-",
)
macros = st.sampled_from(MACROS)
qualifiers = st.sampled_from(("", "+", "-", "~", "?"))
prefix_lengths = st.sampled_from(("", "/0", "/24", "/32", "/33", "/128", "/-1", "//64", "/24//0"))


def _term(kind: str, q: str, target: str, macro: str, length: str) -> str:
    return {
        "all": f"{q}all",
        "include": f"{q}include:{target}",
        "a": f"{q}a",
        "a:": f"{q}a:{target}{length}",
        "mx": f"{q}mx{length}",
        "mx:": f"{q}mx:{target}",
        "ptr": f"{q}ptr",
        "ptr:": f"{q}ptr:{target}",
        "ip4": f"{q}ip4:192.0.2.0{length}",
        "ip6": f"{q}ip6:2001:db8::{length}",
        "exists": f"{q}exists:{macro}.{target}",
        "macro": f"{q}a:{macro}{target}",
        "redirect": f"redirect={target}",
        "redirect-macro": f"redirect={macro}.{target}",
        "exp": f"exp={target}",
        "unknown": "moo=cow",
    }[kind]


spf_terms = st.one_of(
    st.builds(
        _term,
        st.sampled_from(
            (
                "all",
                "include",
                "include",
                "a",
                "a:",
                "mx",
                "mx:",
                "ptr",
                "ptr:",
                "ip4",
                "ip6",
                "exists",
                "macro",
                "redirect",
                "redirect-macro",
                "exp",
                "unknown",
            )
        ),
        qualifiers,
        targets,
        macros,
        prefix_lengths,
    ),
    hostile_text.filter(lambda t: " " not in t),
)
spf_records = st.builds(
    lambda terms, sep: sep.join(["v=spf1", *terms]),
    st.lists(spf_terms, max_size=14),
    st.sampled_from((" ", "  ", "\t", " \x00 ")),
)
# A many-lookup chain: each include names the next (or loops back).
spf_crowds = st.integers(5, 25).map(lambda n: "v=spf1 " + " ".join(["a", "mx", "ptr"] * n))

DMARC_TAGS = (
    "p=none",
    "p=reject",
    "P=Reject",
    " p = quarantine ",
    "p=REJECT",
    "p=bogus",
    "p=",
    "p",
    "sp=none",
    "sp=maybe",
    "adkim=S",
    "aspf=x",
    "pct=100",
    "pct=0",
    "pct=101",
    "pct=-1",
    "pct= 50",
    "pct=\u0663\u0660",  # Arabic-Indic digits: 30
    "pct=\u00b2",  # a superscript: isdigit(), but no int
    "pct=" + "9" * 5000,
    "pct=007",
    "ri=86400",
    "ri=" + "9" * 40,
    "ri=-1",
    "rua=mailto:d@sender.test",
    "rua=" + ",".join(["mailto:x@y.test"] * 50),
    "fo=1",
    "=",
    "x" * 3000,
)
dmarc_records = st.builds(
    lambda head, tags, sep: head + sep.join(tags),
    st.sampled_from(("v=DMARC1; ", "v=DMARC1;", "V=DMARC1; ", "v = DMARC1 ;", "v=dmarc1;", "")),
    st.lists(st.sampled_from(DMARC_TAGS) | hostile_text, max_size=8),
    st.sampled_from(("; ", ";", " ; ", ";;")),
)

GOOD_P = OURS.p
dkim_p = st.sampled_from(
    (
        GOOD_P,
        " ".join(GOOD_P[i : i + 7] for i in range(0, len(GOOD_P), 7)),  # folded
        GOOD_P[:-2],
        GOOD_P + "=",
        "",
        "!!!not base64!!!",
        "A" * 4000,
        base64.b64encode(os.urandom(1500)).decode(),
    )
)
dkim_records = st.builds(
    lambda tags, sep: sep.join(tags),
    st.lists(
        st.sampled_from(
            ("v=DKIM1", "v=DKIM2", "k=ed25519", "K=rsa", "k=rsa", "h=sha1", "t=y", "t=s")
        )
        | dkim_p.map(lambda p: f"p={p}")
        | hostile_text,
        max_size=6,
    ),
    st.sampled_from(("; ", ";", " ;\t")),
)


def _split(record: str, sizes: list[int]) -> tuple[str, ...]:
    """``record`` as many character-strings of one TXT record, some of them empty (60
    characters are at most 240 octets: within the 255 a character-string holds)."""
    parts, rest = [], record
    for size in sizes:
        parts.append(rest[:size])
        rest = rest[size:]
    while rest:
        parts.append(rest[:60])
        rest = rest[60:]
    return tuple(parts) or ("",)


def txt_records(
    records: st.SearchStrategy[str],
) -> st.SearchStrategy[str | bytes | tuple[str, ...]]:
    """One TXT record: as text, split into many character-strings, or raw octets."""
    split = st.builds(_split, records, st.lists(st.integers(1, 40), max_size=30))
    return st.one_of(records, records, split, hostile_bytes, hostile_text)


# --- the zone ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One call on the server's zone: ``getattr(dns, method)(*args)``."""

    method: str
    args: tuple[Any, ...]

    def apply(self, server: LoopbackDNS) -> None:
        getattr(server, self.method)(*self.args)


def _txt(name: str, records: list[Any]) -> Op:
    return Op("txt", (name, *records))


def txt_at(name: str, records: st.SearchStrategy[str], most: int = 3) -> st.SearchStrategy[Op]:
    return st.builds(_txt, st.just(name), st.lists(txt_records(records), max_size=most))


addresses = st.lists(
    st.sampled_from((IP, "192.0.2.11", "127.0.0.2", "127.255.255.254", "10.0.0.1", "0.0.0.0")),
    max_size=4,
)
trouble = st.one_of(
    st.builds(lambda n: Op("servfail", (n,)), names | st.sampled_from((PTR_NAME, DKIM_NAME))),
    st.builds(lambda n: Op("nxdomain", (n,)), names),
    st.builds(lambda n, to: Op("cname", (n, to)), names, names),
)
# A dropped query costs the whole DNS timeout: rare, so the default run stays short.
drops = st.builds(
    lambda n: Op("drop", (n,)), names | st.sampled_from((PTR_NAME, f"_dmarc.{DOMAIN}"))
)


@st.composite
def zones(draw: st.DrawFn) -> list[Op]:
    spf = spf_records | spf_crowds
    zone = [
        draw(txt_at(DOMAIN, spf)),
        draw(txt_at(HELO, spf)),
        draw(txt_at(f"_dmarc.{DOMAIN}", dmarc_records)),
        draw(txt_at(DKIM_NAME, dkim_records)),
    ]
    for name in draw(st.lists(targets, max_size=5, unique=True)):
        zone.append(draw(txt_at(name, spf)))
    for name in draw(st.lists(names, max_size=6, unique=True)):
        zone.append(Op("a", (name, *draw(addresses))))
        if draw(st.booleans()):
            zone.append(Op("mx", (name, [(10, draw(names)), (20, draw(names))])))
    many = st.lists(names, max_size=40) | st.lists(names, max_size=4)
    zone.append(Op("ptr", (IP, *draw(many))))
    zone.append(Op("a", (LISTED, *draw(addresses))))
    # A reason that says "None" itself is the list's to say (hypothesis draws the test's
    # own string constants): not the missing value the summaries are checked for below.
    reasons = (st.text(max_size=80) | _control_text(300)).filter(lambda t: "None" not in t)
    zone.append(draw(txt_at(LISTED, reasons, most=5)))
    zone += draw(st.lists(trouble, max_size=2))
    if draw(st.integers(0, 14)) == 0:
        zone.append(draw(drops))
    return zone


# --- the run -----------------------------------------------------------------------------------


@dataclass
class FakeNetwork:
    """The port 25 probe answers; no socket is opened."""

    probed: list[str] = field(default_factory=list)

    def local_address(self, host: str, port: int, source: str | None) -> str:
        return IP

    def probe(self, host: str, port: int, source: str | None, timeout: float) -> Probe:
        self.probed.append(host)
        return Probe(connected=True, greeting="220 mx.sender.test ESMTP")


# Characters a terminal obeys or that rewrite a line: none may reach the text report.
_OBEYED = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def check_output(report: Any) -> None:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_report(report)
    shown = text.getvalue()
    assert _OBEYED.search(shown) is None, repr(_OBEYED.search(shown))
    shown.encode("utf-8")  # no lone surrogate

    data = io.StringIO()
    print_json(to_jsonable(report), data)
    assert json.loads(data.getvalue().encode("utf-8"))["domain"] == DOMAIN


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackDNS]:
    # One server for every example (starting one costs more than the example itself).
    with LoopbackDNS() as dns_server:
        yield dns_server


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(zone=zones(), bulk=st.booleans())
def test_no_zone_makes_the_doctor_misbehave(
    server: LoopbackDNS, zone: list[Op], bulk: bool
) -> None:
    server.reset()
    for op in zone:
        op.apply(server)
    server.reset_counts()
    setup = SenderSetup(
        domain=DOMAIN,
        helo_name=HELO,
        ip=IP,
        probe="127.0.0.1:25",
        dkim_keys=(
            DKIMKey(domain=DOMAIN, selector=SELECTOR, private_key=KEY_PEM, algorithm="ed25519"),
        ),
        dnsbls=(ZONE,),
        bulk=bulk,
    )
    resolver = DNSResolver(replace(server.dns_config, timeout=TIMEOUT))
    started = time.monotonic()
    report = run_doctor(setup, resolver, FakeNetwork())
    elapsed = time.monotonic() - started
    assert elapsed <= BOUND, f"the doctor took {elapsed:.2f} s"
    assert len(server.query_counts()) <= MOST_QUERIES, len(server.query_counts())

    assert {c.name for c in report.checks} >= {"ptr", "helo", "spf", "spf-helo", "dkim", "dmarc"}
    for check in report.checks:
        assert isinstance(check.status, Status)
        assert len(check.summary) <= LONGEST_SUMMARY, (check.name, check.summary[:300])
        assert "None" not in check.summary.split(), (check.name, check.summary)
    check_output(report)
    event(
        " ".join(f"{c.name}={c.status.value}" for c in report.checks if c.name in ("spf", "dmarc"))
    )


# --- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def command_env(tmp_path_factory: pytest.TempPathFactory, server: LoopbackDNS) -> dict[str, str]:
    """MAILSTROM_* for ``mailstrom doctor`` against the loopback server, with a short DNS
    timeout (a dropped query costs 0.1 s, not the default's seconds)."""
    work = tmp_path_factory.mktemp("doctor")
    (work / "key.pem").write_bytes(KEY_PEM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(
        HOME=str(work),
        XDG_CONFIG_HOME=str(work / ".config"),
        MAILSTROM_HELO_NAME=HELO,
        MAILSTROM_DNS_NAMESERVERS="127.0.0.1",
        MAILSTROM_DNS_PORT=str(server.port),
        MAILSTROM_DNS_TIMEOUT=str(TIMEOUT),
        MAILSTROM_STORE=f"sqlite:///{work}/queue.db",
    )
    return env


def run_doctor_command(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``mailstrom doctor argv`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, env, clear=True),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = cli_main.main(["doctor", *argv])
    return code, out.getvalue(), err.getvalue()


@settings(
    max_examples=max(10, EXAMPLES // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(zone=zones(), as_json=st.booleans())
def test_the_doctor_command_reports_any_zone(
    server: LoopbackDNS, command_env: dict[str, str], zone: list[Op], as_json: bool
) -> None:
    server.reset()
    for op in zone:
        op.apply(server)
    key = Path(command_env["HOME"]) / "key.pem"
    argv = ["--ip", IP, "--probe", "127.0.0.1:9", "--dnsbl", ZONE]
    argv += ["--dkim", f"{DOMAIN}:{SELECTOR}:{key}:ed25519", DOMAIN]
    started = time.monotonic()
    code, out, err = run_doctor_command(command_env, *(["--json", *argv] if as_json else argv))
    elapsed = time.monotonic() - started
    assert elapsed <= BOUND, f"mailstrom doctor took {elapsed:.2f} s"
    # The verdict (0 pass, 1 warn, 2 fail, 75 a lookup failed): never an internal error.
    assert code in (0, 1, 2, 75), (code, err[-2000:])
    assert err == "", err[-2000:]
    if as_json:
        assert json.loads(out.encode("utf-8"))["domain"] == DOMAIN
    else:
        assert _OBEYED.search(out) is None, repr(_OBEYED.search(out))
        assert "Verdict:" in out
    event(f"exit {code}")


# --- pure parsers ------------------------------------------------------------------------------

LONGEST_ERROR = 300
"""A parse error quotes a short piece of the record."""
T = TypeVar("T")


def outcome(parse: Callable[[str], T], text: str) -> T | ValueError:
    """What ``parse`` returns for ``text``, or the ValueError it raises."""
    try:
        return parse(text)
    except ValueError as exc:
        return exc


def mismatch(chain: list[bytes], records: Sequence[TLSARecord], host: str) -> str:
    """How ``chain`` matched ``records``, or the (short) reason it did not."""
    try:
        return f"matched {match_chain(chain, records, host=host).record}"
    except DaneMismatch as exc:
        reason = str(exc)
    assert len(reason) <= 2000, reason[:300]
    return "mismatch"


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(text=dmarc_records | hostile_text | st.text(max_size=400))
def test_dmarc_records_parse_or_say_why_briefly(text: str) -> None:
    record = outcome(parse_dmarc, text)
    if isinstance(record, ValueError):
        assert len(str(record)) <= LONGEST_ERROR, str(record)[:400]
        return
    assert record.p in ("none", "quarantine", "reject")
    assert 0 <= record.pct <= 100
    # RFC 7489 §6.4: white space around "=" and ";" is WSP (SP or HTAB) only.
    pct = re.search(r"(?i)(?:^|;)[ \t]*pct[ \t]*=[ \t]*([^;]*)", text)
    if pct is not None:  # RFC 7489 §6.4: pct = 1*3DIGIT, ASCII digits
        assert re.fullmatch("[0-9]{1,3}", pct.group(1).strip(" \t")), pct.group(1)


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(text=dkim_records | hostile_text | st.text(max_size=400))
def test_dkim_records_parse_or_say_why_briefly(text: str) -> None:
    tags = outcome(parse_tags, text)
    if isinstance(tags, ValueError):
        assert len(str(tags)) <= LONGEST_ERROR, str(tags)[:400]
        return
    p = tags.get("p")
    if p is not None:
        assert isinstance(published_matches(tags.get("k", "rsa"), p, OURS), bool)


def test_a_megabyte_dkim_key_is_no_match_and_quick() -> None:
    # Work, counted as this thread's CPU time: 0.05 s of it took up to 1.2 s by the wall
    # clock on a loaded host, waiting for a core.
    started = time.thread_time()
    for p in ("A" * 1_000_000, base64.b64encode(os.urandom(750_000)).decode(), "!" * 1_000_000):
        assert published_matches("rsa", p, OURS) is False
        assert published_matches("ed25519", p, OURS) is False
    assert parse_tags(f"v=DKIM1; p={'A' * 1_000_000}")["p"]
    assert time.thread_time() - started < 1.0
    assert published_matches("ed25519", OURS.p, OURS)
    assert record_for(OURS).endswith(OURS.p)


labels = st.binary(min_size=1, max_size=12).filter(lambda b: b != b"\\")


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(parts=st.lists(labels, min_size=1, max_size=5), final_dot=st.booleans())
def test_normal_name_keeps_the_name_it_is_given(parts: list[bytes], final_dot: bool) -> None:
    name = dns.name.Name([*parts, b""])
    text = name.to_text(omit_final_dot=not final_dot)
    assert dns.name.from_text(normal_name(text)) == name


# --- TLSA --------------------------------------------------------------------------------------

CA = trustme.CA()
LEAF = CA.issue_cert("mx.sender.test")
CHAIN = [der(blob.bytes()) for blob in LEAF.cert_chain_pems] + [der(CA.cert_pem.bytes())]

tlsa_fields = st.sampled_from((0, 1, 2, 3, 4, 255)) | st.integers(0, 255)
tlsa_data = st.one_of(
    st.binary(min_size=1, max_size=80),
    st.sampled_from((CHAIN[-1], CHAIN[0], CHAIN[-1][:-1], CHAIN[-1] + b"\x00", b"\x30" * 64)),
    st.integers(0, 3000).map(lambda n: b"\x30\x82" + n.to_bytes(2, "big") + bytes(n)),
)
DIGEST_SIZES = {1: 32, 2: 64}
"""Matching types 1 and 2 hold a SHA-256 or SHA-512 digest (RFC 6698 §2.1.3)."""


@st.composite
def tlsa_records(draw: st.DrawFn, *, malformed: bool = True) -> tuple[int, int, int, bytes]:
    """Any usage, selector and matching type; data of any length for matching type 0
    and others, a digest's length for 1 and 2 (of any length, rarely, if ``malformed``)."""
    usage, selector, matching = draw(tlsa_fields), draw(tlsa_fields), draw(tlsa_fields)
    size = DIGEST_SIZES.get(matching)
    if malformed and draw(st.integers(0, 19)) == 0:
        return usage, selector, matching, draw(st.sampled_from((b"", b"\x00", bytes(33))))
    if size is None:
        return usage, selector, matching, draw(tlsa_data)
    return usage, selector, matching, draw(st.binary(min_size=size, max_size=size))


def well_formed(record: tuple[int, int, int, bytes]) -> bool:
    """What the DANE lookup keeps: for matching types 1 and 2, data of a digest's length;
    for the full data (0) of a certificate or key, one DER SEQUENCE filling it."""
    _, selector, matching, data = record
    if matching == 0 and selector in (0, 1):
        if data[:1] != b"\x30" or len(data) < 2:
            return False
        if data[1] < 0x80:  # the short form of a length
            return 2 + data[1] == len(data)
        count = data[1] - 0x80
        return 1 <= count <= 4 and 2 + count + int.from_bytes(data[2 : 2 + count]) == len(data)
    return len(data) == DIGEST_SIZES.get(matching, len(data))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # One RRset holds each record once (RFC 2181 §5).
    records=st.lists(tlsa_records(), min_size=1, max_size=6, unique=True),
    secure=st.booleans(),
)
def test_no_tlsa_records_make_dane_misbehave(
    server: LoopbackDNS, records: list[tuple[int, int, int, bytes]], secure: bool
) -> None:
    server.reset()
    host = "mx.sender.test"
    server.tlsa(tlsa_name(host), *records)
    if secure:
        server.authenticated(everything=True)
    # The first try keeps half the lifetime back for asking again: a malformed record
    # makes dnspython wait out its share, and so does an answer late from the loopback
    # server (a thread of this process, stalled with it). With 0.2 s, a stall of 0.1 s
    # left nothing to ask again with; 0.5 s of a 1 s lifetime is room for both.
    resolver = make_resolver(replace(server.dns_config, timeout=1.0))
    found = asyncio.run(lookup_tlsa(resolver, host))
    assert found.exists
    assert found.secure is secure
    # dnspython refuses a TLSA record whose digest has the wrong length, and with it the
    # whole answer: the lookup asks again and reads the answer without it. Such a record
    # is unusable (RFC 7672 §2.2): counted, never matched; the others are used.
    good = {r for r in records if well_formed(r)}
    assert {(r.usage, r.selector, r.matching, r.data) for r in found.records} == good
    assert found.malformed == len(records) - len(good)
    if found.malformed:
        event("malformed")
    need = requirement_for(found, names=(host,))
    if not secure:
        assert need is None
        return
    assert need is not None
    assert all(well_formed((r.usage, r.selector, r.matching, r.data)) for r in need.tlsa)
    event(mismatch(CHAIN[:-1], need.tlsa, host))


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(records=st.lists(tlsa_records(), min_size=1, max_size=6))
def test_tlsa_matching_raises_only_a_mismatch(records: list[tuple[int, int, int, bytes]]) -> None:
    tlsa = [TLSARecord(usage=u, selector=s, matching=m, data=d) for u, s, m, d in records]
    for chain in (CHAIN[:-1], CHAIN, CHAIN[:1], [b"\x30\x00"], [CHAIN[0][:-3]]):
        mismatch(chain, tlsa, "mx.sender.test")
