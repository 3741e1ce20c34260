"""The pytest plugin: fixtures ``mailstrom_outbox`` and ``fake_mx``.

Registered in every pytest run of an environment where mailstrom is installed, through
the ``pytest11`` entry point ``mailstrom`` (the top-level module ``_mailstrom_pytest``):
``-p no:mailstrom`` turns it off, ``-p mailstrom`` on where plugin autoloading is
disabled. A conftest.py may also list this module in ``pytest_plugins``; pytest registers
it once either way.

Fixtures import what they need when a test first asks for them, so the plugin needs
nothing of the ``testing`` extra until ``fake_mx`` is used, which then raises an
ImportError naming the extra if it is missing.
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
