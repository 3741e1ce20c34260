"""Testing programs that send mail through mailstrom.

Two tools, each also a pytest fixture (the plugin is registered when mailstrom is
installed; see ``docs/testing.md``):

* :func:`capture` / ``mailstrom_outbox``: everything queued is collected for assertions and
  held in its store, so nothing is delivered. Needs nothing beyond mailstrom.
* :class:`FakeMX` / ``fake_mx``: a DNS server and a scripted SMTP server on loopback, and a
  :class:`~mailstrom.Config` pointing at them, to watch real deliveries. Needs the
  ``testing`` extra: ``pip install 'mailstrom[testing]'``.

>>> from mailstrom.testing import capture
>>> with capture() as outbox:  # doctest: +SKIP
...     signup("bob@example.org")
>>> outbox[0].envelope_to  # doctest: +SKIP
['bob@example.org']

The loopback servers underneath (:class:`LoopbackDNS`, :func:`start_receiving_server`)
are importable too, for tests that need more than :class:`FakeMX` scripts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports
from mailstrom.testing.outbox import CapturedMessage, Outbox, capture

if TYPE_CHECKING:
    from mailstrom.testing.dns import LoopbackDNS
    from mailstrom.testing.fakemx import FakeMX
    from mailstrom.testing.smtp import ReceivedMessage, ReceivingServer, start_receiving_server

__all__ = [
    "CapturedMessage",
    "FakeMX",
    "LoopbackDNS",
    "Outbox",
    "ReceivedMessage",
    "ReceivingServer",
    "capture",
    "start_receiving_server",
]

# Imported on first use: they need the ``testing`` extra, and capture() must work without.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.testing.fakemx": ("FakeMX",),
        "mailstrom.testing.dns": ("LoopbackDNS",),
        "mailstrom.testing.smtp": ("ReceivedMessage", "ReceivingServer", "start_receiving_server"),
    },
)
