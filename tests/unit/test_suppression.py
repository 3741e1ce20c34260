"""The suppression list's pure parts: targets, matching, hard-bounce codes, CSV."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailstrom.client.common import suppression_entry
from mailstrom.config import Config, Lane
from mailstrom.errors import ConfigError, InvalidSuppression
from mailstrom.message.addrspec import validate_address
from mailstrom.policy.hardbounce import (
    DEFAULT_SUPPRESS_ON,
    is_hard_bounce,
    is_late_hard_bounce,
)
from mailstrom.policy.reasons import classify_reply
from mailstrom.runtime.suppressing import hard_bounce_entries
from mailstrom.runtime.worker_screening import SUPPRESSION_KEPT, prune_before
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult
from mailstrom.stores.clock import ClockReading
from mailstrom.suppression import (
    Suppression,
    SuppressionSource,
    address_key,
    check_reply,
    lookup_targets,
    match,
    normalize_target,
    stored_forms,
)
from mailstrom.suppression_csv import parse_csv, read_limited, write_csv

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def entry(target: str, **kw: object) -> Suppression:
    return Suppression(
        target=target,
        source=kw.pop("source", SuppressionSource.MANUAL),  # type: ignore[arg-type]
        reply=kw.pop("reply", ""),  # type: ignore[arg-type]
        created_at=NOW,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("text", "target"),
    [
        (" Bob@Example.ORG ", "bob@example.org"),
        ("<bob@example.org>", "bob@example.org"),
        ("EXAMPLE.org", "example.org"),
        # The domain as A-labels, as prepare() stores recipients; IDNA 2008 (ß stays ß).
        ("Jörg@Bücher.example", "jörg@xn--bcher-kva.example"),
        ("<bücher.example>", "xn--bcher-kva.example"),
        ("Straße.DE", "xn--strae-oqa.de"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_targets_are_normalized(text: str, target: str) -> None:
    assert normalize_target(text) == target


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "@example.org",
        "bob@",
        "a b@example.org",
        "a@b@example.org",
        "bob@.org",
        "bob@example..org",
        "bob@example.org.",
        "x\x00@example.org",
        "a,b@example.org",
        '"a b"example.org',  # no @ after the quotes
        '"a<b"@example.org',  # SMTP cannot carry it (message.addrspec)
        '"a b@example.org',  # the quote never closed
        "x" * 321,
        "bob@bü_cher.example",  # no A-label form
        "bob@" + "ü" * 70 + ".example",  # a label over 63 octets once encoded
    ],
)
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(InvalidSuppression):
        normalize_target(text)


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ('"john doe"@example.com', '"john doe"@example.com'),
        ('"John Doe"@Example.COM', '"john doe"@example.com'),
        ('<"a@b"@x.org>', '"a@b"@x.org'),
        # Needless quotes and quoted-pairs off (RFC 5321 §4.1.2: the same mailbox).
        ('"john"@x.org', "john@x.org"),
        ('"jo\\hn"@x.org', "john@x.org"),
        ('"a.b"@x.org', "a.b@x.org"),
        ('"a\\"b"@x.org', '"a\\"b"@x.org'),
        ('"jörg  x"@bücher.example', '"jörg  x"@xn--bcher-kva.example'),
    ],
)
def test_a_quoted_local_part_is_kept_as_prepare_stores_it(text: str, target: str) -> None:
    """Was refused; now the form prepare() stores the recipient in, lower-cased, and
    every way in (the key a recipient is looked up by, removal) agrees with it."""
    assert normalize_target(text) == target
    assert address_key(validate_address(text.strip("<>")).envelope) == target
    assert address_key(text.strip("<>")) == target
    assert stored_forms(text)[0] == target


def test_a_hard_bounce_of_a_quoted_local_part_is_suppressed() -> None:
    """Was: hard_bounce_entries skipped the address (normalize_target refused it)."""
    attempt = Attempt(at=NOW, outcome=AttemptOutcome.PERMANENT, error="550 5.1.1 no such user")
    bounced = RecipientResult(
        message_id="m1",
        address='"John Doe"@example.com',
        state=RecipientState.FAILED,
        attempt=attempt,
        lease_token="t",
        hard_bounce=True,
    )
    [made] = hard_bounce_entries([bounced], expire_after=None)
    assert made.target == '"john doe"@example.com'
    assert match('"John Doe"@example.com', {made.target: made}) is made


def test_a_quoted_local_part_is_exported_and_imported_again() -> None:
    entries = [entry('"john doe"@example.com'), entry('"a@b"@x.org', reply="a, b")]
    out = io.StringIO()
    write_csv(entries, out)
    assert parse_csv(out.getvalue(), now=NOW) == entries
    # A file written by hand quotes the cell as CSV does.
    assert [e.target for e in parse_csv('"""John Doe""@example.com"\n', now=NOW)] == [
        '"john doe"@example.com'
    ]


