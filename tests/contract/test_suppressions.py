"""Contract: the suppression list (add, replace, look up, expire, list, remove)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from mailstrom import Email
from mailstrom.bounces import Report, ReportedRecipient, ReportKind, apply_report
from mailstrom.bounds import EARLIEST_TIME, LATEST_TIME
from mailstrom.config import Lane
from mailstrom.errors import InvalidArgument, StoreError, StoreRefusedData
from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.preparation import prepare
from mailstrom.runtime.suppressing import lane_bypass, lease_targets, screen
from mailstrom.status import RecipientState
from mailstrom.stores import Store
from mailstrom.stores.postgres import PostgresStore
from mailstrom.stores.postgres.store import SUPPRESS_CHUNK
from mailstrom.suppression import (
    BYPASSABLE,
    MAX_TARGET,
    Suppression,
    SuppressionSource,
    match,
    normalize_target,
    stored_forms,
)
from tests.support.refusing import REASON as REFUSED
from tests.support.refusing import refuse_suppression, stop_refusing

from .conftest import Backend
from .support import NOW, at_once, lease_all, message, results_for

DAY = timedelta(days=1)


def entry(
    target: str,
    *,
    source: SuppressionSource = SuppressionSource.HARD_BOUNCE,
    reply: str = "550 5.1.1 no such user",
    expires_at: object = None,
    message_id: str | None = "0190f3a2c4e1b7d08a4f2c6e9b1d3f57",
) -> Suppression:
    return Suppression(
        target=target,
        source=source,
        reply=reply,
        created_at=NOW,
        expires_at=expires_at,  # type: ignore[arg-type]
        message_id=message_id,
    )


def test_an_entry_round_trips_with_every_field(store: Store) -> None:
    bob = entry("bob@example.org", expires_at=NOW + DAY)
    assert store.suppress([bob]) == 1
    assert store.suppressions_for(["bob@example.org"], now=NOW) == {"bob@example.org": bob}
    assert store.list_suppressions() == [bob]


def test_lookup_returns_only_the_targets_asked_for(store: Store) -> None:
    store.suppress(
        [
            entry("bob@example.org"),
            entry("example.net", source=SuppressionSource.MANUAL, reply="", message_id=None),
        ]
    )
    found = store.suppressions_for(
        ["ann@example.org", "example.org", "bob@example.org", "carl@example.net", "example.net"],
        now=NOW,
    )
    assert sorted(found) == ["bob@example.org", "example.net"]
    assert found["example.net"].is_domain
    assert store.suppressions_for([], now=NOW) == {}


def test_a_new_entry_replaces_the_old_one_for_its_target(store: Store) -> None:
    store.suppress([entry("bob@example.org", expires_at=NOW + DAY)])
    newer = entry("bob@example.org", source=SuppressionSource.COMPLAINT, reply="abuse report")
    store.suppress([newer])
    assert store.list_suppressions() == [newer]


def test_the_last_of_duplicates_in_one_call_wins(store: Store) -> None:
    first = entry("bob@example.org", reply="first")
    last = entry("bob@example.org", reply="last")
    store.suppress([first, last])
    assert store.suppressions_for(["bob@example.org"], now=NOW)["bob@example.org"].reply == "last"


def test_expired_entries_do_not_apply_and_are_listed_only_without_now(store: Store) -> None:
    store.suppress([entry("bob@example.org", expires_at=NOW + DAY), entry("ann@example.org")])
    assert sorted(store.suppressions_for(["bob@example.org", "ann@example.org"], now=NOW)) == [
        "ann@example.org",
        "bob@example.org",
    ]
    later = NOW + 2 * DAY
    assert list(store.suppressions_for(["bob@example.org", "ann@example.org"], now=later)) == [
        "ann@example.org"
    ]
    assert [e.target for e in store.list_suppressions(now=later)] == ["ann@example.org"]
    assert [e.target for e in store.list_suppressions()] == ["ann@example.org", "bob@example.org"]


def test_expiring_exactly_now_no_longer_applies(store: Store) -> None:
    store.suppress([entry("bob@example.org", expires_at=NOW)])
    assert store.suppressions_for(["bob@example.org"], now=NOW) == {}


def test_listing_pages_in_target_order(store: Store) -> None:
    targets = [f"user{i:03d}@example.org" for i in range(25)] + ["example.com", "zz.example"]
    store.suppress([entry(t) for t in reversed(targets)])
    seen: list[str] = []
    after = ""
    while page := store.list_suppressions(after=after, limit=10):
        seen += [e.target for e in page]
        after = page[-1].target
    assert seen == sorted(targets)
    assert store.list_suppressions(limit=0) == []


@pytest.mark.parametrize("after", ["a\x00", "a\udc80", "a" * (MAX_TARGET + 1), None])
def test_a_page_after_a_target_no_store_can_compare_is_refused_alike(
    store: Store, after: Any
) -> None:
    """Was: a page after a target with a NUL was listed by the memory store and SQLite
    and refused by PostgreSQL (StoreRefusedData), one with a lone surrogate listed by the
    memory store alone. Every store refuses such an ``after`` (InvalidArgument), as
    ``Mailstrom.suppressions`` and ``mailstrom suppress list --after`` do."""
    store.suppress([entry("a@example.org"), entry("b@example.org")])
    with pytest.raises(InvalidArgument, match=r"^after: ") as raised:
        store.list_suppressions(after=after)
    assert raised.value.argument == "after"
    longest = "a" * MAX_TARGET
    assert [e.target for e in store.list_suppressions(after=longest)] == ["b@example.org"]


def test_unsuppress_removes_and_counts_what_existed(store: Store) -> None:
    store.suppress([entry("bob@example.org"), entry("ann@example.org")])
    assert store.unsuppress(["bob@example.org", "bob@example.org", "nobody@example.org"]) == 1
    assert [e.target for e in store.list_suppressions()] == ["ann@example.org"]
    assert store.unsuppress([]) == 0


def test_many_targets_in_one_call(store: Store) -> None:
    targets = [f"u{i}@example.org" for i in range(1200)]
    assert store.suppress([entry(t) for t in targets]) == 1200
    assert len(store.suppressions_for([*targets, "example.org"], now=NOW)) == 1200
    assert store.unsuppress(targets[:700]) == 700


WHOLE_FILE = SUPPRESS_CHUNK + 1
"""Entries in one call, as ``mailstrom suppress import`` makes it: more than any store
writes in one statement."""


def test_a_whole_file_in_one_call_is_written_the_newest_duplicate_winning(store: Store) -> None:
    entries = [entry(f"u{i:06d}@example.org") for i in range(WHOLE_FILE)]
    newest = entry("u000000@example.org", reply="newest")  # written after the first chunk
    assert store.suppress([*entries, newest]) == WHOLE_FILE + 1
    listed = store.list_suppressions(limit=WHOLE_FILE + 1)
    assert [e.target for e in listed] == [e.target for e in entries]
    assert listed[0] == newest


def test_a_write_that_fails_midway_leaves_the_list_as_it_was(store_backend: object) -> None:
    """All or none: the store fails at the last entry, after whole statements' worth of
    earlier ones (PostgreSQL's connections autocommit each statement unless told not to).
    Trying again once the trouble has passed gives what one clean write gives."""
    from .conftest import Backend

    assert isinstance(store_backend, Backend)
    if store_backend.name == "memory":
        pytest.skip("a memory store has no disk, lock or server that could fail")
    store = store_backend.open()
    before = entry("u000000@example.org", reply="before")
    store.suppress([before])
    entries = [entry(f"u{i:06d}@example.org", reply="new") for i in range(WHOLE_FILE)]
    refuse_suppression(store_backend.url, entries[-1].target)
    with pytest.raises(StoreError, match=REFUSED):
        store.suppress(entries)
    assert store.list_suppressions(limit=WHOLE_FILE) == [before]

    stop_refusing(store_backend.url)
    assert store.suppress(entries) == WHOLE_FILE
    assert store.list_suppressions(limit=WHOLE_FILE + 1) == entries


@pytest.mark.parametrize("unknown", ["source", "created_at"])
def test_an_entry_whose_source_or_time_is_unknown_is_refused(store: Store, unknown: str) -> None:
    """An entry read back from a row that cannot be read has an unknown (None) source or
    time; written, it is refused rather than made up, all or none: SQLite's and
    PostgreSQL's NOT NULL columns refuse it. The memory store kept it, and listed it."""
    before = entry("a@example.org")
    store.suppress([before])
    damaged = dataclasses.replace(entry("c@example.org"), **{unknown: None})
    with pytest.raises(StoreRefusedData):
        store.suppress([entry("a@example.org", reply="new"), entry("b@example.org"), damaged])
    assert store.list_suppressions() == [before]


def test_two_whole_files_written_at_once_in_other_orders_both_go_in(
    store_backend: Backend,
) -> None:
    """Each write waits for the other's entries it shares to commit: written a statement
    at a time in the files' orders, the second statements of two imports waited for each
    other and PostgreSQL failed one import (a deadlock)."""
    stores = [store_backend.open() for _ in range(2)]
    entries = [entry(f"u{i:06d}@example.org") for i in range(2 * SUPPRESS_CHUNK)]
    at_once(
        lambda: stores[0].suppress(entries),
        lambda: stores[1].suppress(entries[::-1]),
        timeout=120,
    )
    assert len(stores[0].list_suppressions(limit=3 * SUPPRESS_CHUNK)) == len(entries)


def test_unicode_targets_round_trip(store: Store) -> None:
    store.suppress([entry("jörg@bücher.example"), entry("bücher.example")])
    found = store.suppressions_for(["jörg@bücher.example", "bücher.example"], now=NOW)
    assert sorted(found) == ["bücher.example", "jörg@bücher.example"]


def test_a_second_store_object_sees_the_entries(store_backend: object) -> None:
    from .conftest import Backend

    assert isinstance(store_backend, Backend)
    first = store_backend.open()
    first.suppress([entry("bob@example.org")])
    second = store_backend.open()
    assert list(second.suppressions_for(["bob@example.org"], now=NOW)) == ["bob@example.org"]


def test_a_lease_carries_the_entries_of_its_recipients_when_the_store_reads_them(
    store: Store,
) -> None:
    """The lease's own transaction reads the list (one store call per lease, not two);
    a store that does not must say None, and the worker then asks suppressions_for."""
    store.enqueue(
        message("bob@example.org", "ann@example.org", "carl@example.net", "dan@other.test"),
        now=NOW,
    )
    store.suppress(
        [
            entry("bob@example.org"),
            entry("example.net", source=SuppressionSource.MANUAL, reply="", message_id=None),
            entry("ann@example.org", expires_at=NOW - DAY),  # expired: does not apply
            entry("eve@example.org"),  # not in the lease
        ]
    )
    lease = lease_all(store)
    assert lease.suppressions is not None  # read with the lease
    targets = ["bob@example.org", "example.org", "ann@example.org", "carl@example.net"]
    targets += ["example.net", "dan@other.test", "other.test"]
    assert lease.suppressions == store.suppressions_for(targets, now=NOW)
    assert sorted(lease.suppressions) == ["bob@example.org", "example.net"]


def test_a_lease_with_an_empty_list_carries_no_entries(store: Store) -> None:
    store.enqueue(message("bob@example.org"), now=NOW)
    lease = lease_all(store)
    assert lease.suppressions == {}


def test_a_lease_reads_entries_whatever_the_case_of_its_addresses(store: Store) -> None:
    store.enqueue(message("Bob@Example.ORG", "ann@EXAMPLE.net"), now=NOW)
    store.suppress(
        [entry("bob@example.org"), entry("example.net", source=SuppressionSource.MANUAL)]
    )
    lease = lease_all(store)
    assert lease.suppressions is not None
    assert sorted(lease.suppressions) == ["bob@example.org", "example.net"]


def test_a_lease_of_a_non_ascii_address_carries_the_entries_or_leaves_them_to_the_worker(
    store: Store,
) -> None:
    """PostgreSQL folds case in SQL for ASCII only (Unicode lower-casing depends on the
    server's locale): a lease with another address says None, and the worker asks
    suppressions_for, which folds in Python like everything else."""
    store.enqueue(message("Ünal@example.org", "bob@example.org", smtputf8=True), now=NOW)
    store.suppress([entry("ünal@example.org")])
    lease = lease_all(store)
    if isinstance(store, PostgresStore):
        assert lease.suppressions is None
    else:
        assert lease.suppressions is not None
        assert sorted(lease.suppressions) == ["ünal@example.org"]
    assert sorted(store.suppressions_for(["ünal@example.org"], now=NOW)) == ["ünal@example.org"]


def test_an_entry_given_with_a_u_label_domain_screens_the_recipients_prepare_stored(
    store: Store,
) -> None:
    """prepare() stores bob@bücher.example as bob@xn--bcher-kva.example: an entry typed
    with the U-label must be kept in that form, or the lookup never finds it."""
    prepared = prepare(
        Email(
            from_="app@example.com",
            to=["bob@bücher.example", "ñoño@bücher.example", "ann@example.org"],
            subject="s",
            text="t",
        )
    )
    store.enqueue(prepared, now=NOW)
    store.suppress(
        [
            entry(normalize_target("Bücher.example"), source=SuppressionSource.MANUAL),
            entry(normalize_target("ñoño@bücher.example"), reply="own entry"),
        ]
    )
    lease = lease_all(store)
    found = lease.suppressions
    if found is None:  # PostgreSQL leaves a non-ASCII address to the worker
        found = store.suppressions_for(lease_targets(lease), now=NOW)
    screened = {r.address: match(r.address, found) for item in lease.items for r in item.recipients}
    assert {a: e and e.target for a, e in screened.items()} == {
        "bob@xn--bcher-kva.example": "xn--bcher-kva.example",
        "ñoño@xn--bcher-kva.example": "ñoño@xn--bcher-kva.example",
        "ann@example.org": None,
    }
    assert store.unsuppress([normalize_target("BÜCHER.example")]) == 1


def test_an_entry_given_with_a_long_ipv6_literal_screens_the_recipient_prepare_stored(
    store: Store,
) -> None:
    """prepare() stores bob@[IPv6:2001:DB8:0::1] as bob@[IPv6:2001:db8::1]: the entry
    typed as the application wrote the recipient, and its domain's, find it in every
    store's lease (PostgreSQL's join included)."""
    prepared = prepare(
        Email(
            from_="app@example.com",
            to=["bob@[IPv6:2001:DB8:0::1]", "ann@[IPv6:2001:0db8::2]", "cy@example.org"],
            subject="s",
            text="t",
        )
    )
    store.enqueue(prepared, now=NOW)
    store.suppress(
        [
            entry(normalize_target("Bob@[IPv6:2001:DB8:0::1]"), reply="own entry"),
            entry(normalize_target("[IPV6:2001:DB8:0:0::2]"), source=SuppressionSource.MANUAL),
        ]
    )
    lease = lease_all(store)
    assert lease.suppressions is not None
    screened = {
        r.address: match(r.address, lease.suppressions)
        for item in lease.items
        for r in item.recipients
    }
    bob, ann, cy = prepared.recipients
    assert {a: e and e.target for a, e in screened.items()} == {
        bob: "bob@[ipv6:2001:db8::1]",
        ann: "[ipv6:2001:db8::2]",
        cy: None,
    }


def test_an_entry_with_a_naive_time_is_refused_and_one_elsewhere_is_kept_in_utc(
    store: Store,
) -> None:
    """Was: the memory store kept an entry's times as given. A naive one, which SQLite
    and PostgreSQL refuse, was written, and every later ``list_suppressions(now=...)``
    and lease lookup compared it with an aware time and raised TypeError; one in another
    zone was read back in that zone, where the SQL stores read it back in UTC."""
    naive_created = dataclasses.replace(entry("a@example.org"), created_at=NOW.replace(tzinfo=None))
    naive_expiry = entry("b@example.org", expires_at=(NOW + DAY).replace(tzinfo=None))
    for bad in (naive_created, naive_expiry):
        with pytest.raises(InvalidArgument):
            store.suppress([entry("c@example.org"), bad])
    assert store.list_suppressions() == []  # all or none
    assert store.list_suppressions(now=NOW) == []
    east = timezone(timedelta(hours=5))
    shifted = dataclasses.replace(
        entry("d@example.org"),
        created_at=NOW.astimezone(east),
        expires_at=(NOW + DAY).astimezone(east),
    )
    assert store.suppress([shifted]) == 1
    (kept,) = store.list_suppressions(now=NOW)
    assert kept == entry("d@example.org", expires_at=NOW + DAY)
    assert kept.created_at is not None and kept.created_at.utcoffset() == timedelta(0)
    assert kept.expires_at is not None and kept.expires_at.utcoffset() == timedelta(0)
    assert store.suppressions_for(["d@example.org"], now=NOW) == {"d@example.org": kept}


FAR_PAST = datetime(1899, 12, 31, 23, 59, tzinfo=UTC)
FAR_FUTURE = datetime(9999, 12, 31, 23, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"expires_at": FAR_FUTURE}, id="expiry-9999"),
        pytest.param({"expires_at": datetime(9000, 1, 1, tzinfo=UTC)}, id="expiry-9000"),
        pytest.param({"created_at": FAR_PAST}, id="created-1899"),
        pytest.param({"target": "a\x00b@example.org"}, id="nul-target"),
        pytest.param({"target": "a\udc80@example.org"}, id="surrogate-target"),
        pytest.param({"target": "a" * (MAX_TARGET + 1)}, id="long-target"),
        pytest.param({"reply": "550 no\x00such user"}, id="nul-reply"),
        pytest.param({"reply": "550 \udc80"}, id="surrogate-reply"),
        pytest.param({"message_id": "0190\x00"}, id="nul-message-id"),
    ],
)
def test_an_entry_no_store_keeps_as_given_is_refused_alike(
    store: Store, bad: dict[str, Any]
) -> None:
    """Was: each store kept such an entry its own way. An expiry of 9999-12-31 (another
    system's "never") or a creation before 1900 was kept by the memory store and read
    back by SQL stores as no expiry and an unknown time (SQLite even for 9000-01-01); a
    NUL was kept by the memory store and SQLite and refused by PostgreSQL, a lone
    surrogate kept by the memory store alone, and a target past MAX_TARGET octets failed
    PostgreSQL's index as a passing StoreError. Now every store refuses it, all or none,
    before writing any."""
    before = entry("a@example.org")
    store.suppress([before])
    damaged = dataclasses.replace(entry("c@example.org"), **bad)
    with pytest.raises(InvalidArgument):
        store.suppress([entry("a@example.org", reply="new"), damaged], keep_longer=True)
    assert store.list_suppressions() == [before]
    edge = [
        dataclasses.replace(entry("d@example.org"), created_at=EARLIEST_TIME),
        entry("e@example.org", expires_at=LATEST_TIME - timedelta(microseconds=1)),
        entry("f" * (MAX_TARGET - len("@example.org")) + "@example.org"),
    ]
    assert store.suppress(edge) == 3
    assert store.list_suppressions() == [before, *edge]


