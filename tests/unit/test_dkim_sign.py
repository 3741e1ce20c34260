"""What prepare() signs, with which keys, and how the signature field is written.

Whether the signatures verify is tested against independent verifiers (through the
loopback DNS server) in tests/integration/test_dkim.py and test_dkim_delivery.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest
from tests.support.dkim import ED25519, RSA, dual, key, signature_tags

from mailstrom.client.common import prepare_for
from mailstrom.config import Config
from mailstrom.dkim import DKIMConfig, DKIMKey, generate_private_key
from mailstrom.dkim.resigned import ResignedMessages
from mailstrom.dkim.signing import resign_stale, sign, unlike_ours
from mailstrom.errors import ConfigError, MessageTooLarge, NoDKIMKey
from mailstrom.message import Email, downgrade_to_7bit, prepare
from mailstrom.status import DKIMStatus

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
DKIM = dual("example.com")


def email(**fields: object) -> Email:
    options: dict[str, object] = {
        "from_": "Shop <shop@example.com>",
        "to": "bob@example.org",
        "subject": "Hi",
        "text": "Hello\n",
    }
    options.update(fields)
    return Email(**options)  # type: ignore[arg-type]


def test_signed_with_every_aligned_key_in_key_order() -> None:
    p = prepare(email(), now=NOW, dkim=DKIM)
    assert [(s.domain, s.selector, s.algorithm) for s in p.dkim] == [
        ("example.com", "rsa", RSA),
        ("example.com", "ed", ED25519),
    ]
    assert [str(s) for s in p.dkim] == [
        "example.com (rsa, rsa-sha256)",
        "example.com (ed, ed25519-sha256)",
    ]
    tags = signature_tags(p.data)
    assert [t["a"] for t in tags] == ["rsa-sha256", "ed25519-sha256"]
    assert p.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")


def test_the_tags() -> None:
    [tags, _] = signature_tags(prepare(email(cc="c@example.org"), now=NOW, dkim=DKIM).data)
    assert tags["v"] == "1" and tags["c"] == "relaxed/relaxed"
    assert (tags["d"], tags["s"]) == ("example.com", "rsa")
    assert tags["t"] == str(int(NOW.timestamp()))
    assert "l" not in tags and "x" not in tags and "i" not in tags
    # Once more than present, and once when absent: none can be added.
    assert tags["h"].split(":") == [
        "from",
        "from",
        "to",
        "to",
        "cc",
        "cc",
        "subject",
        "subject",
        "date",
        "date",
        "message-id",
        "message-id",
        "reply-to",
        "in-reply-to",
        "references",
        "mime-version",
        "mime-version",
        "content-type",
        "content-type",
        "content-transfer-encoding",
        "content-transfer-encoding",
    ]
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", tags["bh"])


def test_expiry() -> None:
    config = dual("example.com", expire=timedelta(days=7))
    [tags, _] = signature_tags(prepare(email(), now=NOW, dkim=config).data)
    assert int(tags["x"]) - int(tags["t"]) == 7 * 86400
    with pytest.raises(ConfigError, match="positive"):
        dual("example.com", expire=timedelta(0))


def test_expiry_counts_from_send_at() -> None:
    """A scheduled message is signed when queued and first sent at send_at, as signed:
    x= counted from queueing would have passed before then (RFC 6376 §3.5)."""
    config = Config(dkim=dual("example.com", expire=timedelta(days=1)))
    later = NOW + timedelta(days=3)
    for send_at, start in ((later, later), (NOW - timedelta(hours=1), NOW), (None, NOW)):
        p = prepare_for(
            config, email(), envelope_from=None, envelope_to=None, now=NOW, send_at=send_at
        )
        [tags, _] = signature_tags(p.data)
        assert tags["t"] == str(int(NOW.timestamp()))  # the signing time stays the time
        assert int(tags["x"]) == int((start + timedelta(days=1)).timestamp()), send_at


@pytest.fixture
def zone_west_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone five hours behind UTC (four in summer)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("zone_west_of_utc")
def test_sign_takes_naive_times_as_utc_as_prepare_does() -> None:
    """sign() took a naive ``now`` or ``send_at`` as local time (``datetime.timestamp``),
    where prepare() and Email.date take it as UTC: five hours west of UTC its t= lay in
    the future and x= five hours late; east of UTC, x= came that much early."""
    data = prepare(email(), now=NOW).data
    naive = NOW.replace(tzinfo=None)
    later = NOW + timedelta(days=2)
    signed, _ = sign(
        data, DKIM.keys, now=naive, expire=timedelta(days=1), send_at=later.replace(tzinfo=None)
    )
    for tags in signature_tags(signed):
        assert tags["t"] == str(int(NOW.timestamp()))
        assert tags["x"] == str(int((later + timedelta(days=1)).timestamp()))


def test_headers_for_providers_are_signed_and_absent_ones_are_signed_as_absent() -> None:
    message = Email(
        from_="shop@example.com",
        to="bob@example.org",
        reply_to="help@example.com",
        text="x",
        unsubscribe_url="https://example.com/u",
        unsubscribe_mailto="u@example.com",
        feedback_id="a:b:c",
    )
    [tags, _] = signature_tags(prepare(message, now=NOW, dkim=DKIM).data)
    names = tags["h"].split(":")
    # None present: one listing forbids adding one.
    assert names.count("subject") == names.count("cc") == 1
    assert names.count("reply-to") == 2 and "sender" not in names
    # A list passing the message on adds its own List-Unsubscribe: not over-signed.
    for name in ("list-unsubscribe", "list-unsubscribe-post", "feedback-id"):
        assert names.count(name) == 1


def test_repeated_fields_are_listed_once_more_than_they_occur() -> None:
    # Signed as given: prepare() refuses a second To now (RFC 5322 §3.6), but what sign()
    # lists must not depend on that.
    raw = (
        b"From: shop@example.com\r\nTo: a@example.org\r\nTo: b@example.org\r\n"
        b"Subject: one\r\nX-Other: not signed\r\n\r\nbody\r\n"
    )
    signed, _ = sign(raw, DKIM.keys, now=NOW)
    [tags, _] = signature_tags(signed)
    names = tags["h"].split(":")
    assert names.count("to") == 3 and names.count("from") == 2 and "x-other" not in names


def test_signature_lines_are_folded() -> None:
    p = prepare(email(), now=NOW, dkim=DKIM)
    head = p.data[: p.data.find(b"\r\n\r\n")]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


@pytest.mark.parametrize(
    ("sender", "selectors"),
    [
        ("a@example.com", ["rsa", "ed"]),  # the key domain itself
        ("a@news.example.com", ["news"]),  # the most specific key domain wins
        ("a@deep.news.example.com", ["news"]),
        ("a@shop.example.com", ["rsa", "ed"]),  # a parent domain aligns (DMARC relaxed)
        ("a@EXAMPLE.COM", ["rsa", "ed"]),
        ("a@example.net", []),
        ("a@notexample.com", []),  # a suffix of the name, not a parent domain
    ],
)
def test_which_keys_sign(sender: str, selectors: list[str]) -> None:
    config = DKIMConfig(keys=(*DKIM.keys, key("news.example.com", "news")))
    p = prepare(email(from_=sender), now=NOW, dkim=config)
    assert [s.selector for s in p.dkim] == selectors
    assert p.data.count(b"DKIM-Signature:") == len(selectors)


def test_every_from_domain_gets_its_keys() -> None:
    config = DKIMConfig(keys=(key("example.com", "a"), key("example.net", "b")))
    message = email(from_=["a@example.com", "b@example.net"], sender="desk@example.org")
    assert [s.domain for s in prepare(message, now=NOW, dkim=config).dkim] == [
        "example.com",
        "example.net",
    ]


def test_the_envelope_or_sender_domain_does_not_sign() -> None:
    # DMARC aligns with From: a key for the Sender or bounce domain would not help.
    config = DKIMConfig(keys=(key("example.org", "s"),))
    message = email(from_="a@example.com", sender="desk@example.org")
    assert prepare(message, envelope_from="bounce@example.org", now=NOW, dkim=config).dkim == ()


def test_unsigned_when_no_key_aligns_unless_required() -> None:
    unsigned = prepare(email(from_="a@example.net"), now=NOW, dkim=DKIM)
    plain = prepare(email(from_="a@example.net", message_id="<x@example.net>"), now=NOW)
    assert unsigned.dkim == () and b"DKIM-Signature" not in unsigned.data
    assert plain.dkim == ()
    required = dual("example.com", required=True)
    with pytest.raises(NoDKIMKey, match=r"example\.net") as caught:
        prepare(email(from_="a@example.net"), now=NOW, dkim=required)
    assert caught.value.domains == ("example.net",)


def test_a_from_group_cannot_be_signed_for() -> None:
    message = email(from_="Team:;", sender="desk@example.com")
    assert prepare(message, now=NOW, dkim=DKIM).dkim == ()
    with pytest.raises(NoDKIMKey, match="From is a group"):
        prepare(message, now=NOW, dkim=dual("example.com", required=True))


def test_a_domain_with_ed25519_keys_only_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """RFC 8301 obliges verifiers to rsa-sha256 alone, and Ed25519 (RFC 8463) is not
    verified everywhere: mail signed by Ed25519 only is unsigned to such a receiver and
    fails DMARC there. Such a configuration loaded without a word (as a small RSA key
    does not), and the most specific domain's keys sign alone, so a subdomain's lone
    Ed25519 key displaced its parent's RSA one."""
    with caplog.at_level("WARNING", logger="mailstrom.dkim"):
        DKIMConfig(
            keys=(
                key("example.com", "r"),
                key("example.com", "e", ED25519),
                key("news.example.com", "e", ED25519),
                key("example.org", "r"),
            )
        )
    warned = [r.getMessage() for r in caplog.records if r.name == "mailstrom.dkim"]
    assert len(warned) == 1 and "news.example.com" in warned[0], warned
    assert "RSA" in warned[0] and "mailstrom dkim keygen" in warned[0]


