"""The frames a worker process and its parent exchange (see :mod:`mailstrom.runtime.child`).

Length-prefixed pickles over the child's stdin and stdout: both ends are mailstrom, started
together, so pickle is safe here. A store pickles as the way to open it again (its
``__reduce__``), so the spec hands the child the same store with the same options.
"""

from __future__ import annotations

import pickle
import ssl
import struct
from dataclasses import dataclass
from typing import IO, Any

from mailstrom.config import Config

_HEADER = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class TLSContextSpec:
    """What a child needs to rebuild ``Config.tls_context``: an :class:`ssl.SSLContext`
    cannot cross a process boundary, so its CA certificates and checks are sent instead
    (the child's context trusts these on top of the system's)."""

    ca_der: tuple[bytes, ...]
    check_hostname: bool
    verify_mode: int

    @classmethod
    def of(cls, context: ssl.SSLContext) -> TLSContextSpec:
        certs = context.get_ca_certs(binary_form=True)
        return cls(
            ca_der=tuple(c for c in certs if isinstance(c, bytes)),
            check_hostname=context.check_hostname,
            verify_mode=int(context.verify_mode),
        )

    def build(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        for der in self.ca_der:
            context.load_verify_locations(cadata=der)
        context.check_hostname = self.check_hostname
        context.verify_mode = ssl.VerifyMode(self.verify_mode)
        return context


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """Everything the child needs; ``config`` has no ``tls_context`` (see ``tls``)."""

    config: Config
    store: Any
    """The store, pickled as the instructions to open it again."""
    tls: TLSContextSpec | None
    log_levels: dict[str, int]


def write_frame(stream: IO[bytes], kind: str, payload: Any = None) -> None:
    data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> tuple[str, Any] | None:
    """The next frame, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    kind, payload = pickle.loads(data)  # noqa: S301 - our own parent, over our own pipe
    return str(kind), payload
