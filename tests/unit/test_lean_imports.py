"""Start-up stays lean: ``import mailstrom`` and a worker's start-up load no optional
feature's dependencies, and every lazily exported name still resolves.

Each check runs in a fresh interpreter, since this one has long imported everything.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mailstrom

SRC = Path(mailstrom.__file__).parent

HEAVY = (
    "httpx",
    "rich",
    "click",
    "cryptography",
    "dkim",
    "email_validator",
    "starlette",
    "uvicorn",
    "jinja2",
    "psycopg",
    "prometheus_client",
    "django",
    "aiosmtplib",
    "aiosmtpd",
    "dnslib",
    "spf",
    "publicsuffixlist",
)
"""Optional features' libraries (and email-validator, needed only to accept new mail)."""

WORKER_FEATURES = (
    "mailstrom.web",
    "mailstrom.doctor.run",
    "mailstrom.readmodel",
    "mailstrom.contrib",
    "mailstrom.ops",
    "mailstrom.cli.live",
    "mailstrom.bounces.apply",
    "mailstrom.tlsrpt.report",
    "mailstrom.tls.dane",
    "mailstrom.cli.check_mtasts",
    "mailstrom.suppression_csv",
    "mailstrom.tlsrpt.deliver",
    "mailstrom.client.common",
    "mailstrom.client.process",
    "mailstrom.client.process_frames",
    "mailstrom.client.process_restart",
    "mailstrom.client.process_start",
    "mailstrom.client.process_watch",
    "mailstrom.client.process_fork",
    "mailstrom.stores.memory",
    "mailstrom.stores.postgres",
    # Building and encoding messages: a worker sends stored bytes (it prepares a bounce
    # notice, or re-encodes for a server without 8BITMIME, only when one is needed). What
    # writes a result's mark "notice owed" (runtime.notices, bounces.notice and the
    # prepared message's type) comes with the worker: a result cannot wait for an import.
    "mailstrom.message.builder",
    "mailstrom.message.preparation",
    "mailstrom.message.trees",
    "mailstrom.message.addresses",
    "mailstrom.message.envelope",
    "mailstrom.message.encoding",
    "mailstrom.message.render",
    # DKIM signs at submission (a worker again only a message whose signature expires);
    # a store reads its outcomes only for a message's status.
    # (Its settings types, dkim.config and dkim.keys, come with the configuration.)
    "mailstrom.dkim.signing",
    # Event hooks (HTTP), MTA-STS and TLS reporting: only when the config turns them on.
    "mailstrom.runtime.hooks",
    "mailstrom.runtime.hook_post",
    "mailstrom.webhooks",
    "mailstrom.mtasts.hook",
    "mailstrom.mtasts.source",
    "mailstrom.mtasts.fetch",
    "mailstrom.mtasts.https",
    "mailstrom.tlsrpt.recorder",
    "mailstrom.tlsrpt.observer",
    "mailstrom.mtasts.policy",
    "mailstrom.tlsrpt.sessions",
    "mailstrom.stores.sqlite_tls",
)
"""mailstrom's own modules a SQLite worker without those features has no use for."""

WORKER_STDLIB = (
    "urllib.request",
    "http.client",
    "email.headerregistry",
    "email.generator",
    # Only to suggest a setting's name for a misspelt one.
    "difflib",
)
"""The standard library's modules that only those features (or errors) bring in."""

BUILD_WORKER = """
from mailstrom.cli.main import build_parser
from mailstrom.cli.context import open_store, settings_from
from mailstrom.runtime.worker import Worker

args = build_parser("worker").parse_args(
    ["worker", "--store", "sqlite:///" + DB, "--helo-name", "mx.example.com"]
)
settings = settings_from(args)
store = open_store(settings.store_url)
worker = Worker(settings.config, store)
store.close()
"""

RUN_WORKER = BUILD_WORKER.replace(
    "store.close()",
    "import asyncio\nasyncio.run(worker.run(once=True))\nstore.close()",
)
"""The same worker, run until nothing is due (an empty queue: at once)."""


def loaded_after(code: str, **names: str) -> set[str]:
    """The modules a fresh interpreter has loaded once ``code`` ran (``names`` bound)."""
    script = "".join(f"{k} = {v!r}\n" for k, v in names.items()) + code
    script += "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_import_mailstrom_loads_no_optional_library() -> None:
    modules = loaded_after("import mailstrom")
    assert heavy_in(modules) == []
    # Nothing beyond the package itself: every public name waits for its first use.
    assert sorted(m for m in modules if m.startswith("mailstrom.")) == [
        "mailstrom._lazy",
        "mailstrom._version",
    ]


