"""Contract: what applying a bounce or complaint reads of the store. A report names a
few recipients of at most eleven messages; it reads those, not every recipient of each
message with its history (:meth:`Store.recipients_by_address`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mailstrom.bounces import Report, ReportedRecipient, ReportKind, apply_report
from mailstrom.bounces.apply import BounceAction
from mailstrom.bounces.verp import recipient_token
from mailstrom.errors import UnknownMessage
from mailstrom.status import MessageStatus, RecipientState
from mailstrom.stores import Store
from tests.support.pg_plans import analyzed, generic_plan, rows_touched, statements_run

from .support import NOW, lease_all, message, results_for


def failed(address: str) -> ReportedRecipient:
    return ReportedRecipient(final_recipient=address, action="failed", status="5.1.1")


def counted_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many recipients each read of a message's recipients returns, in order."""
    reads: list[int] = []
    for name in ("status", "recipients_by_address"):
        real = getattr(store, name, None)
        if real is None:
            continue

        def counting(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            found = _real(*args, **kwargs)
            shown = found if isinstance(found, MessageStatus) else found.message
            reads.append(len(shown.recipients))
            return found

        monkeypatch.setattr(store, name, counting)
    return reads


def test_recipients_by_address_reads_those_named(store: Store) -> None:
    addresses = ("Alice@example.org", "bob@example.org", "carol@example.org")
    mid = store.enqueue(message(*addresses), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))

    found = store.recipients_by_address(mid, ["CAROL@Example.ORG", "alice@example.org", "x@y"])
    assert [r.address for r in found.message.recipients] == [
        "Alice@example.org",
        "carol@example.org",
    ]
    assert not found.single
    assert (found.message.id, found.message.envelope_from) == (mid, "sender@example.com")
    assert [r.state for r in found.message.recipients] == [RecipientState.DELIVERED] * 2
    assert all(r.history == () for r in found.message.recipients)
    assert store.recipients_by_address(mid, []).message.recipients == ()
    every = store.recipients_by_address(mid, None)
    assert [r.address for r in every.message.recipients] == list(addresses)

    one = store.enqueue(message("dave@example.org"), now=NOW)
    found = store.recipients_by_address(one, ["someone@else.example"])
    assert found.single
    assert [r.address for r in found.message.recipients] == ["dave@example.org"]
    for unknown in ("0" * 32, "a\x00b"):
        with pytest.raises(UnknownMessage):
            store.recipients_by_address(unknown, ["dave@example.org"])


