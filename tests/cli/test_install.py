"""First contact (issue 11 §5): the built wheel, installed with no extra into a fresh venv,
runs ``mailstrom --version`` and queues mail in SQLite; PostgreSQL says which extra it
needs.

Everything is installed from this machine's local package index (the ``file://`` indexes
and find-links pip is configured with), never from the network: pip runs with its
configuration files ignored and only those locations given.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _local_sources() -> list[str]:
    """pip options naming only local package sources, from pip's own configuration."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    indexes: list[str] = []
    links: list[str] = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        for item in value.strip().strip("'\"").split():
            if key.endswith("index-url") and item.startswith("file:"):
                indexes.append(item)
            elif key.endswith("find-links") and (item.startswith("file:") or item.startswith("/")):
                links.append(item)
    if not indexes:
        pytest.skip("no local package index configured for pip (file:// index-url)")
    options = ["--index-url", indexes[0]]
    for index in dict.fromkeys(indexes[1:]):
        options += ["--extra-index-url", index]
    for link in dict.fromkeys(links):
        options += ["--find-links", link]
    return options


def _offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "MAILSTROM_"))}
    env.pop("PYTHONPATH", None)  # the installed package, not this checkout
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        PIP_CONFIG_FILE=os.devnull,  # no configured index: only the local ones given
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_wheel_installs_without_extras_and_runs_sqlite(tmp_path: Path) -> None:
    sources = _local_sources()
    env = _offline_env(tmp_path)
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    # Build the wheel (the build backend comes from the local index too).
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), *sources, str(ROOT)],
        env,
        tmp_path,
    )
    [wheel] = dist.glob("mailstrom-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    _run([str(pip), "install", *sources, str(wheel)], env, tmp_path)

    [version] = re.findall(
        r'__version__ = "([^"]+)"', (ROOT / "src" / "mailstrom" / "_version.py").read_text()
    )
    out = _run([str(venv / "bin" / "mailstrom"), "--version"], env, tmp_path)
    assert out.strip() == f"mailstrom {version}"

    # No database driver came along; the SQLite path works from the installed package.
    installed = _run([str(pip), "list", "--format=freeze"], env, tmp_path).lower()
    assert "psycopg" not in installed
    assert "prometheus" not in installed
    script = """
import sys
import mailstrom
from mailstrom import Email, Mailstrom, Config
from mailstrom.errors import ConfigError
from mailstrom.stores import SQLiteStore, open_store

assert "site-packages" in mailstrom.__file__, mailstrom.__file__
store = SQLiteStore("queue.db")
with Mailstrom(Config(helo_name="client.test"), store=store, worker=None) as ms:
    mid = ms.send_email(Email(from_="app@example.com", to=["bob@example.org"], text="Hi"))
    print(ms.query_status(mid).state.value)
store.close()
try:
    open_store("postgresql://mail@127.0.0.1:1/mail")
except ConfigError as exc:
    print(exc)
"""
    out = _run([str(python), "-c", script], env, tmp_path)
    assert out.splitlines()[0] == "queued"
    assert "mailstrom[postgres]" in out

    cli = str(venv / "bin" / "mailstrom")
    store = f"sqlite:///{tmp_path / 'queue.db'}"
    _run(
        [
            cli,
            "--store",
            store,
            "send",
            "--from",
            "app@example.com",
            "--to",
            "c@example.org",
            "--text",
            "Hello",
        ],
        env,
        tmp_path,
    )
    queue = json.loads(_run([cli, "--store", store, "queue", "--json"], env, tmp_path))
    assert [m["state"] for m in queue] == ["queued", "queued"]
