"""docs/testing.md's sample, run as the user's own project: its files are the code blocks
marked ``<!-- sample: PATH -->``, and pytest runs them in a directory of their own, with
mailstrom's plugin loaded the way a user gets it (the installed entry point)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parents[1] / "docs" / "testing.md"
SAMPLE = re.compile(r"<!-- sample: (\S+) -->\n```python\n(.*?)```", re.DOTALL)


def sample_files() -> dict[str, str]:
    files = dict(SAMPLE.findall(DOC.read_text()))
    assert set(files) == {"myapp/mail.py", "tests/test_mail.py"}
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-project")
    for name, code in sample_files().items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    (root / "myapp" / "__init__.py").write_text("")
    return root


def run_pytest(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MAILSTROM_"))}
    # `python -m pytest` puts the project directory on sys.path, for `myapp`. The sample is
    # synchronous; pytest-asyncio (installed for mailstrom's own tests) would warn about a
    # project that does not configure it.
    options = ["-q", "-W", "error", "-p", "no:cacheprovider", "-p", "no:asyncio"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *options, *args],
        cwd=project,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_sample_passes(project: Path) -> None:
    proc = run_pytest(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_the_sample_also_passes_with_the_plugin_in_its_conftest(
    project: Path, tmp_path: Path
) -> None:
    """What docs/testing.md promises: naming the module in pytest_plugins is harmless."""
    for name, code in sample_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["mailstrom.testing.pytest_plugin"]\n')
    proc = run_pytest(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_with_autoloading_off_dash_p_mailstrom_loads_the_plugin(project: Path) -> None:
    proc = run_pytest(project, "-p", "mailstrom", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dash_p_no_mailstrom_turns_the_plugin_off(project: Path) -> None:
    proc = run_pytest(project, "-p", "no:mailstrom")
    assert proc.returncode != 0
    assert "fixture 'mailstrom_outbox' not found" in proc.stdout
