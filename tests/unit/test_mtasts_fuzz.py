"""Fuzzing what an MTA-STS or TLS-RPT domain publishes: the policy file (RFC 8461 §3.2),
the ``_mta-sts`` TXT record (§3.1) and the ``_smtp._tls`` TXT record (RFC 8460 §3).

Any domain mail goes to controls these texts. Whatever they hold:

* :func:`parse_policy` returns a :class:`Policy` or raises :class:`PolicyError`; a policy
  is bounded (patterns, ``max_age``, text size), its patterns are lower-case ASCII host
  names or ``*.`` and one, its text is safe to store and show line by line, and it reads
  back from its own text as the same policy (the text is what is stored and reported);
* :func:`parse_sts_record` returns None, an id of 1 to 32 letters and digits, or a
  :class:`PolicyError`;
* :func:`parse_tlsrpt_record` returns None, at most ``MAX_RUA`` distinct ``mailto:`` or
  ``https:`` URIs that are URIs (ASCII, no space or control), or a
  :class:`ReportRecordError`; and the report mail to each ``mailto:`` URI is built and
  prepared, or refused with a :class:`MailstromError`;
* every reason given is safe text and short.

The generators start from valid texts and mutate them: line ends (CRLF, LF, CR, NEL, U+2028),
repeated and unknown keys, ``mode`` spellings, ``max_age`` huge, negative, signed,
non-ASCII digits (superscripts, Arabic-Indic), ``mx`` patterns with wildcards in odd
places, IDN and Unicode look-alikes (Kelvin sign), a BOM, NUL, 8-bit and C1 octets, bidi
controls, very long lines and up to 10,000 lines; TXT records split into character-strings
anywhere, several of them, odd separators and spacing.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (300 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=20000 pytest --timeout=0 tests/unit/test_mtasts_fuzz.py``.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, date, datetime

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mailstrom.client.common import prepare_for
from mailstrom.config import Config
from mailstrom.errors import MailstromError
from mailstrom.mtasts.policy import (
    MAX_AGE_LIMIT,
    MAX_MX_PATTERNS,
    MAX_POLICY_SIZE,
    Mode,
    Policy,
    PolicyError,
    parse_policy,
    parse_sts_record,
)
from mailstrom.safetext import is_safe
from mailstrom.tlsrpt.deliver import report_message
from mailstrom.tlsrpt.report import (
    MAX_RUA,
    Reporter,
    ReportRecordError,
    build_report,
    parse_tlsrpt_record,
)
from mailstrom.tlsrpt.sessions import ResultType

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "300"))
MAX_REASON = 300
"""Characters a reason may have: it is logged, shown and kept as a report's reason code."""
PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?")
URI_CHARS = re.compile(r"[!-~]+")
"""What RFC 3986 URIs are made of, at most: printable ASCII, no space."""

# --- the inputs --------------------------------------------------------------------------

RARELY = st.sampled_from([False] * 5 + [True])
"""One time in six (``integers(0, 5) == 0`` would be most of the time: 0 is where
hypothesis starts)."""

ODD = st.sampled_from(
    [
        "\x00",
        "\r",
        "\x1b[2J",
        "\x85",
        "\x9b",
        "\u2028",
        "\u2029",
        "\u202e",
        "\u2066",
        "\u200f",
        "\ufeff",
        "\u00a0",
        "\u3000",
        "\t",
        " ",
        ":",
        ";",
        "=",
        ",",
        "*",
        ".",
        "-",
        "\u212a",  # KELVIN SIGN: lower-cases to an ASCII "k"
        "\u0130",  # I WITH DOT ABOVE: lower-cases to two characters
        "ß",
        "ü",
        "日本",
        "\U0001f600",
        "\ufffd",
    ]
)
ODD_TEXT = st.lists(st.one_of(ODD, st.text(max_size=4)), max_size=6).map("".join)
PRINTABLE = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30)

MODES = st.one_of(
    st.sampled_from(["enforce", "testing", "none"]),
    st.sampled_from(["Enforce", "ENFORCE", "enforce ", "x", ""]),
)
VERSIONS = st.one_of(st.just("STSv1"), st.sampled_from(["STSv2", "stsv1", "", "STSv1 x"]))
MAX_AGES = st.one_of(
    st.integers(0, MAX_AGE_LIMIT).map(str),
    st.integers(-(10**12), 10**12).map(str),
    st.sampled_from(
        ["", "+1", "1e5", "0x10", "¹²", "٣٤", "\uff11\uff12", "86400.0", "9" * 11, "0" * 10, " 5 "]
    ),
)
HOSTS = st.one_of(
    st.from_regex(r"\A(\*\.)?[a-z0-9]{1,8}(\.[a-z0-9-]{0,6}[a-z0-9]){1,3}\Z"),
    st.sampled_from(
        [
            "mx1.example.org",
            "*.example.org",
            "*.*.example.org",
            "mx.*.example.org",
            "*",
            "*.",
            ".example.org",
            "example.org.",
            "MX1.EXAMPLE.ORG",
            "xn--bcher-kva.example",
            "bücher.example",
            "\u212aelvin.example",
            "-bad.example",
            "bad-.example",
            "a" * 64 + ".example",
            ("a" * 63 + ".") * 4 + "example",
            "1.2.3.4",
            "[127.0.0.1]",
            "mx_1.example",
            "",
        ]
    ),
    st.from_regex(r"\A(\*\.)?[a-z0-9-]{1,8}(\.[a-z0-9-]{1,8}){0,3}\Z"),
)


