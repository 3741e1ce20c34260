"""An asyncio program whose main coroutine ends without ``await ms.stop()``, its worker a
task on its loop: ``asyncio.run()`` cancels every task left, the worker's deliveries
included. A message whose final dot the server had taken must not be sent again."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
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


_SLOW_WRITE = """\
import asyncio, faulthandler, logging, pickle, sys, time
faulthandler.dump_traceback_later(80, exit=True)
logging.basicConfig(level=logging.WARNING)  # "results ignored" reaches stderr
from mailstrom import AsyncMailstrom, Email
from mailstrom.stores import SQLiteStore

class Threaded(SQLiteStore):
    in_process = False  # hands each call to a thread, as PostgreSQLStore does

    def record_and_lease(self, results, **kwargs):
        if results:
            print("writing", flush=True)
            time.sleep(1.0)  # the loop ends while the write runs in its thread
        return super().record_and_lease(results, **kwargs)

cfg = pickle.loads(open(sys.argv[1], "rb").read())
reported = []

async def main():
    ms = AsyncMailstrom(cfg, store=Threaded(sys.argv[2]), worker="task", on_result=reported.append)
    await ms.start()
    for i in range(3):
        await ms.send_email(Email(from_="a@sender.test", to=[f"u{i}@example.org"], text=str(i)))
    await asyncio.to_thread(sys.stdin.readline)

asyncio.run(main())
print("reported", sorted(r.address for r in reported), flush=True)
"""


def test_a_write_under_way_as_the_loop_ends_is_not_written_again(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """asyncio.run() cancels the store loop while its write runs in a thread: the batch
    went back to be written again though that write went on and committed, so the second
    write found it taken ("3 of 3 results ignored") and on_result never heard of it."""
    cfg = exits.config(dns_server, mx.port, timeouts=exits.SLOW)
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", _SLOW_WRITE, str(path), str(tmp_path / "q.db")]
    child = subprocess.Popen(
        args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"writing\n"
        child.stdin.write(b"\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=90)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err[-2000:]
    assert b"ignored" not in err, err[-2000:]
    got = out.decode().splitlines()[-1]
    assert got.startswith("reported") and got.count("@") == len(mx.messages), out


_CUT_WRITE = """\
import asyncio, faulthandler, pickle, sys, threading, time
faulthandler.dump_traceback_later(80, exit=True)
from mailstrom import AsyncMailstrom, Email
from mailstrom.errors import StoreRefusedData, StoreUnreachable
from mailstrom.stores import SQLiteStore

writing = threading.Event()
refused = sys.argv[3] == "refused"  # the batch refused, written one result at a time

class Threaded(SQLiteStore):
    in_process = False  # hands each call to a thread, as PostgreSQLStore does
    failed = False

    def record_and_lease(self, results, **kwargs):
        if results and refused:
            raise StoreRefusedData("refused")
        if results and not Threaded.failed:
            Threaded.failed = True
            writing.set()
            time.sleep(2.0)  # the worker is cancelled meanwhile
            raise StoreUnreachable("connection lost mid-write")
        return super().record_and_lease(results, **kwargs)

    def record(self, results, **kwargs):
        if not Threaded.failed:
            Threaded.failed = True
            writing.set()
            time.sleep(2.0)  # the worker is cancelled meanwhile
            raise StoreUnreachable("connection lost mid-write")
        return super().record(results, **kwargs)

    def release(self, lease):
        print("released", flush=True)
        return super().release(lease)

cfg = pickle.loads(open(sys.argv[1], "rb").read())
store = Threaded(sys.argv[2])

