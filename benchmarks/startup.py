"""Start-up: what a fresh interpreter pays before mailstrom does any work.

Each figure is the median wall time of ``--runs`` fresh processes (ms), spawn to exit:

* ``python -c pass``: the interpreter alone, the floor under every other row;
* ``import mailstrom``: the package (``-X importtime`` total in its own column);
* ``mailstrom --version``: the command line's parser, every command registered;
* ``worker built``: what ``mailstrom worker`` does before it runs, on a SQLite store:
  parse the options, load the settings, open (and migrate) the store, build the
  :class:`~mailstrom.runtime.worker.Worker`.

``--src NAME=PATH`` (repeatable) measures another checkout's ``src`` too, alternating
processes between them so that both see the same machine load:

    PYTHONPATH=src python benchmarks/startup.py --runs 5 --src main=../main/src --src this=src

Time to the first delivery is ``e2e.py --rows deliver-process`` (column ``1st ms``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD_WORKER = """
import sys
from mailstrom.cli.main import build_parser
from mailstrom.cli.context import open_store, settings_from
from mailstrom.runtime.worker import Worker

# As `mailstrom worker` does: only the worker command's module (build_parser() without
# the name, on a tree from before the command table, loads every command's).
try:
    parser = build_parser("worker")
except TypeError:
    parser = build_parser()
args = parser.parse_args(
    ["worker", "--store", "sqlite:///" + sys.argv[1], "--helo-name", "mx.example.com"]
)
settings = settings_from(args)
store = open_store(settings.store_url)
Worker(settings.config, store)
store.close()
"""

ROWS = ("python -c pass", "import mailstrom", "mailstrom --version", "worker built")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return (time.perf_counter() - began) * 1000, done.stderr


def import_total(stderr: str) -> float:
    """The cumulative µs of ``import mailstrom`` in ``-X importtime`` output, as ms."""
    line = [x for x in stderr.splitlines() if x.rstrip().endswith("| mailstrom")][-1]
    return int(line.split("|")[1]) / 1000


def one_round(src: str, directory: Path, figures: dict[str, list[float]]) -> None:
    env = {**os.environ, "PYTHONPATH": src}
    py = sys.executable
    figures["python -c pass"].append(timed([py, "-c", "pass"], env)[0])
    _, stderr = timed([py, "-X", "importtime", "-c", "import mailstrom"], env)
    figures["importtime"].append(import_total(stderr))
    figures["import mailstrom"].append(timed([py, "-c", "import mailstrom"], env)[0])
    figures["mailstrom --version"].append(timed([py, "-m", "mailstrom", "--version"], env)[0])
    db = directory / f"queue-{len(figures['worker built'])}.db"
    figures["worker built"].append(timed([py, "-c", BUILD_WORKER, str(db)], env)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="processes per figure (default 5)")
    parser.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a checkout's src directory to measure (default: this PYTHONPATH)",
    )
    args = parser.parse_args()
    sources = [tuple(s.split("=", 1)) for s in args.src] or [
        ("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    ]
    figures: dict[str, dict[str, list[float]]] = {
        name: {row: [] for row in (*ROWS, "importtime")} for name, _ in sources
    }
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for name, src in sources:  # alternate, so that load changes hit every source
                one_round(str(Path(src).resolve()), Path(tmp), figures[name])
    print(f"start-up, median of {args.runs} fresh processes, ms (wall, spawn to exit)")
    print(f"{'':22}" + "".join(f"{name:>14}" for name, _ in sources))
    for row in ROWS:
        cells = "".join(f"{statistics.median(figures[n][row]):14.1f}" for n, _ in sources)
        print(f"{row:22}{cells}")
    cells = "".join(f"{statistics.median(figures[n]['importtime']):14.1f}" for n, _ in sources)
    print(f"{'  -X importtime total':22}{cells}")
    print(f"load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
