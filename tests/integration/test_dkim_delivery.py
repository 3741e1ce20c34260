"""DKIM end to end: a message signed at send_email reaches a loopback MX and verifies there,
with keys found only in the loopback DNS server, whatever the path.

Each message is signed with an RSA-2048 and an Ed25519 key and checked as received by two
verifiers that share no code with mailstrom (dkimpy, and Perl's Mail::DKIM for RSA), both
through a receiver offering 8BITMIME and one that does not (where the worker would re-encode
an 8-bit body if the signer had not made it 7-bit first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from mailstrom import (
    Attachment,
    DKIMAlgorithm,
    DKIMSignature,
    DKIMStatus,
    Email,
    MessageStatus,
    RecipientState,
)
from mailstrom.client import Mailstrom
from mailstrom.dkim import DKIMConfig, DKIMKey, generate_private_key, sign
from mailstrom.message import prepare
from mailstrom.policy.retry import RetryPolicy
from mailstrom.stores import MemoryStore, SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import FakeClock, Results, loopback_config
from tests.support.dkim import (
    ED25519,
    RSA,
    assert_all_fail,
    assert_all_pass,
    dual,
    publish,
    signature_tags,
    verify_dkimpy,
)

CONFIG = dual("sender.test")


def text_message(to: str) -> Email:
    # Runs of spaces, a tab and empty lines at the end: what relaxed canonicalisation
    # changes, so a verifier that got it wrong would fail here.
    return Email(
        from_="Shop <shop@sender.test>",
        to=[to],
        subject="Your order  has shipped",
        text="Hello Bob,\n\nyour parcel is on its way.\n\t \nRegards\n\n\n",
        auto_submitted="auto-generated",
    )


def html_with_attachments(to: str) -> Email:
    return Email(
        from_="Shop <shop@sender.test>",
        to=[to],
        cc=[f"Carol <carol@{to.partition('@')[2]}>"],
        reply_to=["help@sender.test"],
        subject="Ihre Rechnung \u2013 vielen Dank",
        text="Grüße aus Köln\n",
        html='<p>Grüße <img src="cid:logo@shop"></p>\n',
        attachments=[
            Attachment(
                filename="logo.png",
                content=bytes(range(256)) * 8,
                content_type="image/png",
                inline=True,
                content_id="logo@shop",
            ),
            Attachment(filename="Rechnung März.pdf", content=b"%PDF-1.4\n" + bytes(range(256))),
        ],
        unsubscribe_url="https://sender.test/u?t=abc",
        unsubscribe_mailto="unsubscribe@sender.test",
        feedback_id="march:c42:invoice:shop",
    )


def utf8_message(to: str) -> Email:
    # A UTF-8 local part: the message needs SMTPUTF8 and its headers are raw UTF-8.
    return Email(
        from_="Bücherstube <bücher@sender.test>",
        to=[f"Zoë <{to}>"],
        subject="Ihre Bestellung über 30 €",
        text="Vielen Dank für Ihre Bestellung!\n",
    )


def raw_eight_bit(to: str) -> bytes:
    return (
        "From: Shop <shop@sender.test>\r\n"
        f"To: {to}\r\n"
        "Subject: raw 8bit\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Grüße  aus Köln \r\n"
        "\r\n"
    ).encode()


def raw_dot_lines(to: str) -> bytes:
    # Lines the SMTP session dot-stuffs (RFC 5321 §4.5.2), one a lone dot, and a last line
    # without a line end, which the session ends: the receiver undoes the one and keeps
    # the other, and neither may change what was signed.
    return (
        "From: Shop <shop@sender.test>\r\n"
        f"To: {to}\r\n"
        "Subject: dots\r\n"
        "\r\n"
        ".\r\n"
        "..two dots\r\n"
        ".leading dot\r\n"
        "last line"
    ).encode()


MESSAGES: dict[str, Callable[[str], Email | bytes]] = {
    "text": text_message,
    "html+attachments": html_with_attachments,
    "smtputf8": utf8_message,
    "raw 8-bit body": raw_eight_bit,
    "dot lines, no final line end": raw_dot_lines,
}


@pytest.fixture
def receivers(smtp_server: Any, dns_server: LoopbackDNS) -> dict[bool, Any]:
    """A receiver with 8BITMIME (modern.test) and one without (old.test), same port."""
    modern = smtp_server(host="127.0.0.1")
    old = smtp_server(host="127.0.0.2", port=modern.port, eightbitmime=False)
    for domain, server in (("modern.test", modern), ("old.test", old)):
        dns_server.mx(domain, [(10, f"mx.{domain}")])
        dns_server.a(f"mx.{domain}", server.host)
    publish(dns_server, CONFIG)
    return {True: modern, False: old}


@pytest.fixture
def mailstrom(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> Iterator[tuple[Mailstrom, Results]]:
    results = Results()
    config = loopback_config(dns_server, receivers[True].port, dkim=CONFIG)
    ms = Mailstrom(config, store=MemoryStore(), worker="thread", on_result=results)
    ms.start()
    yield ms, results
    ms.stop(timeout=5)


@pytest.mark.parametrize("eightbitmime", [True, False], ids=["8bitmime", "7bit-only"])
@pytest.mark.parametrize("shape", list(MESSAGES))
def test_signatures_verify_as_received(
    mailstrom: tuple[Mailstrom, Results],
    receivers: dict[bool, Any],
    dns_server: LoopbackDNS,
    shape: str,
    eightbitmime: bool,
) -> None:
    ms, results = mailstrom
    domain = "modern.test" if eightbitmime else "old.test"
    mid = ms.send_email(MESSAGES[shape](f"bob@{domain}"))
    results.wait_count(2 if shape == "html+attachments" else 1)
    assert ms.query_status(mid).state is RecipientState.DELIVERED
    [received] = receivers[eightbitmime].wait_for_messages(1)
    if not eightbitmime:
        assert "BODY=8BITMIME" not in received.mail_options
    body = received.content[received.content.find(b"\r\n\r\n") :]
    assert body.isascii()  # signed bodies are 7-bit, so no server re-encodes them
    if shape == "dot lines, no final line end":  # un-stuffed as sent, the line ended
        assert body == b"\r\n\r\n.\r\n..two dots\r\n.leading dot\r\nlast line\r\n"
    assert_all_pass(received.content, dns_server)


def test_tampering_breaks_every_signature(
    mailstrom: tuple[Mailstrom, Results], receivers: dict[bool, Any], dns_server: LoopbackDNS
) -> None:
    ms, results = mailstrom
    ms.send_email(html_with_attachments("bob@modern.test"))
    results.wait_count(2)
    [received] = receivers[True].wait_for_messages(1)
    data = received.content
    assert_all_pass(data, dns_server)

    head_end = data.find(b"\r\n\r\n")
    subject = data.index(b"Subject: ")
    one_header = data[:subject] + b"Subject: X" + data[subject + len(b"Subject: ") + 1 :]
    one_body_byte = data[: head_end + 10] + bytes([data[head_end + 10] ^ 1]) + data[head_end + 11 :]
    unsubscribe = data.index(b"https://sender.test/u?t=abc")
    redirected = data[:unsubscribe] + b"https://evil.test/u?t=abc" + data[unsubscribe + 27 :]
    second_from = b"From: Bank <ceo@bank.test>\r\n" + data
    for tampered in (one_header, one_body_byte, redirected, second_from):
        assert tampered != data
        assert_all_fail(tampered, dns_server)


def test_unpublished_key_fails(
    mailstrom: tuple[Mailstrom, Results], receivers: dict[bool, Any], dns_server: LoopbackDNS
) -> None:
    ms, results = mailstrom
    ms.send_email(MESSAGES["text"]("bob@modern.test"))
    results.wait_count(1)
    [received] = receivers[True].wait_for_messages(1)
    dns_server.delete("rsa._domainkey.sender.test")
    verdicts = verify_dkimpy(received.content, dns_server)
    assert [v.result for v in verdicts] == ["fail", "pass"]


def test_a_worker_process_delivers_signed_mail(
    tmp_path: Path, dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """The Config, keys included, crosses to the worker process (which signs only a
    message whose signature is about to expire)."""
    config = loopback_config(dns_server, receivers[True].port, dkim=CONFIG)
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        with Mailstrom(config, store=store, worker="process") as ms:
            assert ms.worker_mode == "process"
            ms.send_email(text_message("bob@old.test"))
            [received] = receivers[False].wait_for_messages(1, timeout=30)
    finally:
        store.close()
    assert_all_pass(received.content, dns_server)


def test_status_says_whether_each_message_was_signed(
    tmp_path: Path, dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Issue 10 §1: a message no key aligns with is sent unsigned "and its status says so";
    a signed one's status lists the signatures the receiver verified."""
    results = Results()
    config = loopback_config(dns_server, receivers[True].port, dkim=CONFIG)
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
            signed = ms.send_email(text_message("bob@modern.test"))
            unsigned = ms.send_email(
                Email(from_="app@elsewhere.test", to=["carol@modern.test"], text="Hi")
            )
            results.wait_count(2)
            signed_status, unsigned_status = ms.query_status(signed), ms.query_status(unsigned)
            recent = {m.id: m.dkim for m in ms.query_recent()}
    finally:
        store.close()
    assert signed_status.state is unsigned_status.state is RecipientState.DELIVERED
    assert signed_status.dkim == DKIMStatus(
        signatures=(
            DKIMSignature(domain="sender.test", selector="rsa", algorithm=DKIMAlgorithm.RSA_SHA256),
            DKIMSignature(
                domain="sender.test", selector="ed", algorithm=DKIMAlgorithm.ED25519_SHA256
            ),
        )
    )
    assert unsigned_status.dkim == DKIMStatus(
        reason="no DKIM key for the From domain elsewhere.test"
    )
    assert recent == {signed: signed_status.dkim, unsigned: unsigned_status.dkim}
    by_rcpt = {m.rcpt_tos[0]: m.content for m in receivers[True].wait_for_messages(2)}
    assert_all_pass(by_rcpt["bob@modern.test"], dns_server)
    assert b"DKIM-Signature" not in by_rcpt["carol@modern.test"]


