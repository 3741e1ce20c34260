"""Fuzz ``prepare()`` for a long time: the property of ``tests/unit/test_message_fuzz.py``
(typed errors only; accepted output is CRLF-only, has lines of at most 998 octets, no
control characters in its headers, and a 7-bit downgrade that does not raise), run with
the same Hypothesis strategies in several processes until ``--cases`` cases have run.

    PYTHONPATH=. .venv/bin/python scripts/fuzz_prepare.py --cases 1000000 --processes 2

Each process runs chunks of ``--chunk`` cases, each chunk from its own seed, and reports
progress; a failure is printed with Hypothesis's shrunk falsifying example and the seed
that reproduces it (``--first-seed SEED --cases CHUNK --processes 1``). Prints figures;
the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import sys
import time
import traceback
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from tests.unit.test_message_fuzz import ENVELOPES, INPUTS, check


def run(index: int, first_seed: int, cases: int, chunk: int, reports: Any) -> None:
    """Run ``cases`` cases in chunks, reporting ("progress", n) and ("failure", text)."""
    counted = [0]

    @settings(
        max_examples=chunk,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(message=INPUTS, options=ENVELOPES)
    def prop(message: Any, options: dict[str, Any]) -> None:
        counted[0] += 1
        check(message, options)

    done = 0
    number = 0
    while done < cases:
        chunk_seed = first_seed + index * 1_000_000 + number
        number += 1
        counted[0] = 0
        try:
            seed(chunk_seed)(prop)()
        except BaseException:
            reports.put(("failure", f"seed {chunk_seed}:\n{traceback.format_exc()}"))
        done += counted[0]
        reports.put(("progress", counted[0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=5000, help="cases per seed")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between reports")
    args = parser.parse_args()

    reports: Any = multiprocessing.Queue()
    share = -(-args.cases // args.processes)
    workers = [
        multiprocessing.Process(
            target=run, args=(i, args.first_seed, share, min(args.chunk, share), reports)
        )
        for i in range(args.processes)
    ]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    total, failures, last = 0, [], began
    while any(worker.is_alive() for worker in workers) or not reports.empty():
        try:
            kind, value = reports.get(timeout=1.0)
        except queue.Empty:
            continue
        if kind == "progress":
            total += value
        else:
            failures.append(value)
            print(f"FAILURE {value}", flush=True)
        now = time.monotonic()
        if now - last >= args.every:
            last = now
            print(
                f"{total:>9} cases  {now - began:7.0f} s  {total / (now - began):6.0f} cases/s",
                flush=True,
            )
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - began
    print(
        f"done: {total} cases in {elapsed:.0f} s ({total / elapsed:.0f} cases/s, "
        f"{args.processes} processes), {len(failures)} failing chunk(s)",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
