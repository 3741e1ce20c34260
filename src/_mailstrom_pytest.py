"""The ``pytest11`` entry point ``mailstrom``: registers :mod:`mailstrom.testing.pytest_plugin`.

pytest loads entry points in every run of an environment where they are installed, before
it reads any conftest.py and before pytest-cov starts measuring. Anything inside the
``mailstrom`` package would import the whole library at that moment (its ``__init__``
re-exports the public API): a cost to every test run, and mailstrom's own coverage would
miss every line that runs at import. So the entry point is this top-level module, which
imports nothing, and it registers the fixtures' module when pytest configures, after
conftest files and coverage have started.

That module is registered under its own name, the name a conftest.py's ``pytest_plugins``
or ``-p mailstrom.testing.pytest_plugin`` would use, and only if nothing registered it
already: pytest loads it once, however it is asked for (mailstrom's own suite lists it in
tests/conftest.py). ``-p no:mailstrom`` turns the entry point off; ``-p mailstrom`` turns
it on where plugin autoloading is disabled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest


def pytest_configure(config: pytest.Config) -> None:
    from mailstrom.testing import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, pytest_plugin.__name__)