def test_a_retry_after_the_signature_expired_goes_out_signed_anew(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """``retry(id)`` of a message deferred for days sent the bytes signed at send_email,
    whose ``x=`` had passed: receivers treat such a signature as invalid (RFC 6376 §3.5,
    §6.1.1), so DMARC failed. The worker signs it again as it sends it. The worker's
    clock starts three days back (dkimpy checks x= by the real one)."""
    mx = receivers[True]
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=3))
    results = Results()
    dkim = dual("sender.test", expire=timedelta(days=1))
    config = loopback_config(
        dns_server, mx.port, dkim=dkim, retry=RetryPolicy(max_age=timedelta(days=5))
    )
    mx.rcpt_replies["bob@modern.test"] = ["451 4.3.0 Try later", "250 2.1.5 OK"]
    with Mailstrom(config, store=MemoryStore(), clock=clock, on_result=results) as ms:
        mid = ms.send_email(text_message("bob@modern.test"))
        results.wait_count(1)
        assert ms.query_status(mid).state is RecipientState.DEFERRED
        stored = signature_tags(ms.message_data(mid))
        clock.advance(timedelta(days=3))  # x= passed two days ago
        assert ms.retry(mid) == 1
        results.wait_count(2)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    assert_all_pass(received.content, dns_server)
    tags = signature_tags(received.content)
    assert [(t["d"], t["s"]) for t in tags] == [(t["d"], t["s"]) for t in stored]
    now = int(clock().timestamp())
    assert all((int(t["t"]), int(t["x"])) == (now, now + 86400) for t in tags), tags
    assert all(int(t["x"]) < now for t in stored)


def delivered_once(
    dns_server: LoopbackDNS, mx: Any, store: MemoryStore, mid: str, dkim: DKIMConfig | None
) -> tuple[MessageStatus, Any, list[tuple[str, str, str]]]:
    """Deliver the queued message ``mid`` with ``dkim`` configured; its status (checked
    delivered), the message the receiver got, and the (d=, s=, a=) of each signature on it."""
    results = Results()
    config = loopback_config(dns_server, mx.port, dkim=dkim)
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(1)
        status = ms.query_status(mid)
    assert status.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    return status, received, [(t["d"], t["s"], t["a"]) for t in signature_tags(received.content)]