class _Interleaved:
    """``store``, but its first ``suppressions_for`` (the read a report's entry is judged
    by) returns only after ``meanwhile`` ran: two ``mailstrom bounce`` runs at once, the
    other one's whole run falling between this one's read and its write."""

    def __init__(self, store: Store, meanwhile: Callable[[], object]) -> None:
        self._store = store
        self._meanwhile: Callable[[], object] | None = meanwhile

    def suppressions_for(self, targets: Sequence[str], *, now: datetime) -> dict[str, Suppression]:
        found = self._store.suppressions_for(targets, now=now)
        if self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            meanwhile()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _bounce(mid: str) -> Report:
    """A hard bounce (5.1.1) after acceptance of a@example.org."""
    return Report(
        kind=ReportKind.DSN,
        reporting_mta="mx.example.org",
        envelope_id=mid,
        recipients=(
            ReportedRecipient(
                final_recipient="a@example.org",
                action="failed",
                status="5.1.1",
                diagnostic="550 5.1.1 no such user",
                diagnostic_type="smtp",
                diagnostic_code=550,
                diagnostic_status="5.1.1",
                remote_mta="mx.example.org",
            ),
        ),
    )


def _complaint(mid: str) -> Report:
    return Report(
        kind=ReportKind.COMPLAINT,
        reporting_mta="fbl.example.org",
        envelope_id=mid,
        feedback_type="abuse",
        recipients=(ReportedRecipient(final_recipient="a@example.org"),),
    )