def test_an_address_entry_wins_over_its_domain() -> None:
    found = {
        "bob@example.org": entry("bob@example.org", reply="own"),
        "example.org": entry("example.org", reply="domain"),
    }
    assert lookup_targets(["Bob@Example.org", "ann@example.org"]) == [
        "bob@example.org",
        "example.org",
        "ann@example.org",
    ]
    assert match("BOB@example.org", found) is found["bob@example.org"]
    assert match("ann@EXAMPLE.org", found) is found["example.org"]
    assert match("ann@example.net", found) is None


def test_an_entry_for_a_u_label_domain_applies_to_recipients_stored_as_a_labels() -> None:
    domain = entry(normalize_target("bücher.example"))
    own = entry(normalize_target("ñoño@Bücher.example"))
    found = {e.target: e for e in (domain, own)}
    # prepare() stores these recipients as A-labels; a U-label one is keyed the same.
    assert lookup_targets(["bob@xn--bcher-kva.example"]) == [
        "bob@xn--bcher-kva.example",
        "xn--bcher-kva.example",
    ]
    assert match("bob@xn--bcher-kva.example", found) is domain
    assert match("ñoño@xn--bcher-kva.example", found) is own
    assert match("ÑOÑO@bücher.example", found) is own


def test_an_entry_typed_decomposed_applies_to_the_recipient_prepare_stores() -> None:
    """prepare() stores a UTF-8 local part in NFC (email_validator): "jo\u0308rg" (o and
    a combining diaeresis, as macOS input and many files write it) is queued as
    "j\u00f6rg". An entry kept as typed was listed but never applied, and a report naming
    the recipient decomposed matched nobody."""
    decomposed = "Jo\u0308rg@example.org"
    stored = validate_address(decomposed).envelope
    assert stored == "J\u00f6rg@example.org"
    own = entry(normalize_target(decomposed))
    assert own.target == "j\u00f6rg@example.org"
    assert match(stored, {own.target: own}) is own
    assert address_key(decomposed) == address_key(stored)
    assert stored_forms(decomposed) == ["j\u00f6rg@example.org", "jo\u0308rg@example.org"]


@pytest.mark.parametrize(
    "written",
    [
        "bob@[IPv6:2001:DB8:0::1]",
        "bob@[ipv6:2001:0db8:0000::0001]",
        "<Bob@[IPV6:2001:db8::1]>",
    ],
)
def test_an_entry_for_an_ipv6_literal_applies_to_the_recipient_prepare_stores(
    written: str,
) -> None:
    """prepare() stores an address literal's IPv6 address in its shortest form
    (email_validator: bob@[IPv6:2001:db8::1]). An entry kept as typed, lower-cased
    (bob@[ipv6:2001:db8:0::1]), was listed and never applied, and neither did its
    domain's entry."""
    stored = validate_address(written.strip("<>")).envelope
    assert stored == ("Bob" if "Bob" in written else "bob") + "@[IPv6:2001:db8::1]"
    own = entry(normalize_target(written))
    domain = entry(normalize_target(written.strip("<>").rpartition("@")[2]))
    assert match(stored, {own.target: own}) is own
    assert match(stored, {domain.target: domain}) is domain
    assert address_key(written.strip("<>")) == own.target


