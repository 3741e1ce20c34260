"""The ``-shm`` file of a SQLite queue deleted while processes have it open (a clean-up
script, an operator tidying up "temporary" files): SQLite gives the next process to open
the database a new one, and each side then wrote to the WAL by its own index, over the
other's commits; the last to close wrote its stale view into the database. Mail that
``send_email`` had acknowledged was lost without a word. The stores that had it open now
refuse to write (StoreCorrupt: a worker exits 74) and leave the WAL to the next opener.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Mailstrom
from mailstrom.errors import StoreCorrupt
from mailstrom.stores import SQLiteStore
from tests.contract.support import message
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_worker_modes import config, hello, mx
from tests.support.delivery import Results

__all__ = ["mx"]  # the fixture, found by pytest under this name

ROOT = Path(__file__).parents[2]

ENQUEUE = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import message

    store = SQLiteStore(sys.argv[1])
    for i in range(3):
        print(store.enqueue(message(f"other{i}@example.org"), now=datetime.now(UTC)))
    store.close()
    """
)


def _enqueue_elsewhere(path: Path) -> list[str]:
    """Three messages queued by another process, which then closes the store."""
    proc = subprocess.run(
        [sys.executable, "-c", ENQUEUE, str(path)],
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split()


QUEUED = textwrap.dedent(
    """
    import json, sqlite3, sys

    check = sqlite3.connect(sys.argv[1])
    ok = check.execute("PRAGMA integrity_check").fetchone()[0]
    ids = sorted(row[0] for row in check.execute("SELECT id FROM messages"))
    print(json.dumps([ok, ids]))
    """
)


def _queued(path: Path) -> set[str]:
    """The ids of the messages in the database, read by a process that opens it anew (in
    this one, a connection would share the stale index this process holds on to)."""
    proc = subprocess.run(
        [sys.executable, "-c", QUEUED, str(path)], capture_output=True, check=True, timeout=60
    )
    ok, ids = json.loads(proc.stdout)
    assert ok == "ok"
    return set(ids)


def test_a_store_whose_shm_was_deleted_refuses_to_write_and_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    before = store.enqueue(message("before@example.org"), now=datetime.now(UTC))
    os.unlink(f"{path}-shm")
    others = _enqueue_elsewhere(path)
    with pytest.raises(StoreCorrupt, match=r"-shm file .* was deleted"):
        store.enqueue(message("after@example.org"), now=datetime.now(UTC))
    with pytest.raises(StoreCorrupt, match="-shm file"):
        store.status(before)
    store.close()
    assert _queued(path) == {before, *others}


def test_a_worker_whose_shm_was_deleted_stops_and_loses_nothing(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    results = Results()
    cfg = config(dns_server, mx.port, poll_interval=0.2)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        first = ms.send_email(hello("first@example.org"))
        results.wait_count(1)
        os.unlink(f"{path}-shm")
        others = _enqueue_elsewhere(path)
        assert ms.worker is not None
        assert ms.worker.wait_stopped(10)  # its next lease
    finally:
        ms.stop()
    error = ms.worker_status.error
    assert error is not None and "-shm file" in error
    store.close()
    assert _queued(path) == {first, *others}
    assert [list(m.rcpt_tos) for m in mx.messages] == [["first@example.org"]]


# --- the -wal file alone ---------------------------------------------------------------------

KILLED = textwrap.dedent(
    """
    import os, sys
    from datetime import UTC, datetime
    from mailstrom.errors import StoreCorrupt
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import message

    store = SQLiteStore(sys.argv[1])
    print(store.enqueue(message("before@example.org"), now=datetime.now(UTC)))
    os.unlink(sys.argv[1] + "-wal")
    try:
        print(store.enqueue(message("after@example.org"), now=datetime.now(UTC)))
    except StoreCorrupt as exc:
        print("refused:", exc)
    sys.stdout.flush()
    os._exit(0)  # killed: the store is never closed
    """
)


def test_a_store_whose_wal_was_deleted_refuses_to_write_and_keeps_what_it_queued(
    tmp_path: Path,
) -> None:
    """The -wal file alone deleted under a running store: its connections went on writing
    to the deleted file, and send_email acknowledged mail that only that process's open
    file held; killed before it closed the store, every message since the last
    checkpoint (and those of before the deletion) was gone. The next write is refused,
    naming the file, and what the deleted file held is written into the database."""
    path = tmp_path / "q.db"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, str(path)],
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    before, after = proc.stdout.decode().splitlines()
    assert after.startswith("refused: "), after
    assert f"-wal file {path}-wal was deleted" in after and "Stop every process" in after
    assert _queued(path) == {before}


def test_a_worker_whose_wal_was_deleted_stops_and_loses_nothing(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The worker process and send_email's store both refuse their next write; the
    worker ends (a command's worker exits 74) and the mail stays in the database."""
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    results = Results()
    cfg = config(dns_server, mx.port, poll_interval=0.2)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        first = ms.send_email(hello("first@example.org"))
        results.wait_count(1)
        held = store.enqueue(message("held@example.org"), now=datetime.now(UTC), hold=True)
        os.unlink(f"{path}-wal")
        with pytest.raises(StoreCorrupt, match="-wal file"):
            ms.send_email(hello("after@example.org", 2))
        assert ms.worker is not None
        assert ms.worker.wait_stopped(10)  # its next lease
    finally:
        ms.stop()
    error = ms.worker_status.error
    assert error is not None and "-wal file" in error
    store.close()
    assert _queued(path) == {first, held}
    assert [list(m.rcpt_tos) for m in mx.messages] == [["first@example.org"]]
