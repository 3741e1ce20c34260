"""The ``mailstrom`` command with a Ctrl-C at a chosen moment of its start-up.

Run ``python -m tests.support.interrupting ARGS...`` (the command line of ``mailstrom``)
with :data:`AT_VARIABLE` naming a module: this process raises SIGINT at itself (as a
terminal's Ctrl-C would send it) when that module is first imported, which is the same
moment on every run. The command starts as its console script does (``from MODULE import
main``, as ``[project.scripts]`` in pyproject.toml names them), or as ``python -m
mailstrom`` does with :data:`ENTRY_VARIABLE` set to ``module``. Nothing of mailstrom is
imported before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import runpy
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

AT_VARIABLE = "TEST_INTERRUPT_AT"
ENTRY_VARIABLE = "TEST_INTERRUPT_ENTRY"


class InterruptAt(importlib.abc.MetaPathFinder):
    """Raises SIGINT (once) as ``name`` is about to be imported, then finds nothing: the
    import goes on by the other finders, if the signal's handler lets it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == self.name:
            sys.meta_path.remove(self)
            # Delivered before raise_signal returns: Python's handler raises
            # KeyboardInterrupt here, in the import, as from a real Ctrl-C.
            signal.raise_signal(signal.SIGINT)
        return None


def run() -> None:
    sys.meta_path.insert(0, InterruptAt(os.environ[AT_VARIABLE]))
    if os.environ.get(ENTRY_VARIABLE) == "module":
        runpy.run_module("mailstrom", run_name="__main__", alter_sys=True)
    else:
        sys.exit(console_script()())


def console_script() -> Callable[[], int]:
    """The function the ``mailstrom`` console script calls, imported as that script
    imports it (its module is the first import; pip writes ``from MODULE import main``)."""
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["mailstrom"]
    module, _, attribute = target.partition(":")
    function: Callable[[], int] = getattr(importlib.import_module(module), attribute)
    return function


if __name__ == "__main__":
    run()