def test_a_bad_ip_literal_is_refused() -> None:
    for text in ("bob@[IPv6:2001:db8::g]", "[192.0.2.300]", "bob@[ 192.0.2.1 ]"):
        with pytest.raises(InvalidSuppression):
            normalize_target(text)


def test_removing_a_u_label_target_reaches_the_form_earlier_builds_stored() -> None:
    assert stored_forms("<Bob@Bücher.example>") == [
        "bob@xn--bcher-kva.example",
        "bob@bücher.example",
    ]
    assert stored_forms("Bob@example.org") == ["bob@example.org"]


def test_reason_and_activity() -> None:
    e = entry("bob@example.org", reply="550 5.1.1 gone", expires_at=NOW + timedelta(days=1))
    assert e.reason == "suppressed since 2026-11-30T09:00:00Z: 550 5.1.1 gone"
    assert entry("bob@example.org").reason == "suppressed since 2026-11-30T09:00:00Z"
    assert e.active(NOW) and not e.active(NOW + timedelta(days=1))
    assert entry("example.org").is_domain and not e.is_domain


def test_the_reason_gives_the_time_in_utc_whatever_its_offset() -> None:
    """Was: ``2026-11-30T11:00:00Z`` for 11:00 at +02:00, two hours off, and only from
    stores that keep the offset (MemoryStore; SQLite gives the time back in UTC)."""
    at = datetime(2026, 11, 30, 11, 0, tzinfo=timezone(timedelta(hours=2)))
    e = Suppression(target="bob@example.org", source=None, reply="", created_at=at)
    assert e.reason == "suppressed since 2026-11-30T09:00:00Z"


@pytest.mark.parametrize(
    ("outcome", "code", "enhanced", "expected"),
    [
        (AttemptOutcome.PERMANENT, 550, "5.1.1", True),
        (AttemptOutcome.PERMANENT, 550, "5.1.10", True),
        (AttemptOutcome.PERMANENT, 550, "5.2.1", True),
        (AttemptOutcome.PERMANENT, None, "5.1.2", True),  # NXDOMAIN, found by our lookup
        (AttemptOutcome.PERMANENT, 556, None, True),
        (AttemptOutcome.PERMANENT, 552, "5.2.2", False),  # full: it may empty
        (AttemptOutcome.PERMANENT, 550, "5.7.1", False),
        (AttemptOutcome.PERMANENT, 550, None, False),
        (AttemptOutcome.TEMPORARY, 450, "4.1.1", False),
        (AttemptOutcome.TEMPORARY, 550, "5.1.1", False),  # retries ran out: not a refusal
    ],
)
def test_hard_bounce_codes(
    outcome: AttemptOutcome, code: int | None, enhanced: str | None, expected: bool
) -> None:
    assert (
        is_hard_bounce(outcome, code=code, enhanced=enhanced, codes=DEFAULT_SUPPRESS_ON) is expected
    )


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "expected"),
    [
        (550, None, "sorry, no mailbox here by that name. (#5.1.1)", True),
        (550, None, "sorry, no mailbox here by that name. (#5.1.1)\r\n", True),
        (553, None, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", False),
        (550, None, "sorry (#5.1.1) said the last hop", False),  # not at the end
        (550, None, "no mailbox here (#4.1.1)", False),  # not the reply's class
        (550, "5.7.1", "blocked (#5.1.1)", False),  # its own code decides
    ],
)
def test_qmails_status_ending_the_text_is_the_refusals_code(
    code: int, enhanced: str | None, text: str, expected: bool
) -> None:
    hard = is_hard_bounce(
        AttemptOutcome.PERMANENT, code=code, enhanced=enhanced, codes=DEFAULT_SUPPRESS_ON, text=text
    )
    assert hard is expected


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "expected"),
    [
        (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)", True),
        (550, "5.4.1", "Recipient address rejected:\n  Access DENIED.", True),
        (550, "5.4.1", "No answer from host", False),  # RFC 3463's 5.4.1
        (554, "5.4.1", "Recipient address rejected: Access denied", False),
        (550, "5.4.4", "Recipient address rejected: Access denied", False),
        (550, "5.7.1", "Recipient address rejected: Access denied", False),  # Postfix's ACL
    ],
)
def test_exchange_onlines_unknown_recipient_is_a_hard_bounce(
    code: int, enhanced: str, text: str, expected: bool
) -> None:
    hard = is_hard_bounce(
        AttemptOutcome.PERMANENT, code=code, enhanced=enhanced, codes=DEFAULT_SUPPRESS_ON, text=text
    )
    assert hard is expected