def test_required_needs_keys() -> None:
    with pytest.raises(ConfigError, match=r"no dkim\.keys"):
        DKIMConfig(required=True)
    with pytest.raises(ConfigError, match="configured twice"):
        DKIMConfig(keys=(key("example.com", "s"), key("example.com", "s", ED25519)))


@pytest.mark.parametrize("keys", [key("example.com", "s"), None, 5, b"keys"])
def test_keys_that_are_no_sequence_of_keys_are_a_config_error(keys: object) -> None:
    """One key given as ``keys=`` (no tuple around it) is a configuration mistake, told
    as every other one is: it raised TypeError ("'DKIMKey' object is not iterable")."""
    with pytest.raises(ConfigError, match=r"dkim\.keys: expected a sequence of DKIMKey"):
        DKIMConfig(keys=keys)  # type: ignore[arg-type]


def test_a_selector_in_other_case_is_the_same_selector() -> None:
    """DNS names are compared without regard to case (RFC 4343): S1._domainkey and
    s1._domainkey are one record, which can publish one of the two keys, so the other's
    signature would fail on every message."""
    with pytest.raises(ConfigError, match="configured twice"):
        DKIMConfig(keys=(key("example.com", "S1"), key("example.com", "s1", ED25519)))


EIGHT_BIT = (
    "From: shop@example.com\r\nTo: bob@example.org\r\nSubject: 8bit\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n"
).encode()


def test_an_eight_bit_body_is_made_seven_bit_before_signing() -> None:
    unsigned = prepare(EIGHT_BIT, now=NOW)
    assert unsigned.eightbit  # unsigned mail keeps its 8-bit body (BODY=8BITMIME)
    signed = prepare(EIGHT_BIT, now=NOW, dkim=DKIM)
    assert not signed.eightbit
    body = signed.data[signed.data.find(b"\r\n\r\n") :]
    assert body.isascii() and b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln" in body
    assert b"Content-Transfer-Encoding: quoted-printable" in signed.data
    # What the worker does for a server without 8BITMIME changes nothing of it.
    assert downgrade_to_7bit(signed.data) is signed.data


