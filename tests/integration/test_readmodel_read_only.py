"""The dashboard's SQLite read model on read-only media: it reads what the read-only store
reads (see tests/cli/test_store_errors.py for the views of the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mailstrom
from mailstrom.stores import SQLiteStore
from tests.cli.test_store_errors import needs_ro_mount
from tests.contract.support import NOW, SECOND, message

VIEWS = textwrap.dedent(
    """
    import json, sys
    from mailstrom.readmodel import QueueQuery, QueueView, open_read_model
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import NOW

    store = SQLiteStore(sys.argv[1], read_only=True)
    model = open_read_model(store)
    try:
        page = model.queue_page(QueueQuery(view=QueueView.ALL), now=NOW)
        ids = [m.id for m in page.messages]
        print(json.dumps({
            "messages": model.overview(now=NOW).messages,
            "page": ids,
            "data": len(model.message_data(ids[0])),
            "destinations": [d.domain for d in model.destinations()],
        }), flush=True)
        sys.stdin.readline()  # meanwhile a writer elsewhere adds a message
        page = model.queue_page(QueueQuery(view=QueueView.ALL), now=NOW)
        print(json.dumps([m.id for m in page.messages]), flush=True)
    finally:
        model.close()
        store.close()
    """
)


@needs_ro_mount
def test_the_read_model_reads_a_store_on_a_read_only_mount(tmp_path: Path) -> None:
    """Was: the read-only store read a WAL database last closed cleanly (no -wal file) on
    a read-only mount as immutable, but the read model beside it opened the file
    ``mode=ro`` only, and every dashboard view failed with "unable to open database
    file" (SQLite cannot make the -shm file there)."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    db = store_dir / "queue.db"
    store = SQLiteStore(db)
    prepared = message("a@one.example")
    mid = store.enqueue(prepared, now=NOW)
    store.close()
    assert not Path(f"{db}-wal").exists()
    root = Path(mailstrom.__file__).parents[1]
    checkout = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(checkout)])}
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    proc = subprocess.Popen(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"),
            *(str(store_dir), sys.executable, "-c", VIEWS, str(db)),
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        assert first, proc.communicate(timeout=60)[1].decode()
        assert json.loads(first) == {
            "messages": 1,
            "page": [mid],
            "data": len(prepared.data),
            "destinations": ["one.example"],
        }
        # The mount is read-only only in the viewer's namespace: a worker elsewhere
        # writes, and closes cleanly (no -wal again). The viewer reads the file as it is
        # now, not pages of it kept from before.
        writer = SQLiteStore(db)
        later = writer.enqueue(message("b@two.example"), now=NOW + SECOND)
        writer.close()
        out, err = proc.communicate(b"go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == [later, mid]
