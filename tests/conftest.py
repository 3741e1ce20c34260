"""Shared test setup. Services live in tests/fixtures/* as pytest plugins so each can be
read on its own; every one binds to loopback on an ephemeral port and stops afterwards.

The loopback DNS and SMTP servers themselves ship in ``mailstrom.testing`` (users test
with them too); tests/fixtures keeps the project's fixtures around them, and the old
import paths. The user-facing fixtures (``mailstrom_outbox``, ``fake_mx``) are listed here
by module name: the ``mailstrom`` entry point (``src/_mailstrom_pytest.py``) registers that
module only when nothing has, so it is registered once whether plugin autoloading is on
or off and whether ``-p no:mailstrom`` or ``-p mailstrom`` is given; and it is imported
here, after coverage has started, not when pytest loads entry points.
"""

import os

from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.dns_server",
    "tests.fixtures.smtp_server",
    "tests.fixtures.postgres",
    "tests.fixtures.https_server",
    "mailstrom.testing.pytest_plugin",
]


# `make test` and CI draw the same examples every run (derandomize seeds each property
# from its own test), so a run fails for a change, never for the examples it happened to
# draw: a flake in CI is a red main for nobody's change. To hunt for new failures, draw
# fresh ones, as many as you like, e.g.
#   MAILSTROM_HYPOTHESIS=explore MAILSTROM_FUZZ_EXAMPLES=5000 \
#       .venv/bin/python -m pytest --timeout=0 tests/unit/test_api_fuzz.py
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("MAILSTROM_HYPOTHESIS", "repeatable"))
