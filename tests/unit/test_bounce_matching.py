"""Matching a report to the recipients of the messages it names (bounces.apply), over a
real in-memory store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tests.contract.support import NOW, lease_all, message, results_for

from mailstrom.bounces import Report, ReportedRecipient, ReportKind, apply_report, recipient_token
from mailstrom.bounces import apply as applying
from mailstrom.bounces.apply import BounceAction
from mailstrom.bounces.verp import check_verp_template, is_verp_template, verp_address
from mailstrom.errors import InvalidAddress
from mailstrom.message.addrspec import validate_address
from mailstrom.status import Attempt, RecipientState
from mailstrom.stores import MemoryStore


def failed(address: str) -> ReportedRecipient:
    return ReportedRecipient(final_recipient=address, action="failed", status="5.1.1")


def test_each_recipient_of_a_message_is_keyed_once_per_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: every address a report named was compared with every recipient of the
    messages it names, each keyed again (an IDNA conversion at an IDN domain): a DSN of
    a thousand blocks about a message of a thousand recipients at bücher.example took
    34 s to apply. Counted here, not timed."""
    store = MemoryStore()
    recipients = [f"user{n}@example.org" for n in range(200)]
    mid = store.enqueue(message(*recipients), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    keyed = 0
    real: Callable[[str], str] = applying.address_key

    def counting(address: str) -> str:
        nonlocal keyed
        keyed += 1
        return real(address)

    monkeypatch.setattr(applying, "address_key", counting)
    others = [failed(f"other{n}@example.org") for n in range(200)]
    report = Report(
        kind=ReportKind.DSN, recipients=(*others, failed("user7@example.org")), envelope_id=mid
    )
    outcomes = apply_report(store, report, now=NOW)
    assert [o.action for o in outcomes] == [BounceAction.UNMATCHED] * 200 + [BounceAction.FAILED]
    assert keyed <= 2 * (len(recipients) + len(report.recipients)), keyed


def test_a_bounce_about_the_copy_in_delivery_is_in_flight_not_unmatched() -> None:
    """Two messages share a Message-ID (one sent again: an application's retry after a
    timeout). The first is in delivery (leased): its server accepted it and bounced at
    once. Was: the report, naming no ENVID (the server bounced itself), was matched to
    the newer copy, still queued, and reported unmatched (exit 66: the MTA returned it,
    the late failure was lost), where the copy in delivery makes it in flight (exit 75:
    applied when the worker has recorded the delivery)."""
    store = MemoryStore()
    first = store.enqueue(message("bob@example.org"), now=NOW)
    lease = lease_all(store)
    again = store.enqueue(message("bob@example.org"), now=NOW)
    assert [store.status(m).recipients[0].leased for m in (first, again)] == [True, False]
    report = Report(
        kind=ReportKind.DSN,
        recipients=(failed("bob@example.org"),),
        original_message_id="<m1@example.com>",
    )
    [outcome] = apply_report(store, report, now=NOW)
    assert (outcome.action, outcome.message_id) == (BounceAction.IN_FLIGHT, first)
    store.record(results_for(lease, RecipientState.DELIVERED))
    [outcome] = apply_report(store, report, now=NOW)
    assert (outcome.action, outcome.message_id) == (BounceAction.FAILED, first)


def test_a_bounce_about_an_uncertain_delivery_is_in_flight() -> None:
    """The connection was lost after the final dot: the server may have accepted the
    message (RFC 5321 §4.5.3.2.6), and the worker, retrying it (``retry_uncertain``),
    keeps the recipient deferred. Was: a bounce about it, which shows that the server did
    accept it, was unmatched ("no server has accepted this recipient", exit 66) and lost;
    it is in flight (exit 75) until the retry is recorded, and then applies."""
    store = MemoryStore()
    mid = store.enqueue(message("bob@example.org"), now=NOW)
    lease = lease_all(store)
    [deferred] = results_for(lease, RecipientState.DEFERRED, next_attempt_at=NOW)
    lost = replace(deferred.attempt, reply=None, error="connection lost after the dot")
    store.record([replace(deferred, attempt=replace(lost, uncertain=True))])
    bob = store.status(mid).recipients[0]
    assert (bob.state, bob.uncertain, bob.leased) == (RecipientState.DEFERRED, True, False)
    report = Report(kind=ReportKind.DSN, recipients=(failed("bob@example.org"),), envelope_id=mid)
    [outcome] = apply_report(store, report, now=NOW)
    assert outcome.action is BounceAction.IN_FLIGHT, outcome.reason
    assert "may have accepted" in outcome.reason
    store.record(results_for(lease_all(store, now=NOW), RecipientState.DELIVERED))
    [outcome] = apply_report(store, report, now=NOW)
    assert outcome.action is BounceAction.FAILED


def test_a_bounce_about_a_recipient_deferred_before_any_acceptance_stays_unmatched() -> None:
    store = MemoryStore()
    mid = store.enqueue(message("bob@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DEFERRED, next_attempt_at=NOW))
    report = Report(kind=ReportKind.DSN, recipients=(failed("bob@example.org"),), envelope_id=mid)
    [outcome] = apply_report(store, report, now=NOW)
    assert outcome.action is BounceAction.UNMATCHED
    assert "no server has accepted this recipient (it is deferred)" in outcome.reason


def test_a_report_about_a_notice_to_a_verp_address_suppresses_no_throwaway_address() -> None:
    """A bounce notice goes to the return path of one recipient of a VERP message
    (``bounces+<token>@...``), an address made for that message and recipient and never
    mailed again. Was: a complaint about the notice (its reader marked it as spam), or a
    DSN about it, suppressed that address, with no end (a complaint's, or a bounce's
    without ``suppress_for``): one more useless entry for each, never pruned. The worker
    adds no entry for such an address when the sender's server refuses the notice; a
    report adds none either. The notice's own state is recorded as before."""
    store = MemoryStore()
    token = recipient_token("0" * 32, "bob@example.org", key=store.verp_key())
    verp = f"bounces+{token}@sender.test"
    notice = store.enqueue(message(verp, envelope_from=""), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    complaint = Report(
        kind=ReportKind.COMPLAINT,
        recipients=(ReportedRecipient(final_recipient=verp),),
        original_message_id="<m1@example.com>",
    )
    [outcome] = apply_report(store, complaint, now=NOW)
    assert (outcome.action, outcome.message_id) == (BounceAction.COMPLAINT, notice)
    assert outcome.suppressed is None
    bounce = Report(kind=ReportKind.DSN, recipients=(failed(verp),), envelope_id=notice)
    [outcome] = apply_report(store, bounce, now=NOW)
    assert (outcome.action, outcome.suppressed) == (BounceAction.FAILED, None)
    assert store.list_suppressions() == []


def test_each_recipient_of_a_verp_message_is_digested_once_per_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report may quote ten tokens (its To, the envelope sender it quotes, the returned
    Return-Path). Was: each token made the digest of every recipient of the message it
    names again, so ten tokens of one message of 50,000 recipients, all with the message
    id any recipient sees and made-up digests, cost 500,000 keyed hashes (0.65 s) where
    the message's own status takes 0.14 s. Counted here, not timed."""
    store = MemoryStore()
    recipients = [f"user{n}@example.org" for n in range(200)]
    mid = store.enqueue(message(*recipients, envelope_from="bounces+{token}@sender.test"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    digests = 0
    real: Callable[..., str] = applying.address_digest

    def counting(message_id: str, address: str, *, key: bytes) -> str:
        nonlocal digests
        digests += 1
        return real(message_id, address, key=key)

    monkeypatch.setattr(applying, "address_digest", counting)
    made_up = [f"bounces+{mid}-{n:010x}@sender.test" for n in range(9)]
    bob = recipient_token(mid, "user7@example.org", key=store.verp_key())
    report = Report(
        kind=ReportKind.DSN,
        recipients=(failed("user7@example.org"),),
        envelope_senders=(*made_up, f"bounces+{bob}@sender.test"),
    )
    [outcome] = apply_report(store, report, now=NOW)
    assert (outcome.action, outcome.address) == (BounceAction.FAILED, "user7@example.org")
    assert digests <= len(recipients), digests


_LOCAL_CHARS = st.sampled_from(list("abcXYZ0129+=-._!#$%&'*/?^`{|}~ä "))


def _address(local: str, domain: str) -> str | None:
    """``local@domain`` as prepare() would store it (quoted when it must be), or None when
    no address has that local part."""
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    for candidate in (local, quoted):
        try:
            return validate_address(f"{candidate}@{domain}").envelope
        except InvalidAddress:
            continue
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    before=st.text(_LOCAL_CHARS, max_size=8),
    after=st.text(_LOCAL_CHARS, max_size=8),
    locals_=st.lists(st.text(_LOCAL_CHARS, min_size=1, max_size=12), min_size=1, max_size=4),
    domain=st.sampled_from(["example.org", "Bücher.example", "EXAMPLE.net"]),
    spelled=st.sampled_from([str, str.upper, str.lower]),
    pick=st.integers(0, 3),
)
def test_a_verp_address_names_its_own_recipient_however_it_is_spelled(
    before: str,
    after: str,
    locals_: list[str],
    domain: str,
    spelled: Callable[[str], str],
    pick: int,
) -> None:
    """Round trip: the envelope sender a recipient's copy went with, given back as the
    address a bounce reached (as sent, or case-folded by the receiving MTA), fails that
    recipient and no other, whatever its local part (quoted, ``+``, ``=``, upper case,
    UTF-8) and the template's, even when the report names the address it was forwarded
    to."""
    template = _address(f"{before}{{token}}{after}", "sender.test")
    assume(template is not None and is_verp_template(template))
    assert template is not None
    try:
        check_verp_template(template)
    except InvalidAddress:
        assume(False)
    addresses = list(dict.fromkeys(a for a in (_address(p, domain) for p in locals_) if a))
    assume(addresses)
    store = MemoryStore()
    mid = store.enqueue(message(*addresses, envelope_from=template), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    recipients = [r.address for r in store.status(mid).recipients]
    bounced = recipients[pick % len(recipients)]
    sent_as = verp_address(template, mid, bounced, key=store.verp_key())
    report = Report(kind=ReportKind.DSN, recipients=(failed("bob@forwarded.example"),))
    [outcome] = apply_report(store, report, now=NOW, envelope_recipient=spelled(sent_as))
    assert (outcome.action, outcome.address) == (BounceAction.FAILED, bounced), sent_as
    states = {r.address: r.state for r in store.status(mid).recipients}
    assert [a for a, s in states.items() if s is RecipientState.FAILED] == [bounced]


class _PurgedMeanwhile(MemoryStore):
    """A store whose finished messages another process (a worker's retention, ``mailstrom
    purge``) deletes between a report's reading of a message and its write."""

    def fail_late(self, message_id: str, address: str, attempt: Attempt) -> bool:
        self.purge(finished_before=NOW + timedelta(days=1))
        return super().fail_late(message_id, address, attempt)


def test_a_bounce_about_a_message_purged_meanwhile_is_unmatched_not_an_error() -> None:
    """Was: the write raised UnknownMessage out of apply_report, the outcomes of the
    report's other recipients with it (``mailstrom bounce`` printed only "unknown message
    id" and exited 66), where a message purged before the report was read leaves its
    recipients unmatched."""
    store = _PurgedMeanwhile()
    first = store.enqueue(message("bob@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    report = Report(
        kind=ReportKind.DSN,
        recipients=(failed("bob@example.org"), failed("carol@example.org")),
        envelope_id=first,
    )
    bob, carol = apply_report(store, report, now=NOW)
    assert (bob.action, bob.address, bob.message_id) == (
        BounceAction.UNMATCHED,
        "bob@example.org",
        first,
    )
    assert "purged" in bob.reason
    assert bob.suppressed is None and store.list_suppressions() == []
    assert (carol.action, carol.address) == (BounceAction.UNMATCHED, "carol@example.org")


@pytest.mark.parametrize("status", ["2.0.0", "2.1.5"])
def test_a_failed_block_with_a_success_status_undoes_no_delivery(status: str) -> None:
    """RFC 3463 §3.1: a 2.X.X status "is reporting a positive delivery action". Was: a
    block saying ``Action: failed`` with such a status (``250 2.0.0 ok`` relayed as its
    diagnostic) marked the recipient its server had accepted failed, classed as a
    mailbox problem. The report contradicts itself and says nothing final: ignored, as a
    ``delivered`` block is. A failed block with a 4.X.X status (retries ran out) still
    fails the recipient."""
    store = MemoryStore()
    mid = store.enqueue(message("bob@example.org", "carol@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))

    def block(address: str, status: str) -> ReportedRecipient:
        return ReportedRecipient(
            final_recipient=address,
            action="failed",
            status=status,
            diagnostic="250 2.0.0 ok",
            diagnostic_type="smtp",
        )

    report = Report(
        kind=ReportKind.DSN,
        recipients=(block("bob@example.org", status), block("carol@example.org", "4.4.7")),
        envelope_id=mid,
    )
    bob, carol = apply_report(store, report, now=NOW)
    assert (bob.action, bob.status) == (BounceAction.IGNORED, status)
    assert f"success status {status}" in bob.reason
    assert carol.action is BounceAction.FAILED
    states = {r.address: r.state for r in store.status(mid).recipients}
    assert states == {
        "bob@example.org": RecipientState.DELIVERED,
        "carol@example.org": RecipientState.FAILED,
    }
    assert store.list_suppressions() == []


def test_a_report_built_by_the_application_is_held_to_the_parsers_bounds() -> None:
    """``Report`` is public: an application may build one from its provider's webhook.
    Was: ``apply_report`` stored its texts as given, while ``parse_report`` makes each
    one line of at most 1,000 safe characters: an escape sequence and a line break
    reached a recipient's reason and MX host and a suppression's reply (and every view
    of them), and a reporting MTA of 5,000 characters made a reply the suppression
    list's own export could not import again (past 2,048 characters)."""
    from io import StringIO

    from mailstrom.safetext import is_safe
    from mailstrom.suppression_csv import parse_csv, write_csv

    store = MemoryStore()
    mid = store.enqueue(message("bob@example.org", "carol@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    mta = "mx.example.org\x1b[2J\r\nX-Injected: 1 " + "m" * 5000
    complaint = Report(
        kind=ReportKind.COMPLAINT,
        recipients=(ReportedRecipient(final_recipient="bob@example.org"),),
        envelope_id=mid,
        reporting_mta=mta,
        feedback_type="abuse",
    )
    bounce = Report(
        kind=ReportKind.DSN,
        recipients=(
            ReportedRecipient(
                final_recipient="carol@example.org",
                action="failed",
                status="5.1.1",
                diagnostic="550 5.1.1 \x1b[31mgone\r\nX-Injected: 1",
                diagnostic_type="smtp",
                remote_mta="mx\n\x1b" * 1000,
            ),
        ),
        envelope_id=mid,
        reporting_mta=mta,
    )
    [bob] = apply_report(store, complaint, now=NOW)
    [carol] = apply_report(store, bounce, now=NOW)
    assert (bob.action, carol.action) == (BounceAction.COMPLAINT, BounceAction.FAILED)
    entries = store.list_suppressions()
    texts = [e.reply for e in entries]
    texts += [text for r in store.status(mid).recipients for text in (r.error, r.mx_host) if text]
    assert any(mta[:14] in text for text in texts)
    for text in texts:
        assert is_safe(text), text[:60]
        assert len(text) <= 2048
    stream = StringIO()
    write_csv(entries, stream)
    again = parse_csv(stream.getvalue(), now=NOW)
    assert [e.reply for e in again] == [e.reply for e in entries]


def test_an_action_of_an_application_built_report_is_read_case_blind() -> None:
    """RFC 3464 action values are case-insensitive and ``parse_report`` lower-cases
    them; an application's ``Report`` saying ``Failed`` was ignored as "nothing final"."""
    store = MemoryStore()
    mid = store.enqueue(message("bob@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    report = Report(
        kind=ReportKind.DSN,
        recipients=(
            ReportedRecipient(
                final_recipient="bob@example.org",
                action="Failed",
                status="5.1.1",
                diagnostic="550 5.1.1 gone",
                diagnostic_type="smtp",
            ),
        ),
        envelope_id=mid,
    )
    [bob] = apply_report(store, report, now=NOW)
    assert bob.action is BounceAction.FAILED