def test_a_report_reads_the_recipients_it_names(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: applying one report read every recipient, with its history, of each of up to
    eleven messages it leads to (its ENVID, ten sharing its Message-ID header): 10 s on
    SQLite for a report about messages of 50,000 recipients, whoever sent it. Counted
    here (recipients read), not timed."""
    recipients = [f"user{n}@example.org" for n in range(300)]
    ids = [store.enqueue(message(*recipients), now=NOW) for _ in range(3)]
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    reads = counted_reads(store, monkeypatch)
    report = Report(
        kind=ReportKind.DSN,
        recipients=(failed("USER7@example.org"), failed("nobody@example.org")),
        original_message_id="<m1@example.com>",
        envelope_id=ids[0],
    )
    outcomes = apply_report(store, report, now=NOW)
    assert [(o.action, o.message_id) for o in outcomes] == [
        (BounceAction.FAILED, ids[0]),
        (BounceAction.UNMATCHED, None),
    ]
    assert sum(reads) <= 3, reads


def test_a_token_reads_its_recipient_or_every_one_when_rewritten(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VERP token names its recipient by a digest: the report's own recipients are
    tried first, and only a forwarded address (none the report names) reads them all."""
    recipients = [f"user{n}@example.org" for n in range(300)]
    mid = store.enqueue(message(*recipients, envelope_from="bounces+{token}@sender.test"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    key = store.verp_key()
    reads = counted_reads(store, monkeypatch)
    token = recipient_token(mid, "user7@example.org", key=key)
    named = Report(kind=ReportKind.DSN, recipients=(failed("user7@example.org"),))
    [outcome] = apply_report(
        store, named, now=NOW, envelope_recipient=f"bounces+{token}@sender.test"
    )
    assert (outcome.action, outcome.address) == (BounceAction.FAILED, "user7@example.org")
    assert sum(reads) <= 1, reads

    token = recipient_token(mid, "user9@example.org", key=key)
    forwarded = Report(kind=ReportKind.DSN, recipients=(failed("user9@forward.example"),))
    [outcome] = apply_report(
        store, forwarded, now=NOW, envelope_recipient=f"bounces+{token}@sender.test"
    )
    assert (outcome.action, outcome.address) == (BounceAction.FAILED, "user9@example.org")


@pytest.mark.parametrize(
    ("stored", "reported"),
    [
        ("JÖRG@example.com", "jörg@example.com"),
        ("ÉMILE@xn--bcher-kva.example", "émile@bücher.example"),
    ],
)
def test_a_report_finds_a_recipient_whose_local_part_differs_in_unicode_case(
    store: Store, stored: str, reported: str
) -> None:
    """Was: the store compares ASCII letters only, so a stored ``JÖRG@example.com``
    reported as ``jörg@example.com`` came back unmatched; the suppression list's key
    (full lower case) matched it before the read was narrowed."""
    mid = store.enqueue(message(stored, "other@example.com"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    report = Report(kind=ReportKind.DSN, recipients=(failed(reported),), envelope_id=mid)

    [outcome] = apply_report(store, report, now=NOW)

    assert (outcome.action, outcome.address) == (BounceAction.FAILED, stored)
    assert store.status(mid).recipients[1].state is RecipientState.DELIVERED


@pytest.mark.parametrize("plan_of", [analyzed, generic_plan], ids=["custom", "generic"])
def test_postgres_seeks_the_named_recipients_in_their_folded_index(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, plan_of: Callable[..., Any]
) -> None:
    """Was: PostgreSQL folded every address of the message to compare it with those
    named, reading each row of the message: 32,000 rows and 126 ms for a bounce about one
    recipient of a message of 30,000. The names are now sought in recipients_folded (its
    expression is that fold), in the plan made for the values and in a prepared
    statement's generic one: a few rows touched, not the message's 3,000 nor the other
    messages' rows of the name, and the other case stored beside it is found as before."""
    import psycopg

    from mailstrom.stores.postgres import PostgresStore

    with PostgresStore(postgres_url) as store:
        stored = [f"user{n}@example.org" for n in range(3000)]
        mid = store.enqueue(message(*stored, "USER7@Example.org"), now=NOW)
        # The names in 2,000 small messages too: the generic plan is made for those.
        small = message("user7@example.org", "USER7@Example.org")
        store.enqueue_many([small] * 2000, now=NOW)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("ANALYZE recipients")
        picked = statements_run(monkeypatch, lambda _, params: "addresses" in (params or {}))
        with picked as seen:
            found = store.recipients_by_address(mid, ["User7@example.ORG"])
    assert [r.address for r in found.message.recipients] == [
        "user7@example.org",
        "USER7@Example.org",
    ]
    [(sql, params)] = seen
    plan = plan_of(postgres_url, sql, params)
    plan = plan[0]["Plan"] if isinstance(plan, list) else plan
    touched = rows_touched(plan)
    assert touched < 100, (touched, plan)
    assert "recipients_folded" in repr(plan), plan


@pytest.mark.parametrize("plan_of", [analyzed, generic_plan], ids=["custom", "generic"])
def test_postgres_seeks_a_lower_case_name_in_the_key_however_common_it_is(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, plan_of: Callable[..., Any]
) -> None:
    """A name in lower case is sought in the primary key, by the message and the name.
    Was: the name comes from unnest(), unknown when the statement is planned, so the
    planner could take the index of addresses alone and filter by message: a bounce
    about a name that 5,000 other messages hold read its 5,000 rows (and a million for a
    name in a million messages)."""
    import psycopg

    from mailstrom.stores.postgres import PostgresStore

    with PostgresStore(postgres_url) as store:
        stored = [f"user{n}@example.org" for n in range(30000)]
        mid = store.enqueue(message(*stored, "frequent@example.org"), now=NOW)
        small = message("frequent@example.org", "other@example.org")
        store.enqueue_many([small] * 5000, now=NOW)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("ANALYZE recipients")
        picked = statements_run(monkeypatch, lambda _, params: "addresses" in (params or {}))
        with picked as seen:
            found = store.recipients_by_address(mid, ["frequent@example.org"])
    assert [r.address for r in found.message.recipients] == ["frequent@example.org"]
    [(sql, params)] = seen
    plan = plan_of(postgres_url, sql, params)
    plan = plan[0]["Plan"] if isinstance(plan, list) else plan
    touched = rows_touched(plan)
    assert touched < 100, (touched, plan)


@pytest.mark.parametrize("reported", ["bob@bücher.example", '"bob"@xn--bcher-kva.example'])
def test_postgres_finds_a_name_written_unlike_any_recipient_in_the_key(
    postgres_url: str, reported: str
) -> None:
    """A report names a recipient in a form no recipient is stored in (a U-label domain,
    a quoted local part): it is found by its stored form, which is asked for too."""
    from mailstrom.stores.postgres import PostgresStore

    store = PostgresStore(postgres_url)
    try:
        others = [f"user{n}@xn--bcher-kva.example" for n in range(50)]
        mid = store.enqueue(message("bob@xn--bcher-kva.example", *others), now=NOW)
        store.record(results_for(lease_all(store), RecipientState.DELIVERED))
        report = Report(kind=ReportKind.DSN, recipients=(failed(reported),), envelope_id=mid)
        [outcome] = apply_report(store, report, now=NOW)
        assert (outcome.action, outcome.address) == (
            BounceAction.FAILED,
            "bob@xn--bcher-kva.example",
        )
    finally:
        store.close()


def test_a_token_of_a_message_sent_without_verp_reads_no_other_recipient(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a message sent with VERP has tokens: one naming another message (its id is in
    the Message-ID header every recipient sees, the digest made up) read every recipient
    of it, 300 here, to digest each one, and a digest that happened to match would have
    named that recipient."""
    recipients = [f"user{n}@example.org" for n in range(300)]
    mid = store.enqueue(message(*recipients), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    reads = counted_reads(store, monkeypatch)
    forged = Report(kind=ReportKind.DSN, recipients=(failed("user9@forward.example"),))
    [outcome] = apply_report(
        store, forged, now=NOW, envelope_recipient=f"bounces+{mid}-0123456789@sender.test"
    )
    assert outcome.action is BounceAction.UNMATCHED
    assert sum(reads) <= 1, reads


def test_recipients_by_address_finds_every_case_variant(store: Store) -> None:
    """Was: PostgreSQL returned only the spellings asked for when each was found as
    written, so of ``Bob@`` and ``bob@`` asking for ``bob@`` (even twice, or as ``BOB@``
    too) found ``bob@`` alone; memory and SQLite found both, as the contract says."""
    stored = ("Bob@example.org", "carol@example.org", "bob@example.org", "BOB@Example.ORG")
    mid = store.enqueue(message(*stored), now=NOW)
    bobs = ["Bob@example.org", "bob@example.org", "BOB@Example.ORG"]
    for asked in (
        ["bob@example.org"],
        ["bob@example.org", "bob@example.org"],
        ["bob@example.org", "BOB@EXAMPLE.ORG"],
        ["Bob@example.org", "bob@example.org", "BOB@Example.ORG"],
    ):
        found = store.recipients_by_address(mid, asked)
        assert [r.address for r in found.message.recipients] == bobs, asked
