"""An asyncio program whose main coroutine ends without ``await ms.stop()``, its worker a
task on its loop: ``asyncio.run()`` cancels every task left, the worker's deliveries
included. A message whose final dot the server had taken must not be sent again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_exit_without_stop as exits
from tests.integration import test_worker_modes

mx = test_worker_modes.mx

_PROGRAM = """\
import asyncio, faulthandler, pickle, sys
faulthandler.dump_traceback_later(80, exit=True)
from mailstrom import AsyncMailstrom, Email
from mailstrom.stores import SQLiteStore

class Threaded(SQLiteStore):
    in_process = False  # hands each call to a thread, as PostgreSQLStore does

cfg = pickle.loads(open(sys.argv[1], "rb").read())
store = sys.argv[2]
if store.endswith(".threaded"):
    store = Threaded(store.removesuffix(".threaded"))

async def main():
    ms = AsyncMailstrom(cfg, store=store, worker="task")
    await ms.start()
    for i in range(3):
        await ms.send_email(Email(from_="a@sender.test", to=[f"u{i}@example.org"], text=str(i)))
    print("queued", flush=True)
    # The test says when a final dot has reached the server.
    await asyncio.to_thread(sys.stdin.readline)
    {ending}

asyncio.run(main())
"""

_GIVE_UP_STOP = """try:
        await asyncio.wait_for(ms.stop(timeout=30), 0.2)
    except TimeoutError:
        print("stop() given up", flush=True)"""


@pytest.mark.parametrize(
    ("ending", "store"),
    [
        ("return", "q.db"),
        ("raise SystemExit(0)", "q.db"),
        ("return", "q.db.threaded"),  # the drain's store calls in threads, as PostgreSQL's
        # A stop() given up on (its wait cut short), then main returns: the worker was in
        # that stop's drain when asyncio.run() cancelled it.
        (_GIVE_UP_STOP, "q.db"),
        (_GIVE_UP_STOP, "q.db.threaded"),
    ],
)
def test_task_worker_drains_when_the_loop_ends_without_stop(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, ending: str, store: str
) -> None:
    """main() returns (or raises) while the server holds its reply to a final dot it has
    taken: asyncio.run() cancelled the delivery, the message stayed leased unrecorded,
    and the next worker sent it a second time."""
    program = _PROGRAM.replace("{ending}", ending)
    exits._run(mx, dns_server, tmp_path, program, str(tmp_path / store))
    exits._expect_each_once(mx)
