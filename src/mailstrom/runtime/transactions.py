"""Mail transactions on an open SMTP connection, driven from the protocol's callbacks.

:class:`TransactionsMixin` is the part of
:class:`~mailstrom.runtime.connection.SMTPConnection` that sends MAIL, RCPT, DATA and the
content of submitted transactions and turns each reply into the next step, without a task
per transaction. With PIPELINING the envelope goes in one write and the next transaction's
envelope travels with this one's content and final dot (RFC 2920 §3.1); without it each
command waits for the reply to the one before. The connection supplies the session, the
writes, the deadline and what happens when the session cannot go on (``_abort``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailstrom.errors import (
    DeliveryError,
    PermanentFailure,
    RequireTLSFailure,
    SMTPConnectError,
    SMTPProtocolError,
    TemporaryFailure,
)
from mailstrom.smtp import ClientSession, Command, content_size, encode_path, encode_recipient
from mailstrom.status import SMTPReply

Handler = Callable[[Command, SMTPReply], None]
"""Called with each reply and the command it answers, in the order the commands were
sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionResult:
    """Every reply of one mail transaction, as far as it went.

    ``final`` is None when the content was never sent, or when the connection was lost or
    timed out after the final dot and before its reply: then ``uncertain`` is True, as the
    server may have accepted the message (RFC 5321 §4.5.3.2.6; RFC 1047).
    """

    mail: SMTPReply | None
    rcpt: tuple[tuple[str, SMTPReply], ...]
    """Per recipient, in the order sent."""
    data: SMTPReply | None
    """The reply to DATA (354 to go ahead), or None if DATA was not sent."""
    final: SMTPReply | None
    uncertain: bool = False
    cause: DeliveryError | None = None
    """When ``uncertain``: what ended the session before the reply to the final dot (a
    timeout, the connection lost, or a reply that broke the protocol)."""

    @property
    def accepted(self) -> tuple[str, ...]:
        """Recipients whose RCPT got a 2xx reply."""
        return tuple(address for address, reply in self.rcpt if 200 <= reply.code < 300)


class EnvelopeCut(TemporaryFailure):
    """A ``421`` to RCPT ended the session inside the envelope: like any broken session
    it fails the transaction, but ``answered`` keeps the replies that came before it, so
    that a recipient the server refused already is decided by its own reply (RFC 5321
    §3.8: the server closes; what it said before still stands)."""

    def __init__(self, reply: SMTPReply, *, host: str, what: str, answered: TransactionResult):
        super().__init__(
            f"{host} refused {what}: {reply}",
            code=reply.code,
            enhanced=reply.enhanced,
            host=host,
            reply=reply,
        )
        self.answered = answered


class Withdrawn(TemporaryFailure):
    """The worker took a queued transaction back before any of its commands went (its
    lease was cancelled, held, suspended or taken over meanwhile, see
    :meth:`TransactionsMixin.withdraw`): nothing was sent, and it goes back to the store
    untried."""


def answered_before(exc: BaseException) -> TransactionResult | None:
    """The replies a transaction had when ``exc`` ended it before its content was sent
    (the ``answered`` of an :class:`EnvelopeCut`, or of the error a lost or timed-out
    session settled it with, see :func:`cut_short`), or None."""
    answered = vars(exc).get("answered")
    return answered if isinstance(answered, TransactionResult) else None


def cut_short(error: DeliveryError, answered: TransactionResult) -> DeliveryError:
    """``error`` (the connection lost, a timeout...) as the failure of one transaction that
    had got the replies ``answered`` when it struck: its own copy, of the same type and
    words, that keeps them for :func:`answered_before`. A recipient the server refused
    already is decided by its own reply, as when a ``421`` cuts the envelope."""
    own = copy.copy(error)
    vars(own)["answered"] = answered
    return own