def _all_ours_anew_over_7bit(
    dns_server: LoopbackDNS, status: MessageStatus, received: Any, sent: list[tuple[str, str, str]]
) -> None:
    """A message of the application's signature and ours (sender.test rotated, other.test
    kept) went re-encoded to 7 bit: every one of ours verifies over it, anew."""
    assert sorted(sent) == [
        ("app.test", "app1", "rsa-sha256"),
        ("other.test", "ed", "ed25519-sha256"),
        ("other.test", "rsa", "rsa-sha256"),
        ("sender.test", "ed2027", "ed25519-sha256"),
        ("sender.test", "rsa2027", "rsa-sha256"),
    ]
    verdicts = {
        (v.domain, v.algorithm): v.result for v in verify_dkimpy(received.content, dns_server)
    }
    # Re-encoded, the application's own cannot verify; every one of ours does.
    assert verdicts.pop(("app.test", "rsa-sha256")) == "fail"
    assert set(verdicts.values()) == {"pass"}, verdicts
    assert status.dkim is not None
    assert sorted((s.domain, s.selector) for s in status.dkim.signatures) == [
        ("other.test", "ed"),
        ("other.test", "rsa"),
        ("sender.test", "ed2027"),
        ("sender.test", "rsa2027"),
    ]


def rotated(domain: str = "sender.test") -> DKIMConfig:
    """New keys of their own (not ``dual``'s) under new selectors: the rotation done."""
    return DKIMConfig(
        keys=tuple(
            DKIMKey(domain=domain, selector=s, private_key=generate_private_key(a), algorithm=a)
            for s, a in (("rsa2027", RSA), ("ed2027", ED25519))
        )
    )


def test_a_message_queued_before_a_key_rotation_goes_out_signed_by_the_new_keys(
    tmp_path: Path, dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Keys rotated while a message waits (deferred, held, scheduled): new selectors in
    dkim.keys, the old ones removed from it and from DNS. The message went out with the
    signatures of the keys it was queued with, which no receiver could verify any more
    (no x= to make the worker sign it again); it is signed by the keys now configured."""
    mx = receivers[True]
    mx.rcpt_replies["bob@modern.test"] = ["451 4.3.0 Try later", "250 2.1.5 OK"]
    store = SQLiteStore(tmp_path / "queue.db")
    try:
        results = Results()
        config = loopback_config(dns_server, mx.port, dkim=CONFIG)
        with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
            mid = ms.send_email(text_message("bob@modern.test"))
            results.wait_count(1)
            assert ms.query_status(mid).state is RecipientState.DEFERRED
        new = rotated()
        publish(dns_server, new)
        for old in CONFIG.keys:
            dns_server.delete(old.dns_record().name)
        results = Results()
        config = loopback_config(dns_server, mx.port, dkim=new)
        with Mailstrom(config, store=store, worker="thread", on_result=results) as ms:
            assert ms.retry(mid) == 1
            results.wait_count(1)
            status = ms.query_status(mid)
            recent = {m.id: m.dkim for m in ms.query_recent()}
    finally:
        store.close()
    assert status.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    sent = [(t["d"], t["s"], t["a"]) for t in signature_tags(received.content)]
    assert sent == [
        ("sender.test", "rsa2027", "rsa-sha256"),
        ("sender.test", "ed2027", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)
    # The status names the signatures the receiver got, not those made at queueing.
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent
    assert recent[mid] == status.dkim


def test_a_message_queued_before_only_its_rsa_key_rotated_goes_out_rsa_signed_anew(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """The RSA key rotated while the message waited, the Ed25519 key did not. One valid
    signature (the Ed25519 one) stopped the re-sign, so the message went out with an RSA
    signature whose record was gone: a receiver that verifies RSA alone (RFC 8301 obliges
    verifiers to it, RFC 8463's Ed25519 is optional) saw it unsigned. A domain with RSA
    keys configured and no RSA signature by one of them is signed anew."""
    mx = receivers[True]
    store = MemoryStore()
    old = prepare(text_message("bob@modern.test"), now=datetime.now(UTC), dkim=CONFIG)
    mid = store.enqueue(old, now=datetime.now(UTC))
    [ed] = [k for k in CONFIG.keys if k.algorithm is ED25519]
    new_rsa = DKIMKey(
        domain="sender.test", selector="rsa2027", private_key=generate_private_key(RSA)
    )
    new = DKIMConfig(keys=(new_rsa, ed))
    publish(dns_server, new)
    for gone in CONFIG.keys:
        if gone.algorithm is RSA:
            dns_server.delete(gone.dns_record().name)
    results = Results()
    config = loopback_config(dns_server, mx.port, dkim=new)
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(1)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    sent = [(t["d"], t["s"], t["a"]) for t in signature_tags(received.content)]
    assert sent == [
        ("sender.test", "rsa2027", "rsa-sha256"),
        ("sender.test", "ed", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)


def test_a_message_queued_before_only_its_ed25519_key_rotated_goes_out_signed_anew(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """The Ed25519 key rotated while the message waited, the RSA key did not. The valid
    RSA signature stopped the re-sign, so the message went out with an Ed25519 signature
    whose record was gone: a failure at every receiver that verifies Ed25519 (and in its
    DMARC reports), where the key now configured makes a valid one. Both are made anew,
    the stale one dropped."""
    mx = receivers[True]
    store = MemoryStore()
    old = prepare(text_message("bob@modern.test"), now=datetime.now(UTC), dkim=CONFIG)
    mid = store.enqueue(old, now=datetime.now(UTC))
    [rsa] = [k for k in CONFIG.keys if k.algorithm is RSA]
    new_ed = DKIMKey(
        domain="sender.test",
        selector="ed2027",
        private_key=generate_private_key(ED25519),
        algorithm=ED25519,
    )
    new = DKIMConfig(keys=(rsa, new_ed))
    publish(dns_server, new)
    for gone in CONFIG.keys:
        if gone.algorithm is ED25519:
            dns_server.delete(gone.dns_record().name)
    status, received, sent = delivered_once(dns_server, mx, store, mid, new)
    assert sent == [
        ("sender.test", "rsa", "rsa-sha256"),
        ("sender.test", "ed2027", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


def test_a_message_signed_anew_is_signed_once_however_often_it_is_deferred(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """A message queued before a key rotation, deferred again and again at DATA: it was
    signed anew at every attempt (an RSA signature and the body hash each time), each
    with the time of that attempt. The worker keeps what it made: every attempt sends
    the bytes of the first, which verify, and each result names their signatures."""
    mx = receivers[True]
    mx.data_reply = ["451 4.3.0 Try later", "451 4.3.0 Try later", "250 2.0.0 OK"]
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3))
    store = MemoryStore()
    old = prepare(text_message("bob@modern.test"), now=clock(), dkim=CONFIG)
    mid = store.enqueue(old, now=clock())
    new = rotated()
    publish(dns_server, new)
    results = Results()
    config = loopback_config(dns_server, mx.port, dkim=new)
    with Mailstrom(config, store=store, clock=clock, on_result=results) as ms:
        for attempt in (1, 2):
            results.wait_count(attempt)
            assert ms.query_status(mid).state is RecipientState.DEFERRED
            clock.advance(timedelta(hours=1))
            assert ms.retry(mid) == 1
        results.wait_count(3)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    sent = [m.content for m in mx.wait_for_received(3)]
    assert sent[0] == sent[1] == sent[2]
    tags = signature_tags(sent[0])
    assert [(t["d"], t["s"]) for t in tags] == [
        ("sender.test", "rsa2027"),
        ("sender.test", "ed2027"),
    ]
    assert {int(t["t"]) for t in tags} == {int(clock().timestamp()) - 2 * 3600}
    assert_all_pass(sent[0], dns_server)
    made = DKIMStatus(
        signatures=tuple(
            DKIMSignature(domain=k.domain, selector=k.selector, algorithm=k.algorithm)
            for k in new.keys
        )
    )
    assert [r.dkim for r in results.all] == [made] * 3


def test_an_expired_signature_whose_keys_are_all_gone_is_not_sent(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Every key of the signing domain removed from the configuration while a message
    with an x= waited: nothing can sign it anew, and its signatures, past their x= when
    it goes, are invalid to every receiver (RFC 6376 §3.5, §6.1.1), only a failure in
    its reports. It goes without them, and its status says so. A signature not expired
    (no x=) is kept: its record may still be published, and a failed one counts as none."""
    mx = receivers[True]
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=3))
    store = MemoryStore()
    expiring = dual("sender.test", expire=timedelta(days=1))
    queued = prepare(text_message("bob@modern.test"), now=clock(), dkim=expiring)
    lasting = prepare(text_message("carol@modern.test"), now=clock(), dkim=CONFIG)
    mids = [store.enqueue(p, now=clock(), hold=True) for p in (queued, lasting)]
    clock.advance(timedelta(days=3))  # x= passed two days ago
    results = Results()
    config = loopback_config(dns_server, mx.port, dkim=rotated("other.test"))
    with Mailstrom(config, store=store, clock=clock, on_result=results) as ms:
        for mid in mids:
            assert ms.release(mid) == 1
        results.wait_count(2)
        status = {mid: ms.query_status(mid) for mid in mids}
    by_rcpt = {m.rcpt_tos[0]: m.content for m in mx.wait_for_messages(2)}
    assert all(s.state is RecipientState.DELIVERED for s in status.values())
    sent = by_rcpt["bob@modern.test"]
    assert b"DKIM-Signature" not in sent
    assert queued.data.endswith(sent)  # the signature fields on top gone, nothing else
    assert status[mids[0]].dkim == DKIMStatus(
        reason="its signatures had expired (x=) and no key of sender.test is configured now"
    )
    assert {r.address: r.dkim for r in results.all}["bob@modern.test"] == status[mids[0]].dkim
    # No x=: sent as queued, and it verifies (the old records are still published).
    assert by_rcpt["carol@modern.test"] == lasting.data
    assert_all_pass(lasting.data, dns_server)
    assert status[mids[1]].dkim == lasting.dkim_status


