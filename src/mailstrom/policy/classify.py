"""What an SMTP reply, or an exception, means for the recipients it concerns.

Pure and table-driven. The decision rests on the basic reply code (RFC 5321 §4.2.1):

* ``2yz`` to the final dot (:attr:`Stage.DATA_END`) → DELIVERED. At every other stage a
  positive reply only lets the transaction go on; callers test :func:`is_positive` and
  only ask :func:`classify` about replies that end something.
* ``4yz`` → TEMPORARY, ``5yz`` → PERMANENT.
* Anything else (a ``3yz`` where none is expected, a code outside 200-599) is a protocol
  violation by the peer → TEMPORARY: retrying costs little, losing mail costs a lot.

An RFC 3463 enhanced status code whose class contradicts the reply code (``550 4.2.2`` or
``451 5.7.1``) does not override it. RFC 5321 defines the outcome of each command by the
reply code, and the enhanced code (RFC 2034) only refines it; a server that sends the two
inconsistently is broken, and the reply code is the part every client and server agree on
and test. Postfix likewise lets the reply code decide.

Exception (RFC 5321 §4.5.3.1.10): a ``552`` reply to RCPT, which older servers send for
"too many recipients", is treated as temporary so the remaining recipients are retried.
"""

from __future__ import annotations

from enum import StrEnum

from mailstrom.errors import PermanentFailure
from mailstrom.status import AttemptOutcome, SMTPReply


class Stage(StrEnum):
    """The point of an SMTP session a reply answers."""

    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    """The reply to the DATA command itself (354 means "go ahead")."""
    DATA_END = "data_end"
    """The reply to the final dot: the only reply that delivers."""
    RSET = "rset"
    QUIT = "quit"


# Intermediate replies that let a stage go on: DATA's go-ahead (RFC 5321 §4.3.2) and an
# AUTH challenge (RFC 4954). Everywhere else only 2yz moves on.
_INTERMEDIATE: dict[Stage, int] = {Stage.DATA: 354, Stage.AUTH: 334}

_BY_CLASS: dict[int, AttemptOutcome] = {
    4: AttemptOutcome.TEMPORARY,
    5: AttemptOutcome.PERMANENT,
}

# (stage, code) pairs that break the class rule, with the reason in the module docstring.
_OVERRIDES: dict[tuple[Stage, int], AttemptOutcome] = {
    (Stage.RCPT, 552): AttemptOutcome.TEMPORARY,
}


def is_positive(reply: SMTPReply, *, stage: Stage) -> bool:
    """True when ``reply`` lets the session go on at ``stage`` (250 to RCPT, 354 to DATA)."""
    if reply.code == _INTERMEDIATE.get(stage):
        return True
    # DATA's only positive answer is 354; a 250 there is a protocol violation.
    return stage is not Stage.DATA and 200 <= reply.code < 300


def classify(reply: SMTPReply, *, stage: Stage) -> AttemptOutcome:
    """The outcome ``reply`` at ``stage`` means for the recipients it concerns.

    Raises ValueError for a positive reply before :attr:`Stage.DATA_END`: it ends nothing,
    so asking what it means is a bug in the caller.

    >>> classify(SMTPReply(code=250, text="ok"), stage=Stage.DATA_END)
    <AttemptOutcome.DELIVERED: 'delivered'>
    >>> classify(SMTPReply(code=552, text="too many recipients"), stage=Stage.RCPT)
    <AttemptOutcome.TEMPORARY: 'temporary'>
    """
    if is_positive(reply, stage=stage):
        if stage is Stage.DATA_END:
            return AttemptOutcome.DELIVERED
        raise ValueError(f"reply {reply.code} at {stage} is positive and ends nothing")
    override = _OVERRIDES.get((stage, reply.code))
    if override is not None:
        return override
    return _BY_CLASS.get(reply.code // 100, AttemptOutcome.TEMPORARY)


def classify_exception(exc: BaseException) -> AttemptOutcome:
    """The outcome of an attempt that ended in ``exc`` instead of a reply.

    :class:`~mailstrom.errors.PermanentFailure` → PERMANENT; everything else → TEMPORARY:
    :class:`~mailstrom.errors.TemporaryFailure`, network errors (``OSError``,
    ``TimeoutError``) and, deliberately, unknown errors too — a bug or an unforeseen
    condition should delay mail, not bounce it.
    """
    if isinstance(exc, PermanentFailure):
        return AttemptOutcome.PERMANENT
    return AttemptOutcome.TEMPORARY