async def main():
    ms = AsyncMailstrom(cfg, store=store, worker="task")
    await ms.start()
    sent = await ms.send_email(Email(from_="a@sender.test", to=["u0@example.org"], text="0"))
    await asyncio.to_thread(writing.wait)
    worker, task = ms.worker, ms._task
    worker.request_stop(30)  # a stop, then cut short while it waits for that write,
    await asyncio.sleep(0.5)
    worker.request_stop(0)  # as mailstrom worker's second signal does
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(2.0)  # the write has failed by now
    [r] = store.status(sent).recipients
    print("leased", r.leased, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("write", ["batch", "refused"])
def test_a_write_cut_off_by_the_workers_end_keeps_its_lease(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, write: str
) -> None:
    """The worker ended at once (a second signal, a stop() past its bound) while its last
    write ran in a thread: the results in that write are unrecorded, so their lease is
    kept to expire. Was: the cut write was left aside, the lease given back due at once,
    and the delivered message, its write then failing, was sent again right away; the
    same when the store had refused the batch and its results were being written one at
    a time."""
    cfg = exits.config(dns_server, mx.port, timeouts=exits.SLOW)
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", _CUT_WRITE, str(path), str(tmp_path / "q.db"), write]
    ran = subprocess.run(args, env=env, capture_output=True, timeout=90)
    out = ran.stdout.decode()
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    assert "released" not in out, out
    assert out.splitlines()[-1] == "leased True", out
    assert b"never retrieved" not in ran.stderr, ran.stderr.decode()[-2000:]
    assert [m.rcpt_tos for m in mx.messages] == [("u0@example.org",)]


_REFUSED_HALF_WRITTEN = """\
import asyncio, faulthandler, logging, pickle, sys, threading, time
faulthandler.dump_traceback_later(80, exit=True)
logging.basicConfig(level=logging.WARNING)  # "results ignored" reaches stderr
from mailstrom import AsyncMailstrom, Email
from mailstrom.errors import StoreRefusedData, StoreUnreachable
from mailstrom.stores import SQLiteStore

slow = int(sys.argv[3])  # the one-at-a-time write the loop ends in: 1st or 2nd

writing = threading.Event()
calls = []

class Threaded(SQLiteStore):
    in_process = False  # hands each call to a thread, as PostgreSQLStore does

    def record_and_lease(self, results, **kwargs):
        if results and not calls:
            calls.append("refused")
            raise StoreRefusedData("refused")  # written one result at a time, then
        return super().record_and_lease(results, **kwargs)

    def record(self, results, **kwargs):
        calls.append("record")
        if calls.count("record") == slow:
            writing.set()
            time.sleep(1.5)  # the loop ends meanwhile
            raise StoreUnreachable("connection lost mid-write")  # written by the drain
        return super().record(results, **kwargs)

cfg = pickle.loads(open(sys.argv[1], "rb").read())
store = Threaded(sys.argv[2])
seen = []

async def main():
    ms = AsyncMailstrom(cfg, store=store, worker="task", on_result=lambda r: seen.append(r.address))
    await ms.start()
    to = ["u0@example.org", "u1@example.org"]
    await ms.send_email(Email(from_="a@sender.test", to=to, text="0"))
    await asyncio.to_thread(writing.wait)  # main returns: asyncio.run cancels the worker

asyncio.run(main())
print(sorted(seen), flush=True)
"""


@pytest.mark.parametrize("slow", [1, 2], ids=["none-written", "one-written"])
def test_a_refused_batch_half_written_as_the_loop_ends_reports_what_was_written(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path, slow: int
) -> None:
    """A batch the store refused is written one result at a time; the loop ends while one
    is being written: what was written before is taken in (on_result hears of it), the
    rest written by the drain. Was (9b30cbeb): the whole batch went back, a written result
    was written again and read as taken over ("1 of 2 results ignored"), on_result never
    called; and a first version of the fix crashed the worker when nothing was written
    yet (min() of an empty batch), the delivered mail left leased."""
    cfg = exits.config(dns_server, mx.port, timeouts=exits.SLOW)
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(cfg))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    args = [
        sys.executable,
        "-c",
        _REFUSED_HALF_WRITTEN,
        str(path),
        str(tmp_path / "q.db"),
        str(slow),
    ]
    ran = subprocess.run(args, env=env, capture_output=True, timeout=90)
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    assert b"ignored" not in ran.stderr, ran.stderr.decode()[-2000:]
    assert ran.stdout.decode().splitlines()[-1] == "['u0@example.org', 'u1@example.org']"
    assert [m.rcpt_tos for m in mx.messages] == [("u0@example.org", "u1@example.org")]