def not_written(error: DeliveryError) -> DeliveryError:
    """``error`` (what ended the session) as the failure of the transactions that were
    still waiting to go when it struck: a copy, of the same type and words, that says
    none of their commands went on the wire (see :func:`was_written`). Their recipients
    were not tried, and the session's failure is not theirs to carry."""
    own = copy.copy(error)
    vars(own)["unwritten"] = True
    return own


def was_written(exc: BaseException) -> bool:
    """Whether the transaction ``exc`` ended had put any command on the wire: False only
    for one that waited behind the transaction the session broke on (:func:`not_written`)."""
    return vars(exc).get("unwritten") is not True


def failure(reply: SMTPReply, *, host: str, what: str) -> DeliveryError:
    """A Temporary/PermanentFailure carrying ``reply``, by its class (5xx permanent)."""
    cls = PermanentFailure if reply.code >= 500 else TemporaryFailure
    return cls(
        f"{host} refused {what}: {reply}",
        code=reply.code,
        enhanced=reply.enhanced,
        host=host,
        reply=reply,
    )


def _is_2xx(reply: SMTPReply | None) -> bool:
    return reply is not None and 200 <= reply.code < 300


class Txn:
    """One submitted mail transaction and the replies gathered for it (private, mutable)."""

    __slots__ = (
        "data",
        "data_reply",
        "dot_end",
        "dot_pending",
        "dsn_mail",
        "dsn_rcpt",
        "eightbit",
        "final",
        "future",
        "mail",
        "next_rcpt",
        "rcpt",
        "recipients",
        "requiretls",
        "reset",
        "sender",
        "smtputf8",
        "written",
    )

    def __init__(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        eightbit: bool,
        reset: bool,
        future: Outcome,
        requiretls: bool = False,
        dsn_mail: bytes = b"",
        dsn_rcpt: Sequence[bytes] = (),
    ) -> None:
        self.requiretls = requiretls
        self.dsn_mail = dsn_mail
        self.dsn_rcpt = dsn_rcpt
        self.sender = sender
        self.recipients = recipients
        self.data = data
        self.smtputf8 = smtputf8
        self.eightbit = eightbit
        self.reset = reset
        self.future = future
        self.mail: SMTPReply | None = None
        self.rcpt: list[tuple[str, SMTPReply]] = []
        self.data_reply: SMTPReply | None = None
        self.final: SMTPReply | None = None
        self.next_rcpt = 0  # stepwise: the next recipient to send RCPT for
        self.written = False  # some command of this transaction is on the wire
        self.dot_pending = False  # content written but not yet handed to the kernel
        self.dot_end = 0  # octets written on the connection up to the final dot

    def result(
        self, *, uncertain: bool = False, cause: DeliveryError | None = None
    ) -> TransactionResult:
        return TransactionResult(
            mail=self.mail,
            rcpt=tuple(self.rcpt),
            data=self.data_reply,
            final=self.final,
            uncertain=uncertain,
            cause=cause,
        )

    @property
    def decided(self) -> bool:
        """Whether the replies so far decide every recipient, whatever comes next: MAIL
        was refused, or every RCPT was answered and none accepted (no content can go).
        Without PIPELINING such a transaction ends at that reply; with it, the replies to
        what was pipelined behind it are still owed."""
        mail = self.mail
        if mail is None:
            return False
        if not 200 <= mail.code < 300:
            return True
        return len(self.rcpt) == len(self.recipients) and not any(
            200 <= reply.code < 300 for _, reply in self.rcpt
        )

    def settle(self, result: TransactionResult | BaseException) -> None:
        future = self.future
        if future.outcome is None:
            future.outcome = result  # kept even when the waiting task cancelled it
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
            # Read here: the session that would read it may be gone (cancelled while the
            # worker stops), and asyncio would log the error as never retrieved.
            future.exception()
        else:
            future.set_result(result)


