"""MTA-STS records and policy files (RFC 8461 §3.1, §3.2, §4.1): parsing and MX matching."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.mtasts.policy import (
    MAX_AGE_LIMIT,
    MAX_MX_PATTERNS,
    MAX_POLICY_SIZE,
    MIN_CACHE,
    CachedPolicy,
    Mode,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_sts_record,
)

GOOD = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 604800\r\n"
)


def test_good_policy() -> None:
    policy = parse_policy(GOOD)
    assert policy.mode is Mode.ENFORCE
    assert policy.mx == ("mail.example.com", "*.example.net")
    assert policy.max_age == 604800
    assert policy.lines == [
        "version: STSv1",
        "mode: enforce",
        "mx: mail.example.com",
        "mx: *.example.net",
        "max_age: 604800",
    ]


def test_lf_line_ends_unknown_keys_and_spaces_are_fine() -> None:
    policy = parse_policy(
        b"version: STSv1\nmode:testing\nmx:  MX.Example.COM. \nfuture-key: whatever\nmax_age: 0\n"
    )
    assert policy.mode is Mode.TESTING
    assert policy.mx == ("mx.example.com",)
    assert policy.max_age == 0


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n").mx == ()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        (b"mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        (b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode"),
        (b"version: STSv1\nmx: a.example\nmax_age: 1\n", "mode"),
        (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "without any mx"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n", "1 ignored, not a host"),
        (b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "1 ignored, not a host"),
        (b"version: STSv1\nmode: enforce\nmx: a b\nmax_age: 1\n", "1 ignored, not a host"),
        (b"<html>version: STSv1</html>\n", "key: value"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n\xff\n", "UTF-8"),
        # RFC 8461 §3.2 allows no control character in a value; a NUL could not be stored.
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nx-note: a\x00b\n", "line 5"),
        (b"version: STSv1\nmode: enforce\x1b[2J\nmx: a.example\nmax_age: 1\n", "U\\+001B"),
        (b"version: STSv1\rmode: enforce\nmx: a.example\nmax_age: 1\n", "U\\+000D"),
        ("version: STSv1\nmode: none\nmax_age: 1\nx: \x85\n".encode(), "U\\+0085"),
        # Found by tests/unit/test_mtasts_fuzz.py: what safetext calls unsafe was kept in the
        # policy's text (stored, reported, shown), and a Unicode look-alike of an ASCII
        # letter made an mx pattern of another name than the text shows.
        ("version: STSv1\nmode: none\nmax_age: 1\nx: \u202eevil\n".encode(), "U\\+202E"),
        ("version: STSv1\nmode: none\nmax_age: 1\nx: a\u2028b\n".encode(), "U\\+2028"),
        # The bidi marks too, as safetext has them (one RLM on each side reverses "1 2 3").
        ("version: STSv1\nmode: none\nmax_age: 1\nx: \u200f1 2 3\u200f\n".encode(), "U\\+200F"),
        ("version: STSv1\nmode: none\nmax_age: 1\nx: \u061cb\n".encode(), "U\\+061C"),
        ("version: STSv1\nmode: none\u2029\nmax_age: 1\n".encode(), "U\\+2029"),
        ("version: STSv1\nmode: enforce\nmx: \u212aelvin.example\nmax_age: 1\n".encode(), "mx"),
    ],
)
def test_bad_policies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason) as info:
        parse_policy(body)
    assert info.value.result_type == "sts-policy-invalid"


@pytest.mark.parametrize("key", ["version", "mode", "max_age"])
def test_a_long_bad_value_is_not_echoed_whole(key: str) -> None:
    # Found by tests/unit/test_mtasts_fuzz.py: these reasons quoted the whole value, up to
    # a whole line (and six times that as escapes) in a log line and a reason code.
    fields = {"version": "STSv1", "mode": "enforce", "max_age": "1"}
    fields[key] = "9" * 1000
    body = "".join(f"{k}: {v}\n" for k, v in fields.items()) + "mx: a.example\n"
    with pytest.raises(PolicyError, match=key) as info:
        parse_policy(body.encode())
    assert len(info.value.reason) < 120


def test_tabs_and_crlf_line_ends_are_no_control_characters() -> None:
    body = b"version: STSv1\r\nmode:\tenforce\r\nmx: a.example\r\nmax_age: 1\r\n"
    assert parse_policy(body).mx == ("a.example",)


def test_largest_max_age_is_accepted() -> None:
    body = f"version: STSv1\nmode: testing\nmx: a.example\nmax_age: {MAX_AGE_LIMIT}\n"
    assert parse_policy(body.encode()).max_age == MAX_AGE_LIMIT


def test_size_line_and_pattern_limits() -> None:
    with pytest.raises(PolicyError, match="larger"):
        parse_policy(GOOD + b"#" * MAX_POLICY_SIZE)


def test_many_mx_lines_are_kept_not_refused() -> None:
    """RFC 8461 §3.2 sets no number of mx lines, and parsers MUST accept a valid policy:
    101 lines had the whole policy refused, leaving an enforce domain none. The 64 KiB
    body bounds them; a repeated pattern is kept once."""
    many = b"".join(b"mx: m%d.example\n" % i for i in range(150))
    policy = parse_policy(GOOD + many)
    assert policy.mode is Mode.ENFORCE and len(policy.mx) == 152
    assert policy.allows("m149.example") and not policy.allows("m150.example")
    repeated = parse_policy(GOOD + b"mx: mail.example.com\n" * 2_000)
    assert repeated.mx == ("mail.example.com", "*.example.net")
    shortest = b"version:STSv1\nmode:enforce\nmax_age:1\n"
    full = shortest + b"".join(
        b"mx:%s\n" % "".join(chr(97 + i // 26**k % 26) for k in range(3)).encode()
        for i in range((MAX_POLICY_SIZE - len(shortest)) // 7)
    )
    assert len(parse_policy(full).mx) == (MAX_POLICY_SIZE - len(shortest)) // 7 <= MAX_MX_PATTERNS


def test_long_lines_are_no_reason_to_refuse_a_policy() -> None:
    """RFC 8461 §3.2 bounds neither an extension field's value nor the WSP after a colon,
    and parsers MUST accept a syntactically valid policy, ignoring unknown fields: one
    line over 1,024 octets had the whole policy refused, leaving an enforce domain none.
    The 64 KiB bound on the body already bounds the work."""
    policy = parse_policy(GOOD + b"x-pad: " + b"a" * 2000 + b"\n")
    assert policy.mode is Mode.ENFORCE and policy.mx == ("mail.example.com", "*.example.net")
    padded = parse_policy(GOOD + b"mx:" + b" " * 1100 + b"mx9.example.org\n")
    assert padded.allows("mx9.example.org")
    long_mx = parse_policy(GOOD + b"mx: " + b"a" * 2000 + b"\n")
    assert long_mx.mx == policy.mx and long_mx.ignored == ("a" * 2000,)
    with pytest.raises(PolicyError, match="mode"):
        parse_policy(GOOD.replace(b"mode: enforce", b"mode: " + b"e" * 2000))


def test_first_of_a_repeated_key_counts() -> None:
    policy = parse_policy(GOOD + b"mode: none\n")
    assert policy.mode is Mode.ENFORCE


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mx1.example.org", False),
    ],
)
def test_mx_matching(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_policy_allows_listed_hosts_only() -> None:
    policy = parse_policy(GOOD)
    assert policy.allows("mail.example.com")
    assert policy.allows("mx7.example.net")
    assert not policy.allows("evil.example.org")


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], None),
        (["v=spf1 -all"], None),
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=abc; ext=1"], "abc"),
        (["other", "v=STSv1; id=abc;"], "abc"),
        (["v=STSv10; id=a"], None),
    ],
)
def test_sts_records(records: list[str], expected: str | None) -> None:
    assert parse_sts_record(records) == expected


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        (["v=STSv1; id=a;", "v=STSv1; id=b;"], "2 v=STSv1"),
        (["v=STSv1;"], "no id"),
        (["v=STSv1; id=not-alnum;"], "letters and digits"),
        (["v=STSv1; id=" + "a" * 33], "letters and digits"),
        (["v=STSv1; junk"], "without '='"),
    ],
)
def test_bad_sts_records(records: list[str], reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        parse_sts_record(records)


@pytest.mark.parametrize("stray", ["v=STSv1", "v=STSv1 ", " v=STSv1; id=b", "v=STSv1 id=b"])
def test_records_not_starting_v_stsv1_semicolon_are_discarded(stray: str) -> None:
    """RFC 8461 §3.1: of several _mta-sts records, those that do not begin with
    "v=STSv1;" are discarded. A bare "v=STSv1" beside the real record made two STS
    records, and the domain no policy at all."""
    assert parse_sts_record([stray, "v=STSv1; id=abc;"]) == "abc"
    assert parse_sts_record(["v=STSv1; id=abc;", stray]) == "abc"


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2003"])
def test_sts_records_are_trimmed_of_wsp_only(space: str) -> None:
    """RFC 8461 §3.1's delimiters are *WSP: str.strip() also took a no-break space, U+3000
    or an EM SPACE, so "v=STSv1<U+3000>" was a record and "id=abc<U+00A0>" its id abc."""
    assert parse_sts_record(["v=STSv1 ;\tid=abc ; "]) == "abc"
    assert parse_sts_record([f"v=STSv1{space}; id=abc"]) is None
    with pytest.raises(PolicyError, match="letters and digits"):
        parse_sts_record([f"v=STSv1; id=abc{space}"])
    with pytest.raises(PolicyError, match="no id"):
        parse_sts_record([f"v=STSv1; {space}id=abc"])


def test_cached_policy_lifetime_has_a_floor() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    zero = parse_policy(b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 0\n")
    cached = CachedPolicy.of("example.org", "1", zero, now)
    assert cached.expires_at == now + timedelta(seconds=MIN_CACHE)
    assert cached.fresh(now)
    assert not cached.fresh(cached.expires_at)


def test_mta_sts_settings_are_checked() -> None:
    from mailstrom import Config, MTASTSConfig
    from mailstrom.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mta_sts\.port"):
        MTASTSConfig(port=0)
    with pytest.raises(ConfigError, match=r"mta_sts\.timeout"):
        MTASTSConfig(timeout=0)
    with pytest.raises(ConfigError, match=r"mta_sts\.recheck"):
        MTASTSConfig(recheck=-1)
    with pytest.raises(ConfigError, match="MTASTSConfig"):
        Config(mta_sts=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "mode"),
    [
        ("mode: enforce", Mode.ENFORCE),
        ("mode:testing", Mode.TESTING),
        ("mode:\t none \t", Mode.NONE),  # sts-policy-field-delim = ":" *WSP, then *WSP
    ],
)
def test_fields_spelled_as_the_grammar_has_them_are_read(line: str, mode: Mode) -> None:
    body = f"version: STSv1\n{line}\nmx: a.example\nmax_age: 1\n"
    assert parse_policy(body.encode()).mode is mode


@pytest.mark.parametrize(
    ("version", "mode", "reason"),
    [
        ("stsv1", "enforce", "version is 'stsv1'"),
        ("STSV1", "enforce", "version"),
        ("STSv1", "Enforce", "mode is 'Enforce'"),
        ("STSv1", "TESTING", "mode"),
        ("STSv1", "None", "mode"),
    ],
)
def test_version_and_mode_values_are_case_sensitive(version: str, mode: str, reason: str) -> None:
    """RFC 8461 §3.2 writes them %s"STSv1", %s"enforce" (RFC 7405): case-sensitive."""
    body = f"version: {version}\nmode: {mode}\nmx: a.example\nmax_age: 1\n"
    with pytest.raises(PolicyError, match=reason):
        parse_policy(body.encode())


def test_field_names_are_case_sensitive() -> None:
    """%s"mode": ``Mode`` is an unknown extension field, ignored (§3.2), not the mode."""
    with pytest.raises(PolicyError, match="mode is None"):
        parse_policy(b"version: STSv1\nMode: enforce\nmx: a.example\nmax_age: 1\n")
    with pytest.raises(PolicyError, match="version is None"):
        parse_policy(b"Version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n")
    policy = parse_policy(b"version: STSv1\nMode: none\nmode: testing\nmx: a.example\nmax_age: 1")
    assert policy.mode is Mode.TESTING


@pytest.mark.parametrize(
    "line",
    [
        "mode: enforce\u00a0",  # a no-break space is no WSP: str.strip() took it
        "mode:\u3000enforce",
        "mode: \u2003enforce",
    ],
)
def test_only_spaces_and_tabs_are_trimmed_from_a_value(line: str) -> None:
    body = f"version: STSv1\n{line}\nmx: a.example\nmax_age: 1\n"
    with pytest.raises(PolicyError, match="mode is"):
        parse_policy(body.encode())


@pytest.mark.parametrize(
    "line", [" mode: enforce", "\tmode: enforce", "mode : enforce", "mode\t: enforce"]
)
def test_white_space_before_a_key_or_colon_breaks_the_policy(line: str) -> None:
    """The grammar has a field begin its line and the colon follow its name at once."""
    body = f"version: STSv1\n{line}\nmx: a.example\nmax_age: 1\n"
    with pytest.raises(PolicyError, match="line 2 has white space before its key or colon"):
        parse_policy(body.encode())


def test_a_byte_order_mark_before_the_policy_is_dropped() -> None:
    """Editors on Windows save UTF-8 with a BOM: the first line then read as the key
    "\\ufeffversion" and the whole policy was refused, leaving the domain unprotected.
    A BOM says nothing about the policy: it is dropped, and only at the very start."""
    policy = parse_policy(b"\xef\xbb\xbf" + GOOD)
    assert policy.mode is Mode.ENFORCE and policy.mx == ("mail.example.com", "*.example.net")
    assert policy.lines[0] == "version: STSv1"
    with pytest.raises(PolicyError, match="line 2"):
        parse_policy(b"version: STSv1\n\xef\xbb\xbfmode: enforce\nmx: a.example\nmax_age: 1\n")


def test_a_max_age_above_the_limit_is_capped() -> None:
    """RFC 8461 §3.2's grammar takes up to ten digits and gives 31557600 as the largest
    value: a larger one is read as that largest, not taken for a broken policy (which
    would leave the domain without the protection it asked for a long time)."""
    body = b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 9999999999\n"
    policy = parse_policy(body)
    assert policy.max_age == MAX_AGE_LIMIT and policy.mode is Mode.ENFORCE
    assert "max_age: 9999999999" in policy.lines  # the text stays as published


@pytest.mark.parametrize(
    "bad",
    [".example.com", "a..example", "*.*.example", "a b", "mx.example.com:25", "\u212aelvin.x"],
)
def test_an_invalid_mx_pattern_is_ignored_not_the_policy(bad: str) -> None:
    """One bad ``mx`` line refused the whole policy, so the domain had none: mail went to
    any MX, over any TLS. Ignored, the pattern allows nothing: the allowed set only
    shrinks (the patterns left, or none at all, which is refused as before)."""
    body = f"version: STSv1\nmode: enforce\nmx: {bad}\nmx: mail.example.com\nmax_age: 60\n"
    policy = parse_policy(body.encode())
    assert policy.mode is Mode.ENFORCE
    assert policy.mx == ("mail.example.com",)
    assert policy.ignored == (bad,)
    assert policy.allows("mail.example.com")
    assert not policy.allows("www.example.com") and not policy.allows("example.com")
    with pytest.raises(PolicyError, match="without any valid mx line"):
        parse_policy(f"version: STSv1\nmode: enforce\nmx: {bad}\nmax_age: 60\n".encode())
