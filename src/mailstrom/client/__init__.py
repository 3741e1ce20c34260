"""The facades users hold: :class:`Mailstrom` (threads) and :class:`AsyncMailstrom` (asyncio)."""

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports

if TYPE_CHECKING:
    from mailstrom.client.aio import AsyncMailstrom
    from mailstrom.client.sync import Mailstrom


__all__ = ["AsyncMailstrom", "Mailstrom"]

# Loaded on first use (PEP 562): importing the package costs only what is touched.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.client.aio": ("AsyncMailstrom",),
        "mailstrom.client.sync": ("Mailstrom",),
    },
)
