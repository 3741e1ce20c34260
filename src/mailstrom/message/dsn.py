"""Delivery status notification requests (RFC 3461): what a message asks receiving MTAs to
report, sent as MAIL and RCPT parameters only to servers that offer the DSN extension.

>>> dsn = DSN(notify=("failure", "delay"), ret="hdrs", envid="order-42")
>>> dsn.mail_params("0190f3a2c4e1b7d08a4f2c6e9b1d3f57")
b' RET=HDRS ENVID=order-42'
>>> dsn.rcpt_params("bob@example.org")
b' NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@example.org'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from mailstrom.arguments import shown
from mailstrom.errors import InvalidMessage

MAX_ENVID = 100
"""Characters of an ENVID (RFC 3461 §4.4)."""


class Notify(StrEnum):
    """When a receiving MTA should report on a recipient (RFC 3461 §4.1)."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"
    NEVER = "NEVER"
    """Never; not combined with the others."""


class Return(StrEnum):
    """What a failure report carries of the message (RFC 3461 §4.3)."""

    FULL = "FULL"
    HEADERS = "HDRS"


_Word = TypeVar("_Word", Notify, Return)


def _word(kind: type[_Word], value: object, what: str) -> _Word:
    """``value`` (a member, or its value in any case) as a member of ``kind``;
    InvalidMessage naming the words taken otherwise, where the enum's own ValueError said
    "'BOGUS' is not a valid Notify", the value quoted whole."""
    try:
        return kind(str(value).upper())
    except ValueError:
        words = ", ".join(member.value for member in kind)
        raise InvalidMessage(
            f"dsn: {what} takes {words} (in any case), not {shown(value)}"
        ) from None


def xtext(text: str) -> bytes:
    """``text`` as RFC 3461 xtext: printable ASCII but ``+`` and ``=`` as is, the rest as
    ``+XX`` (the UTF-8 octets of a non-ASCII character each so)."""
    out = bytearray()
    for octet in text.encode("utf-8"):
        if 33 <= octet <= 126 and octet not in (43, 61):
            out.append(octet)
        else:
            out += b"+%02X" % octet
    return bytes(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class DSN:
    """What to ask receiving MTAs to report about a message.

    ``notify``: when to report (empty: leave it to the server, which reports failures);
    ``ret``: the whole message or its headers in a failure report (None: the server's
    choice); ``envid``: an id the report quotes as ``Original-Envelope-Id`` (None: the
    mailstrom message id, which ``mailstrom bounce`` then recognises); ``orcpt``: send each
    recipient's address as ``ORCPT``, which the report quotes as ``Original-Recipient`` even
    when the receiver rewrote it (only for ASCII addresses). Strings are accepted for the
    enums, in any case: ``DSN(notify=("failure",), ret="hdrs")``.
    """

    notify: tuple[Notify, ...] = ()
    ret: Return | None = None
    envid: str | None = None
    orcpt: bool = True

    def __post_init__(self) -> None:
        # Checked here, where the values enter: a stored request is written and read back
        # (``encode``), and orcpt="no" or 2 would fail there or read back as another one.
        if isinstance(self.notify, str | bytes) or not isinstance(self.notify, Iterable):
            raise InvalidMessage(
                f"dsn: notify must be a tuple of Notify values, not {shown(self.notify)}"
            )
        if not isinstance(self.orcpt, bool):
            raise InvalidMessage(f"dsn: orcpt must be True or False, not {shown(self.orcpt)}")
        if self.envid is not None and not isinstance(self.envid, str):
            raise InvalidMessage(f"dsn: envid must be a str, not {shown(self.envid)}")
        notify = tuple(dict.fromkeys(_word(Notify, n, "notify") for n in self.notify))
        ret = None if self.ret is None else _word(Return, self.ret, "ret")
        if Notify.NEVER in notify and len(notify) > 1:
            raise InvalidMessage("dsn: notify NEVER cannot be combined with other values")
        if self.envid is not None and (
            not self.envid
            or len(self.envid) > MAX_ENVID
            or not all(32 < ord(c) < 127 for c in self.envid)
        ):
            raise InvalidMessage(
                f"dsn: envid must be 1 to {MAX_ENVID} printable ASCII characters without spaces"
            )
        object.__setattr__(self, "notify", notify)
        object.__setattr__(self, "ret", ret)

    def mail_params(self, message_id: str) -> bytes:
        """`` RET=... ENVID=...`` for the MAIL command of message ``message_id``."""
        params = b" RET=" + self.ret.value.encode() if self.ret is not None else b""
        return params + b" ENVID=" + xtext(self.envid or message_id)

    def rcpt_params(self, address: str) -> bytes:
        """`` NOTIFY=... ORCPT=rfc822;...`` for the RCPT command of ``address``."""
        params = b""
        if self.notify:
            params += b" NOTIFY=" + ",".join(n.value for n in self.notify).encode()
        if self.orcpt and address.isascii():
            params += b" ORCPT=rfc822;" + xtext(address)
        return params

    def encode(self) -> str:
        """The form stores keep: ``notify=FAILURE,DELAY;ret=HDRS;orcpt=1;envid=...``
        (the envid last: it may hold ``;`` and ``=``)."""
        return ";".join(
            [
                "notify=" + ",".join(n.value for n in self.notify),
                "ret=" + (self.ret.value if self.ret is not None else ""),
                f"orcpt={int(self.orcpt)}",
                "envid=" + (self.envid or ""),
            ]
        )

    @classmethod
    def from_options(
        cls, notify: str | None, ret: str | None = None, envid: str | None = None
    ) -> DSN | None:
        """The request of command-line options (``never`` or ``failure,delay``; ``full``
        or ``hdrs``; an envid), None when none is given; InvalidMessage when invalid."""
        if notify is None and ret is None and envid is None:
            return None
        words = tuple(
            _word(Notify, w.strip(), "notify") for w in (notify or "").split(",") if w.strip()
        )
        kind = _word(Return, ret, "ret") if ret else None
        return cls(notify=words, ret=kind, envid=envid)

    @classmethod
    def decode(cls, text: str) -> DSN:
        """The DSN that :meth:`encode` wrote."""
        fields = dict(part.partition("=")[::2] for part in text.split(";", 3))
        return cls(
            notify=tuple(Notify(n) for n in fields.get("notify", "").split(",") if n),
            ret=Return(fields["ret"]) if fields.get("ret") else None,
            envid=fields.get("envid") or None,
            orcpt=fields.get("orcpt", "1") == "1",
        )
