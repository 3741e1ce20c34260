"""Every benchmark still runs against today's API, on tiny inputs.

The benchmarks are scripts outside ``src/`` (not type-checked, never imported by the
suite), so an API change can break one silently; this runs each the way its README does,
with sizes that take a second or two, and checks that it printed its table. The figures
themselves are not looked at: performance is judged by running the benchmarks, not here.
``e2e.py`` needs Postfix's smtp-sink and smtp-source, which the suite does not install;
it is run when they are present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.postfix import missing_tools

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "prepare": (["--count", "20", "--runs", "1"], "text+html"),
    "enqueue": (
        ["--count", "50", "--repeat", "1", "--queued", "1000", "--batch", "50"],
        "record",
    ),
    "deliver": (["-n", "40", "--stores", "memory,sqlite", "--repeat", "1"], "sqlite"),
    "reasons": (["-n", "20", "--repeat", "1"], "greylisted"),
    "dkim_stale": (["-n", "20", "--repeat", "1"], "app's own (worker)"),
    "dkim_canon": (["--mib", "0.05", "--runs", "1"], "tab-separated"),
    "route_cache": (["-n", "20", "--repeat", "1"], "one.test"),
    "mtasts": (["-n", "20", "--repeat", "1"], "enforce policy"),
    "stats": (["--recipients", "500", "--runs", "1"], "stats()"),
    "queue_tools": (["--messages", "2000", "--runs", "1"], "queue --shape"),
    "bulk_select": (["--messages", "200", "--size", "5000", "--runs", "1"], "retry --domain"),
    "status_read": (["--messages", "20", "--size", "100000", "--runs", "1"], "message_dkim"),
    "web": (["--messages", "2000", "--runs", "1"], "overview"),
    "web_indexes": (["--messages", "500", "--rounds", "1"], "lease+record"),
    "priority": (
        ["-n", "300", "--transactional", "1", "--warmup", "50", "--gap", "10"],
        "latency median",
    ),
    "suppression": (["--entries", "2000", "--repeat", "3"], "µs/lease"),
    "attemptlog": (["--count", "200", "--runs", "1"], "delivered"),
    "smtp_cpu": (["-n", "200", "--repeat", "1", "--worker-messages", "50"], "session (sans-IO)"),
    "startup": (["--runs", "1"], "worker built"),
    "page_size": (["--count", "30", "--rounds", "1"], "WAL B/enq"),
    "memory_listing": (["--messages", "3000", "--seconds", "0.1"], "dashboard destinations"),
    "memory_lease": (["--messages", "3000", "--seconds", "0.05"], "purge_state"),
}


def run_benchmark(name: str, args: list[str]) -> str:
    return run_script(ROOT / "benchmarks" / f"{name}.py", args)


def run_script(script: Path, args: list[str]) -> str:
    # This checkout's src first: the installed mailstrom may be another checkout's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs(name: str) -> None:
    args, expected = RUNS[name]
    assert expected in run_benchmark(name, args)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_benchmark_runs() -> None:
    # Starts its own throwaway server, as the suite's fixture does.
    out = run_benchmark("postgres", ["-n", "100", "--processes", "1", "--timeout", "60"])
    assert "enqueue_many" in out


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_commits_benchmark_runs() -> None:
    out = run_benchmark("postgres_commits", ["--processes", "2", "--count", "5"])
    assert "NOTIFY/s" in out


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_lease_benchmark_runs() -> None:
    out = run_benchmark(
        "postgres_lease", ["--backlog", "600", "--leases", "3", "--limit", "10", "--runs", "1"]
    )
    assert "statistics" in out


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_web_indexes_benchmark_runs() -> None:
    out = run_benchmark("web_indexes_postgres", ["--messages", "300", "--rounds", "1"])
    assert "lease+record" in out


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_tools()), reason="Postfix's smtp-sink/smtp-source missing")
def test_e2e_benchmark_runs() -> None:
    out = run_benchmark(
        "e2e", ["-n", "200", "--repeat", "1", "--rows", "deliver-thread", "--wakeups", "2"]
    )
    assert "deliver only" in out


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_tools()), reason="Postfix's smtp-sink/smtp-source missing")
def test_e2e_split_runs() -> None:
    out = run_benchmark("e2e", ["-n", "100", "--split"])
    assert "write lock wait" in out


@pytest.mark.slow
def test_soak_script_runs() -> None:
    """``scripts/soak.py`` (the crash soak beyond test_chaos.py's size) at a tiny size:
    its own checks must pass (exit 0), so an API change that breaks it shows here."""
    args = ["--store", "sqlite", "--messages", "200", "--workers", "2"]
    args += ["--kill-min", "0.5", "--kill-max", "1.5", "--term-every", "3", "--seed", "1"]
    out = run_script(ROOT / "scripts" / "soak.py", args)  # exit 0: its checks passed
    assert '"late_suppressed_received"' in out
