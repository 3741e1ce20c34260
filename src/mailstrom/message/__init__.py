"""The message model: build, parse, validate and encode messages (pure, no I/O)."""

from mailstrom.message.builder import Attachment, Email
from mailstrom.message.encoding import downgrade_to_7bit
from mailstrom.message.prepare import prepare
from mailstrom.message.prepared import PreparedMessage

__all__ = ["Attachment", "Email", "PreparedMessage", "downgrade_to_7bit", "prepare"]