_YAHOO = "delivery error: dd This user doesn't have a yahoo.com account (a@yahoo.com) [0]"


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "expected"),
    [
        (554, None, _YAHOO, True),
        (554, None, "delivery error: dd This user doesn't have a aol.com account", True),
        (554, None, "delivery error: dd This user doesn't have a\n  YAHOO.COM account", True),
        (554, None, "Message not accepted for policy reasons", False),
        (550, None, _YAHOO, False),  # the rule is Yahoo's 554 alone
    ],
)
def test_yahoos_unknown_account_is_a_hard_bounce(
    code: int, enhanced: str | None, text: str, expected: bool
) -> None:
    """Yahoo and AOL say "no such account" with a 554 and no enhanced code; the reply
    table knew it, suppression did not."""
    hard = is_hard_bounce(
        AttemptOutcome.PERMANENT, code=code, enhanced=enhanced, codes=DEFAULT_SUPPRESS_ON, text=text
    )
    assert hard is expected
    # Relayed in a bounce that came later (Exim's and Postfix's Status 5.0.0).
    late = is_late_hard_bounce(
        "5.0.0", code=code, codes=DEFAULT_SUPPRESS_ON, diagnostic=f"{code} {text}"
    )
    assert late is expected


_YAHOO_DISABLED = (
    "delivery error: dd Sorry your message to a@yahoo.com cannot be delivered. This account"
    " has been disabled or discontinued [#102]. - mta1047.mail.gq1.yahoo.com"
)


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (554, _YAHOO_DISABLED, True),
        (554, _YAHOO_DISABLED.replace(" This", "\n  THIS"), True),
        (550, _YAHOO_DISABLED, False),  # the rule is Yahoo's 554 alone
    ],
)
def test_yahoos_disabled_account_is_a_hard_bounce(code: int, text: str, expected: bool) -> None:
    """Yahoo and AOL refuse an account that was closed with a 554, no enhanced code and
    "[#102]"; it was class "other" and never suppressed. It is a disabled mailbox
    (5.2.1, in the default ``suppress_on``)."""
    if expected:
        assert classify_reply(SMTPReply(code=code, text=text)) is ReasonClass.MAILBOX
    hard = is_hard_bounce(
        AttemptOutcome.PERMANENT, code=code, enhanced=None, codes=DEFAULT_SUPPRESS_ON, text=text
    )
    assert hard is expected
    late = is_late_hard_bounce(
        "5.0.0", code=code, codes=DEFAULT_SUPPRESS_ON, diagnostic=f"{code} {text}"
    )
    assert late is expected