def test_an_eight_bit_email_message_is_made_seven_bit_too() -> None:
    message = EmailMessage()
    message["From"] = "shop@example.com"
    message["To"] = "bob@example.org"
    message.set_content("Grüße\n", cte="8bit")
    signed = prepare(message, now=NOW, dkim=DKIM)
    assert not signed.eightbit and len(signed.dkim) == 2


def test_utf8_headers_stay_utf8_and_are_signed() -> None:
    message = email(from_="Bücher <bücher@example.com>", subject="Grüße")
    signed = prepare(message, now=NOW, dkim=DKIM)
    assert signed.smtputf8 and len(signed.dkim) == 2
    assert 'From: "Bücher" <bücher@example.com>'.encode() in signed.data


def test_the_size_limit_counts_the_signatures() -> None:
    size = len(prepare(email(message_id="<x@example.com>"), now=NOW).data)
    with pytest.raises(MessageTooLarge, match="the limit is"):
        prepare(email(message_id="<x@example.com>"), now=NOW, dkim=DKIM, max_size=size + 100)


# --- signing again as the message goes out ------------------------------------------------

DAY = timedelta(days=1)
EXPIRING = dual("example.com", expire=DAY)


def as_sent(data: bytes, dkim: DKIMConfig, *, now: datetime) -> bytes | None:
    """What :func:`resign_stale` sends, checking the signatures it says it made."""
    found = resign_stale(data, dkim, now=now)
    if found is None:
        return None
    out, status = found
    ours = [t for t in signature_tags(out) if t["s"].lower() in dkim.selectors(t["d"])]
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.signatures] == [
        (t["d"], t["s"], t["a"]) for t in ours
    ]
    return out


@pytest.mark.parametrize(
    ("later", "resigned"),
    [
        (timedelta(0), False),
        (timedelta(hours=22, minutes=59), False),  # x= more than RESIGN_BEFORE ahead
        (timedelta(hours=23, minutes=1), True),  # x= within it: the attempt may outlast it
        (timedelta(days=3), True),  # a retry long after x=
    ],
)
def test_a_signature_expiring_before_it_is_checked_is_made_anew(
    later: timedelta, resigned: bool
) -> None:
    stored = prepare(email(), now=NOW, dkim=EXPIRING).data
    now = NOW + later
    out = as_sent(stored, EXPIRING, now=now)
    if not resigned:
        assert out is None
        return
    assert out is not None
    old, new = signature_tags(stored), signature_tags(out)
    assert [(t["d"], t["s"], t["a"]) for t in new] == [(t["d"], t["s"], t["a"]) for t in old]
    stamp = int(now.timestamp())
    assert all((int(t["t"]), int(t["x"])) == (stamp, stamp + 86400) for t in new)
    assert new[0]["h"] == old[0]["h"] and new[0]["bh"] == old[0]["bh"]
    # Only the signatures changed: the message under them is the one stored.
    assert out.split(b"\r\nFrom: ", 1)[1] == stored.split(b"\r\nFrom: ", 1)[1]
    assert resign_stale(out, EXPIRING, now=now) is None  # fresh now


def test_nothing_is_signed_again_without_an_expiring_signature() -> None:
    later = NOW + timedelta(days=30)
    unsigned = prepare(email(), now=NOW).data
    no_expiry = prepare(email(), now=NOW, dkim=DKIM).data
    assert resign_stale(unsigned, EXPIRING, now=later) is None
    assert resign_stale(no_expiry, EXPIRING, now=later) is None
    # A signature of a domain this configuration has no key for stays as it is, while
    # its x= has not passed.
    other = prepare(email(), now=NOW, dkim=dual("example.com", expire=timedelta(days=60))).data
    assert resign_stale(other, DKIMConfig(keys=(key("example.net", "n"),)), now=later) is None


def test_an_expired_signature_no_key_configured_can_make_anew_goes() -> None:
    """Every key of the signing domain removed from the configuration while the message
    waited: once their x= has passed, its signatures are invalid to every receiver (RFC
    6376 §3.5, §6.1.1) and nothing can make them anew. They go, and the status says why
    the message is unsigned; before their x= they stay (they may still verify)."""
    stored = prepare(email(), now=NOW, dkim=dual("example.com", expire=timedelta(hours=1))).data
    gone = DKIMConfig(keys=(key("example.net", "n"),))
    assert resign_stale(stored, gone, now=NOW + timedelta(minutes=59)) is None
    found = resign_stale(stored, gone, now=NOW + timedelta(hours=1))
    assert found is not None
    out, status = found
    assert b"DKIM-Signature" not in out and stored.endswith(out)
    assert status == DKIMStatus(
        reason="its signatures had expired (x=) and no key of example.com is configured now"
    )


