"""prepare()'s signatures checked by independent verifiers, which find the public keys on
the loopback DNS server: dkimpy for every message, Perl's Mail::DKIM as well for fixed
messages, and dkimpy against random ones (white space, folding, empty lines, UTF-8) where a
canonicalisation mistake would show."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import dkim as dkimpy
import nacl.encoding
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailstrom import Attachment, Email
from mailstrom.dkim import DKIMConfig, DKIMKey, generate_private_key
from mailstrom.dkim.signing import resign_stale
from mailstrom.doctor import DNSResolver, Status
from mailstrom.doctor.dkim import DKIMKey as DoctorKey
from mailstrom.doctor.dkim import judge_dkim
from mailstrom.message import prepare
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.dkim import (
    assert_all_fail,
    assert_all_pass,
    dual,
    publish,
    signature_tags,
    verify_dkimpy,
    verify_mail_dkim,
)

DKIM = dual("example.com", expire=timedelta(days=3))
NOW = datetime.now(UTC)  # x= must lie ahead of the verifiers' clock


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    """One loopback DNS server for the module (hypothesis reruns a test many times)."""
    with LoopbackDNS() as server:
        publish(server, DKIM)
        yield server


def stdlib_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = "bob@example.org"
    message["Subject"] = "Grüße"
    message.set_content("Grüße aus Köln\n", cte="8bit")
    message.add_attachment(b"\x00\x01binary", maintype="application", subtype="octet-stream")
    return message


FIXED = {
    "text": Email(from_="shop@example.com", to="bob@example.org", subject="Hi", text="Hello\n"),
    "empty body": Email(from_="shop@example.com", to="bob@example.org", text=""),
    "html+attachments+provider headers": Email(
        from_="Shop <shop@news.example.com>",
        to=["Bob <bob@example.org>", "carol@example.org"],
        cc="dave@example.org",
        reply_to="help@example.com",
        subject="A subject long enough to be folded by the renderer, " * 3,
        text="Plain\n",
        html="<p>HTML</p>\n",
        attachments=[Attachment(filename="a.pdf", content=bytes(range(256)) * 4)],
        unsubscribe_url="https://example.com/unsubscribe?token=" + "x" * 120,
        unsubscribe_mailto="mailto:unsubscribe@example.com?subject=stop",
        feedback_id="spring:c42:newsletter:shop",
        auto_submitted="auto-generated",
    ),
    "utf-8 headers": Email(
        from_="Zoë <zoë@example.com>", to="bob@example.org", subject="Ünïcödé", text="ü\n"
    ),
    "raw 8-bit": (
        "From: shop@example.com\r\nTo: bob@example.org\r\nSubject:  spaced\t out \r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße \t aus Köln  \r\n\r\n\r\n"
    ).encode(),
    "raw with LF line ends and folding": (
        b"From: shop@example.com\nTo: a@example.org,\n\tb@example.org\nSubject: x\n\nbody\n"
    ),
    "EmailMessage": stdlib_message(),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_signatures_verify(dns: LoopbackDNS, name: str) -> None:
    p = prepare(FIXED[name], now=NOW, dkim=DKIM)  # type: ignore[arg-type]
    assert len(p.dkim) == 2
    assert_all_pass(p.data, dns)


def test_an_expired_signature_fails(dns: LoopbackDNS) -> None:
    p = prepare(FIXED["text"], now=NOW - timedelta(days=4), dkim=DKIM)  # type: ignore[arg-type]
    assert_all_fail(p.data, dns)


# --- canonicalisation edges --------------------------------------------------------------

_HEAD = b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: edges\r\n"
EDGES = {
    "no body at all": _HEAD,
    "body of only line ends": _HEAD + b"\r\n\r\n\r\n\r\n",
    "lines of only white space": _HEAD + b"\r\n \t\r\n  \r\nx\r\n \r\n\t\r\n",
    "body of only white space, no line end": _HEAD + b"\r\n \t ",
    "last line with white space, no line end": _HEAD + b"\r\nhello \t",
    "white space after the last line end": _HEAD + b"\r\nabc\r\n  ",
    "folded field with an empty continuation": (
        b"From: shop@example.com\r\nTo: bob@example.org,\r\n \t\r\n carol@example.org\r\n"
        b"Subject:\t  spaced \t out  \r\n\r\nbody\r\n"
    ),
    "repeated List-Unsubscribe, signed bottom-up": (
        _HEAD + b"List-Unsubscribe: <mailto:u@example.com>\r\n"
        b"List-Unsubscribe: <https://example.com/u>\r\n\r\nbody\r\n"
    ),
    # prepare() makes a lone CR or LF a CRLF before it signs: the bytes signed are those
    # sent, whichever line end a receiver would have made of them.
    "lone CR and LF in the body": _HEAD + b"\r\na\rb\nc\r\nd\r",
    "white space before the colons": (
        b"From : shop@example.com\r\nTo\t: bob@example.org\r\nSubject \t:x\r\n\r\nbody\r\n"
    ),
    "RFC 2047 subject": _HEAD.replace(b"edges", b"=?utf-8?q?Gr=C3=BC=C3=9Fe?= =?utf-8?b?w7w=?=")
    + b"\r\nbody\r\n",
    "two Received fields, not signed": (
        b"Received: from a.example.org by b.example.org; Mon, 1 Jan 2035 00:00:00 +0000\r\n"
        b"Received: from c.example.org\r\n by a.example.org; Mon, 1 Jan 2035 00:00:00 +0000\r\n"
        + _HEAD
        + b"\r\nbody\r\n"
    ),
    "long 8-bit lines": Email(
        from_="shop@example.com", to="bob@example.org", subject="s", text="Grüße " * 400
    ),
}


@pytest.mark.parametrize("name", list(EDGES))
def test_canonicalisation_edges_verify_as_sent(dns: LoopbackDNS, name: str) -> None:
    """Relaxed canonicalisation's corners (RFC 6376 §3.4.2, §3.4.4), checked on the bytes
    a receiver gets: the SMTP session ends a last line that has no line end."""
    data = prepare(EDGES[name], now=NOW, dkim=DKIM).data  # type: ignore[arg-type]
    assert_all_pass(data if data.endswith(b"\r\n") else data + b"\r\n", dns)


# --- random messages ---------------------------------------------------------------------

WORDS = st.text("abcxyzäö€ \t", min_size=0, max_size=12)
LINES = st.lists(st.text("abc é\t", max_size=30), max_size=8)


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    subject = draw(WORDS).strip("\t ")
    folded = draw(st.booleans())
    extra = draw(st.lists(WORDS, max_size=3))
    body = "\r\n".join(draw(LINES)) + draw(st.sampled_from(["", "\r\n", "\r\n\r\n", "  "]))
    lines = [
        "From: Shop <shop@example.com>",
        "To: bob@example.org," + ("\r\n\t" if folded else " ") + "carol@example.org",
        f"Subject: {subject}" + draw(st.sampled_from(["", " ", "\t"])),
        *(f"X-Extra:{value}" for value in extra),
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(raw_messages())
def test_random_messages_verify(dns: LoopbackDNS, data: bytes) -> None:
    p = prepare(data, now=NOW, dkim=DKIM)
    verdicts = verify_dkimpy(p.data, dns)
    assert [v.result for v in verdicts] == ["pass", "pass"], (p.data, verdicts)


# --- fields added on the way -------------------------------------------------------------

ADDED_FIELDS = [
    b"Reply-To: thief@attacker.example\r\n",  # the answers would go to the attacker
    b"To: victim@example.org\r\n",
    b"Cc: victim@example.org\r\n",
    b"From: ceo@example.com\r\n",
    b"Subject: Urgent: pay this invoice\r\n",
    b"Date: Mon, 1 Jan 2035 00:00:00 +0000\r\n",
    b"Message-ID: <other@example.com>\r\n",
    b"Content-Type: text/html\r\n",  # above the signed one: readers take the first
    b"MIME-Version: 1.0\r\n",
]
LIST_FIELDS = [
    b"List-Id: <shop.lists.example.org>\r\n",
    b"List-Unsubscribe: <mailto:leave@lists.example.org>\r\n",
    b"Sender: shop-bounces@lists.example.org\r\n",
    b"Precedence: list\r\n",
]


def add_field(data: bytes, field: bytes, where: str) -> bytes:
    at = data.index(b"\r\nFrom:") + 2 if where == "above" else data.index(b"\r\n\r\n") + 2
    return data[:at] + field + data[at:]


@pytest.mark.parametrize("field", ADDED_FIELDS, ids=lambda f: f.split(b":")[0].decode())
@pytest.mark.parametrize("where", ["above", "below"])
def test_a_field_added_after_signing_breaks_the_signatures(
    dns: LoopbackDNS, field: bytes, where: str
) -> None:
    """Whoever holds one signed message must not be able to add a field that changes
    what the reader sees or where the answer goes, a Reply-To, a second To or
    Content-Type, and keep a valid signature: these are listed in h= once more than they
    occur (RFC 6376 §8.15), so an added one breaks the signature wherever it is put."""
    data = prepare(FIXED["text"], now=NOW, dkim=DKIM).data  # type: ignore[arg-type]
    assert_all_fail(add_field(data, field, where), dns)


BARE = b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: bare\r\n\r\nPGI+aGk8L2I+\r\n"
"""A raw message without MIME fields: its body is read as US-ASCII text (RFC 2045 §5.2)."""
FIELDS_A_BARE_MESSAGE_LACKS = [
    b"Content-Type: text/html\r\n",
    b"Content-Transfer-Encoding: base64\r\n",  # the body above becomes "<b>hi</b>"
    b"MIME-Version: 1.0\r\n",
    b"Cc: victim@example.org\r\n",
    b"Reply-To: thief@attacker.example\r\n",
    b"In-Reply-To: <thread@example.org>\r\n",
    b"References: <thread@example.org>\r\n",
]


@pytest.mark.parametrize(
    "field", FIELDS_A_BARE_MESSAGE_LACKS, ids=lambda f: f.split(b":")[0].decode()
)
@pytest.mark.parametrize("where", ["above", "below"])
def test_a_field_the_message_lacked_breaks_the_signatures_when_added(
    dns: LoopbackDNS, field: bytes, where: str
) -> None:
    """A raw message without Content-Type, Content-Transfer-Encoding or MIME-Version
    was signed without naming them in h=, so a relay could add them, changing how the
    body is read (as HTML, as base64), and the signature still verified: absent, each is
    listed once (RFC 6376 §8.15, §5.4.2), so that an added one breaks it."""
    data = prepare(BARE, now=NOW, dkim=DKIM).data
    assert_all_pass(data, dns)
    assert_all_fail(add_field(data, field, where), dns)


def test_what_a_mailing_list_adds_keeps_the_signatures(dns: LoopbackDNS) -> None:
    """A list that passes a message on unchanged adds List-* fields and often a Sender:
    the signature must survive them."""
    data = prepare(FIXED["text"], now=NOW, dkim=DKIM).data  # type: ignore[arg-type]
    for field in LIST_FIELDS:
        data = add_field(data, field, "above")
    assert_all_pass(data, dns)


def test_what_relays_add_keeps_the_signatures(dns: LoopbackDNS) -> None:
    """Every relay on the way puts a Received field on top, the final one a Return-Path
    (RFC 5321 §4.4): neither may be signed, even when the input already had some."""
    raw = (
        b"Received: from app.example.com by mx.example.com; Mon, 1 Jan 2035 00:00:00 +0000\r\n"
        b"Return-Path: <old@example.com>\r\n"
        b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    )
    data = prepare(raw, now=NOW, dkim=DKIM).data
    assert all(
        name not in tags["h"].split(":")
        for tags in signature_tags(data)
        for name in ("received", "return-path")
    )
    for field in (
        b"Received: from mx.example.com by mx.example.org; Mon, 1 Jan 2035 00:00:01 +0000\r\n",
        b"Return-Path: <bounces@example.com>\r\n",
    ):
        data = field + data
    assert_all_pass(data, dns)


# --- key forms ---------------------------------------------------------------------------


def test_a_dknewkey_seed_file_signs_what_dkimpy_verifies(dns: LoopbackDNS, tmp_path: Path) -> None:
    """An Ed25519 key kept as dkimpy's dknewkey writes it (the seed's base64, no PEM):
    mailstrom's signature and dkimpy's own, made from the same file, both verify against
    the record mailstrom prints for it."""
    signing = nacl.signing.SigningKey.generate()
    seed = signing.encode(encoder=nacl.encoding.Base64Encoder)
    path = tmp_path / "example.com.seed.key"
    path.write_bytes(seed)
    path.chmod(0o600)
    key = DKIMKey(domain="example.com", selector="seed", private_key=path, algorithm="ed25519")
    record = key.dns_record()
    dns.txt(record.name, record.strings)
    data = prepare(FIXED["text"], now=NOW, dkim=DKIMConfig(keys=(key,))).data  # type: ignore[arg-type]
    assert_all_pass(data, dns, signatures=1)
    theirs = dkimpy.sign(
        data,
        b"seed",
        b"example.com",
        path.read_bytes(),
        signature_algorithm=b"ed25519-sha256",
        include_headers=[b"from", b"to", b"subject"],
    )
    assert_all_pass(theirs + data, dns, signatures=2)


def test_an_expired_signature_made_anew_verifies(dns: LoopbackDNS) -> None:
    """What the worker sends for a message whose x= has passed (resign_stale): the
    signatures made anew verify, a raw message's own signature of another domain (not
    expired) kept."""
    foreign = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=x; c=relaxed/relaxed;\r\n"
        b" t=1; h=from; bh=AAAA; b=AAAA\r\n"
    )
    raw = foreign + b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    for message in (FIXED["text"], raw):
        stored = prepare(message, now=NOW - timedelta(days=4), dkim=DKIM).data  # type: ignore[arg-type]
        assert_all_fail(stored, dns)
        found = resign_stale(stored, DKIM, now=NOW)
        assert found is not None
        fresh, _ = found
        verdicts = verify_dkimpy(fresh, dns)
        assert [v.result for v in verdicts[:2]] == ["pass", "pass"], verdicts
        assert len(verdicts) == (3 if message is raw else 2)


@pytest.mark.parametrize("bits", [1024, 4096])
def test_rsa_keys_of_every_accepted_size_sign_what_verifiers_verify(
    dns_server: LoopbackDNS, bits: int
) -> None:
    """The smallest RSA key accepted (RFC 8301 §3.2's 1024 bits, which dkimpy's default
    minimum takes) and the largest (4096: its record spans four TXT strings)."""
    key = DKIMKey(
        domain="example.com", selector=f"r{bits}", private_key=generate_private_key(bits=bits)
    )
    config = DKIMConfig(keys=(key,))
    publish(dns_server, config)
    data = prepare(FIXED["html+attachments+provider headers"], now=NOW, dkim=config).data  # type: ignore[arg-type]
    assert_all_pass(data, dns_server, signatures=1)


# --- what the doctor says of a published record --------------------------------------------


@pytest.mark.parametrize(
    "tags",
    [
        *("g=foo; ", "g=; ", "g=ab*; ", "g=*; ", ""),
        *("h=sha1 : sha256; ", "s=email : tlsrpt; "),
        *("s=*:email; ", "s=tlsrpt:email; ", "s=email; "),
        *("; ", "n=x ; ; "),
        *("p=~=", "p=~====", "p==~"),
    ],
)
def test_the_doctor_passes_a_record_only_when_both_verifiers_verify_with_it(
    dns_server: LoopbackDNS, tags: str
) -> None:
    """A key record's ``g=`` (RFC 4871's granularity, dropped by RFC 6376) is still applied
    by Mail::DKIM, SpamAssassin's verifier: to an identity with no local part, the ``i=``
    our signatures leave out, only ``*`` matches. And FWS around the colons of its ``h=``
    or ``s=`` list, which RFC 6376 allows, makes Mail::DKIM find neither ``sha256`` nor
    ``email`` there (dkimpy neither for ``s=``); dkimpy takes an ``s=`` list of several
    services as one unknown service, and a record with an empty tag (``;;``) as invalid;
    Mail::DKIM a key with padding beyond its end.
    Such records fail every signature at those receivers, and the doctor said they
    pass."""
    config = DKIMConfig(keys=(dual("example.com").keys[0],))
    record = config.keys[0].dns_record()
    value = record.value.replace("p=", tags + "p=")
    if tags.startswith("p="):  # p= itself, "~" standing for the key's base64
        value = record.value.partition("p=")[0] + tags.replace("~", record.value.split("p=")[1])
    dns_server.txt(record.name, value)
    data = prepare(FIXED["text"], now=NOW, dkim=config).data  # type: ignore[arg-type]
    verdicts = [*verify_mail_dkim(data, dns_server), *verify_dkimpy(data, dns_server)]
    key = config.keys[0]
    pem = key.private_key
    assert isinstance(pem, bytes)
    doctor_key = DoctorKey(domain=key.domain, selector=key.selector, private_key=pem)
    check = judge_dkim(DNSResolver(dns_server.dns_config), doctor_key).check
    passed = all(v.result == "pass" for v in verdicts)
    assert passed == (check.status is Status.PASS), (verdicts, check)
