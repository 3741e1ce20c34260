"""The frames a worker process and its parent exchange (see :mod:`mailstrom.runtime.child`).

Length-prefixed pickles over two pipes of their own (not the child's standard input and
output, which others may use): both ends are mailstrom, started
together, so pickle is safe here. A store pickles as the way to open it again (its
``__reduce__``), so the spec hands the child the same store with the same options, pickled
once more on its own: the child unpickles (opens) it when it chooses, again while the
database does not answer (see :mod:`mailstrom.runtime.store_opening`).
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import IO, Any

from mailstrom.config import Config
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult, Store
from mailstrom.tls_spec import TLSContextSpec

_HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024
"""The largest frame read, in octets: far past any either end sends (a spec with a CA
bundle, a batch of :data:`~mailstrom.runtime.child.RESULTS_PER_FRAME` results, a log
record), and below the length any four octets of printable text make (512 MiB and up).
A length past it is no frame of ours: bytes someone else wrote into the pipe. Read as
one, it had that much allocated at once and swallowed every later frame, the stream no
longer followed."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """Everything the child needs; ``config`` has no ``tls_context`` (see ``tls``)."""

    config: Config
    store: bytes
    """The store, pickled: unpickling it opens the store again (:func:`open_store`)."""
    tls: TLSContextSpec | None
    log_levels: dict[str, int]
    forward_results: bool
    """Whether the parent wants every result (it has an ``on_result`` callback)."""
    holder: str
    """The child's worker's lease holder (``Worker(holder=...)``), fresh for each child:
    the parent gives back what a child it saw die had leased
    (:meth:`~mailstrom.stores.Store.release_holder`)."""
    orphan_drain: float
    """Seconds the child lets its deliveries in flight finish once its parent is gone
    (:data:`mailstrom.client.process.ORPHAN_DRAIN`), before it gives the rest back."""


def open_store(spec: ChildSpec) -> Store:
    """The store of ``spec``, opened (each call opens it anew)."""
    store: Store = pickle.loads(spec.store)  # noqa: S301 - our own parent's spec
    return store


def write_frame(stream: IO[bytes], kind: str, payload: Any = None) -> None:
    data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> tuple[str, Any] | None:
    """The next frame, or None at the end of the stream; ``ValueError`` for a length
    no frame has (past :data:`MAX_FRAME`)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes, more than either end sends: garbled")
    data = stream.read(size)
    if len(data) < size:
        return None
    kind, payload = pickle.loads(data)  # noqa: S301 - our own parent, over our own pipe
    return str(kind), payload


# Results cross as plain tuples: unpickling three dataclasses per result costs the
# application's process about 60 us (dataclass __setstate__), building them 5. Every
# field crosses (tests/unit/test_pipes.py checks each one): on_result of a worker process
# got the attempt's tls_policy, and the result's own_reply and hard_bounce, at their
# defaults, where a worker thread's had them.

ResultWire = tuple[Any, ...]


def result_to_wire(r: RecipientResult) -> ResultWire:
    a = r.attempt
    reply = (a.reply.code, a.reply.text, a.reply.enhanced) if a.reply is not None else None
    reason = a.reason_class.value if a.reason_class is not None else None
    return (
        *(r.message_id, r.address, r.state.value, r.lease_token, r.next_attempt_at, r.ref),
        *(a.at, a.outcome.value, a.duration, a.mx_host, a.ip, a.port, a.tls_version),
        *(a.tls_cipher, reply, a.error, a.uncertain, reason),
        *(r.queued_at, r.size, r.envelope_from),
        *(a.tls_policy, r.own_reply, r.hard_bounce, r.notice, r.relayed, r.dkim),
        r.attempted,
    )


def result_from_wire(w: ResultWire) -> RecipientResult:
    (message_id, address, state, token, next_at, ref, at, outcome, duration) = w[:9]
    (mx_host, ip, port, tls_version, tls_cipher, reply, error, uncertain, reason) = w[9:18]
    (queued_at, size, envelope_from) = w[18:21]
    (tls_policy, own_reply, hard_bounce, notice, relayed, dkim) = w[21:27]
    attempted = w[27]
    smtp_reply = (
        None if reply is None else SMTPReply(code=reply[0], text=reply[1], enhanced=reply[2])
    )
    return RecipientResult(
        message_id=message_id,
        address=address,
        state=RecipientState(state),
        lease_token=token,
        next_attempt_at=next_at,
        ref=ref,
        queued_at=queued_at,
        size=size,
        envelope_from=envelope_from,
        own_reply=own_reply,
        hard_bounce=hard_bounce,
        notice=notice,
        relayed=relayed,
        dkim=dkim,
        attempted=attempted,
        attempt=Attempt(
            at=at,
            outcome=AttemptOutcome(outcome),
            duration=duration,
            mx_host=mx_host,
            ip=ip,
            port=port,
            tls_version=tls_version,
            tls_cipher=tls_cipher,
            reply=smtp_reply,
            error=error,
            uncertain=uncertain,
            reason_class=None if reason is None else ReasonClass(reason),
            tls_policy=tls_policy,
        ),
    )