@st.composite
def policy_lines(draw: st.DrawFn) -> list[str]:
    """The lines of a policy: a valid one, then some of its lines changed, repeated,
    dropped or added."""
    lines = [
        f"version: {draw(VERSIONS)}",
        f"mode: {draw(MODES)}",
        *(f"mx: {draw(HOSTS)}" for _ in range(draw(st.integers(1, 4)))),
        f"max_age: {draw(MAX_AGES)}",
    ]
    for _ in range(draw(st.one_of(st.just(0), st.integers(1, 4)))):  # half of them intact
        kind = draw(st.sampled_from(["unknown", "dup", "drop", "odd", "nospace", "empty"]))
        at = draw(st.integers(0, len(lines)))
        if kind == "unknown":
            key = draw(st.sampled_from(["x", "ext_1", "a.b-c", "k" * 33, "é", "_x", "1"]))
            lines.insert(at, f"{key}: {draw(st.one_of(PRINTABLE, ODD_TEXT))}")
        elif kind == "dup" and lines:
            lines.insert(at, lines[at % len(lines)])
        elif kind == "drop" and lines:
            del lines[at % len(lines)]
        elif kind == "odd" and lines:
            line = lines[at % len(lines)]
            cut = draw(st.integers(0, len(line)))
            lines[at % len(lines)] = line[:cut] + draw(ODD_TEXT) + line[cut:]
        elif kind == "nospace" and lines:
            lines[at % len(lines)] = lines[at % len(lines)].replace(": ", ":")
        else:
            lines.insert(at, draw(st.sampled_from(["", " ", "\t"])))
    return lines


@st.composite
def policy_bodies(draw: st.DrawFn) -> bytes:
    lines = draw(policy_lines())
    size = draw(st.sampled_from(["small"] * 8 + ["many", "long"]))
    if size == "many":  # thousands of lines: mx patterns past 100, or empty lines
        line = draw(st.sampled_from(["mx: mx.example.org", "", "x: y", "mx: *.example.org"]))
        lines[1:1] = [line] * draw(st.integers(98, 10_000))
    elif size == "long":  # one very long line
        lines.insert(1, "x: " + "y" * draw(st.integers(1000, 70_000)))
    end = draw(
        st.one_of(
            st.sampled_from(["\r\n", "\n"]),
            st.sampled_from(["\r", "\r\r\n", "\n\r", "\x85", "\u2028", "\n\n"]),
        )
    )
    text = end.join(lines) + draw(st.sampled_from([end, "", "\n\n"]))
    if draw(RARELY):
        text = "\ufeff" + text
    body = text.encode()
    if draw(RARELY):  # octets that are not UTF-8
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=4)) + body[at:]
    return body


RECORD_FIELDS = st.one_of(
    st.sampled_from(
        [
            "v=STSv1",
            "v=STSv1",
            "v=STSV1",
            "v = STSv1",
            "id=20240101T000000",
            "id=abc",
            "id=" + "a" * 32,
            "id=" + "a" * 33,
            "id=",
            "id",
            "id=a b",
            "id=١٢",
            "id=\u212a",
            "ext=x",
            "",
        ]
    ),
    ODD_TEXT,
    st.text(max_size=20),
)
RUA_URIS = st.one_of(
    st.sampled_from(
        [
            "mailto:tls@example.org",
            "mailto:tls@example.org?subject=x",
            "MAILTO:tls@example.org",
            "mailto:",
            "mailto:@",
            "mailto:a@b@c",
            "mailto:<a@b>",
            'mailto:"a b"@example.org',
            "mailto:tls%40example.org",
            "mailto:=?utf-8?q?x?=@example.org",
            "mailto:a@[127.0.0.1]",
            "mailto:ñ@example.org",
            "mailto:" + "a" * 300 + "@example.org",
            "https://r.example/tls",
            "https://",
            "https://[",
            "https://xn--/",
            "https://a b/",
            "ftp://x",
            "",
        ]
    ),
    st.builds(lambda a, b: f"mailto:{a}@{b}", ODD_TEXT, ODD_TEXT),
    st.builds(lambda a: f"https://{a}/", ODD_TEXT),
)


@st.composite
def txt_record(draw: st.DrawFn, first: str) -> str:
    """One TXT record as :func:`txt_records` gives it: its character-strings joined (a
    record split anywhere reads the same), fields in some order with odd separators."""
    fields = [first, draw(st.sampled_from(["id=20240101T000000", "id=x1", "id=" + "a" * 32]))]
    if draw(st.booleans()):
        fields += draw(st.lists(RECORD_FIELDS, max_size=5))
        fields = [first, *draw(st.permutations(fields[1:]))]
    separator = draw(st.sampled_from([";", "; ", " ;", ";;", ";\t", ";\u00a0"]))
    return separator.join(fields) + draw(st.sampled_from(["", ";", "; ", " "]))


