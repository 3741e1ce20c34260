"""The SQLite store past this process's file size limit (``RLIMIT_FSIZE``, ``ulimit -f``,
set with ``setrlimit`` in a subprocess, or with ``prlimit`` on a worker process): every
write that would grow the database or its ``-wal`` file fails with EFBIG, as on a disk
with a quota or a container's file size cap. ``send_email`` fails with a StoreError that
says so and writes nothing; a worker keeps the results it cannot record and records them
once the limit is raised, delivering nothing twice.

(Python ignores SIGXFSZ, which would otherwise end the process at the first such write.)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailstrom import Mailstrom, RecipientState
from mailstrom.client.process import WorkerProcess
from mailstrom.stores import SQLiteStore
from mailstrom.testing.smtp import ReceivedMessage
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration.test_worker_modes import config, hello, mx
from tests.support.delivery import Results

__all__ = ["mx"]  # the fixture, found by pytest under this name

ROOT = Path(__file__).parents[2]

SEND_PAST_THE_LIMIT = textwrap.dedent(
    """
    import json, os, resource, sys
    from mailstrom import Config, Email, Mailstrom
    from mailstrom.errors import StoreError
    from mailstrom.stores import SQLiteStore

    path = sys.argv[1]
    store = SQLiteStore(path)

    def email(subject, text):
        return Email(from_="a@client.test", to=["b@example.org"], subject=subject, text=text)

    with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
        kept = ms.send_email(email("kept", "queued before"))
        # No file may grow from here on: the WAL's next frame goes past its end.
        limit = os.path.getsize(path + "-wal")
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            ms.send_email(email("big", "x" * 100_000))
            refused = None
        except StoreError as exc:
            refused = [type(exc).__name__, str(exc)]
        messages_then = store.stats().messages
        unlimited = resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_FSIZE, (unlimited, unlimited))
        later = ms.send_email(email("later", "queued after"))
        subjects = sorted(m.subject for m in ms.query_recent())
        kept_state = ms.query_status(kept).state
    print(json.dumps({"limit": limit, "refused": refused, "messages_then": messages_then,
                      "subjects": subjects, "kept": kept_state}))
    """
)


def test_send_email_past_the_file_size_limit_says_so_and_writes_nothing(tmp_path: Path) -> None:
    """SQLite reports EFBIG as "disk I/O error", which is all the caller was told
    ("SQLite error on ...: disk I/O error"): a failing disk, for all it said."""
    proc = subprocess.run(
        [sys.executable, "-c", SEND_PAST_THE_LIMIT, str(tmp_path / "q.db")],
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    kind, text = report["refused"]
    assert kind == "StoreError"
    assert f"file size limit of {report['limit']} bytes" in text
    assert "RLIMIT_FSIZE" in text and "queued mail is kept" in text
    assert report["messages_then"] == 1  # nothing of the refused message
    assert report["subjects"] == ["kept", "later"]
    assert report["kept"] == "queued"


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)  # polling a status snapshot; nothing to wait on
    return predicate()


def test_a_worker_past_the_file_size_limit_keeps_its_results_until_it_is_raised(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """The limit is lowered on the worker process as the server takes the messages: it
    cannot record what it delivered, says why, keeps the results and retries; raised
    again, everything is recorded, each message delivered once."""
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker="process")
    ms.start()
    try:
        assert isinstance(ms.worker, WorkerProcess) and ms.worker.pid is not None
        pid = ms.worker.pid
        took = mx.record

        def record(taken: ReceivedMessage, *, accepted: bool) -> None:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
            took(taken, accepted=accepted)

        mx.record = record  # type: ignore[method-assign]
        ids = [ms.send_email(hello(f"u{i}@example.org", i)) for i in range(5)]
        assert _wait_until(lambda: ms.worker_status.metrics.store_errors >= 3)
        troubled = ms.worker_status
        assert troubled.running and troubled.error is None
        assert troubled.store_error is not None
        assert "file size limit of 1 bytes" in troubled.store_error
        assert results.all == []
        assert {ms.query_status(i).state for i in ids} == {RecipientState.QUEUED}
        mx.record = took  # type: ignore[method-assign]
        unlimited = resource.RLIM_INFINITY
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        results.wait_count(len(ids))
        assert _wait_until(lambda: ms.worker_status.store_error is None)
        assert ms.worker_status.unrecorded == 0
    finally:
        ms.stop()
    assert ms.worker_status.error is None
    assert [ms.query_status(i).state for i in ids] == [RecipientState.DELIVERED] * len(ids)
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == [f"u{i}@example.org" for i in range(5)]
    store.close()


PURGE_AT_THE_LIMIT = textwrap.dedent(
    """
    import json, os, resource, sys
    from datetime import timedelta
    from mailstrom.status import RecipientState
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW, lease_all, message, results_for

    path = sys.argv[1]
    store = SQLiteStore(path)
    data = b"Subject: big\\r\\n\\r\\n" + b"x" * 1_000_000 + b"\\r\\n"
    ids = [store.enqueue(message("to@example.org", data=data), now=NOW) for _ in range(20)]
    store.record(results_for(lease_all(store), RecipientState.DELIVERED))
    # No file may grow from here on, as on a disk with no room left.
    limit = max(os.path.getsize(path), os.path.getsize(path + "-wal"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    purged = store.purge_many(ids, finished_before=NOW + timedelta(days=1))
    print(json.dumps({"purged": purged, "messages": store.stats().messages}))
    """
)


def test_a_purge_frees_room_where_no_file_may_grow(tmp_path: Path) -> None:
    """Deleting 20 MB of delivered mail needs no room the files do not have: where
    SQLite zeroes freed pages (SECURE_DELETE, Debian's build), the purge wrote the 20 MB
    to the WAL again and failed past the limit, so a full disk could not be purged."""
    proc = subprocess.run(
        [sys.executable, "-c", PURGE_AT_THE_LIMIT, str(tmp_path / "q.db")],
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == {"purged": 20, "messages": 0}