def test_a_message_queued_before_its_subdomain_s_keys_were_removed_goes_out_signed_by_the_parent(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Mail from news.sender.test was signed by that subdomain's keys; they were removed
    (from dkim.keys and DNS) while it waited, the parent's kept. Signing at send_email
    now takes the parent's keys (the most specific key domain that is a parent of the
    From domain), but the worker looked only for keys of the signature's own d=, found
    none, and sent the message with signatures no receiver could verify any more. It is
    signed anew with the keys that would sign it now."""
    mx = receivers[True]
    store = MemoryStore()
    subdomain = dual("news.sender.test")
    publish(dns_server, subdomain)
    message = Email(from_="news@news.sender.test", to=["bob@modern.test"], subject="N", text="n\n")
    both = DKIMConfig(keys=(*CONFIG.keys, *subdomain.keys))
    old = prepare(message, now=datetime.now(UTC), dkim=both)
    assert [(s.domain, s.selector) for s in old.dkim] == [
        ("news.sender.test", "rsa"),
        ("news.sender.test", "ed"),
    ]
    mid = store.enqueue(old, now=datetime.now(UTC))
    for gone in subdomain.keys:
        dns_server.delete(gone.dns_record().name)
    status, received, sent = delivered_once(dns_server, mx, store, mid, CONFIG)
    assert sent == [
        ("sender.test", "rsa", "rsa-sha256"),
        ("sender.test", "ed", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


def test_a_parent_signed_message_goes_out_signed_by_the_subdomain_keys_added_since(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Mail from news.sender.test was signed by the parent's keys (the subdomain had
    none); while it waited, the parent's were removed (from dkim.keys and DNS) and the
    subdomain's added. The worker found no key of the signatures' d= nor of a parent of
    it, took them for someone else's, and sent the message with signatures no receiver
    could verify any more, and none by the keys that sign its From domain now. It is
    signed anew by those."""
    mx = receivers[True]
    store = MemoryStore()
    message = Email(from_="news@news.sender.test", to=["bob@modern.test"], subject="N", text="n\n")
    old = prepare(message, now=datetime.now(UTC), dkim=CONFIG)
    assert [(s.domain, s.selector) for s in old.dkim] == [
        ("sender.test", "rsa"),
        ("sender.test", "ed"),
    ]
    mid = store.enqueue(old, now=datetime.now(UTC))
    subdomain = dual("news.sender.test")
    publish(dns_server, subdomain)
    for gone in CONFIG.keys:
        dns_server.delete(gone.dns_record().name)
    status, received, sent = delivered_once(dns_server, mx, store, mid, subdomain)
    assert sent == [
        ("news.sender.test", "rsa", "rsa-sha256"),
        ("news.sender.test", "ed", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


def test_a_message_from_two_subdomains_goes_out_signed_by_the_keys_of_each(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Mail from news.sender.test and shop.sender.test (two From mailboxes, a Sender) was
    signed by the parent's keys; while it waited, the parent's were removed and both
    subdomains' added. send_email now signs it by the keys of each From domain; the
    worker signed it anew by those of the first alone, and a receiver saw no signature
    aligned with the second mailbox. It goes out signed as send_email would sign it."""
    mx = receivers[True]
    store = MemoryStore()
    message = Email(
        from_=["news@news.sender.test", "shop@shop.sender.test"],
        sender="desk@sender.test",
        to=["bob@modern.test"],
        subject="N",
        text="n\n",
    )
    old = prepare(message, now=datetime.now(UTC), dkim=CONFIG)
    assert [s.domain for s in old.dkim] == ["sender.test"] * 2
    mid = store.enqueue(old, now=datetime.now(UTC))
    subdomains = DKIMConfig(keys=(*dual("news.sender.test").keys, *dual("shop.sender.test").keys))
    publish(dns_server, subdomains)
    for gone in CONFIG.keys:
        dns_server.delete(gone.dns_record().name)
    status, received, sent = delivered_once(dns_server, mx, store, mid, subdomains)
    now_signed = prepare(message, now=datetime.now(UTC), dkim=subdomains).dkim
    assert sent == [(s.domain, s.selector, s.algorithm.value) for s in now_signed]
    assert {d for d, _, _ in sent} == {"news.sender.test", "shop.sender.test"}
    assert_all_pass(received.content, dns_server, signatures=4)
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


def app_signed(from_domain: str, app: DKIMKey) -> tuple[bytes, bytes]:
    """A raw message from ``app@from_domain``, and the DKIM-Signature field the
    application made for it with dkimpy and ``app`` (its own selector, before
    send_email)."""
    raw = (
        f"From: app@{from_domain}\r\nTo: bob@modern.test\r\nSubject: A\r\n"
        f"Date: Mon, 05 Jan 2026 12:00:00 +0000\r\nMessage-ID: <a1@{from_domain}>\r\n\r\n"
        "body\r\n"
    ).encode("ascii")
    field = dkimpy.sign(
        raw,
        app.selector.encode("ascii"),
        app.domain.encode("ascii"),
        app.private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return raw, field


def test_the_application_s_own_signature_stays_when_the_domain_s_keys_rotated(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """A raw message the application signed itself (with dkimpy, a selector of its own
    of the domain mailstrom signs), queued, then mailstrom's keys rotated. None of the
    domain's signatures was by a key configured now, so the worker took the
    application's for one of ours and stripped it; the receiver got ours, made anew,
    and not the application's, which still verifies. It goes out with both."""
    mx = receivers[True]
    store = MemoryStore()
    app = DKIMKey(domain="sender.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    raw, field = app_signed("sender.test", app)
    old = prepare(field + raw, now=datetime.now(UTC), dkim=CONFIG)
    assert [t["s"] for t in signature_tags(old.data)] == ["rsa", "ed", "app1"]
    assert_all_pass(old.data, dns_server, signatures=3)
    mid = store.enqueue(old, now=datetime.now(UTC))
    new = rotated()
    publish(dns_server, new)
    for gone in CONFIG.keys:
        dns_server.delete(gone.dns_record().name)
    results = Results()
    with Mailstrom(
        loopback_config(dns_server, mx.port, dkim=new), store=store, on_result=results
    ) as ms:
        results.wait_count(1)
        status = ms.query_status(mid)
        recent = {m.id: m.dkim for m in ms.query_recent()}
    assert status.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    sent = [(t["d"], t["s"], t["a"]) for t in signature_tags(received.content)]
    assert sent == [
        ("sender.test", "rsa2027", "rsa-sha256"),
        ("sender.test", "ed2027", "ed25519-sha256"),
        ("sender.test", "app1", "rsa-sha256"),
    ]
    assert_all_pass(received.content, dns_server, signatures=3)
    # The status names the signatures mailstrom made, not the application's own (of a
    # domain mailstrom has keys for, by a selector that is not one of them).
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent[:2]
    assert recent[mid] == status.dkim


def test_our_subdomain_signature_goes_when_its_keys_were_removed_beside_the_parent_s(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """Mail from news.sender.test and shop.sender.test was signed at send_email by the
    keys of news.sender.test and of sender.test (shop's key domain), in one run of
    fields on top. news.sender.test's keys were then removed (from dkim.keys and DNS)
    while it waited. Its signatures were taken for the application's own, because the
    parent that signs news.sender.test now had ours of each algorithm, and went out
    failing. They are ours (made by one sign() with the parent's): they go, and the
    parent's keys sign in their place."""
    mx = receivers[True]
    store = MemoryStore()
    subdomain = dual("news.sender.test")
    publish(dns_server, subdomain)
    message = Email(
        from_=["news@news.sender.test", "shop@shop.sender.test"],
        sender="desk@sender.test",
        to=["bob@modern.test"],
        subject="N",
        text="n\n",
    )
    both = DKIMConfig(keys=(*CONFIG.keys, *subdomain.keys))
    old = prepare(message, now=datetime.now(UTC), dkim=both)
    assert [s.domain for s in old.dkim] == ["news.sender.test"] * 2 + ["sender.test"] * 2
    mid = store.enqueue(old, now=datetime.now(UTC))
    for gone in subdomain.keys:
        dns_server.delete(gone.dns_record().name)
    status, received, sent = delivered_once(dns_server, mx, store, mid, CONFIG)
    assert sent == [
        ("sender.test", "rsa", "rsa-sha256"),
        ("sender.test", "ed", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


def test_a_message_whose_selector_now_names_a_key_of_another_algorithm_is_signed_anew(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """The message was signed by the domain's one key, RSA under ``rsa``; while it
    waited, ``rsa`` was given to an Ed25519 key (record replaced) and the RSA key moved
    to ``rsa2027``. The RSA signature by ``s=rsa`` was taken for one by a key configured
    now (its d= and s= named one) and went out failing: no valid signature at all. A
    key is its d=, s= and a=: the message is signed anew by the keys configured now."""
    mx = receivers[True]
    store = MemoryStore()
    [rsa] = [k for k in CONFIG.keys if k.algorithm is RSA]
    old = prepare(
        text_message("bob@modern.test"), now=datetime.now(UTC), dkim=DKIMConfig(keys=(rsa,))
    )
    mid = store.enqueue(old, now=datetime.now(UTC))
    new = DKIMConfig(
        keys=tuple(
            DKIMKey(
                domain="sender.test", selector=s, private_key=generate_private_key(a), algorithm=a
            )
            for s, a in (("rsa2027", RSA), ("rsa", ED25519))
        )
    )
    for gone in CONFIG.keys:
        dns_server.delete(gone.dns_record().name)
    publish(dns_server, new)
    status, received, sent = delivered_once(dns_server, mx, store, mid, new)
    assert sent == [
        ("sender.test", "rsa2027", "rsa-sha256"),
        ("sender.test", "rsa", "ed25519-sha256"),
    ]
    assert_all_pass(received.content, dns_server)
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


def test_a_message_send_email_left_unsigned_keeps_the_application_s_own_signature(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """A raw message from other.test, for which no key is configured, that the
    application signed itself as sender.test (a selector of its own): send_email signs
    nothing and its status says so. The worker took the application's signature for one
    of ours whose key was rotated away (its d= is a domain with keys, its s= none of
    theirs), stripped it and sent sender.test's signatures instead, and the status
    turned to signed. Without a field sign() made on top none is ours: it goes as it
    came."""
    mx = receivers[True]
    store = MemoryStore()
    app = DKIMKey(domain="sender.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    raw, field = app_signed("other.test", app)
    queued = prepare(field + raw, now=datetime.now(UTC), dkim=CONFIG)
    assert queued.dkim == ()
    mid = store.enqueue(queued, now=datetime.now(UTC))
    results = Results()
    config = loopback_config(dns_server, mx.port, dkim=CONFIG)
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(1)
        status = ms.query_status(mid)
    assert status.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    assert [(t["d"], t["s"]) for t in signature_tags(received.content)] == [("sender.test", "app1")]
    assert_all_pass(received.content, dns_server, signatures=1)
    assert status.dkim == queued.dkim_status
    assert status.dkim is not None and not status.dkim.signed


def test_a_message_s_own_field_in_our_layout_goes_as_it_came_and_verifies(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """A raw message from other.test (no key configured for it) that the application
    signed as sender.test with mailstrom's own sign() (a selector of its own): its field
    is in the layout the worker takes for ours, so the worker signed the message with
    sender.test's keys, which send_email had not signed it with. prepare() gives the
    field a second space, which its relaxed canonicalisation ignores: it goes as it
    came, unsigned by us, and still verifies."""
    mx = receivers[True]
    store = MemoryStore()
    app = DKIMKey(domain="sender.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    raw = (
        b"From: app@other.test\r\nTo: bob@modern.test\r\nSubject: A\r\n"
        b"Date: Mon, 05 Jan 2026 12:00:00 +0000\r\nMessage-ID: <a2@other.test>\r\n\r\n"
        b"body\r\n"
    )
    signed, _ = sign(raw, [app], now=datetime.now(UTC))
    queued = prepare(signed, now=datetime.now(UTC), dkim=CONFIG)
    assert queued.dkim == ()
    mid = store.enqueue(queued, now=datetime.now(UTC))
    results = Results()
    config = loopback_config(dns_server, mx.port, dkim=CONFIG)
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(1)
        status = ms.query_status(mid)
    assert status.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    assert [(t["d"], t["s"]) for t in signature_tags(received.content)] == [("sender.test", "app1")]
    assert_all_pass(received.content, dns_server, signatures=1)
    assert status.dkim == queued.dkim_status


@pytest.mark.parametrize(
    ("address", "subdomain"),
    [
        ("news@NEWS.Sender.TEST", "news.sender.test"),
        ("news@bücher.sender.test", "xn--bcher-kva.sender.test"),
        ("news@XN--BCHER-KVA.sender.test", "xn--bcher-kva.sender.test"),
    ],
    ids=["upper case", "U-label", "A-label in upper case"],
)
def test_a_from_domain_in_any_case_or_as_a_u_label_is_signed_anew_by_its_keys(
    dns_server: LoopbackDNS, receivers: dict[bool, Any], address: str, subdomain: str
) -> None:
    """The worker reads the From domains back from the stored message to pick the keys
    that sign it now (the parent's removed, the subdomain's added): in upper case, as a
    U-label or an A-label in upper case, they are the key domain's, as at send_email."""
    mx = receivers[True]
    store = MemoryStore()
    message = Email(from_=address, to=["bob@modern.test"], subject="N", text="n\n")
    old = prepare(message, now=datetime.now(UTC), dkim=CONFIG)
    assert [s.domain for s in old.dkim] == ["sender.test"] * 2
    mid = store.enqueue(old, now=datetime.now(UTC))
    keys = dual(subdomain)
    publish(dns_server, keys)
    for gone in CONFIG.keys:
        dns_server.delete(gone.dns_record().name)
    results = Results()
    with Mailstrom(
        loopback_config(dns_server, mx.port, dkim=keys), store=store, on_result=results
    ) as ms:
        results.wait_count(1)
        status = ms.query_status(mid)
    assert status.state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    sent = [(t["d"], t["s"]) for t in signature_tags(received.content)]
    assert sent == [(subdomain, "rsa"), (subdomain, "ed")]
    assert_all_pass(received.content, dns_server)


def test_selectors_shared_by_two_domains_are_told_apart_by_domain(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """sender.test and shop.test sign with selectors of the same names (rsa, ed). A
    message from both; shop.test's keys rotated while it waited (rsa and ed now name
    other keys there, published anew). Only shop.test's signatures are made anew;
    sender.test's, by the same selector names, stay and verify."""
    mx = receivers[True]
    store = MemoryStore()
    shop = dual("shop.test")
    publish(dns_server, shop)
    message = Email(
        from_=["a@sender.test", "b@shop.test"],
        sender="a@sender.test",
        to=["bob@modern.test"],
        subject="S",
        text="s\n",
    )
    old = prepare(message, now=datetime.now(UTC), dkim=DKIMConfig(keys=(*CONFIG.keys, *shop.keys)))
    mid = store.enqueue(old, now=datetime.now(UTC))
    new_shop = DKIMConfig(
        keys=tuple(
            DKIMKey(
                domain="shop.test", selector=s, private_key=generate_private_key(a), algorithm=a
            )
            for s, a in (("rsa2", RSA), ("ed2", ED25519))
        )
    )
    for gone in shop.keys:
        dns_server.delete(gone.dns_record().name)
    publish(dns_server, new_shop)
    results = Results()
    config = loopback_config(
        dns_server, mx.port, dkim=DKIMConfig(keys=(*CONFIG.keys, *new_shop.keys))
    )
    with Mailstrom(config, store=store, on_result=results) as ms:
        results.wait_count(1)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    [received] = mx.wait_for_messages(1)
    sent = [(t["d"], t["s"]) for t in signature_tags(received.content)]
    assert sent == [
        ("shop.test", "rsa2"),
        ("shop.test", "ed2"),
        ("sender.test", "rsa"),
        ("sender.test", "ed"),
    ]
    assert_all_pass(received.content, dns_server, signatures=4)


@pytest.mark.parametrize("replaced", [RSA, ED25519], ids=["rsa", "ed25519"])
def test_a_message_queued_before_a_key_was_replaced_under_its_selector_is_signed_anew(
    dns_server: LoopbackDNS, receivers: dict[bool, Any], replaced: DKIMAlgorithm
) -> None:
    """The operator replaced one private key in place: same domain, selector and
    algorithm, the new public key published under the same name. A message queued before
    and sent after carried the signature of the old key, which its name now publishes
    no more: it failed at every receiver. It is signed anew by the keys configured now."""
    mx = receivers[True]
    store = MemoryStore()
    old = prepare(text_message("bob@modern.test"), now=datetime.now(UTC), dkim=CONFIG)
    mid = store.enqueue(old, now=datetime.now(UTC))
    new = DKIMConfig(
        keys=tuple(
            k
            if k.algorithm is not replaced
            else DKIMKey(
                domain=k.domain,
                selector=k.selector,
                private_key=generate_private_key(k.algorithm),
                algorithm=k.algorithm,
            )
            for k in CONFIG.keys
        )
    )
    publish(dns_server, new)  # the old key's record replaced
    status, received, sent = delivered_once(dns_server, mx, store, mid, new)
    assert sent == [("sender.test", "rsa", "rsa-sha256"), ("sender.test", "ed", "ed25519-sha256")]
    verdicts = verify_dkimpy(received.content, dns_server)
    assert [v.result for v in verdicts] == ["pass", "pass"], verdicts
    assert status.dkim is not None
    assert [(s.domain, s.selector, s.algorithm.value) for s in status.dkim.signatures] == sent


@pytest.mark.parametrize("eightbitmime", [True, False], ids=["8bitmime", "7bit-only"])
def test_an_application_signed_8bit_body_keeps_its_signature_beside_ours(
    mailstrom: tuple[Mailstrom, Results],
    receivers: dict[bool, Any],
    dns_server: LoopbackDNS,
    eightbitmime: bool,
) -> None:
    """A raw message with an 8-bit body that the application signed itself (dkimpy, a
    selector of its own), which send_email signs too. Its body was made 7-bit before
    ours were made, which broke the application's signature at every receiver, those
    offering 8BITMIME (almost all) too. Signed content goes as it came; where the worker
    must make it 7-bit (no 8BITMIME) it signs ours anew over the bytes it sends."""
    ms, results = mailstrom
    app = DKIMKey(domain="sender.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    domain = "modern.test" if eightbitmime else "old.test"
    raw = (
        f"From: app@sender.test\r\nTo: bob@{domain}\r\nSubject: A\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße  aus Köln \r\n"
    ).encode()
    field = dkimpy.sign(
        raw,
        b"app1",
        b"sender.test",
        app.private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    mid = ms.send_email(field + raw)
    results.wait_count(1)
    assert ms.query_status(mid).state is RecipientState.DELIVERED
    [received] = receivers[eightbitmime].wait_for_messages(1)
    assert [t["s"] for t in signature_tags(received.content)] == ["rsa", "ed", "app1"]
    if eightbitmime:
        assert_all_pass(received.content, dns_server, signatures=3)
        assert "BODY=8BITMIME" in received.mail_options
    else:
        # Re-encoded, the application's own cannot verify; ours, made anew, do.
        verdicts = verify_dkimpy(received.content, dns_server)
        assert [v.result for v in verdicts] == ["pass", "pass", "fail"], verdicts


def app_signed_8bit(from_: str, app: DKIMKey) -> bytes:
    """A raw message from ``from_`` to bob@old.test with an 8-bit body, which the
    application signed itself with ``app`` (dkimpy) before send_email."""
    raw = (
        f"From: {from_}\r\nSender: {from_.split(',')[0]}\r\nTo: bob@old.test\r\nSubject: A\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße  aus Köln \r\n"
    ).encode()
    field = dkimpy.sign(
        raw,
        app.selector.encode("ascii"),
        app.domain.encode("ascii"),
        app.private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    return field + raw


def test_an_application_signed_8bit_body_of_two_domains_one_rotated_is_signed_anew_whole(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """An application-signed 8-bit body from two key domains, queued, then one domain's
    keys rotated: the worker signs that one anew and keeps the other's (an older t=).
    Made 7-bit for a server without 8BITMIME, the kept one was taken for the
    application's own by its t= and went unchanged, failing its body hash there; every
    one of ours is signed anew over the bytes sent."""
    app = DKIMKey(domain="app.test", selector="app1", private_key=generate_private_key(RSA))
    other = dual("other.test")
    for config in (DKIMConfig(keys=(app,)), other):
        publish(dns_server, config)
    queued = DKIMConfig(keys=CONFIG.keys + other.keys)
    data = app_signed_8bit("a@sender.test, b@other.test", app)
    old = prepare(data, now=datetime.now(UTC) - timedelta(minutes=5), dkim=queued)
    store = MemoryStore()
    mid = store.enqueue(old, now=datetime.now(UTC))
    new = rotated()
    publish(dns_server, new)
    status, received, sent = delivered_once(
        dns_server, receivers[False], store, mid, DKIMConfig(keys=new.keys + other.keys)
    )
    _all_ours_anew_over_7bit(dns_server, status, received, sent)


def test_our_signatures_without_keys_now_go_from_an_8bit_body_made_7bit(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """An application-signed 8-bit body, queued signed by sender.test's keys, which are
    all removed since (the worker has keys of another domain only). Made 7-bit for a
    server without 8BITMIME, ours were kept, failing there, and the status still named
    them; they go, and the status says why the message has none of ours."""
    app = DKIMKey(domain="app.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    old = prepare(app_signed_8bit("a@sender.test", app), now=datetime.now(UTC), dkim=CONFIG)
    assert [t["s"] for t in signature_tags(old.data)] == ["rsa", "ed", "app1"]
    store = MemoryStore()
    mid = store.enqueue(old, now=datetime.now(UTC))
    status, _, sent = delivered_once(dns_server, receivers[False], store, mid, dual("other.test"))
    assert sent == [("app.test", "app1", "rsa-sha256")]
    assert status.dkim is not None and not status.dkim.signatures
    assert status.dkim.reason is not None and "sender.test" in status.dkim.reason


def test_a_worker_without_keys_drops_ours_from_an_8bit_body_made_7bit(
    dns_server: LoopbackDNS, receivers: dict[bool, Any]
) -> None:
    """An application-signed 8-bit body signed by send_email where the keys are, sent by
    a worker configured without DKIM to a server without 8BITMIME: ours, over the 8-bit
    body, cannot be made anew there. They went out failing and the status named them;
    they go, and the status says why."""
    app = DKIMKey(domain="app.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    old = prepare(app_signed_8bit("a@sender.test", app), now=datetime.now(UTC), dkim=CONFIG)
    store = MemoryStore()
    mid = store.enqueue(old, now=datetime.now(UTC))
    status, _, sent = delivered_once(dns_server, receivers[False], store, mid, None)
    assert sent == [("app.test", "app1", "rsa-sha256")]
    assert status.dkim is not None and not status.dkim.signatures
    assert status.dkim.reason is not None and "8BITMIME" in status.dkim.reason


def test_an_8bit_body_sent_as_queued_after_a_7bit_host_broke_records_the_status_sent(
    dns_server: LoopbackDNS, smtp_server: Any
) -> None:
    """An application-signed 8-bit body, signed by send_email, sent by a worker without
    keys to a domain whose first MX lacks 8BITMIME and breaks the session after MAIL,
    its second offering 8BITMIME. The 7-bit bytes' status ("broke its signatures")
    stayed on the work, so the 8-bit bytes that went next, ours intact, were recorded
    with it; the status is of the bytes sent."""
    app = DKIMKey(domain="app.test", selector="app1", private_key=generate_private_key(RSA))
    publish(dns_server, DKIMConfig(keys=(app,)))
    publish(dns_server, CONFIG)
    old = smtp_server(host="127.0.0.1", eightbitmime=False, drop_on="mail")
    modern = smtp_server(host="127.0.0.2", port=old.port)
    dns_server.mx("old.test", [(10, "mx1.old.test"), (20, "mx2.old.test")])
    dns_server.a("mx1.old.test", old.host)
    dns_server.a("mx2.old.test", modern.host)
    queued = prepare(app_signed_8bit("a@sender.test", app), now=datetime.now(UTC), dkim=CONFIG)
    store = MemoryStore()
    mid = store.enqueue(queued, now=datetime.now(UTC))
    status, received, sent = delivered_once(dns_server, modern, store, mid, None)
    assert "MAIL" in old.commands
    assert "BODY=8BITMIME" in received.mail_options
    assert received.content == queued.data
    assert sent == [
        ("sender.test", "rsa", "rsa-sha256"),
        ("sender.test", "ed", "ed25519-sha256"),
        ("app.test", "app1", "rsa-sha256"),
    ]
    assert_all_pass(received.content, dns_server, signatures=3)
    assert status.dkim is not None and status.dkim.reason is None
    assert status.dkim.signatures == queued.dkim


def test_a_message_signed_anew_then_made_7bit_on_a_second_host_has_every_one_of_ours_anew(
    dns_server: LoopbackDNS, smtp_server: Any
) -> None:
    """An application-signed 8-bit body from two key domains, queued, then one domain's
    keys rotated, sent by a worker whose signatures expire within the hour. Its first MX
    (8BITMIME) breaks the session after MAIL, the second lacks 8BITMIME. The second
    submit signed the bytes the first had made again, told ours by their layout: the
    other domain's, kept with their older t=, read as the application's, and went
    unchanged over the 7-bit body, failing there. Every one of ours is made anew."""
    app = DKIMKey(domain="app.test", selector="app1", private_key=generate_private_key(RSA))
    other = dual("other.test")
    new = rotated()
    for config in (DKIMConfig(keys=(app,)), other, new):
        publish(dns_server, config)
    modern = smtp_server(host="127.0.0.1", drop_on="mail")
    old = smtp_server(host="127.0.0.2", port=modern.port, eightbitmime=False)
    dns_server.mx("old.test", [(10, "mx1.old.test"), (20, "mx2.old.test")])
    dns_server.a("mx1.old.test", modern.host)
    dns_server.a("mx2.old.test", old.host)
    data = app_signed_8bit("a@sender.test, b@other.test", app)
    queued = prepare(
        data,
        now=datetime.now(UTC) - timedelta(minutes=5),
        dkim=DKIMConfig(keys=CONFIG.keys + other.keys),
    )
    store = MemoryStore()
    mid = store.enqueue(queued, now=datetime.now(UTC))
    worker = DKIMConfig(keys=new.keys + other.keys, expire=timedelta(minutes=30))
    status, received, sent = delivered_once(dns_server, old, store, mid, worker)
    assert "MAIL" in modern.commands
    assert "BODY=8BITMIME" not in received.mail_options
    _all_ours_anew_over_7bit(dns_server, status, received, sent)


def test_a_message_signed_anew_on_one_host_and_sent_on_another_is_signed_once(
    dns_server: LoopbackDNS, smtp_server: Any
) -> None:
    """A message queued before a key rotation, whose first MX breaks the session after
    MAIL and whose second defers it at DATA once. The second submit asked again of the
    bytes the first had made, not of those stored, which dropped what the worker kept:
    the retry signed anew, another t=. Both attempts send the bytes made at the first."""
    first = smtp_server(host="127.0.0.1", drop_on="mail")
    second = smtp_server(host="127.0.0.2", port=first.port)
    second.data_reply = ["451 4.3.0 Try later", "250 2.0.0 OK"]
    dns_server.mx("two.test", [(10, "mx1.two.test"), (20, "mx2.two.test")])
    dns_server.a("mx1.two.test", first.host)
    dns_server.a("mx2.two.test", second.host)
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3))
    store = MemoryStore()
    mid = store.enqueue(
        prepare(text_message("bob@two.test"), now=clock(), dkim=CONFIG), now=clock()
    )
    new = rotated()
    publish(dns_server, new)
    results = Results()
    config = loopback_config(dns_server, first.port, dkim=new)
    with Mailstrom(config, store=store, clock=clock, on_result=results) as ms:
        results.wait_count(1)
        assert ms.query_status(mid).state is RecipientState.DEFERRED
        clock.advance(timedelta(hours=1))
        assert ms.retry(mid) == 1
        results.wait_count(2)
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    assert first.commands.count("MAIL") == 2
    sent = [m.content for m in second.wait_for_received(2)]
    assert sent[0] == sent[1]
    assert {int(t["t"]) for t in signature_tags(sent[0])} == {int(clock().timestamp()) - 3600}
    assert_all_pass(sent[0], dns_server)