def test_an_expired_signature_goes_the_others_stay_and_are_named() -> None:
    """Of the signatures no key configured now made, those past their x= go: another
    domain's that came with a raw message, and the application's own of a domain
    mailstrom signs too (its signature by a key configured now stays, valid). One
    without x= stays, and is named when no key configured now made one."""
    theirs = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=x; c=relaxed/relaxed;\r\n"
        b" t=1; h=from; bh=AAAA; b=AAAA\r\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=y; c=relaxed/relaxed;\r\n"
        b" t=1; x=2; h=from; bh=AAAA; b=AAAA\r\n"
        b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.com; s=app1; t=1; x=2;\r\n"
        b" h=from; bh=AAAA; b=AAAA\r\n"
    )
    raw = theirs + b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    stored = prepare(raw, now=NOW, dkim=DKIM).data
    later = NOW + timedelta(days=1)
    out = as_sent(stored, DKIM, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
        ("example.net", "x"),
    ]
    assert stored.startswith(out[: out.index(b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net")])
    # No key configured for the domain: the one left is named in the status.
    found = resign_stale(stored, DKIMConfig(keys=(key("example.edu", "e"),)), now=later)
    assert found is not None
    assert [(t["d"], t["s"]) for t in signature_tags(found[0])] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
        ("example.net", "x"),
    ]
    assert [(s.domain, s.selector) for s in found[1].signatures] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
        ("example.net", "x"),
    ]


def test_only_the_expiring_signatures_of_our_domains_are_replaced() -> None:
    """A signature that came with a raw message (another domain's, not expired) stays;
    ours, made with a selector since rotated away, is replaced by the domain's keys now
    configured."""
    foreign = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=x; c=relaxed/relaxed;\r\n"
        b" t=1; h=from; bh=AAAA; b=AAAA\r\n"
    )
    raw = foreign + b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    old = DKIMConfig(keys=(key("example.com", "old"),), expire=timedelta(days=1))
    stored = prepare(raw, now=NOW, dkim=old).data
    assert [t["d"] for t in signature_tags(stored)] == ["example.com", "example.net"]
    out = as_sent(stored, EXPIRING, now=NOW + timedelta(days=2))
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
        ("example.net", "x"),
    ]
    assert foreign in out
    # Without an expiry configured now, the new signatures have none.
    unexpiring = as_sent(stored, DKIM, now=NOW + timedelta(days=2))
    assert unexpiring is not None
    assert ["x" in t for t in signature_tags(unexpiring)] == [False, False, False]


def test_a_signature_by_a_key_rotated_away_is_made_anew() -> None:
    """Keys rotated while the message was queued, no x= at all: the domain's signatures
    are made by its keys now configured (a selector's case is no rotation); a domain
    whose keys are all gone keeps its signature, there being nothing to sign it with."""
    later = NOW + timedelta(days=30)
    stored = prepare(email(), now=NOW, dkim=DKIM).data
    assert resign_stale(stored, DKIM, now=later) is None
    same = DKIMConfig(keys=(key("example.com", "RSA", RSA), key("example.com", "Ed", ED25519)))
    assert resign_stale(stored, same, now=later) is None
    # Only the Ed25519 key rotated: the RSA signature is still by a key configured, and
    # valid, but the Ed25519 one fails wherever Ed25519 is verified while a key now
    # configured makes a valid one: both are made anew.
    partly = DKIMConfig(keys=(key("example.com", "rsa", RSA), key("example.com", "ed2", ED25519)))
    out = as_sent(stored, partly, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("example.com", "rsa"),
        ("example.com", "ed2"),
    ]
    assert resign_stale(out, partly, now=later) is None
    # Only the RSA key rotated: the Ed25519 signature is valid, but a receiver that
    # verifies RSA alone would see none; both are made anew, by the keys now there.
    rsa_only = DKIMConfig(keys=(key("example.com", "rsa2", RSA), key("example.com", "ed", ED25519)))
    out = as_sent(stored, rsa_only, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("example.com", "rsa2"),
        ("example.com", "ed"),
    ]
    assert resign_stale(out, rsa_only, now=later) is None
    # A domain with Ed25519 keys only has no RSA signature to miss.
    ed_only = DKIMConfig(keys=(key("example.com", "ed", ED25519),))
    assert resign_stale(stored, ed_only, now=later) is None
    # Both rotated: both signatures are made anew, by the keys now there.
    new = DKIMConfig(keys=(key("example.com", "rsa2", RSA), key("example.com", "ed2", ED25519)))
    out = as_sent(stored, new, now=later)
    assert out is not None
    assert [(t["d"], t["s"], "x" in t) for t in signature_tags(out)] == [
        ("example.com", "rsa2", False),
        ("example.com", "ed2", False),
    ]
    assert out.split(b"\r\nFrom: ", 1)[1] == stored.split(b"\r\nFrom: ", 1)[1]
    assert resign_stale(out, new, now=later) is None
    assert resign_stale(stored, DKIMConfig(keys=(key("example.net", "n"),)), now=later) is None


def test_a_signature_by_a_key_replaced_under_its_selector_is_made_anew() -> None:
    """A private key replaced in place (same d=, s= and a=, the new public key
    published under that name): the signature the old key made is told by its key id
    and made anew, with the other domain's; a message signed before signatures carried
    a key id goes as it is, nothing telling which key made it."""
    later = NOW + timedelta(hours=1)
    stored = prepare(email(), now=NOW, dkim=DKIM).data
    assert [t["mailstrom_key_id"] for t in signature_tags(stored)] == [
        k.key_id() for k in DKIM.keys
    ]
    rsa, ed = DKIM.keys
    replaced = DKIMConfig(
        keys=(
            rsa,
            DKIMKey(
                domain="example.com",
                selector="ed",
                private_key=generate_private_key(ED25519),
                algorithm=ED25519,
            ),
        )
    )
    assert replaced.keys[1].key_id() != ed.key_id()
    out = as_sent(stored, replaced, now=later)
    assert out is not None
    assert [(t["s"], t["mailstrom_key_id"]) for t in signature_tags(out)] == [
        ("rsa", rsa.key_id()),
        ("ed", replaced.keys[1].key_id()),
    ]
    assert out.split(b"\r\nFrom: ", 1)[1] == stored.split(b"\r\nFrom: ", 1)[1]
    assert resign_stale(out, replaced, now=later) is None
    before_key_ids = re.sub(rb"mailstrom_key_id=[^;]*;[ \t\r\n]*", b"", stored)
    assert resign_stale(before_key_ids, DKIM, now=later) is None
    assert b"mailstrom_key_id" not in before_key_ids
    assert resign_stale(before_key_ids, replaced, now=later) is None
    # Still taken for ours: a selector rotated away is seen as before.
    rotated = DKIMConfig(keys=(rsa, key("example.com", "ed2", ED25519)))
    assert resign_stale(before_key_ids, rotated, now=later) is not None


