"""What a bulk command by filters reads on a SQLite queue of large messages: ``retry
--domain``, ``cancel --domain --dry-run`` and ``hold``/``release --domain`` on a store of
``--messages`` messages (default 20,000) of ``--size`` octets (default 50,000), half of
them to the domain chosen.

The store is filled through its API (``enqueue_many``, batches of 500, one recipient
each, a tag and a metadata entry each: until schema version 20 SQLite reached those
columns, stored after the message's bytes, only by walking its overflow pages). Each
command runs as the real ``mailstrom`` in a subprocess (``main()`` of
``mailstrom.cli.main``, as ``python -m mailstrom`` calls it); the table shows, medians
of ``--runs``, its wall time, its peak RSS (``ru_maxrss``) and the octets it read
through ``read()`` (``rchar`` of ``/proc/self/io`` as it ends: SQLite's page reads, from
the page cache or the disk).

    .venv/bin/python benchmarks/bulk_select.py [--messages 20000] [--size 50000] [--runs 3]

Prints figures only; ``--keep PATH`` keeps (and reuses) the filled database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from mailstrom.message.attributes import QueueAttributes
from mailstrom.message.prepared import PreparedMessage
from mailstrom.stores import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
BATCH = 500
DOMAIN = "chosen.test"

RUN = (
    "import resource, sys\n"
    "from mailstrom.cli.main import main\n"
    "code = main(sys.argv[1:])\n"
    "with open('/proc/self/io') as io:\n"
    "    rchar = next(line for line in io if line.startswith('rchar:')).split()[1]\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
    "sys.stderr.write(f'\\nmeasured {rchar} {peak}\\n')\n"
    "sys.exit(code)\n"
)
"""The command as ``python -m mailstrom`` runs it, telling as it ends the octets it read
and its peak RSS (``ru_maxrss``, KiB on Linux)."""


def fill(path: Path, messages: int, size: int) -> float:
    """Fill the store; returns the seconds it took."""
    started = time.perf_counter()
    store = SQLiteStore(path)
    body = b"Subject: report\r\nFrom: app@example.com\r\n\r\n"
    body += b"x" * max(size - len(body) - 2, 0) + b"\r\n"
    # As an application tags its mail: the columns that held these lay after the bytes.
    attributes = QueueAttributes(tags=("report",), metadata={"account": "42"})
    now = datetime.now(UTC)
    try:
        for start in range(0, messages, BATCH):
            store.enqueue_many(
                [
                    PreparedMessage(
                        data=body,
                        envelope_from="app@example.com",
                        recipients=(f"user{i}@{DOMAIN if i % 2 else 'other.test'}",),
                        subject="report",
                        attributes=attributes,
                    )
                    for i in range(start, min(start + BATCH, messages))
                ],
                now=now,
            )
    finally:
        store.close()
    return time.perf_counter() - started


def command(path: Path, args: list[str]) -> tuple[float, int, int, str]:
    """Wall seconds, peak RSS (octets), octets read and the output of the command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-c", RUN, "--store", f"sqlite:///{path}", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}: {err.decode()}")
    rchar, peak = err.decode().rsplit("measured ", 1)[1].split()[:2]
    return took, int(peak), int(rchar), out.decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="fill (or reuse) this database file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "q.db"
        if args.keep is None or not path.exists():
            took = fill(path, args.messages, args.size)
            print(f"filled {args.messages:,} messages of {args.size:,} octets in {took:.1f} s")
        print(f"database: {path.stat().st_size / 1e6:,.0f} MB")
        lines = (
            ["retry", "--domain", DOMAIN],
            ["cancel", "--domain", DOMAIN, "--dry-run"],
            ["hold", "--domain", DOMAIN],
            ["release", "--domain", DOMAIN],  # what hold held: each round starts alike
            ["--version"],  # what every command reads and holds to start
        )
        runs: list[list[tuple[float, int, int, str]]] = [[] for _ in lines]
        for _ in range(args.runs):
            for line, done in zip(lines, runs, strict=True):
                done.append(command(path, line))
        rows = []
        for line, done in zip(lines, runs, strict=True):
            wall = statistics.median(r[0] for r in done)
            rss = statistics.median(r[1] for r in done)
            read = statistics.median(r[2] for r in done)
            said = done[-1][3].splitlines()[-1] if done[-1][3] else ""
            rows.append((" ".join(line[:3]), wall, rss, read, said[:50]))
        width = max(len(r[0]) for r in rows)
        print(f"{'command':<{width}}  {'wall s':>6}  {'peak RSS MB':>11}  {'read MB':>8}  output")
        for name, wall, rss, read, said in rows:
            print(f"{name:<{width}}  {wall:>6.2f}  {rss / 1e6:>11.0f}  {read / 1e6:>8.1f}  {said}")


if __name__ == "__main__":
    main()
