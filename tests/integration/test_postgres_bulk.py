"""PostgreSQL bulk operator actions over the 100,000 messages a command lists: each must
fit a server's ``statement_timeout``, as ``purge_many`` does (see test_postgres_purge)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from mailstrom.cli.selection import note_left_out
from mailstrom.errors import StoreLocked
from mailstrom.status import RecipientState
from mailstrom.stores.base import QueueFilter
from mailstrom.stores.postgres import PostgresStore, migrate
from mailstrom.stores.postgres import store as postgres_store
from mailstrom.stores.postgres.store import EVENT_SPAN, PURGE_SPAN
from tests.support.pg_tables import messages_in_bulk, small_message

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)


def pending_in_bulk(url: str, count: int) -> list[str]:
    """``count`` messages of one queued recipient due at T0, analysed; their ids, sorted."""
    messages_in_bulk(url, count, at=T0)
    # As autovacuum leaves a queue this size (it analyses a table a tenth of which changed).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE messages, recipients")
        return sorted(mid for (mid,) in conn.execute("SELECT id FROM messages"))


def timed_out_at(url: str, ms: int) -> None:
    """Every later connection to the fixture's database has ``statement_timeout = ms``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET statement_timeout = {ms}')


def states(url: str) -> dict[tuple[str, bool], int]:
    """Recipients per (state, message held)."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT r.state, m.held, count(*) FROM recipients r"
            " JOIN messages m ON m.id = r.message_id GROUP BY 1, 2"
        ).fetchall()
    return {(state, held): int(n) for state, held, n in found}


@pytest.mark.parametrize("action", ["retry", "cancel", "hold", "release"])
def test_a_bulk_action_over_a_long_list_fits_a_statement_timeout(
    postgres_url: str, action: str
) -> None:
    """``mailstrom cancel --all`` (and retry, hold, release) lists up to 100,000 messages,
    and each was one statement over the whole list: under a server's 400 ms
    ``statement_timeout`` it was cancelled and rolled back whole on every run, so the
    operator could never cancel (or hold) that queue. In lists of 500 it completes."""
    total = 200 * PURGE_SPAN
    ids = pending_in_bulk(postgres_url, total)
    if action == "release":
        with psycopg.connect(postgres_url) as conn:
            conn.execute("UPDATE messages SET held = true")
            conn.execute("UPDATE recipients SET aside = true")
    timed_out_at(postgres_url, 400)
    with PostgresStore(postgres_url) as store:
        if action == "retry":
            assert store.retry_many(ids, now=LATER) == total
            with psycopg.connect(postgres_url) as conn:
                [(due,)] = conn.execute(
                    "SELECT count(*) FROM recipients WHERE next_attempt_at = %s", (LATER,)
                ).fetchall()
            assert due == total
        elif action == "cancel":
            assert store.cancel_many(ids, now=LATER) == total
            assert states(postgres_url) == {("failed", False): total}
        else:
            held = action == "hold"
            assert store.hold_many(ids, held) == total
            assert states(postgres_url) == {("queued", held): total}


def test_a_bulk_action_that_fails_keeps_what_it_changed_and_goes_on_when_called_again(
    postgres_url: str,
) -> None:
    """A cancel stopped part way (here by a lock held on its last message's recipient)
    keeps the spans it finished, and the same call again cancels the rest."""
    total = 3 * PURGE_SPAN
    ids = pending_in_bulk(postgres_url, total)
    with psycopg.connect(postgres_url) as holder:
        holder.execute("SELECT 1 FROM recipients WHERE message_id = %s FOR UPDATE", (ids[-1],))
        with PostgresStore(postgres_url + "?lock_timeout=200ms") as store:
            with pytest.raises(StoreLocked):
                store.cancel_many(ids, now=LATER)
            left = states(postgres_url)[("queued", False)]
            assert 0 < left <= PURGE_SPAN
            holder.rollback()
            assert store.cancel_many(ids, now=LATER) == left
    assert states(postgres_url) == {("failed", False): total}


@pytest.mark.parametrize("action", ["cancel", "hold"])
def test_a_leased_message_in_an_earlier_span_is_told_here_too(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """This store object's ``watch_cancels`` callbacks are told of leased mail cancelled
    or held in any span, before the call returns (and once more by the NOTIFY, through
    the listener): the tell of a span was '' (falsy), so a later span without leased mail
    replaced it, and only the NOTIFY came."""
    monkeypatch.setattr(postgres_store, "PURGE_SPAN", 1)
    calls: list[None] = []
    with PostgresStore(postgres_url) as store:
        leased_id = store.enqueue(small_message("a@example.org"), now=T0)
        other_id = store.enqueue(small_message("b@example.org"), now=T0)
        lease = store.lease(now=T0, limit=1, lease_for=timedelta(minutes=5))
        assert lease is not None and [i.message_id for i in lease.items] == [leased_id]
        stop = store.watch_cancels(lambda: calls.append(None))
        try:
            if action == "cancel":
                assert store.cancel_many([leased_id, other_id], now=T0) == 2
            else:
                assert store.hold_many([leased_id, other_id], True) == 2
            deadline = time.monotonic() + 10
            while len(calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop()
    assert len(calls) == 2


def test_a_retry_of_every_deferred_recipient_fits_a_statement_timeout(postgres_url: str) -> None:
    """``mailstrom retry --deferred`` was one UPDATE of every deferred recipient in the
    queue: under a server's 400 ms ``statement_timeout`` it was cancelled and rolled back
    whole on every run. Walked 500 messages per statement, it completes."""
    total = 200 * PURGE_SPAN
    pending_in_bulk(postgres_url, total)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE recipients SET state = 'deferred', next_attempt_at = %s", (LATER,))
        conn.execute("ANALYZE recipients")  # as autovacuum does after a change this large
    timed_out_at(postgres_url, 400)
    with PostgresStore(postgres_url) as store:
        assert store.retry_deferred(now=T0) == total
    with psycopg.connect(postgres_url) as conn:
        [(due,)] = conn.execute(
            "SELECT count(*) FROM recipients WHERE next_attempt_at = %s", (T0,)
        ).fetchall()
    assert due == total


def test_a_retry_of_deferred_recipients_among_finished_mail_makes_each_due_once(
    postgres_url: str,
) -> None:
    """The walk goes by the deferred recipients' messages (the index of recipients by
    state), not by every message kept: the deferred ones scattered among finished mail
    over several spans, one message with two of them and a queued one, are each made due
    once, and nothing else changes."""
    total = 4 * PURGE_SPAN
    ids = pending_in_bulk(postgres_url, total)
    with psycopg.connect(postgres_url) as conn:
        conn.execute(
            "UPDATE recipients SET state = CASE WHEN seq %% 3 = 0 THEN 'deferred'"
            " ELSE 'delivered' END, next_attempt_at = CASE WHEN seq %% 3 = 0 THEN %s END",
            (LATER,),
        )
        [(seq,)] = conn.execute(
            "SELECT seq FROM recipients WHERE message_id = %s", (ids[0],)
        ).fetchall()
        conn.execute(
            "INSERT INTO recipients (message_id, address, seq, position, domain, state,"
            " attempts, next_attempt_at) VALUES"
            " (%s, 'two@example.org', %s, 1, 'example.org', 'deferred', 1, %s),"
            " (%s, 'queued@example.org', %s, 2, 'example.org', 'queued', 0, %s)",
            (ids[0], seq, LATER, ids[0], seq, LATER),
        )
        [(deferred,)] = conn.execute(
            "SELECT count(*) FROM recipients WHERE state = 'deferred'"
        ).fetchall()
    assert deferred > PURGE_SPAN  # more than one span of them
    with PostgresStore(postgres_url) as store:
        assert store.retry_deferred(now=T0) == deferred
    with psycopg.connect(postgres_url) as conn:
        found = dict(
            conn.execute(
                "SELECT state || ' ' || coalesce((next_attempt_at = %s)::text, 'none'),"
                " count(*) FROM recipients GROUP BY 1",
                (T0,),
            ).fetchall()
        )
    assert found == {
        "deferred true": deferred,
        "delivered none": total - (deferred - 1),
        "queued false": 1,
    }


def sent_events_in_bulk(url: str, count: int) -> None:
    """``count`` delivery events acknowledged at T0, written by SQL and analysed."""
    migrate(url)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO events (message_id, address, state, attempt, at, sent_at)"
            " SELECT md5(i::text), 'r@example.org', 'delivered', 1, %s, %s"
            " FROM generate_series(1, %s) i",
            (T0, T0, count),
        )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")


def test_a_prune_of_many_events_fits_a_statement_timeout(postgres_url: str) -> None:
    """``mailstrom events --prune`` was one DELETE of every old event (one per recipient's
    attempt): 0.6 s for a million here, so under a server's 300 ms ``statement_timeout`` it
    was cancelled and rolled back whole on every run, and the table only grew. Walked in
    spans, each far inside it, the prune completes."""
    total = 200 * EVENT_SPAN
    sent_events_in_bulk(postgres_url, total)
    timed_out_at(postgres_url, 300)
    with PostgresStore(postgres_url) as store:
        assert store.prune_events(sent_before=LATER) == total
    # Counted without the timeout: a read over a million dead rows not yet vacuumed
    # may take longer than it on a loaded machine, and is not what is tested.
    with psycopg.connect(postgres_url, options="-c statement_timeout=0") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_a_selection_too_large_to_count_is_still_acted_on(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bulk command that selected its limit (``cancel --state queued`` of a larger
    queue) counts what it left out, for a note: 1.6 s for 500,000 queued messages here,
    so under a server's ``statement_timeout`` the count failed with StoreError and the
    command stopped before acting, on every run. The note now says the rest was not
    counted, and the command goes on. (A 50 ms timeout and 200,000 messages, a count of
    some 0.4 s: far past it on any machine, where the store's own opening is not.)"""
    pending_in_bulk(postgres_url, 400 * PURGE_SPAN)
    where = QueueFilter(limit=10, state=RecipientState.QUEUED)
    with PostgresStore(postgres_url + "?options=-c%20statement_timeout%3D50") as store:
        note_left_out(store, where, where.limit, now=LATER)
    err = capsys.readouterr().err
    assert "only the newest 10 messages the filters match were selected" in err
    assert "not counted" in err