def test_a_signature_of_a_subdomain_whose_keys_were_removed_is_made_by_the_parent_s() -> None:
    """Mail from news.example.com, signed by that subdomain's keys; they were removed
    while it waited, example.com's kept. It was sent with the subdomain's signatures
    (no key of d= itself configured: taken for another's), which fail once their
    records are gone. It is signed as send_email would sign it now: by example.com's."""
    later = NOW + timedelta(days=30)
    news = dual("news.example.com")
    stored = prepare(
        email(from_="a@news.example.com"), now=NOW, dkim=DKIMConfig(keys=(*DKIM.keys, *news.keys))
    ).data
    assert [t["d"] for t in signature_tags(stored)] == ["news.example.com"] * 2
    out = as_sent(stored, DKIM, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
    ]
    assert out.split(b"\r\nFrom: ", 1)[1] == stored.split(b"\r\nFrom: ", 1)[1]
    assert resign_stale(out, DKIM, now=later) is None
    # The subdomain's keys still there, or no key of it nor of a parent: as it is.
    assert resign_stale(stored, DKIMConfig(keys=(*DKIM.keys, *news.keys)), now=later) is None
    assert resign_stale(stored, dual("example.net"), now=later) is None
    # A subdomain signature by the application's own key, below the parent's ones by
    # keys configured now: no rotation, the message goes as it is.
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=news.example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n"
        b"From: a@news.example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    own = prepare(raw, now=NOW, dkim=DKIM).data
    assert [t["d"] for t in signature_tags(own)] == ["example.com"] * 2 + ["news.example.com"]
    assert resign_stale(own, DKIM, now=later) is None


def test_a_parent_s_signature_whose_keys_were_removed_is_made_by_the_subdomain_s() -> None:
    """Mail from news.example.com, signed by example.com's keys (the subdomain had none);
    they were removed while it waited and news.example.com's added. It was sent with the
    parent's signatures (no key of d= nor of a parent of it: taken for another's), which
    fail once their records are gone, and none by the keys that sign it now. It is
    signed as send_email would sign it now: by news.example.com's."""
    later = NOW + timedelta(days=30)
    news = dual("news.example.com")
    stored = prepare(email(from_="a@news.example.com"), now=NOW, dkim=DKIM).data
    assert [t["d"] for t in signature_tags(stored)] == ["example.com"] * 2
    out = as_sent(stored, news, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("news.example.com", "rsa"),
        ("news.example.com", "ed"),
    ]
    assert out.split(b"\r\nFrom: ", 1)[1] == stored.split(b"\r\nFrom: ", 1)[1]
    assert resign_stale(out, news, now=later) is None
    # The parent's keys kept beside the subdomain's: its signatures still verify.
    assert resign_stale(stored, DKIMConfig(keys=(*DKIM.keys, *news.keys)), now=later) is None
    # Mail from another subdomain, or with a From the subdomain's keys do not sign: no
    # key configured now signs it; its signatures go as they are, while not expired (a
    # record may still be published; one that fails counts as none, RFC 6376 §6.1).
    shop = prepare(email(from_="a@shop.example.com"), now=NOW, dkim=DKIM).data
    assert resign_stale(shop, news, now=later) is None
    assert resign_stale(stored, dual("example.net"), now=later) is None
    expiring = prepare(
        email(from_="a@shop.example.com"), now=NOW, dkim=dual("example.com", expire=DAY)
    ).data
    found = resign_stale(expiring, news, now=NOW + 2 * DAY)
    assert found is not None and b"DKIM-Signature" not in found[0]
    assert found[1] == DKIMStatus(
        reason="its signatures had expired (x=) and no key of example.com is configured now"
    )
    # The application's own signature of the parent, below ours by the subdomain's keys
    # configured now: no rotation, and it stays when ours are made anew for their x=.
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n"
        b"From: a@news.example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    own = prepare(raw, now=NOW, dkim=news).data
    assert [t["d"] for t in signature_tags(own)] == ["news.example.com"] * 2 + ["example.com"]
    assert resign_stale(own, news, now=later) is None
    # Another subdomain's keys too: ours are by news.example.com's, so that is the app's.
    shops = DKIMConfig(keys=(*news.keys, *dual("shop.example.com").keys))
    assert resign_stale(own, shops, now=later) is None
    news_expiring = dual("news.example.com", expire=DAY)
    own = prepare(raw, now=NOW, dkim=news_expiring).data
    out = as_sent(own, news_expiring, now=NOW + 2 * DAY)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("news.example.com", "rsa"),
        ("news.example.com", "ed"),
        ("example.com", "app1"),
    ]


