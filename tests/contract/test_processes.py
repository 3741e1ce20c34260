"""Contract: two processes share one queue (enqueue here, deliver there, and back)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

from mailstrom.status import RecipientState
from mailstrom.stores import Store

from .conftest import Backend
from .support import NOW, lease_all, message, results_for

PRELUDE = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime, timedelta
    from mailstrom.message.prepared import PreparedMessage
    from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
    from mailstrom.stores import RecipientResult, open_store

    store = open_store(sys.argv[1])
    now = datetime.fromisoformat(sys.argv[2])
    """
)

LEASE_AND_DELIVER = PRELUDE + textwrap.dedent(
    """
    lease = store.lease(now=now, limit=100, lease_for=timedelta(minutes=5))
    results = [
        RecipientResult(
            message_id=item.message_id, address=r.address, state=RecipientState.DELIVERED,
            lease_token=lease.token,
            attempt=Attempt(at=now, outcome=AttemptOutcome.DELIVERED,
                            reply=SMTPReply(code=250, enhanced="2.0.0", text="child ok")),
        )
        for item in lease.items for r in item.recipients
    ]
    print(json.dumps({"recorded": len(store.record(results)),
                      "data": [item.data.decode() for item in lease.items]}))
    store.close()
    """
)

ENQUEUE = PRELUDE + textwrap.dedent(
    """
    mid = store.enqueue(
        PreparedMessage(data=b"Subject: from child\\r\\n\\r\\nhi\\r\\n",
                        envelope_from="child@example.com", recipients=("x@example.org",)),
        now=now,
    )
    print(json.dumps({"id": mid}))
    store.close()
    """
)

LEASE_LOOP = PRELUDE + textwrap.dedent(
    """
    got = []
    while lease := store.lease(now=now, limit=5, lease_for=timedelta(minutes=5)):
        got += [r.address for item in lease.items for r in item.recipients]
    print(json.dumps(got))
    store.close()
    """
)


def _run(code: str, url: str) -> object:
    done = subprocess.run(
        [sys.executable, "-c", code, url, NOW.isoformat()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_enqueue_here_deliver_in_another_process(store_backend: Backend, store: Store) -> None:
    store_backend.require_durable()
    mid = store.enqueue(message("a@example.org", "b@other.example"), now=NOW)
    out = _run(LEASE_AND_DELIVER, store_backend.url)
    assert out == {"recorded": 2, "data": ["Subject: Hello\r\n\r\nHi there.\r\n"] * 2}
    st = store.status(mid)
    assert st.state is RecipientState.DELIVERED
    assert all(r.reply is not None and r.reply.text == "child ok" for r in st.recipients)


def test_enqueue_in_another_process_deliver_here(store_backend: Backend, store: Store) -> None:
    store_backend.require_durable()
    out = _run(ENQUEUE, store_backend.url)
    assert isinstance(out, dict)
    mid = out["id"]
    lease = lease_all(store)
    assert [i.message_id for i in lease.items] == [mid]
    assert lease.items[0].envelope_from == "child@example.com"
    assert len(store.record(results_for(lease, RecipientState.DELIVERED))) == 1
    assert store.status(mid).state is RecipientState.DELIVERED


def test_two_processes_leasing_at_once_never_share_a_recipient(
    store_backend: Backend, store: Store
) -> None:
    store_backend.require_durable()
    expected = {f"r{i}@d{i % 3}.example" for i in range(120)}
    store.enqueue_many([message(a) for a in sorted(expected)], now=NOW)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LEASE_LOOP, store_backend.url, NOW.isoformat()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    got = []
    for child in children:
        stdout, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
        got.append(json.loads(stdout))
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(expected)


def test_a_watcher_hears_of_mail_enqueued_by_another_process(
    store_backend: Backend, store: Store
) -> None:
    """Engine v2 #5: a worker in another process is woken within milliseconds, not at its
    next poll (SQLite: a datagram socket beside the database; PostgreSQL: NOTIFY)."""
    store_backend.require_durable()
    woken = threading.Event()
    stop = store.watch(woken.set)
    try:
        started = time.monotonic()
        _run(ENQUEUE, store_backend.url)
        assert woken.wait(10)
        # The child's interpreter start-up dominates; the wake-up itself takes microseconds.
        assert time.monotonic() - started < 10
    finally:
        stop()