def test_suppress_on_is_checked_by_config() -> None:
    assert Config(helo_name="h.test", suppress_on=(" 5.7.1 ", "554")).suppress_on == (
        "5.7.1",
        "554",
    )
    assert Config(helo_name="h.test", suppress_on=()).suppress_on == ()
    # ARABIC-INDIC ONE and FULLWIDTH FIVE: a str pattern's \d took them.
    for bad in (("4.1.1",), ("5.1",), ("550 5.1.1",), ("x",), ("5.\u0661.1",), ("5\uff15\uff10",)):
        with pytest.raises(ConfigError, match="suppress_on"):
            Config(helo_name="h.test", suppress_on=bad)
    with pytest.raises(ConfigError, match="suppress_for"):
        Config(helo_name="h.test", suppress_for=timedelta(0))


def test_suppress_on_of_the_wrong_type_is_a_config_error() -> None:
    # Was: AttributeError ('int' object has no attribute 'strip') for a basic code given
    # as a number, TypeError for None or a number alone, and for a string alone a
    # complaint about its first character.
    for bad in ([550], ["5.1.1", None], None, 550, b"5.1.1", "5.1.1"):
        with pytest.raises(ConfigError, match="suppress_on"):
            Config(helo_name="h.test", suppress_on=bad)  # type: ignore[arg-type]


# --- CSV -------------------------------------------------------------------------------


def test_export_then_import_round_trips() -> None:
    entries = [
        entry(
            "bob@example.org",
            source=SuppressionSource.HARD_BOUNCE,
            reply='550 5.1.1 "no such user", sorry\nsecond line',
            expires_at=NOW + timedelta(days=3),
            message_id="0190f3a2",
        ),
        entry("example.net"),
    ]
    out = io.StringIO()
    assert write_csv(entries, out) == 2
    assert out.getvalue().startswith("target,source,reply,created_at,expires_at,message_id\n")
    assert parse_csv(out.getvalue(), now=NOW + timedelta(days=1)) == entries


@pytest.mark.parametrize("ending", ["\r\n", "\r"])
def test_an_export_with_its_line_ends_converted_imports_again(ending: str) -> None:
    """An export whose line ends were converted (a file saved on Windows, ``unix2dos``,
    Git's ``autocrlf``) holds the line break inside a multi-line reply converted too:
    the import refused that reply, CR and all, as holding control characters."""
    entries = [
        entry(
            "bob@example.org",
            source=SuppressionSource.HARD_BOUNCE,
            reply="550-5.1.1 no such user\n550 5.1.1 see https://example.org/help",
        ),
        entry("example.net", reply="spam report"),
    ]
    out = io.StringIO()
    write_csv(entries, out)
    converted = out.getvalue().replace("\n", ending).encode()
    assert parse_csv(read_limited(io.BytesIO(converted)), now=NOW) == entries


def test_import_without_header_or_optional_columns() -> None:
    later = NOW + timedelta(hours=1)
    got = parse_csv(
        "# a comment\nBob@Example.org\n\nexample.net,complaint,spam report\n",
        now=later,
        source=SuppressionSource.ASYNC_BOUNCE,
    )
    assert [(e.target, e.source, e.reply, e.created_at) for e in got] == [
        ("bob@example.org", SuppressionSource.ASYNC_BOUNCE, "", later),
        ("example.net", SuppressionSource.COMPLAINT, "spam report", later),
    ]


def test_a_target_starting_with_a_hash_is_exported_and_imported_again() -> None:
    """``#`` is atext (RFC 5322 §3.2.3): ``#team@example.org`` is an address, not a
    comment, and no row an export writes reads as one."""
    entries = [entry("#team@example.org"), entry("#x@example.org", reply="# not a comment")]
    out = io.StringIO()
    write_csv(entries, out)
    assert parse_csv(out.getvalue(), now=NOW) == entries
    got = parse_csv(
        "# note\n#note\n###,x\n#\n#team@example.org\n  # indented note, with cells\n",
        now=NOW,
    )
    assert [e.target for e in got] == ["#team@example.org"]