def test_a_message_from_several_domains_is_signed_anew_by_the_keys_of_each() -> None:
    """Mail from news.example.com and shop.example.com (two From mailboxes, a Sender)
    signed by example.com's keys; they were removed while it waited and both
    subdomains' added. send_email now signs it by the keys of every From domain; the
    worker signed it anew by those of the first From domain alone. And with
    news.example.com's keys kept and only shop.example.com's added, the parent's
    signature (ours, for the shop mailbox) was taken for the application's own."""
    later = NOW + timedelta(days=30)
    news, shop = dual("news.example.com"), dual("shop.example.com")
    both = DKIMConfig(keys=(*news.keys, *shop.keys))
    message = email(from_=["a@news.example.com", "b@shop.example.com"], sender="d@example.com")
    now_signed = [(s.domain, s.selector) for s in prepare(message, now=later, dkim=both).dkim]
    assert now_signed == [
        ("news.example.com", "rsa"),
        ("news.example.com", "ed"),
        ("shop.example.com", "rsa"),
        ("shop.example.com", "ed"),
    ]
    stored = prepare(message, now=NOW, dkim=DKIM).data
    assert [t["d"] for t in signature_tags(stored)] == ["example.com"] * 2
    out = as_sent(stored, both, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == now_signed
    assert out.split(b"\r\nFrom: ", 1)[1] == stored.split(b"\r\nFrom: ", 1)[1]
    assert resign_stale(out, both, now=later) is None
    # Signed by news.example.com's and example.com's (for the shop mailbox); the
    # parent's removed since, shop.example.com's added: the parent's go, shop's sign.
    first = prepare(message, now=NOW, dkim=DKIMConfig(keys=(*news.keys, *DKIM.keys))).data
    assert [t["d"] for t in signature_tags(first)] == ["news.example.com"] * 2 + ["example.com"] * 2
    out = as_sent(first, both, now=later)
    assert out is not None
    assert sorted((t["d"], t["s"]) for t in signature_tags(out)) == sorted(now_signed)
    assert resign_stale(out, both, now=later) is None
    # The application's own signature of the parent, below ours by the keys of both
    # From domains configured now: no rotation.
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n"
        b"From: a@news.example.com, b@shop.example.com\r\nSender: d@example.com\r\n"
        b"To: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    own = prepare(raw, now=NOW, dkim=both).data
    assert [t["d"] for t in signature_tags(own)][-1] == "example.com"
    assert resign_stale(own, both, now=later) is None


def test_the_application_s_own_signature_of_the_domain_is_no_rotation() -> None:
    """A raw message the application signed itself, with a selector of its own for the
    domain mailstrom signs too: its signature is below the ones ``sign()`` puts on top,
    and is no key rotated away. It goes out as queued, not stripped and signed anew at
    every attempt."""
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n"
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
        b"Date: Mon, 05 Jan 2026 12:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nbody\r\n"
    )
    stored = prepare_for(
        Config(dkim=DKIM),
        raw,
        envelope_from="a@example.com",
        envelope_to=["b@example.org"],
        now=NOW,
    ).data
    assert [(t["d"], t["s"]) for t in signature_tags(stored)] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
        ("example.com", "app1"),
    ]
    assert resign_stale(stored, DKIM, now=NOW + timedelta(minutes=5)) is None
    # Nor is its own Ed25519 signature, beside the current keys' of both algorithms.
    ed = raw.replace(
        b"a=rsa-sha256; d=example.com; s=app1", b"a=ed25519-sha256; d=example.com; s=app2"
    )
    own_ed = prepare(ed, now=NOW, dkim=DKIM).data
    assert [t["s"] for t in signature_tags(own_ed)] == ["rsa", "ed", "app2"]
    assert resign_stale(own_ed, DKIM, now=NOW + timedelta(minutes=5)) is None


def test_the_application_s_own_signature_of_a_rotated_domain_stays() -> None:
    """The application signed a raw message with a selector of its own of the domain
    mailstrom signs; mailstrom's keys of that domain were rotated while it waited. Every
    signature of the domain was by a key not configured now, so the application's went
    with ours, though nothing of ours can make it again. Ours are the fields one sign()
    put on top (its layout, one t=); only those are made anew."""
    later = NOW + timedelta(days=30)
    rotated = DKIMConfig(keys=(key("example.com", "rsa2", RSA), key("example.com", "ed2", ED25519)))
    for app in (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n",
        # Made by mailstrom's own sign() too, a minute before send_email: another t=.
        sign(
            b"From: a@example.com\r\n\r\nbody\r\n",
            [key("example.com", "app1", ED25519)],
            now=NOW - timedelta(minutes=1),
        )[0].split(b"From:")[0],
    ):
        raw = app + b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
        stored = prepare(raw, now=NOW, dkim=DKIM).data
        assert [t["s"] for t in signature_tags(stored)] == ["rsa", "ed", "app1"]
        out = as_sent(stored, rotated, now=later)
        assert out is not None
        assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
            ("example.com", "rsa2"),
            ("example.com", "ed2"),
            ("example.com", "app1"),
        ]
        kept = unlike_ours(app)  # one in sign()'s layout is given a second space
        assert out[out.index(kept) :] == stored[stored.index(kept) :]
        assert resign_stale(out, rotated, now=later) is None
    # Mailstrom did not sign it (no key of the domain then): the signatures on top are
    # the application's, in sign()'s layout or not; none is ours, all go as they came.
    for message in (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\nFrom: a@example.com\r\nTo: b@example.org\r\n\r\nbody\r\n",
        raw,
    ):
        unsigned = prepare(message, now=NOW, dkim=dual("example.net")).data
        assert resign_stale(unsigned, rotated, now=later) is None


def test_the_application_s_own_signature_stays_when_ours_are_made_anew_for_x() -> None:
    """The application's own signatures (a selector of its own of the domain mailstrom
    signs, and one of a subdomain without keys) below ours: when ours are made anew
    because their x= comes near, all the domain's signatures went, the application's
    own too, which nothing of ours can make again."""
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=shop.example.com; s=app2; c=relaxed/relaxed;"
        b" h=from; bh=abc=; b=xyz=\r\n"
        b"From: a@shop.example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    stored = prepare(raw, now=NOW, dkim=EXPIRING).data
    later = NOW + timedelta(days=2)
    out = as_sent(stored, EXPIRING, now=later)
    assert out is not None
    assert [(t["d"], t["s"]) for t in signature_tags(out)] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
        ("example.com", "app1"),
        ("shop.example.com", "app2"),
    ]
    app = raw[: raw.index(b"From:")]
    assert out[out.index(app) :] == stored[stored.index(app) :]
    assert {t["t"] for t in signature_tags(out)[:2]} == {str(int(later.timestamp()))}
    assert resign_stale(out, EXPIRING, now=later) is None


