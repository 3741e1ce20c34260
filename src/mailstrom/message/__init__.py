"""The message model: build, parse, validate and encode messages (pure, no I/O)."""

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports

if TYPE_CHECKING:
    from mailstrom.message.builder import Attachment, Email
    from mailstrom.message.encoding import downgrade_to_7bit
    from mailstrom.message.preparation import prepare
    from mailstrom.message.prepared import PreparedMessage

__all__ = ["Attachment", "Email", "PreparedMessage", "downgrade_to_7bit", "prepare"]

# Loaded on first use (PEP 562): a worker, which only sends stored bytes, needs the stored
# form (`prepared`) but not the builder, parser and encoders behind `prepare`.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.message.builder": ("Attachment", "Email"),
        "mailstrom.message.encoding": ("downgrade_to_7bit",),
        "mailstrom.message.preparation": ("prepare",),
        "mailstrom.message.prepared": ("PreparedMessage",),
    },
)
