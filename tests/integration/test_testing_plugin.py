"""How mailstrom's pytest plugin is loaded, and what the package needs without the extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return env | extra


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param([], {}, id="autoload"),
        pytest.param(["-p", "no:mailstrom"], {}, id="entry-point-blocked"),
        pytest.param(["-p", "mailstrom"], {}, id="entry-point-named"),
        pytest.param(
            ["-p", "pytest_asyncio.plugin", "-p", "pytest_timeout"],
            {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
            id="autoload-off",
        ),
    ],
)
def test_the_suite_registers_the_fixtures_once(args: list[str], env: dict[str, str]) -> None:
    """tests/conftest.py names the plugin module, which the entry point also loads by
    that name: one registration however pytest is started (never pluggy's "Plugin already
    registered under a different name")."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-q", *args, "tests/unit/test_status.py"],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for fixture in ("mailstrom_outbox", "fake_mx", "dns_server", "smtp_server"):
        assert sum(line.startswith(f"{fixture} ") for line in lines) == 1, fixture


def test_without_the_extra_capture_works_and_the_servers_say_what_to_install() -> None:
    """`pip install mailstrom` without [testing]: the plugin (always registered) and
    capture() import nothing of the extra; FakeMX names the extra in its ImportError."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("aiosmtpd", "dnslib", "trustme"):
            sys.modules[name] = None  # as if not installed: importing raises ImportError

        import _mailstrom_pytest
        import mailstrom.testing.pytest_plugin
        from mailstrom import Config, Email, Mailstrom
        from mailstrom.stores import MemoryStore
        from mailstrom.testing import capture

        with capture() as outbox:
            Mailstrom(Config(helo_name="a.test"), store=MemoryStore(), worker=None).send_email(
                Email(from_="a@a.test", to=["b@b.test"], text="x"))
        assert len(outbox) == 1
        assert not {"aiosmtpd", "dnslib", "trustme"} & {
            n.partition(".")[0] for n, m in sys.modules.items() if m is not None}
        try:
            from mailstrom.testing import FakeMX
        except ImportError as exc:
            print(exc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'mailstrom[testing]'" in proc.stdout
