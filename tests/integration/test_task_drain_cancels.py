"""The task worker's drain when ``asyncio.run()`` ends around it (see
test_task_exit_without_stop.py): cancels that come late, and writes that fail for a
while meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import AsyncMailstrom, Email, Mailstrom, RecipientState
from mailstrom.client import aio
from mailstrom.errors import StoreLocked
from mailstrom.runtime import worker as worker_module
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.integration import test_exit_without_stop as exits
from tests.integration import test_hooks, test_worker_modes
from tests.integration import test_task_exit_without_stop as task_exits
from tests.support.waiting import eventually

mx = test_worker_modes.mx
endpoint = test_hooks.endpoint

_LOCKED_WRITES = """\
import asyncio, faulthandler, pickle, sys, threading
faulthandler.dump_traceback_later(80, exit=True)
from mailstrom import AsyncMailstrom, Email
from mailstrom.errors import StoreLocked
from mailstrom.stores import SQLiteStore

locked = threading.Event()

class Locked(SQLiteStore):
    in_process = sys.argv[3] == "inline"  # or calls in threads, as PostgreSQL's

    def record_and_lease(self, results, **kwargs):
        if results and locked.is_set():
            raise StoreLocked("database is locked")  # another process writes meanwhile
        return super().record_and_lease(results, **kwargs)

cfg = pickle.loads(open(sys.argv[1], "rb").read())
reported = []

