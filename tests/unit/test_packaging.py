"""The package as a user meets it first: its version, its licence, and a clear word when the
PostgreSQL driver is not installed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mailstrom
from mailstrom.cli.main import main

ROOT = Path(__file__).parents[2]


def test_version_is_pep440_and_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert mailstrom.__version__.count(".") == 2
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"mailstrom {mailstrom.__version__}"


def test_licence_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    # The core needs no database driver: SQLite is in the standard library.
    assert not any(dep.startswith("psycopg") for dep in project["dependencies"])
    assert "postgres" in project["optional-dependencies"]


def test_postgres_store_without_driver_names_the_extra() -> None:
    # A None entry in sys.modules makes `import psycopg` fail as if it were not installed.
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from mailstrom.errors import ConfigError\n"
        "from mailstrom.stores import open_store\n"
        "try:\n"
        "    open_store('postgresql://mail@127.0.0.1:1/mail')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "mailstrom[postgres]" in out
