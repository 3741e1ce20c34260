"""The facades users hold: :class:`Mailstrom` (threads) and :class:`AsyncMailstrom` (asyncio)."""

from mailstrom.client.aio import AsyncMailstrom
from mailstrom.client.sync import Mailstrom

__all__ = ["AsyncMailstrom", "Mailstrom"]
