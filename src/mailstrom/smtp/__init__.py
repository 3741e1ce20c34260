"""Sans-IO SMTP client: feed it bytes, get replies paired with the commands they answer.

No sockets here; :mod:`mailstrom.runtime.connection` drives a session over asyncio.
"""

from mailstrom.smtp.events import NEED_DATA, Command, LocalProtocolError, NeedData, Reply
from mailstrom.smtp.replies import ReplyParser, make_reply, parse_ehlo
from mailstrom.smtp.session import (
    ClientSession,
    State,
    content_size,
    encode_body,
    encode_path,
    encode_recipient,
)

__all__ = [
    "NEED_DATA",
    "ClientSession",
    "Command",
    "LocalProtocolError",
    "NeedData",
    "Reply",
    "ReplyParser",
    "State",
    "content_size",
    "encode_body",
    "encode_path",
    "encode_recipient",
    "make_reply",
    "parse_ehlo",
]
