"""Package attributes loaded on first use (PEP 562), so that importing a package costs
only what the caller touches.

A package ``__init__`` lists where each public name lives and installs the pair this
module returns as its ``__getattr__`` and ``__dir__``; it also imports the same names
under ``TYPE_CHECKING`` so that type checkers see the real objects.

>>> __getattr__, __dir__ = lazy_exports(__name__, {"json": ("dumps",)})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public names are found in
    the modules ``exports`` maps them from (module name → names it defines)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        # Stored on the package, so the next lookup is a plain attribute read.
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | where.keys())

    return __getattr__, __dir__
