"""What a SQLite queue's message bytes cost the reads and writes that do not need them.

For each message size of ``--sizes`` (default 1 kB, 30 kB and 300 kB), a fresh store is
filled with ``--messages`` messages (default 1,000; one recipient, a tag and a metadata
entry each), and these run through the store's API, each timed, with the octets the
process read and wrote through ``read()``/``write()`` meanwhile (``rchar``/``wchar`` of
``/proc/self/io``: SQLite's page reads and its WAL and checkpoint writes):

* ``enqueue 1``: ``enqueue()`` of one message, one durable commit each (the first 200);
* ``enqueue_many``: the rest, in batches of 100;
* ``hold+release``: ``hold_many(all, True)`` then ``hold_many(all, False)``;
* ``query tag``: ``query()`` by a tag one message in a hundred carries (a scan);
* ``query held``: ``query()`` of held messages (none);
* ``recent``: ``recent(100)``;
* ``lease``: leasing every recipient, 100 at a time;
* ``record``: recording each of those leases delivered.

µs/msg divides by the messages the step touched, wall time and CPU time (of
the whole process: the store's threads too). Caches are warm (the file was just
written). Prints figures only; compare figures of one run, or of runs on one machine.

    .venv/bin/python benchmarks/sqlite_row_layout.py [--messages 1000] [--sizes 1000,30000,300000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import QueueFilter, SQLiteStore
from mailstrom.stores.base import Lease, RecipientResult

SINGLE = 200
"""Messages enqueued one at a time; the rest go in batches of :data:`BATCH`."""
BATCH = 100


def io_counts() -> tuple[int, int]:
    """(rchar, wchar) of this process so far."""
    counts = {}
    with open("/proc/self/io") as io:
        for line in io:
            name, _, value = line.partition(":")
            counts[name] = int(value)
    return counts["rchar"], counts["wchar"]


def measured(call: Callable[[], Any]) -> tuple[float, float, int, int, Any]:
    """(seconds, CPU seconds, octets read, octets written, result) of ``call()``."""
    r0, w0 = io_counts()
    c0 = time.process_time()
    t0 = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    r1, w1 = io_counts()
    return seconds, cpu, r1 - r0, w1 - w0, result


def lease_all(store: SQLiteStore, now: datetime) -> list[Lease]:
    """Lease every due recipient, 100 at a time."""
    leases = []
    while (lease := store.lease(now=now, limit=BATCH, lease_for=timedelta(minutes=5))) is not None:
        leases.append(lease)
    return leases


def record_all(store: SQLiteStore, leases: list[Lease], now: datetime) -> int:
    """Record every recipient of ``leases`` delivered, a lease at a time."""
    attempt = Attempt(
        at=now, outcome=AttemptOutcome.DELIVERED, reply=SMTPReply(code=250, text="ok")
    )
    done = 0
    for lease in leases:
        results = [
            RecipientResult(
                message_id=item.message_id,
                address=r.address,
                lease_token=lease.token,
                ref=r.ref,
                state=RecipientState.DELIVERED,
                attempt=attempt,
            )
            for item in lease.items
            for r in item.recipients
        ]
        done += len(store.record(results))
    return done


def run(messages: int, size: int) -> list[tuple[str, int, float, float, int, int]]:
    """The rows (step, messages, seconds, CPU seconds, read, written) for one message
    size."""
    now = datetime.now(UTC)
    head = b"Subject: report\r\nFrom: app@example.com\r\n\r\n"
    body = head + b"x" * max(size - len(head) - 2, 0) + b"\r\n"

    def prepared(i: int) -> PreparedMessage:
        return PreparedMessage(
            data=body,
            envelope_from="app@example.com",
            recipients=(f"user{i}@example.org",),
            attributes=QueueAttributes(tags=(f"t{i % 100}",), metadata={"account": str(i)}),
        )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db")
        try:
            single = min(SINGLE, messages)
            s, c, r, w, ids = measured(
                lambda: [store.enqueue(prepared(i), now=now) for i in range(single)]
            )
            rows.append(("enqueue 1", single, s, c, r, w))

            def batches() -> list[str]:
                out: list[str] = []
                for start in range(single, messages, BATCH):
                    end = min(start + BATCH, messages)
                    batch = [prepared(i) for i in range(start, end)]
                    out += store.enqueue_many(batch, now=now)
                return out

            s, c, r, w, more = measured(batches)
            rows.append(("enqueue_many", len(more), s, c, r, w))
            ids += more

            def hold_release() -> int:
                return store.hold_many(ids, True) + store.hold_many(ids, False)

            s, c, r, w, changed = measured(hold_release)
            assert changed == 2 * messages, changed
            rows.append(("hold+release", messages, s, c, r, w))
            tag = QueueFilter(tag="t7", limit=100)
            s, c, r, w, found = measured(lambda: store.query(now=now, where=tag))
            rows.append(("query tag", messages, s, c, r, w))
            held = QueueFilter(held=True, limit=100)
            s, c, r, w, found = measured(lambda: store.query(now=now, where=held))
            assert not found
            rows.append(("query held", messages, s, c, r, w))
            s, c, r, w, found = measured(lambda: store.recent(100))
            rows.append(("recent", len(found), s, c, r, w))
            s, c, r, w, leases = measured(lambda: lease_all(store, now))
            rows.append(("lease", messages, s, c, r, w))
            s, c, r, w, done = measured(lambda: record_all(store, leases, now))
            assert done == messages, done
            rows.append(("record", messages, s, c, r, w))
        finally:
            store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sizes", default="1000,30000,300000", help="octets per message")
    args = parser.parse_args()
    print(f"{args.messages} messages per size; read/written: MB through read()/write()")
    header = ("size", "step", "msgs", "ms", "µs/msg", "CPU µs/msg", "read MB", "wrote MB")
    print("{:>8} {:<14} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9}".format(*header))
    for size in (int(s) for s in args.sizes.split(",")):
        for step, n, seconds, cpu, read, written in run(args.messages, size):
            per, cpu_per = (x * 1e6 / max(n, 1) for x in (seconds, cpu))
            print(
                f"{size:>8} {step:<14} {n:>6} {seconds * 1000:>9.1f} {per:>9.1f}"
                f" {cpu_per:>10.1f} {read / 1e6:>9.2f} {written / 1e6:>9.2f}"
            )


if __name__ == "__main__":
    main()