@pytest.mark.parametrize("text", ["#", "###", "#note", "bob@#example.org", "bob@exa#mple.org"])
def test_no_domain_holds_a_hash(text: str) -> None:
    with pytest.raises(InvalidSuppression):
        normalize_target(text)


@pytest.mark.parametrize("text", ["*.example.com", "bob@*.example.com", "*", "mail.*.example"])
def test_a_wildcard_is_refused_not_listed_as_an_entry_that_never_applies(text: str) -> None:
    """Entries are found by the recipient's own address and domain: ``*.example.com`` (the
    form of a wildcard in ``tls_domains`` and shaping rules) was taken and listed, and
    suppressed nothing, neither ``bob@mail.example.com`` nor any other recipient (none
    has such a domain: ``bob@*.example.com`` is no address)."""
    from mailstrom import Mailstrom
    from mailstrom.stores import MemoryStore

    ms = Mailstrom(Config(helo_name="mail.example.com"), store=MemoryStore(), worker=None)
    with pytest.raises(InvalidSuppression, match=r"\*"):
        ms.suppress(text)
    assert ms.suppressions() == []
    with pytest.raises(InvalidSuppression):
        parse_csv(f"{text},by hand\n", now=NOW)
    # One an earlier version took can still be taken off the list.
    ms.store.suppress([entry(text)])
    assert ms.unsuppress(text.upper()) is True
    assert ms.suppressions() == []


def test_import_with_a_header_in_another_order() -> None:
    [e] = parse_csv("reply,target\nby hand,bob@example.org\n", now=NOW)
    assert (e.target, e.reply) == ("bob@example.org", "by hand")


def test_a_first_row_whose_reply_says_target_is_no_header() -> None:
    """A row is the header when its first cell names a column: a file without one whose
    first entry's reply (or message id) was the word "target" was refused as a header
    with an unknown column (the entry's address)."""
    text = "bob@example.org,manual,Target\nann@example.org,complaint,,,,target\n"
    got = parse_csv(text, now=NOW)
    assert [(e.target, e.reply, e.message_id) for e in got] == [
        ("bob@example.org", "Target", None),
        ("ann@example.org", "", "target"),
    ]
    out = io.StringIO()
    write_csv(got, out)
    assert parse_csv(out.getvalue(), now=NOW) == got


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("bob@example.org\nnot an address\n", "line 2: not an address"),
        ("bob@example.org,weird\n", "line 1: unknown source 'weird'"),
        ("target,colour\n", "line 1: unknown column 'colour'"),
        ("bob@example.org,manual,,yesterday\n", "line 1: not an ISO 8601 time"),
        ("bob@example.org,manual,,2026-01-01T00:00:00\n", "line 1: a time without a zone"),
        ("a@example.org,manual,x,,,,extra\n", "line 1: 7 columns"),
        ('"bob@example.org\n', "malformed CSV"),
        ("bob@example.org,manual," + "x" * 3000 + "\n", "longer than 2048"),
        ("bob@example.org,manual,gone\x1b[2J\n", "line 1: the reply holds control"),
        ('bob@example.org,manual,"a\x00b"\n', "line 1: the reply holds control"),
        ("bob@example.org,manual," + "x" * 20000 + "\n", "malformed CSV"),
    ],
)
def test_bad_rows_name_their_line(text: str, reason: str) -> None:
    with pytest.raises(InvalidSuppression, match=reason):
        parse_csv(text, now=NOW)


def test_rows_are_bounded() -> None:
    text = "".join(f"u{i}@example.org\n" for i in range(11))
    assert len(parse_csv(text, now=NOW, max_rows=11)) == 11
    with pytest.raises(InvalidSuppression, match="line 11: more than 10 entries"):
        parse_csv(text, now=NOW, max_rows=10)