def test_an_absurd_expiry_in_a_stored_signature_is_no_error() -> None:
    stored = prepare(email(), now=NOW, dkim=EXPIRING).data
    later = NOW + timedelta(days=3)
    huge = re.sub(rb"; x=[0-9]+", b"; x=" + b"9" * 5000, stored)
    assert resign_stale(huge, EXPIRING, now=later) is None  # far ahead: kept
    # The first signature's x= is past, the second's far ahead: the domain's two
    # signatures are made anew, none is kept twice.
    at = stored.index(b"; x=", stored.index(b"DKIM-Signature:", 1))
    second = stored[:at] + b"; x=" + b"9" * 5000 + stored[at + 14 :]
    out = as_sent(second, EXPIRING, now=later)
    assert out is not None and [t["s"] for t in signature_tags(out)] == ["rsa", "ed"]
    assert b"9" * 30 not in out


def test_the_application_s_own_signatures_looked_at_are_bounded() -> None:
    """A raw message may bring its own DKIM-Signature fields by the hundred (up to the
    header section's limits), tag names packed in their values: each attempt looked at
    every one, and a Python loop went over every "d=", "s=", "a=" and "x=" in each (some
    0.2 s of the worker's event loop per attempt for 1 MiB of them). Below ours, 16 are
    looked at; beyond them the fields go as they came, an expired one too (every
    receiver counts it as none)."""
    expired = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=x; x=2; b=AAAA\r\n"
    packed = b"DKIM-Signature: " + b"ad=as=ax=aa=" * 80 + b"\r\n"
    rest = b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    later = NOW + timedelta(minutes=1)
    stored = prepare(packed * 15 + expired + rest, now=NOW, dkim=DKIM).data
    found = resign_stale(stored, DKIM, now=later)
    assert found is not None and expired not in found[0]
    after = stored.index(expired) + len(expired)
    assert found[0].endswith(packed * 15 + stored[after:])
    stored = prepare(packed * 16 + expired + rest, now=NOW, dkim=DKIM).data
    assert resign_stale(stored, DKIM, now=later) is None
    stored = prepare(packed * 900 + rest, now=NOW, dkim=DKIM).data
    assert resign_stale(stored, DKIM, now=later) is None


@pytest.mark.parametrize(
    "field",
    [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=x; x=2; b=AAAA\r\n",
        b"DKIM-Signature:d=example.net;s=x;a=rsa-sha256;x=2\r\n",
        b"DKIM-Signature: z=From:ad=y|To:as=z; h=ax=:aa=; d=\r\n\t example.net;\r\n"
        b" s=\t\tx;   "
        + b" " * 300
        + b"a=rsa-sha256;\r\n"
        + b"      " * 50
        + b"\r\n x=2; b=AAAA\r\n",
        b"DKIM-Signature: bh=ad=as=ax=aa=;" + b"ad=as=ax=aa=" * 40 + b";d=example.net; s=x;\r\n"
        b" a=rsa-sha256; x=2\r\n",
    ],
)
def test_the_tags_of_a_field_of_any_shape_are_found(field: bytes) -> None:
    """Tags after FWS of any length, tag names inside other tags' values (which no colon
    or semicolon precedes): found as RFC 6376 §3.2 writes them."""
    stored = prepare(
        field + b"From: shop@example.com\r\nTo: bob@example.org\r\n\r\nbody\r\n",
        now=NOW,
        dkim=DKIM,
    ).data
    found = resign_stale(stored, DKIMConfig(keys=(key("example.edu", "e"),)), now=NOW)
    assert found is not None  # the field's x= is past: it goes, ours stay
    assert field not in found[0]
    assert [(s.domain, s.selector) for s in found[1].signatures] == [
        ("example.com", "rsa"),
        ("example.com", "ed"),
    ]


@pytest.mark.parametrize("sender", ["other.test", "example.com"])
def test_a_field_of_the_message_in_our_layout_is_not_taken_for_ours(sender: str) -> None:
    """A raw message may bring a DKIM-Signature field written as sign() writes its own,
    on top (send_email signed nothing: no key for other.test) or below ours with their
    t= (guessed: the second of send_email), its d= another domain the configuration has
    keys for and its s= none of them. The worker took it for ours, by a key rotated
    away, and signed the message with that domain's keys, which send_email had refused
    to sign it with. prepare() leaves no field of the message in that layout: one more
    space after the colon, which the field's own relaxed canonicalisation ignores."""
    other = dual("example.net")
    dkim = DKIMConfig(keys=(*DKIM.keys, *other.keys))
    forged = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net; s=old;\r\n"
        b" t=%d; h=from:to; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n b=AAAA\r\n"
    ) % int(NOW.timestamp())
    raw = forged + f"From: a@{sender}\r\nTo: bob@example.org\r\n\r\nbody\r\n".encode()
    stored = prepare(raw, now=NOW, dkim=dkim)
    assert [s.domain for s in stored.dkim] == (
        [] if sender == "other.test" else ["example.com"] * 2
    )
    assert resign_stale(stored.data, dkim, now=NOW + timedelta(minutes=1)) is None
    assert forged.replace(b": v=1;", b":  v=1;") in stored.data


@pytest.mark.parametrize("sender", ["other.test", "example.com"])
@pytest.mark.parametrize("expiry", [b" x=1;", b""])
def test_a_field_of_the_message_naming_one_of_our_keys_is_not_taken_for_ours(
    sender: str, expiry: bytes
) -> None:
    """A raw message may bring a DKIM-Signature field naming one of our keys (its d=,
    s= and a=), in any layout, with an x= past or no RSA signature beside it. The worker
    took any such field for one of ours, signed the message anew for its domain (x=
    near, or no RSA signature by a key configured), and so signed with example.net's
    keys mail that send_email had not signed with them. Only ours (on top, made by
    sign()) are made anew; the message's own go as they came (the expired one dropped)."""
    other = dual("example.net")
    dkim = DKIMConfig(keys=(*DKIM.keys, *other.keys))
    forged = b"DKIM-Signature: v=1; d=example.net; s=ed; a=ed25519-sha256;%s b=AAAA\r\n" % expiry
    raw = forged + f"From: a@{sender}\r\nTo: bob@example.org\r\n\r\nbody\r\n".encode()
    stored = prepare(raw, now=NOW, dkim=dkim)
    found = resign_stale(stored.data, dkim, now=NOW + timedelta(minutes=1))
    if found is not None:
        assert found[0] == stored.data.replace(forged, b"")
    assert b"d=example.net; s=rsa" not in (stored.data if found is None else found[0])
    assert (found is None) == (expiry == b"")