class Outcome(asyncio.Future[TransactionResult]):
    """A transaction's future that keeps what settled it even once cancelled (the session
    awaiting it was cancelled: a stop), for the stop to report (dispatch._report_cut_off)
    without shielding every await, whose extra loop turn split pipelined writes."""

    outcome: TransactionResult | BaseException | None = None
    holds: Callable[[], bool] | None = None
    """Whether a cancel is refused now: the task awaiting it is then cancelled only once
    it has settled (asyncio's Task.cancel falls back to that), its reply reported."""

    def cancel(self, msg: object = None) -> bool:
        if self.holds is not None and self.holds():
            return False
        return super().cancel(msg)


class TransactionsMixin:
    """The transaction machine of an SMTP connection (see the module docstring)."""

    # Supplied by the connection:
    _written: int  # octets handed to the transport so far
    host: str
    encrypted: bool  # TLS is up
    _loop: asyncio.AbstractEventLoop
    _session: ClientSession
    _handlers: deque[Handler]

    def _init_transactions(self) -> None:
        self.messages_sent = 0
        """Transactions submitted on this connection (for the per-connection cap)."""
        # Transactions submitted but not yet on the wire, and those on the wire.
        self._queued: deque[Txn] = deque()
        self._active: deque[Txn] = deque()
        # A transaction whose MAIL was accepted but whose content never went (every RCPT
        # refused, DATA refused) leaves the server inside a mail transaction: the next one
        # must start with RSET, or its MAIL is refused as nested (RFC 5321 §4.1.1.5).
        self._needs_reset = False

    @property
    def busy(self) -> bool:
        """True while submitted transactions have not all been answered."""
        return bool(self._queued or self._active)

    @property
    def usable(self) -> bool:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _arm_next(self) -> None:
        raise NotImplementedError

    def _arm_if_idle(self) -> None:
        raise NotImplementedError

    def _disarm(self) -> None:
        raise NotImplementedError

    def _watch_dots(self) -> None:
        raise NotImplementedError

    def _unsent(self, end: int) -> bool:
        raise NotImplementedError

    def _abort(self, error: DeliveryError | None) -> None:
        raise NotImplementedError

    async def send(
        self,
        *,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        eightbit: bool,
    ) -> TransactionResult:
        """Send one message to ``recipients`` in one transaction and report every reply.

        The awaited form of :meth:`submit`; see there for what is checked and raised.
        """
        return await self.submit(
            envelope_from=envelope_from,
            recipients=recipients,
            data=data,
            smtputf8=smtputf8,
            eightbit=eightbit,
        )

    def submit(
        self,
        *,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        eightbit: bool,
        reset: bool = False,
        requiretls: bool = False,
        dsn_mail: bytes = b"",
        dsn_rcpt: Sequence[bytes] = (),
    ) -> asyncio.Future[TransactionResult]:
        """Queue one transaction; the future gives its :class:`TransactionResult`.

        Transactions go out in submission order; with PIPELINING the envelope of one
        submitted before the previous one's content was written travels with that content.
        ``data`` is the message with CRLF line endings, not dot-stuffed. ``reset`` sends RSET
        first (for a connection that sat idle).

        Checked here, before anything is sent: a message larger than the server's SIZE
        raises ``PermanentFailure`` (552 5.3.4), one needing SMTPUTF8 the server lacks
        raises ``PermanentFailure`` (553 5.6.7, RFC 6531 §3.4), ``requiretls`` on a server
        without REQUIRETLS or a connection without TLS raises ``RequireTLSFailure`` (550
        5.7.30, RFC 8689), ``eightbit`` without 8BITMIME raises ``ValueError`` (the caller
        must downgrade to 7 bit first), and so does an address that cannot be put on the
        wire. A rejected MAIL or RCPT is in the result, not raised. Losing the connection
        or timing out before the final dot sets ``SMTPConnectError``/``SMTPTimeout`` on the
        future (nothing was delivered; the RCPT replies that came are kept, see
        :func:`answered_before`); after the final dot the result says ``uncertain=True``.
        If the server answers 354 to DATA although no recipient was accepted, the
        connection is closed rather than an empty message sent.

        ``dsn_mail`` and ``dsn_rcpt`` (one per recipient) are RFC 3461 parameters
        (:class:`~mailstrom.message.dsn.DSN`); given to a server without DSN they raise
        ``LocalProtocolError`` here, so callers give them only when ``extensions`` has DSN.
        """
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        if dsn_rcpt and len(dsn_rcpt) != len(recipients):
            raise ValueError("dsn_rcpt needs one entry per recipient")
        if not self.usable:
            raise SMTPConnectError(f"connection to {self.host} is not usable", host=self.host)
        session = self._session
        extensions = session.extensions
        if eightbit and "8BITMIME" not in extensions:
            raise ValueError(f"{self.host} lacks 8BITMIME: downgrade the message to 7 bit")
        limit = session.max_size
        size = content_size(data)
        if limit is not None and size > limit:
            raise PermanentFailure(
                f"message size {size} exceeds the limit of {limit} octets of {self.host}",
                code=552,
                enhanced="5.3.4",
                host=self.host,
            )
        encode_path(envelope_from, smtputf8)  # ValueError now rather than mid-transaction
        for address in recipients:
            encode_recipient(address, smtputf8)
        # Checked now too: once queued, they go on the wire from the protocol's callbacks
        # (behind another transaction, or RCPT after MAIL's reply), where an error
        # escapes to the event loop and drops the connection with the mail in flight.
        for params in (dsn_mail, *dsn_rcpt):
            if params:
                session.check_dsn(params)
        if smtputf8 and "SMTPUTF8" not in extensions:
            raise PermanentFailure(
                f"message needs SMTPUTF8, which {self.host} does not support",
                code=553,
                enhanced="5.6.7",
                host=self.host,
            )
        if requiretls and "REQUIRETLS" not in extensions:
            # RFC 8689 §4.2.1: such a message must not go to a server without REQUIRETLS.
            raise RequireTLSFailure(
                f"message requires TLS (REQUIRETLS), which {self.host} does not support",
                code=550,
                enhanced="5.7.30",
                host=self.host,
            )
        if requiretls and not self.encrypted:
            # RFC 8689 §4.2.1: the whole path is TLS; MAIL ... REQUIRETLS never goes in clear.
            raise RequireTLSFailure(
                f"message requires TLS (REQUIRETLS), and the connection to {self.host} "
                "is not encrypted",
                code=550,
                enhanced="5.7.30",
                host=self.host,
            )
        self.messages_sent += 1
        future = Outcome(loop=self._loop)
        self._queued.append(
            Txn(
                envelope_from,
                recipients,
                data,
                smtputf8,
                eightbit,
                reset,
                future,
                requiretls,
                dsn_mail=dsn_mail,
                dsn_rcpt=dsn_rcpt,
            )
        )
        self._continue()
        return future

    def withdraw(self, future: asyncio.Future[TransactionResult]) -> bool:
        """Take back the transaction that ``future`` is for if none of its commands went
        on the wire yet (queued behind another: with PIPELINING its envelope leaves with
        the content of the one before); its future then fails with :class:`Withdrawn`.
        Returns whether it was taken back. One whose commands went goes on as it would
        (the work under way finishes, as the store's cancel, hold and suspend say)."""
        for txn in self._queued:
            if txn.future is future:
                self._queued.remove(txn)
                self.messages_sent -= 1  # not this connection's after all (its cap)
                if txn.reset:
                    self._needs_reset = True  # the RSET it carried goes with the next
                txn.settle(
                    Withdrawn(f"taken back before any of it went to {self.host}", host=self.host)
                )
                return True
        return False

    def _start_queued(self) -> bytes:
        """The commands of queued transactions that may go on the wire now."""
        queued = self._queued
        if not queued:
            return b""
        session = self._session
        txn = queued[0]
        if self._needs_reset:
            txn.reset = True
        if session.pipelining:
            if not session.can_send(Command.RSET if txn.reset else Command.MAIL):
                return b""
            self._take(txn)
            batch = session.envelope(
                txn.sender,
                txn.recipients,
                size=content_size(txn.data),
                eightbit=txn.eightbit,
                smtputf8=txn.smtputf8,
                reset=txn.reset,
                requiretls=txn.requiretls,
                dsn_mail=txn.dsn_mail,
                dsn_rcpt=txn.dsn_rcpt,
            )
            handlers = self._handlers
            if txn.reset:
                handlers.append(functools.partial(self._on_rset, txn))
            handlers.append(functools.partial(self._on_mail, txn))
            on_rcpt = functools.partial(self._on_rcpt, txn)
            handlers.extend(on_rcpt for _ in txn.recipients)
            handlers.append(functools.partial(self._on_data, txn))
            self._arm_if_idle()
            return batch
        # Stepwise: one command, then the next once its reply is in.
        if session.outstanding or not session.can_send(Command.RSET if txn.reset else Command.MAIL):
            return b""
        self._take(txn)
        if txn.reset:
            self._handlers.append(functools.partial(self._on_rset, txn))
            line = session.rset()
        else:
            line = self._mail_line(txn)
        self._arm_if_idle()
        return line

    def _take(self, txn: Txn) -> None:
        """``txn``, first in the queue, goes on the wire now."""
        self._queued.popleft()
        self._active.append(txn)
        txn.written = True
        self._needs_reset = False

    def _mail_line(self, txn: Txn) -> bytes:
        self._handlers.append(functools.partial(self._on_mail, txn))
        return self._session.mail(
            txn.sender,
            size=content_size(txn.data),
            eightbit=txn.eightbit,
            smtputf8=txn.smtputf8,
            requiretls=txn.requiretls,
            dsn=txn.dsn_mail,
        )

    # The handlers below get each reply with the command it answers (which they know).

    def _on_rset(self, txn: Txn, command: Command, reply: SMTPReply) -> None:
        if reply.code == 421:
            self._abort(failure(reply, host=self.host, what="RSET"))
        elif not 200 <= reply.code < 300:
            # RFC 5321 §4.1.1.5: RSET gets 250. Refused, the server may still be inside the
            # transaction before (every RCPT refused), where the session will not let MAIL
            # go (stepwise) or the server refuses it as nested (pipelined, a 5xx that would
            # bounce the recipients): the session cannot go on, and the transaction is
            # tried again on another.
            quoted = str(reply)[:200]  # the peer's text, however long it is
            self._abort(SMTPProtocolError(f"{self.host} refused RSET: {quoted}", host=self.host))
        elif not self._session.pipelining:
            self._write(self._mail_line(txn))
            self._arm_next()

    def _on_mail(self, txn: Txn, command: Command, reply: SMTPReply) -> None:
        txn.mail = reply
        if reply.code == 421:
            self._finish(txn)
            self._abort(None)
            return
        if self._session.pipelining:
            return
        if not 200 <= reply.code < 400:
            self._finish(txn)
            self._continue()
            return
        self._send_rcpt(txn)

    def _send_rcpt(self, txn: Txn) -> None:
        address = txn.recipients[txn.next_rcpt]
        dsn = txn.dsn_rcpt[txn.next_rcpt] if txn.dsn_rcpt else b""
        txn.next_rcpt += 1
        self._handlers.append(functools.partial(self._on_rcpt, txn))
        self._write(self._session.rcpt(address, smtputf8=txn.smtputf8, dsn=dsn))
        self._arm_next()

    def _on_rcpt(self, txn: Txn, command: Command, reply: SMTPReply) -> None:
        address = txn.recipients[len(txn.rcpt)]
        if reply.code == 421:
            # The replies for the remaining recipients (and the rest) will never come; those
            # that came stay with this transaction's error (the others' is shared).
            what = f"RCPT TO:<{address}>"
            if not txn.decided:
                txn.settle(EnvelopeCut(reply, host=self.host, what=what, answered=txn.result()))
            # else a refused MAIL decides it: _abort settles it with its replies.
            self._abort(failure(reply, host=self.host, what=what))
            return
        txn.rcpt.append((address, reply))
        if self._session.pipelining:
            return
        if txn.next_rcpt < len(txn.recipients):
            self._send_rcpt(txn)
        elif any(200 <= r.code < 300 for _, r in txn.rcpt):
            self._handlers.append(functools.partial(self._on_data, txn))
            self._write(self._session.data())
            self._arm_next()
        else:
            self._finish(txn)
            self._continue()

    def _on_data(self, txn: Txn, command: Command, reply: SMTPReply) -> None:
        txn.data_reply = reply
        if reply.code != 354:
            # A refusal: the session takes no other reply to DATA (another 3xx is a
            # protocol error there, which ends the session before any handler sees it).
            self._finish(txn)
            if reply.code == 421:
                self._abort(None)
            else:
                self._continue()
            return
        if not (_is_2xx(txn.mail) and any(200 <= r.code < 300 for _, r in txn.rcpt)):
            # The server wants content for a transaction without recipients (pipelined
            # DATA after every RCPT failed): sending even an empty body could deliver
            # something, so drop the connection instead.
            self._finish(txn)
            self._abort(None)
            return
        # The content and final dot, and the next transaction's envelope in the same write.
        self._handlers.append(functools.partial(self._on_body, txn))
        body = self._session.body(txn.data)
        txn.dot_pending = True
        txn.dot_end = self._written + len(body)
        following = self._start_queued()
        self._write(body + following if following else body)
        self._watch_dots()
        self._arm_next()

    def _on_body(self, txn: Txn, command: Command, reply: SMTPReply) -> None:
        # A reply while the final dot is still in this process's buffers came before the
        # end of the content (RFC 5321 §4.1.1.4 wants it after): a refusal stands for this
        # transaction (an acceptance does not, see below), but the server reads what is
        # left of the content as commands, so nothing more may go on this session.
        early = self._unsent(txn.dot_end)
        txn.dot_pending = False
        if early and 200 <= reply.code < 300:
            # An acceptance of content the server has not read to its end accepts no
            # message we sent: not a delivery, an uncertain one (as a reply to the dot
            # lost on the way), whatever the server makes of what it has.
            error = self._early_reply(reply)
            self._finish(txn, error)
            self._abort(error)
            return
        txn.final = reply
        self._finish(txn)
        if reply.code == 421:
            self._abort(None)
        elif early:
            self._abort(self._early_reply(reply))
        else:
            self._continue()

    def _early_reply(self, reply: SMTPReply) -> SMTPProtocolError:
        quoted = str(reply)[:200]
        return SMTPProtocolError(
            f"{self.host} answered before the end of the message: {quoted}", host=self.host
        )

    def _finish(self, txn: Txn, uncertain: DeliveryError | None = None) -> None:
        """``txn`` is over: settled with its replies (``uncertain``: what left its outcome
        unknown after its content was sent)."""
        active = self._active
        if active and active[0] is txn:
            active.popleft()  # transactions finish in the order they started, but for bugs
        else:
            with contextlib.suppress(ValueError):
                active.remove(txn)
        if uncertain is not None:
            txn.settle(txn.result(uncertain=True, cause=uncertain))
            return
        if txn.final is None and _is_2xx(txn.mail):
            self._needs_reset = True
        txn.settle(txn.result())

    def _continue(self) -> None:
        """Put the next queued transaction on the wire if the session allows it now."""
        out = self._start_queued()
        if out:
            self._write(out)
        elif self._queued and not self._handlers:
            # Nothing outstanding could ever make room for it: a bug, not a hang.
            self._abort(
                SMTPProtocolError(
                    f"cannot start a transaction in session state {self._session.state}",
                    host=self.host,
                )
            )
        if not self._handlers:
            self._disarm()