@pytest.mark.parametrize("skipped", ["\n", "#\n", ",\n", '""\n', "# note, x\n"])
def test_empty_and_comment_rows_are_bounded_too(skipped: str) -> None:
    """Only entries were counted: 64 MiB of "#" lines, none an entry, took four minutes to
    read and import nothing. As many as entries are taken: a file with an empty row after
    each entry (line ends converted twice) imports whole."""
    spaced = "".join(f"u{i}@example.org\n{skipped}" for i in range(10))
    assert len(parse_csv(spaced, now=NOW, max_rows=10)) == 10
    with pytest.raises(InvalidSuppression, match="line 11: more than 10 empty or comment rows"):
        parse_csv(skipped * 11 + "bob@example.org\n", now=NOW, max_rows=10)


def test_input_is_bounded_and_must_be_utf8() -> None:
    assert read_limited(io.BytesIO(b"\xef\xbb\xbfbob@example.org\n"), 100) == "bob@example.org\n"
    with pytest.raises(InvalidSuppression, match="larger than 10 octets"):
        read_limited(io.BytesIO(b"x" * 11), 10)
    with pytest.raises(InvalidSuppression, match="not UTF-8"):
        read_limited(io.BytesIO(b"bob@\xffexample.org"), 100)


@pytest.mark.parametrize("reply", ["x\x00", "x\x1b[31m", "a\rb", "a\r\nb", "\u202ex", "x\x85"])
def test_a_reason_given_by_hand_holds_no_control_characters(reply: str) -> None:
    """It is shown in status lines and bounce reasons, and PostgreSQL cannot store a NUL:
    refused where it is given (the facade's suppress, the command's --reason, an import)."""
    with pytest.raises(InvalidSuppression, match="control characters"):
        check_reply(reply)
    with pytest.raises(InvalidSuppression, match="control characters"):
        suppression_entry(
            "bob@example.org", reply, source=SuppressionSource.MANUAL, expires_at=None, now=NOW
        )
    kept = "550 5.1.1 gone\tfor good,\nGrüße"  # TAB, and LF between a reply's lines
    assert check_reply(kept) == kept


def test_a_lane_may_bypass_bounces_only() -> None:
    """A complaint or an operator's entry (an unsubscribe, a block) stops every lane."""
    lane = Lane(name="account", bypass_suppression=("hard_bounce", SuppressionSource.HARD_BOUNCE))
    assert lane.bypass_suppression == (SuppressionSource.HARD_BOUNCE,)
    for bad in (["complaint"], ["manual"], ["bogus"], "hard_bounce", [None]):
        with pytest.raises(ConfigError, match="bypass_suppression"):
            Lane(name="account", bypass_suppression=bad)  # type: ignore[arg-type]
    found = {
        "bob@example.org": entry("bob@example.org", source=SuppressionSource.HARD_BOUNCE),
        "example.org": entry("example.org"),
    }
    bounces = frozenset({SuppressionSource.HARD_BOUNCE})
    assert match("bob@example.org", found, bypass=bounces) is found["example.org"]
    del found["example.org"]
    assert match("bob@example.org", found, bypass=bounces) is None
    assert match("bob@example.org", found) is found["bob@example.org"]


def test_a_worker_prunes_by_the_earlier_of_its_clock_and_the_store_servers() -> None:
    """Pruning deletes for every worker: a clock ahead of the server's (beyond what the
    round trip explains) prunes by the server's time; one behind, or no reading (memory,
    SQLite: one host clock), by its own."""
    now = datetime(2030, 1, 2, tzinfo=UTC)
    ahead = ClockReading(skew=60 * 86400.0, uncertainty=2.0, server="db")
    behind = ClockReading(skew=-3600.0, uncertainty=2.0, server="db")
    unclear = ClockReading(skew=1.5, uncertainty=2.0, server="db")
    own = now - SUPPRESSION_KEPT
    assert prune_before(now, ahead) == own - timedelta(days=60) + timedelta(seconds=2)
    assert prune_before(now, behind) == own
    assert prune_before(now, unclear) == own
    assert prune_before(now) == own
