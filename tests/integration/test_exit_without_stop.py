"""A program that ends without ``stop()``: returning from its main, or a SIGTERM that a
handler turns into SystemExit. The facade's worker must not be cut off in the middle of
its deliveries, the server's acceptance unrecorded (sent again by the next worker)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import Mailstrom, RecipientState, Timeouts
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_worker_modes
from tests.integration.test_worker_modes import config
from tests.support.waiting import eventually

mx = test_worker_modes.mx

SLOW = Timeouts(connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=30)

_HEAD = """\
import faulthandler, pickle, sys
faulthandler.dump_traceback_later(50, exit=True)
from mailstrom import Email, Mailstrom

cfg = pickle.loads(open(sys.argv[1], "rb").read())
"""
_PROGRAM = (
    _HEAD
    + """\
ms = Mailstrom(cfg, store=sys.argv[2], worker="thread")
ms.start()
for i in range(3):
    ms.send_email(Email(from_="a@sender.test", to=[f"u{i}@example.org"], text=str(i)))
print("queued", flush=True)
sys.stdin.readline()  # the test says when a final dot has reached the server
"""
)


def _program(body: str) -> str:
    return _PROGRAM + textwrap.dedent(body)


@pytest.mark.parametrize(
    "ending",
    [
        "",  # returns from main
        "raise SystemExit(0)",  # a SIGTERM handler's exit, as most services have it
    ],
)
def test_exit_without_stop_records_what_the_server_took(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, ending: str
) -> None:
    """The program ends while the server holds its reply to a final dot it has taken.
    The worker thread, a daemon, was frozen there: the message stayed leased, and the
    next worker sent it a second time. It now drains at exit, as stop() would."""
    mx.data_delay = 1.0  # the server holds its reply to each final dot
    cfg = config(dns_server, mx.port, timeouts=SLOW, lease_for=timedelta(seconds=1))
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    db = tmp_path / "q.db"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _program(ending), str(path), str(db)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "queued\n"
        assert eventually(lambda: len(mx.received) >= 1, within=30)
        child.stdin.write("\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err[-2000:]
    # Another worker on the same queue, once any lease left behind has run out.
    mx.data_delay = 0.0
    store = SQLiteStore(db)
    try:
        with Mailstrom(cfg, store=store, worker="thread") as ms:
            delivered = RecipientState.DELIVERED
            assert eventually(lambda: all(s.state is delivered for s in ms.query()), within=30)
    finally:
        store.close()
    got = sorted(m.rcpt_tos[0] for m in mx.messages)
    assert got == ["u0@example.org", "u1@example.org", "u2@example.org"]