def test_a_public_name_loads_only_what_it_needs() -> None:
    modules = loaded_after("from mailstrom import MailstromError")
    assert "mailstrom.errors" in modules
    assert "mailstrom.client" not in modules
    assert heavy_in(modules) == []


def test_sqlite_worker_start_up_loads_no_unused_feature(tmp_path: Path) -> None:
    modules = loaded_after(BUILD_WORKER, DB=str(tmp_path / "queue.db"))
    assert "mailstrom.runtime.worker" in modules  # the script did build a worker
    assert heavy_in(modules) == []
    unused = [m for m in (*WORKER_FEATURES, *WORKER_STDLIB) if m in modules]
    assert unused == []


def test_sqlite_worker_run_loads_no_unused_feature(tmp_path: Path) -> None:
    # Starting the loops (TLS reporting, hooks, the dispatcher) on the default config
    # loads nothing more of the features above either.
    modules = loaded_after(RUN_WORKER, DB=str(tmp_path / "queue.db"))
    assert "mailstrom.runtime.outcomes" in modules  # the worker did run
    assert heavy_in(modules) == []
    unused = [m for m in (*WORKER_FEATURES, *WORKER_STDLIB) if m in modules]
    assert unused == []


# The packages whose names resolve on first use (mailstrom._lazy).
LAZY_PACKAGES = [
    "mailstrom",
    "mailstrom.bounces",
    "mailstrom.client",
    "mailstrom.dkim",
    "mailstrom.message",
    "mailstrom.stores",
]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_exported_name_resolves_in_a_fresh_interpreter(package: str) -> None:
    code = (
        f"import importlib, {package} as p\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(p.__all__) <= set(dir(p)), set(p.__all__) - set(dir(p))\n"
        "exec('from ' + p.__name__ + ' import *')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_names_match_the_type_checking_imports(package: str) -> None:
    """What type checkers see (the ``TYPE_CHECKING`` imports), what ``__all__`` promises
    and where ``__getattr__`` looks are the same names, found in the same modules."""
    module = importlib.import_module(package)
    source = Path(module.__file__ or "").read_text()
    checked: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module
                for alias in stmt.names:
                    checked[alias.asname or alias.name] = stmt.module
    assert set(checked) == set(module.__all__)
    for name, where in checked.items():
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(where), name), name


def test_the_test_kit_loads_no_server_library_until_one_is_used() -> None:
    # capture() must work without the ``testing`` extra: its servers' libraries wait.
    modules = loaded_after("import mailstrom.testing\nfrom mailstrom.testing import capture")
    assert heavy_in(modules) == []
    assert "trustme" not in modules


def test_the_test_kit_lists_every_public_name() -> None:
    # Its lazily imported servers were missing from dir(mailstrom.testing) (and so from
    # completion in a shell or an editor) until something had used them.
    code = (
        "import mailstrom.testing as p\n"
        "assert set(p.__all__) <= set(dir(p)), sorted(set(p.__all__) - set(dir(p)))\n"
        "assert 'aiosmtpd' not in __import__('sys').modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_prepare_is_the_function_whatever_was_imported_first() -> None:
    # The function's module has its own name (`preparation`), so importing it first, or
    # any other submodule of the lazy package, cannot put a module where `prepare` is.
    code = (
        "import mailstrom.message.preparation, mailstrom.message.prepared, types\n"
        "from mailstrom.message import prepare\n"
        "from mailstrom import prepare as top\n"
        "assert not isinstance(prepare, types.ModuleType)\n"
        "assert top is prepare is mailstrom.message.preparation.prepare\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        mailstrom.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        exec("from mailstrom import no_such_name")


OTHER_COMMANDS = (
    "mailstrom.cli.send",
    "mailstrom.cli.sendmail",
    "mailstrom.cli.manage",
    "mailstrom.cli.worker",
    "mailstrom.cli.check",
    "mailstrom.cli.doctor",
    "mailstrom.cli.dkim",
    "mailstrom.cli.web",
    "mailstrom.cli.tlsrpt",
    "mailstrom.cli.bounce",
    "mailstrom.cli.suppress",
)


def test_a_command_loads_only_its_own_module() -> None:
    modules = loaded_after(
        "from mailstrom.cli.main import main\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--store', 'memory://', 'status', '--help']) == 0\n"
    )
    assert "mailstrom.cli.views" in modules
    assert sorted(m for m in OTHER_COMMANDS if m in modules) == []
    assert heavy_in(modules) == []
