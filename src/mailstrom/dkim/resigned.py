"""The messages a worker signed anew as it sent them, kept so that each is signed once.

:func:`~mailstrom.dkim.signing.resign_stale` signs a queued message again when its
signatures are stale (its keys rotated away, its ``x=`` about to pass). The stored bytes
do not change, so every later attempt of that message (a deferral, a retry) found them
stale again and signed again: an RSA signature (some 0.35 ms) and the body hash each
time, for a message deferred twenty times twenty of them, each with another ``t=``.

A worker keeps, per message, the signature fields the signing replaced and the fields it
put in their place (some hundred octets a signature, not the message), for the
:data:`KEPT` messages it signed anew last. The next attempt sends the same bytes again,
unless they are stale by then themselves (their own ``x=`` near): that is looked at as
for any signed message, in some microseconds. Nothing is written to the store, which has
no place for signature fields apart from the message: a restarted worker signs such a
message once more.
"""

from __future__ import annotations

from datetime import datetime

from mailstrom.dkim.config import DKIMConfig
from mailstrom.dkim.signing import resign_stale_top
from mailstrom.status import DKIMStatus

KEPT = 1024
"""Messages kept per worker, the last signed anew or sent again first out."""
MAX_KEPT_OCTETS = 16 * 1024
"""Octets of signature fields (replaced and made) kept per message; a message with more
(fields of its own, a configuration of many keys) is signed at each attempt as before."""


class ResignedMessages:
    """:func:`~mailstrom.dkim.signing.resign_stale` for a worker's attempts, once per
    message and key set. Not thread-safe: one per worker (its event loop)."""

    __slots__ = ("_dkim", "_kept", "_size")

    def __init__(self, dkim: DKIMConfig, *, size: int = KEPT) -> None:
        self._dkim = dkim
        self._size = size
        self._kept: dict[str, tuple[bytes, bytes, DKIMStatus, int]] = {}
        """By message id: (the fields replaced, those put in their place, the DKIM status
        of the result, the octets of ours on top of it), oldest first."""

    def __len__(self) -> int:
        return len(self._kept)

    def sign(
        self, message_id: str, data: bytes, *, now: datetime
    ) -> tuple[bytes, DKIMStatus, int] | None:
        """What :func:`~mailstrom.dkim.signing.resign_stale` makes of ``data`` (the stored
        bytes of ``message_id``) now: the bytes made at an earlier attempt when they are
        still good, else signed anew (and kept); None when ``data`` goes as it is. With
        them, the octets of ours on top (``ours`` of
        :func:`~mailstrom.dkim.signing.resign_stale_top`): ours kept keep their older
        ``t=``, so their layout alone no longer tells them from the application's."""
        kept = self._kept.pop(message_id, None)
        if kept is not None:
            replaced, made, status, ours = kept
            # The replaced fields hold their body hash and signature: other bytes under
            # this id (none should be) are not taken for the message signed.
            if data.startswith(replaced):
                again = made + data[len(replaced) :]
                # Ours kept have their t= of before: told by where they are.
                if resign_stale_top(again, self._dkim, now=now, ours=ours) is None:
                    self._kept[message_id] = kept  # the last used goes out last
                    return again, status, ours
        found = resign_stale_top(data, self._dkim, now=now)
        if found is None:
            return None
        signed, status, replaced_octets, ours_octets = found
        made_octets = len(signed) - (len(data) - replaced_octets)
        if replaced_octets + made_octets <= MAX_KEPT_OCTETS:
            self._kept[message_id] = (
                data[:replaced_octets],
                signed[:made_octets],
                status,
                ours_octets,
            )
            if len(self._kept) > self._size:
                del self._kept[next(iter(self._kept))]
        return signed, status, ours_octets