async def main():
    ms = AsyncMailstrom(
        cfg, store=Locked(sys.argv[2]), worker="task", on_result=reported.append
    )
    await ms.start()
    locked.set()
    for i in range(3):
        await ms.send_email(Email(from_="a@sender.test", to=[f"u{i}@example.org"], text=str(i)))
    print("queued", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # every message is at the server
    {ending}
    threading.Timer(1.0, locked.clear).start()  # the lock is let go soon after

asyncio.run(main())
print("reported", sorted(r.address for r in reported), flush=True)
"""

_GIVE_UP_STOP = """try:
        await asyncio.wait_for(ms.stop(timeout=30), 0.5)
    except TimeoutError:
        print("stop() given up", flush=True)"""


@pytest.mark.parametrize("calls", ["inline", "threaded"])
@pytest.mark.parametrize("ending", ["pass", _GIVE_UP_STOP], ids=["return", "stop-given-up"])
def test_results_whose_write_fails_for_a_while_are_written_by_the_drain(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, ending: str, calls: str
) -> None:
    """Every message went out while the store refused the writes of their results (a
    lock held elsewhere); main returns, perhaps after giving up on a stop() that was
    retrying those writes, and the lock is let go a second later. The drain keeps
    trying and records them. Was, after a stop() given up: asyncio.run's cancel reached
    the stop's last records, the results were dropped unlogged, their lease kept, and
    the next worker sent every message again."""
    cfg = test_worker_modes.config(
        dns_server, mx.port, timeouts=exits.SLOW, lease_for=timedelta(seconds=1)
    )
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    program = _LOCKED_WRITES.replace("{ending}", ending)
    store = str(tmp_path / "q.db")
    child = subprocess.Popen(
        [sys.executable, "-c", program, str(path), store, calls],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "queued\n"
        assert eventually(lambda: len(mx.messages) >= 3, within=30)
        child.stdin.write("\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=90)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err[-2000:]
    last = out.splitlines()[-1]
    assert last == "reported ['u0@example.org', 'u1@example.org', 'u2@example.org']", (
        out + err[-2000:]
    )
    with Mailstrom(cfg, store=store, worker="thread") as ms:
        delivered = RecipientState.DELIVERED
        assert eventually(lambda: all(s.state is delivered for s in ms.query()), within=30)
    exits._expect_each_once(mx)


@pytest.mark.parametrize("ending", ["return", "stop-given-up"])
def test_the_hook_hears_of_what_the_drain_recorded(
    mx: Any, dns_server: LoopbackDNS, endpoint: test_hooks.Endpoint, tmp_path: Path, ending: str
) -> None:
    """main returns while the server holds its reply to a final dot: the drain records
    the delivery, and the hook sender posts its event before the program ends, as after
    a stop(). Was: asyncio.run's sweep had cancelled the hook sender too, and the event
    waited in the outbox until some later worker ran (never, for a program run once)."""
    hooked = test_hooks.hook_config(dns_server, mx.port, endpoint.url)
    cfg = dataclasses.replace(hooked, timeouts=exits.SLOW, poll_interval=30)
    ms = AsyncMailstrom(cfg, store=tmp_path / "q.db", worker="task")
    mx.data_delay = 1.0  # the server holds its reply to the final dot

    async def main() -> None:
        await ms.start()
        await ms.send_email(Email(from_="a@sender.test", to=["u0@example.org"], text="0"))
        await asyncio.to_thread(eventually, lambda: len(mx.received) >= 1, 30)
        if ending == "stop-given-up":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ms.stop(timeout=30), 0.2)

    asyncio.run(main())
    sent = [(e["recipient"], e["type"]) for r in endpoint.requests for e in r.events]
    assert sent == [("u0@example.org", "delivered")]
    assert [m.rcpt_tos for m in mx.messages] == [("u0@example.org",)]


_CANCEL_ALL = """for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()  # and asyncio.run() cancels them again"""


@pytest.mark.parametrize("store", ["q.db", "q.db.threaded"])
def test_a_worker_cancelled_twice_as_the_loop_ends_still_drains(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, store: str
) -> None:
    """main cancels the tasks left itself, then returns, while the server holds its reply
    to a final dot: asyncio.run() cancels them all again. The second cancel reached the
    worker as it took the first as a stop (or found two pending, which it did not take
    as one), the delivery was cut off, and the next worker sent that message again."""
    program = task_exits._PROGRAM.replace("{ending}", _CANCEL_ALL)
    exits._run(mx, dns_server, tmp_path, program, str(tmp_path / store))
    exits._expect_each_once(mx)


_CANCEL_ALL_TWICE = """for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()
            task.cancel()  # two pending at once, and asyncio.run() cancels them again"""


def test_a_worker_cancelled_twice_at_once_as_the_loop_ends_still_drains(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """As above, with two cancels pending at once when the worker and its sessions see
    them: only one was taken as a stop, and two ended the delivery mid-way."""
    program = task_exits._PROGRAM.replace("{ending}", _CANCEL_ALL_TWICE)
    exits._run(mx, dns_server, tmp_path, program, str(tmp_path / "q.db"))
    exits._expect_each_once(mx)


class _LockedForResults(SQLiteStore):
    """Refuses every write of results, as a lock held elsewhere for ever would."""

    def record_and_lease(self, results: Any, **kwargs: Any) -> Any:
        if results:
            raise StoreLocked("database is locked")
        return super().record_and_lease(results, **kwargs)


def test_a_drain_cut_short_leaves_no_hook_sender_running(
    mx: Any,
    dns_server: LoopbackDNS,
    endpoint: test_hooks.Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """main returns with a result unwritten (the store refuses it): the drain started
    the hook sender again, and the grace cancel ended the worker in its last records,
    before it stopped the hooks. That sender was left pending when asyncio.run() returned (it
    waits only for the tasks it cancelled), polling the outbox of a worker that had
    ended."""
    monkeypatch.setattr(aio, "ORPHAN_DRAIN", 1.0)
    monkeypatch.setattr(worker_module, "_CANCEL_GRACE", 0.2)
    hooked = test_hooks.hook_config(dns_server, mx.port, endpoint.url)
    cfg = dataclasses.replace(hooked, timeouts=exits.SLOW, poll_interval=30)
    ms = AsyncMailstrom(cfg, store=_LockedForResults(tmp_path / "q.db"), worker="task")

    async def main() -> None:
        await ms.start()
        await ms.send_email(Email(from_="a@sender.test", to=["u0@example.org"], text="0"))
        await asyncio.to_thread(eventually, lambda: len(mx.messages) >= 1, 30)

    with asyncio.Runner() as runner:  # as asyncio.run(), keeping the loop to look at
        runner.run(main())
        loop = runner.get_loop()
    left = sorted(t.get_name() for t in asyncio.all_tasks(loop) if not t.done())
    assert left == []
