"""The pytest plugin: fixtures ``mailstrom_outbox`` and ``fake_mx``.

Loaded in every pytest run of an environment where mailstrom is installed, through the
``pytest11`` entry point ``mailstrom`` (see :mod:`mailstrom.testing.pytest_entry`):
``-p no:mailstrom`` turns it off, ``-p mailstrom`` on where plugin autoloading is
disabled. A conftest.py may also list this module in ``pytest_plugins``; pytest loads it
once either way.

pytest loads it at start-up, before any test (or coverage) runs, so this module imports
nothing but pytest: mailstrom itself and the ``testing`` extra's packages are imported
when a test first asks for a fixture. A program without the extra installed therefore
loses nothing by having the plugin, and gets an ImportError naming the extra only from
``fake_mx``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mailstrom.testing.fakemx import FakeMX
    from mailstrom.testing.outbox import Outbox


@pytest.fixture
def mailstrom_outbox() -> Iterator[Outbox]:
    """Everything queued through mailstrom during the test, held instead of delivered.

    A :class:`~mailstrom.testing.Outbox` (a sequence of
    :class:`~mailstrom.testing.CapturedMessage`): see :func:`mailstrom.testing.capture`.
    """
    from mailstrom.testing.outbox import capture

    with capture() as outbox:
        yield outbox


@pytest.fixture
def fake_mx() -> Iterator[FakeMX]:
    """A started :class:`~mailstrom.testing.FakeMX`: loopback DNS routing every domain to
    a scripted SMTP server, and ``fake_mx.config`` to deliver there. Stopped after the
    test. Needs the ``testing`` extra."""
    from mailstrom.testing.fakemx import FakeMX

    with FakeMX() as mx:
        yield mx
