"""The doctor's optional libraries (the ``mailstrom[doctor]`` extra) and what to say when
one is missing. Delivery never needs them."""

from __future__ import annotations

import importlib.util

from mailstrom.errors import MailstromError

INSTALL = "pip install 'mailstrom[doctor]'"

# import name → distribution name on PyPI
LIBRARIES = {
    "spf": "pyspf",
    "cryptography": "cryptography",
    "publicsuffixlist": "publicsuffixlist",
}


class MissingExtra(MailstromError):
    """A library of the ``doctor`` extra is not installed."""

    def __init__(self, packages: list[str]) -> None:
        self.packages = packages
        super().__init__(f"the sender doctor needs {', '.join(packages)}: {INSTALL}")


def missing() -> list[str]:
    """The distributions of the extra that cannot be imported, in a stable order."""
    return [dist for module, dist in LIBRARIES.items() if not _importable(module)]


def require() -> None:
    """Raise :class:`MissingExtra` unless every library of the extra is importable."""
    if absent := missing():
        raise MissingExtra(absent)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests)
        return False