@pytest.mark.parametrize("first", ["bounce", "complaint"])
def test_two_reports_at_once_leave_the_longer_entry(store_backend: Backend, first: str) -> None:
    """A hard bounce (suppressed for ``suppress_for``) and a complaint (for good) about
    one address, applied by two runs at once. Was: each run read the entry in force and
    then wrote its own; the bounce's run, reading before the complaint was written and
    writing after, replaced the complaint's entry by one that ran out, and the address got
    mail again. The store's write now keeps the longer entry itself."""
    store = store_backend.open()
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    other = store_backend.open()  # the other run's own store (the same one in memory)
    reports = {"bounce": _bounce(mid), "complaint": _complaint(mid)}
    second = "complaint" if first == "bounce" else "bounce"
    later = NOW + DAY

    def run(on: Any, kind: str, at: datetime) -> None:
        apply_report(on, reports[kind], now=at, suppress_for=timedelta(days=30))

    run(_Interleaved(store, lambda: run(other, second, later)), first, later)
    [kept] = store.list_suppressions()
    assert (kept.source, kept.expires_at) == (SuppressionSource.COMPLAINT, None)
    assert store.status(mid).recipient("a@example.org").state is RecipientState.FAILED


def test_writers_at_once_with_keep_longer_leave_the_longer_entries(store_backend: Backend) -> None:
    """Two writers on stores of their own (connections of their own), at the same time:
    one writes bounces' entries (30 days) and one complaints' (for good) for the same
    targets, each in its own order and transaction by transaction. However their writes
    interleave, every target ends with the complaint's entry: the store keeps the longer
    one in the write itself (an upsert judged on the row it locked), not by a read before."""
    first = store_backend.open()
    others = [store_backend.open() for _ in range(2)]
    targets = [f"u{i}@example.org" for i in range(120)]
    bounce = [entry(t, expires_at=NOW + 30 * DAY, reply="bounce") for t in targets]
    complaint = [entry(t, source=SuppressionSource.COMPLAINT, reply="abuse") for t in targets]
    start = threading.Barrier(2, timeout=30)
    failed: list[BaseException] = []

    def write(on: Store, entries: list[Suppression]) -> None:
        try:
            start.wait()
            for one in entries:
                on.suppress([one], keep_longer=True)
        except BaseException as exc:  # reported by the test's thread
            failed.append(exc)

    writers = [
        threading.Thread(target=write, args=(others[0], bounce)),
        threading.Thread(target=write, args=(others[1], complaint[::-1])),
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert not any(w.is_alive() for w in writers)
    assert failed == []
    kept = {e.target: (e.source, e.expires_at) for e in first.list_suppressions(limit=1000)}
    assert kept == dict.fromkeys(targets, (SuppressionSource.COMPLAINT, None))


def test_keep_longer_writes_only_over_an_entry_that_ends_sooner(store: Store) -> None:
    forever = entry("a@example.org", source=SuppressionSource.COMPLAINT, reply="abuse")
    week = entry("b@example.org", expires_at=NOW + 7 * DAY, reply="week")
    store.suppress([forever, week, entry("c@example.org", expires_at=NOW - DAY)])
    day = NOW + DAY
    bounces = [entry(t, expires_at=day, reply="bounce") for t in ("a", "b", "c", "d")]
    store.suppress(
        [dataclasses.replace(e, target=f"{e.target}@example.org") for e in bounces],
        keep_longer=True,
    )
    kept = {e.target: e.reply for e in store.list_suppressions()}
    assert kept == {
        "a@example.org": "abuse",
        "b@example.org": "week",
        "c@example.org": "bounce",  # ran out before the new one ends
        "d@example.org": "bounce",
    }
    # An entry without end replaces one with an end; of duplicates the longest stands.
    store.suppress(
        [
            entry("b@example.org", reply="for good"),
            entry("b@example.org", expires_at=day, reply="shorter, later"),
        ],
        keep_longer=True,
    )
    assert store.suppressions_for(["b@example.org"], now=NOW)["b@example.org"].reply == "for good"
    # Without it, the newest wins as before (an operator's change).
    store.suppress([entry("a@example.org", expires_at=day, reply="operator")])
    assert store.suppressions_for(["a@example.org"], now=NOW)["a@example.org"].reply == "operator"


def test_a_quoted_local_part_is_suppressed_in_the_form_prepare_stores(store: Store) -> None:
    """Was: an entry for ``"john doe"@example.com`` or ``"a@b"@x.org`` was refused (not
    an address), so neither an operator nor a hard bounce could put it on the list, and
    mail to it went on. The entry is kept as prepare() stores the recipient (needless
    quotes off: ``"john"@x`` is ``john@x``, RFC 5321 §4.1.2), lower-cased like any."""
    prepared = prepare(
        Email(
            from_="app@example.com",
            to=['"John Doe"@example.com', '"john"@example.org', '"a@b"@x.org', "ann@x.org"],
            subject="s",
            text="t",
        )
    )
    store.enqueue(prepared, now=NOW)
    typed = ['"JOHN DOE"@Example.com', "John@example.org", '"a@b"@X.org']
    store.suppress([entry(normalize_target(t)) for t in typed])
    assert [e.target for e in store.list_suppressions()] == [
        '"a@b"@x.org',
        '"john doe"@example.com',
        "john@example.org",
    ]
    lease = lease_all(store)
    found = store.suppressions_for(lease_targets(lease), now=NOW)
    if lease.suppressions is not None:
        assert lease.suppressions == found
    screened = {r.address: match(r.address, found) for item in lease.items for r in item.recipients}
    assert {a: e and e.target for a, e in screened.items()} == {
        '"John Doe"@example.com': '"john doe"@example.com',
        "john@example.org": "john@example.org",
        '"a@b"@x.org': '"a@b"@x.org',
        "ann@x.org": None,
    }
    assert store.unsuppress(stored_forms('"john doe"@EXAMPLE.com')) == 1
    assert store.unsuppress(stored_forms('"john"@example.org')) == 1


@pytest.mark.parametrize("limit", [True, 1.5, None, 2**63], ids=["bool", "float", "none", "huge"])
def test_a_prune_limit_no_store_takes_is_refused_whatever_has_expired(
    store: Store, limit: Any
) -> None:
    """Was: SQLite looked for expired entries before it looked at ``limit``: with none
    expired it answered 0, and refused the same limit (InvalidArgument) once one had,
    where the memory store and PostgreSQL refused it always."""
    store.suppress([entry("a@example.org", expires_at=NOW + DAY)])
    with pytest.raises(InvalidArgument, match=r"^limit: "):
        store.prune_suppressions(expired_before=NOW, limit=limit)
    with pytest.raises(InvalidArgument, match=r"^limit: "):
        store.prune_suppressions(expired_before=NOW + 2 * DAY, limit=limit)
    assert len(store.list_suppressions()) == 1


def test_pruning_deletes_expired_entries_a_bounded_batch_at_a_time(store: Store) -> None:
    """Was: nothing deleted an entry once it expired; a list fed by ``suppress_for``
    grew for ever. Entries expired at or before the time go, soonest expired first and at
    most ``limit`` a call (one short write each); others stay."""
    store.suppress(
        [
            entry("a@example.org", expires_at=NOW - 3 * DAY),
            entry("b@example.org", expires_at=NOW - 2 * DAY),
            entry("c@example.org", expires_at=NOW - DAY),
            entry("d@example.org", expires_at=NOW + DAY),
            entry("e@example.org"),
        ]
    )
    assert store.prune_suppressions(expired_before=NOW - DAY, limit=2) == 2
    assert [e.target for e in store.list_suppressions()] == [
        "c@example.org",
        "d@example.org",
        "e@example.org",
    ]
    assert store.prune_suppressions(expired_before=NOW - DAY, limit=2) == 1
    assert store.prune_suppressions(expired_before=NOW - DAY, limit=2) == 0
    assert store.prune_suppressions(expired_before=NOW + 2 * DAY, limit=0) == 0
    assert store.prune_suppressions(expired_before=NOW + 2 * DAY, limit=10) == 1
    assert [e.target for e in store.list_suppressions()] == ["e@example.org"]
    with pytest.raises(InvalidArgument):
        store.prune_suppressions(expired_before=NOW.replace(tzinfo=None), limit=10)


def test_a_lane_that_bypasses_bounces_is_sent_past_them_and_only_them(store: Store) -> None:
    """A password reset to an address that bounced, sent in a lane whose
    ``bypass_suppression`` names bounces, goes out; the same mail in another lane, or to
    an address with a complaint's, an operator's or its domain's manual entry, does not.
    The lane comes back with the lease from every store."""
    addresses = ["bounced@example.org", "late@example.org", "complained@example.org"]
    addresses += ["manual@example.org", "bounced@blocked.test"]
    for lane in ("account", "transactional"):
        store.enqueue(
            dataclasses.replace(message(*addresses), attributes=QueueAttributes(priority=lane)),
            now=NOW,
        )
    store.suppress(
        [
            entry("bounced@example.org"),
            entry("late@example.org", source=SuppressionSource.ASYNC_BOUNCE),
            entry("complained@example.org", source=SuppressionSource.COMPLAINT),
            entry("manual@example.org", source=SuppressionSource.MANUAL),
            entry("bounced@blocked.test"),
            entry("blocked.test", source=SuppressionSource.MANUAL),
        ]
    )
    lanes = (
        Lane(name="account", bypass_suppression=tuple(BYPASSABLE)),
        Lane(name="transactional"),
    )
    bypass = lane_bypass(lanes)
    lease = lease_all(store)
    found = store.suppressions_for(lease_targets(lease), now=NOW)
    sent: dict[str, list[str]] = {}
    for item in lease.items:
        rest, _ = screen(item, found, now=NOW, bypass=bypass)
        kept = [] if rest is None else [r.address for r in rest.recipients]
        sent.setdefault(item.priority, []).extend(kept)
    assert {lane: sorted(kept) for lane, kept in sent.items()} == {
        "account": ["bounced@example.org", "late@example.org"],
        "transactional": [],
    }


def test_a_complaint_takes_the_place_of_a_bounces_entry_as_long(store: Store) -> None:
    """The password reset of the test above went out past the address's hard bounce (no
    end, the default), and its reader complained. Was: the complaint's entry, also
    without end, did not outlast the bounce's, which was kept (``keep_longer``), so the
    lane that sends past bounces went on mailing the address that complained, whose
    complaint should stop every lane. It now takes the bounce's place, from a report
    (``apply_report``), from an entry written alone or with the bounce's in one call,
    and whichever came first; a bounce still never replaces a complaint."""
    later = NOW + DAY
    complaint = dataclasses.replace(
        entry("a@example.org", source=SuppressionSource.COMPLAINT, reply="abuse"),
        created_at=later,
    )
    store.suppress([entry("a@example.org"), entry("b@example.org")], keep_longer=True)
    store.suppress([complaint], keep_longer=True)
    store.suppress(
        [entry("c@example.org"), dataclasses.replace(complaint, target="c@example.org")],
        keep_longer=True,
    )
    store.suppress([dataclasses.replace(complaint, target="d@example.org")], keep_longer=True)
    store.suppress([entry("d@example.org"), entry("b@example.org")], keep_longer=True)
    mid = store.enqueue(message("e@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    [failed] = _bounce(mid).recipients
    bounce = dataclasses.replace(
        _bounce(mid), recipients=(dataclasses.replace(failed, final_recipient="e@example.org"),)
    )
    [outcome] = apply_report(store, bounce, now=later)
    assert outcome.suppressed is not None
    assert outcome.suppressed.source is SuppressionSource.ASYNC_BOUNCE
    arf = Report(kind=ReportKind.COMPLAINT, recipients=(), envelope_id=mid, feedback_type="abuse")
    [outcome] = apply_report(store, arf, now=later + DAY)
    assert outcome.suppressed is not None
    assert outcome.suppressed.source is SuppressionSource.COMPLAINT
    kept = {e.target: e.source for e in store.list_suppressions()}
    assert kept == {
        "a@example.org": SuppressionSource.COMPLAINT,
        "b@example.org": SuppressionSource.HARD_BOUNCE,
        "c@example.org": SuppressionSource.COMPLAINT,
        "d@example.org": SuppressionSource.COMPLAINT,
        "e@example.org": SuppressionSource.COMPLAINT,
    }
    found = store.suppressions_for([f"{t}@example.org" for t in "acde"], now=later + DAY)
    for target in "acde":
        assert match(f"{target}@example.org", found, bypass=BYPASSABLE) is not None


def test_a_late_bounce_of_a_quoted_local_part_finds_and_suppresses_it(store: Store) -> None:
    """A report naming ``"John Doe"@example.org`` (or needlessly quoted ``"ann"@...``)
    finds the recipient prepare() queued and puts it on the list in the same form."""
    prepared = prepare(
        Email(
            from_="app@example.com",
            to=['"John Doe"@example.org', "ann@example.org"],
            subject="s",
            text="t",
        )
    )
    mid = store.enqueue(prepared, now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    reported = [
        dataclasses.replace(_bounce(mid).recipients[0], final_recipient=address)
        for address in ('"john doe"@Example.org', '"ann"@example.org')
    ]
    report = dataclasses.replace(_bounce(mid), recipients=tuple(reported))
    apply_report(store, report, now=NOW + DAY)
    status = store.status(mid)
    assert status.recipient('"John Doe"@example.org').state is RecipientState.FAILED
    assert status.recipient("ann@example.org").state is RecipientState.FAILED
    assert [(e.target, e.source) for e in store.list_suppressions()] == [
        ('"john doe"@example.org', SuppressionSource.ASYNC_BOUNCE),
        ("ann@example.org", SuppressionSource.ASYNC_BOUNCE),
    ]


def test_a_bounce_or_complaint_leaves_an_operators_entry_in_force(store: Store) -> None:
    """Was: an operator's entry with an end (``suppress add --expires``) or without one
    was replaced by a hard bounce's or a complaint's that lasted longer: its reason, its
    end and its source were lost, and an entry the operator can no longer tell from a
    bounce's. An operator's entry in force stays; one that ran out is replaced."""
    week = entry("a@example.org", source=SuppressionSource.MANUAL, reply="paused by ops")
    week = dataclasses.replace(week, expires_at=NOW + 7 * DAY)
    gone = entry("b@example.org", source=SuppressionSource.MANUAL, expires_at=NOW - DAY)
    store.suppress([week, gone])
    later = NOW + DAY
    bounce = dataclasses.replace(entry("a@example.org", reply="550 gone"), created_at=later)
    complaint = dataclasses.replace(bounce, source=SuppressionSource.COMPLAINT, reply="abuse")
    store.suppress([bounce], keep_longer=True)
    store.suppress([complaint], keep_longer=True)
    store.suppress([dataclasses.replace(bounce, target="b@example.org")], keep_longer=True)
    kept = {e.target: (e.source, e.reply, e.expires_at) for e in store.list_suppressions()}
    assert kept == {
        "a@example.org": (SuppressionSource.MANUAL, "paused by ops", NOW + 7 * DAY),
        "b@example.org": (SuppressionSource.HARD_BOUNCE, "550 gone", None),
    }


def test_a_late_bounce_leaves_an_operators_entry_in_force(store: Store) -> None:
    """The same for a report read by ``mailstrom bounce`` (apply_report): it fails the
    recipient and leaves the operator's entry as it was."""
    mid = store.enqueue(message("a@example.org"), now=NOW)
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    mine = entry("a@example.org", source=SuppressionSource.MANUAL, reply="on hold")
    store.suppress([dataclasses.replace(mine, expires_at=NOW + 7 * DAY)])
    apply_report(store, _bounce(mid), now=NOW + DAY)
    [kept] = store.list_suppressions()
    assert (kept.source, kept.reply, kept.expires_at) == (
        SuppressionSource.MANUAL,
        "on hold",
        NOW + 7 * DAY,
    )


def test_of_duplicates_in_one_call_an_operators_entry_stands_in_every_store(
    store: Store,
) -> None:
    """With ``keep_longer``, an operator's entry followed by a bounce's for the same
    target in one call stays, as it would written one call after the other: PostgreSQL,
    which picks one entry per target before its statement, kept the longer bounce's."""
    mine = entry("a@example.org", source=SuppressionSource.MANUAL, reply="paused by ops")
    mine = dataclasses.replace(mine, expires_at=NOW + 7 * DAY)
    bounce = dataclasses.replace(entry("a@example.org", reply="550 gone"), created_at=NOW + DAY)
    store.suppress([mine, bounce], keep_longer=True)
    [kept] = store.list_suppressions()
    assert (kept.source, kept.reply) == (SuppressionSource.MANUAL, "paused by ops")