@st.composite
def sts_records(draw: st.DrawFn) -> list[str]:
    records = [draw(txt_record(draw(st.sampled_from(["v=STSv1", "v=STSv1", "v=spf1 -all"]))))]
    records += draw(st.lists(st.one_of(txt_record("v=STSv1"), ODD_TEXT), max_size=2))
    return draw(st.permutations(records))


@st.composite
def rua_records(draw: st.DrawFn) -> list[str]:
    uris = draw(st.lists(RUA_URIS, max_size=12))
    joiner = draw(st.sampled_from([",", ", ", " ,", ",,"]))
    rua = "rua=" + joiner.join(uris)
    fields = draw(st.permutations([rua, *draw(st.lists(RECORD_FIELDS, max_size=3))]))
    version = draw(st.sampled_from(["v=TLSRPTv1", "v=TLSRPTv1", "v=TLSRPTv2", "v=STSv1"]))
    records = [f"{version};" + ";".join(fields)]
    if draw(RARELY):
        records.append(draw(st.sampled_from(["v=TLSRPTv1; rua=mailto:b@x", "v=spf1 -all"])))
    return records


# --- the properties ----------------------------------------------------------------------


def check_reason(reason: str, result_type: str = ResultType.STS_POLICY_INVALID) -> None:
    assert is_safe(reason), reason
    assert len(reason) <= MAX_REASON, reason[:MAX_REASON]
    assert result_type == ResultType.STS_POLICY_INVALID


def check_policy(policy: Policy, body: bytes) -> None:
    assert len(body) <= MAX_POLICY_SIZE
    assert policy.mode in set(Mode)
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT
    assert len(policy.mx) <= MAX_MX_PATTERNS
    assert policy.mx or policy.mode is Mode.NONE
    for pattern in policy.mx:
        assert pattern.isascii() and PATTERN.fullmatch(pattern), pattern
        assert len(pattern) <= 253
        # The pattern is what the text says, not what a Unicode look-alike lower-cases to.
        assert any(
            line.partition(":")[2].strip().rstrip(".").lower() == pattern
            for line in policy.lines
            if line.strip().startswith("mx")
        ), (pattern, policy.lines)
    assert len(policy.text.encode()) <= MAX_POLICY_SIZE
    for line in policy.lines:
        assert is_safe(line), line  # stored, reported and shown
    assert parse_policy(policy.text.encode()) == policy  # read back from the store's text


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=policy_bodies())
def test_policy_files_give_a_policy_or_a_reason(body: bytes) -> None:
    try:
        policy = parse_policy(body)
    except PolicyError as exc:
        check_reason(exc.reason, exc.result_type)
        event(f"refused: {re.sub(r'line [0-9]+', 'line', exc.reason)[:45]}")
        return
    event(f"policy {policy.mode}")
    check_policy(policy, body)


@settings(max_examples=EXAMPLES, deadline=None)
@given(records=sts_records())
def test_sts_records_give_an_id_none_or_a_reason(records: list[str]) -> None:
    try:
        policy_id = parse_sts_record(records)
    except PolicyError as exc:
        check_reason(exc.reason)
        event("refused")
        return
    event("no record" if policy_id is None else "id")
    assert policy_id is None or re.fullmatch(r"[A-Za-z0-9]{1,32}", policy_id), policy_id


NOW = datetime(2030, 1, 2, 12, tzinfo=UTC)
REPORT = build_report(
    "example.org",
    date(2030, 1, 1),
    [],
    Reporter(organization="Org", contact="postmaster@sender.test", submitter="sender.test"),
    report_id="2030-01-01_example.org_0@sender.test",
)
CONFIG = Config(helo_name="sender.test")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(records=rua_records())
# Characters whose repr is ten times longer: the reason quotes the record, bounded.
@example(records=["v=TLSRPTv1;rua=https://a b/," + "\U000101fe" * 200])
def test_rua_records_give_uris_none_or_a_reason(records: list[str]) -> None:
    try:
        uris = parse_tlsrpt_record(records)
    except ReportRecordError as exc:
        check_reason(exc.reason)
        event("refused")
        return
    event("no record" if uris is None else f"{len(uris)} uris")
    if uris is None:
        return
    assert 1 <= len(uris) <= MAX_RUA
    assert len(set(uris)) == len(uris), uris
    for uri in uris:
        assert uri.lower().startswith(("mailto:", "https://")), uri
        assert URI_CHARS.fullmatch(uri), uri  # safe to show, and no header can be forged
        if not uri.lower().startswith("mailto:"):
            continue
        # What ``mailstrom tlsrpt --send`` does with it: a mail, or a typed refusal.
        to = uri[len("mailto:") :].split("?", 1)[0]
        try:
            message = report_message(REPORT, sender="tls@sender.test", to=to, submitter="s.test")
            prepare_for(CONFIG, message, envelope_from=None, envelope_to=None, now=NOW)
        except MailstromError as exc:
            event(f"mail refused: {type(exc).__name__}")
