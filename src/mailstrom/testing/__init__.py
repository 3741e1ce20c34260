"""Testing programs that send mail through mailstrom.

* :func:`capture`: everything queued is collected for assertions and held in its store,
  so nothing is delivered. Needs nothing beyond mailstrom.

>>> from mailstrom.testing import capture
>>> with capture() as outbox:  # doctest: +SKIP
...     signup("bob@example.org")
>>> outbox[0].envelope_to  # doctest: +SKIP
['bob@example.org']

Real DNS and SMTP servers on loopback (:class:`LoopbackDNS`, :func:`start_receiving_server`)
need the ``testing`` extra: ``pip install 'mailstrom[testing]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mailstrom.testing.outbox import CapturedMessage, Outbox, capture

if TYPE_CHECKING:
    from mailstrom.testing.dns import LoopbackDNS
    from mailstrom.testing.smtp import ReceivedMessage, ReceivingServer, start_receiving_server

__all__ = [
    "CapturedMessage",
    "LoopbackDNS",
    "Outbox",
    "ReceivedMessage",
    "ReceivingServer",
    "capture",
    "start_receiving_server",
]

# Imported on first use: they need the ``testing`` extra, and capture() must work without.
_NEEDS_EXTRA = {
    "LoopbackDNS": "mailstrom.testing.dns",
    "ReceivedMessage": "mailstrom.testing.smtp",
    "ReceivingServer": "mailstrom.testing.smtp",
    "start_receiving_server": "mailstrom.testing.smtp",
}


def __getattr__(name: str) -> Any:
    module = _NEEDS_EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