def test_an_expired_signature_of_a_domain_with_keys_is_not_said_to_have_none() -> None:
    """A message send_email left unsigned (no key for other.test) whose own signature,
    of example.com (which has keys), had expired: it goes, and the status said "no key
    of example.com is configured now", which is false; it names no such domain now."""
    own = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app1; x=2; h=from; b=AAAA\r\n"
    raw = own + b"From: a@other.test\r\nTo: bob@example.org\r\n\r\nbody\r\n"
    stored = prepare(raw, now=NOW, dkim=DKIM).data
    found = resign_stale(stored, DKIM, now=NOW)
    assert found is not None and own not in found[0]
    assert found[1] == DKIMStatus(reason="its signatures had expired (x=)")


def test_a_field_in_our_layout_queued_without_dkim_is_not_taken_for_ours() -> None:
    """Queued while DKIM was not configured, sent by a worker that has keys: a field the
    raw message brought on top in sign()'s layout was taken for ours by a key rotated
    away, and the message signed with its d='s keys. prepare() gives it the second
    space whether or not it signs."""
    forged = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=old;\r\n"
        b" t=1; h=from:to; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n b=AAAA\r\n"
    )
    raw = forged + b"From: a@other.test\r\nTo: bob@example.org\r\n\r\nbody\r\n"
    stored = prepare(raw, now=NOW).data
    assert resign_stale(stored, DKIM, now=NOW) is None
    assert stored.startswith(unlike_ours(forged))


# --- what a worker keeps of a message it signed anew ---------------------------------------


def test_a_message_signed_anew_is_sent_again_as_made_until_it_is_stale() -> None:
    """Each attempt of a message signed anew sends the bytes of the first (same t=, no
    new signature), until their own x= comes near: then it is signed again, once."""
    stored = prepare(email(), now=NOW, dkim=EXPIRING).data
    resigned = ResignedMessages(EXPIRING)
    first_at = NOW + timedelta(days=2)
    first = resigned.sign("m1", stored, now=first_at)
    assert first is not None and first[:2] == resign_stale(stored, EXPIRING, now=first_at)
    for later in (timedelta(minutes=5), timedelta(hours=22, minutes=59)):
        assert resigned.sign("m1", stored, now=first_at + later) == first
    # Within RESIGN_BEFORE of the x= made at the first: made anew, and kept in its place.
    again_at = first_at + timedelta(hours=23, minutes=1)
    again = resigned.sign("m1", stored, now=again_at)
    assert again is not None and again != first
    assert {t["t"] for t in signature_tags(again[0])} == {str(int(again_at.timestamp()))}
    assert resigned.sign("m1", stored, now=again_at + timedelta(hours=1)) == again
    # Fresh bytes are not kept: nothing to sign again.
    assert (
        resigned.sign("m2", prepare(email(), now=again_at, dkim=EXPIRING).data, now=again_at)
        is None
    )
    assert len(resigned) == 1


def test_ours_kept_beside_those_made_anew_are_made_anew_when_their_x_comes_near() -> None:
    """A message signed by example.com and example.net: example.net's keys rotated, so
    its signatures were made anew at the first attempt and example.com's kept, with
    their t= of before. At a later attempt the worker asks of those bytes again; the
    kept ones, no longer in one run with ours on top, must still count as ours: their x=
    near, the message is signed anew, not sent with them about to expire."""
    both = DKIMConfig(keys=(*DKIM.keys, *dual("example.net").keys), expire=DAY)
    message = email(from_=["a@example.com", "b@example.net"], sender="a@example.com")
    stored = prepare(message, now=NOW, dkim=both).data
    rotated = DKIMConfig(
        keys=(*DKIM.keys, key("example.net", "rsa2", RSA), key("example.net", "ed2", ED25519)),
        expire=DAY,
    )
    resigned = ResignedMessages(rotated)
    first_at = NOW + timedelta(hours=1)
    first = resigned.sign("m1", stored, now=first_at)
    assert first is not None
    assert [(t["d"], t["s"]) for t in signature_tags(first[0])][:4] == [
        ("example.net", "rsa2"),
        ("example.net", "ed2"),
        ("example.com", "rsa"),
        ("example.com", "ed"),
    ]
    assert resigned.sign("m1", stored, now=first_at + timedelta(hours=1)) == first
    # example.com's x= (a day after NOW) within RESIGN_BEFORE: all made anew.
    near = NOW + DAY - timedelta(minutes=30)
    again = resigned.sign("m1", stored, now=near)
    assert again is not None and again != first
    assert {t["t"] for t in signature_tags(again[0])[:4]} == {str(int(near.timestamp()))}


def test_what_is_kept_is_bounded_and_taken_only_for_its_own_bytes() -> None:
    rotated = DKIMConfig(keys=(key("example.com", "rsa2", RSA), key("example.com", "ed2", ED25519)))
    stored = [prepare(email(subject=f"n{n}"), now=NOW, dkim=DKIM).data for n in range(3)]
    resigned = ResignedMessages(rotated, size=2)
    made = [resigned.sign(f"m{n}", data, now=NOW) for n, data in enumerate(stored)]
    assert all(m is not None for m in made) and len(resigned) == 2
    later = NOW + timedelta(hours=1)
    assert resigned.sign("m2", stored[2], now=later) == made[2]
    # m0 went first: signed anew (another t=).
    m0 = resigned.sign("m0", stored[0], now=later)
    assert m0 is not None and m0 != made[0]
    # Other bytes under a kept id are signed for themselves, not sent as the kept ones.
    other = resigned.sign("m2", stored[1], now=later)
    assert other is not None and other[:2] == resign_stale(stored[1], rotated, now=later)
