"""What happened to one work item, as a :class:`RecipientResult` per recipient.

Pure decisions over what the connection reported (RFC 5321 §4.2.5, and the delivery rules
in docs/guide.md): a rejected MAIL decides for every recipient; then each RCPT reply decides
for its recipient; the reply to DATA or to the final dot decides for the recipients
accepted. A connection lost after the final dot is uncertain. The retry policy turns
temporary outcomes into the next attempt time or, past its limits, a final failure.

Every failed attempt also gets its :class:`~mailstrom.status.ReasonClass`: from the reply
(:func:`~mailstrom.policy.reasons.classify_reply`, once per reply however many recipients
it decides for) or, without one, from the error's type and then its enhanced code. A
delivery is never classified.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from mailstrom.config import Config
from mailstrom.errors import (
    DeliveryError,
    LocalResourceShortage,
    PermanentFailure,
    RequireTLSFailure,
    SMTPConnectError,
    SMTPProtocolError,
    SMTPTimeout,
    TLSRequiredError,
)
from mailstrom.message.dsn import Notify
from mailstrom.policy import Stage, classify, is_positive, next_attempt
from mailstrom.policy.backoff import next_try_unattempted
from mailstrom.policy.hardbounce import is_hard_bounce
from mailstrom.policy.reasons import classify_local, classify_reply, table
from mailstrom.runtime.connection import Abandoned, SMTPConnection, TLSHandshakeError
from mailstrom.runtime.transactions import TransactionResult
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores.base import LeasedRecipient, RecipientResult, WorkItem, bounded_text
from mailstrom.tls.requirement import TLSRequirement

# Errors whose type says why, whatever reply they carry (a refused STARTTLS has one), most
# specific first. The rest are classified by their reply, else their enhanced code.
_BY_ERROR_TYPE: tuple[tuple[type[DeliveryError], ReasonClass], ...] = (
    # 4.3.0 by its subject alone is "system", the receiver's trouble: this host's own.
    (LocalResourceShortage, ReasonClass.LOCAL),
    (TLSHandshakeError, ReasonClass.TLS),  # and TLSVerifyError
    (TLSRequiredError, ReasonClass.TLS),
    (RequireTLSFailure, ReasonClass.TLS),
    (SMTPTimeout, ReasonClass.CONNECTION),
    (SMTPConnectError, ReasonClass.CONNECTION),
    (SMTPProtocolError, ReasonClass.PROTOCOL),
)


def error_reason(exc: DeliveryError, reply: SMTPReply | None) -> ReasonClass:
    """The class of an attempt that ended in ``exc`` (``reply``: the one it carries)."""
    for kind, reason in _BY_ERROR_TYPE:
        if isinstance(exc, kind):
            return reason
    if reply is not None:
        return classify_reply(reply)
    return classify_local(exc.enhanced)


_MAX_QUOTED = 200
"""Most characters of a peer's bad reply quoted in a reason."""


def over_recipient_limit(result: TransactionResult) -> frozenset[str]:
    """The recipients ``result``'s server refused only because the transaction had reached
    its limit of recipients, when it accepted some others: they were not tried, and go in a
    later transaction without an attempt counted (RFC 5321 §4.5.3.1.10: the server "MUST"
    answer 452, the client "SHOULD then send the message to the remaining recipients in a
    later transaction"; older servers answer 552, so a 552 without an enhanced code counts
    as a 452, and an X.5.3 enhanced code, "Too many recipients" in RFC 3463, counts
    whatever the reply code).

    Empty when the server accepted none of them: a 452 is then an ordinary temporary
    refusal, so that every later transaction delivers at least one recipient and the
    splitting ends.
    """
    rcpt = result.rcpt
    if len(rcpt) < 2:
        return frozenset()  # one recipient: nothing to split
    over = frozenset(address for address, reply in rcpt if _limit_reached(reply))
    if not over or len(over) == len(rcpt) or not result.accepted:
        return frozenset()
    return over


def recipients_taken(result: TransactionResult) -> int | None:
    """How many recipients ``result``'s server took before it refused every one after them
    for its limit of recipients: the most a later transaction to it should name. None
    when the replies show no such limit: none refused with "too many recipients" in an
    enhanced code (X.5.3, RFC 3463), or one accepted after such a refusal.

    A bare 452 or 552 shows no limit, even last: it is also a full disk or mailbox (RFC
    5321 §4.2.3), and kept as a limit it would cut every later transaction to this
    destination to the recipients taken before it, however many the server takes.
    """
    rcpt = result.rcpt
    for index, (_, reply) in enumerate(rcpt):
        if reply.enhanced is not None and _limit_reached(reply):
            if not all(_limit_reached(after) for _, after in rcpt[index:]):
                return None
            taken = sum(1 for _, before in rcpt[:index] if 200 <= before.code < 300)
            return taken or None
    return None


def asks_success(item: WorkItem) -> bool:
    """Whether ``item``'s message asks to hear of its delivery (RFC 3461 NOTIFY=SUCCESS)."""
    dsn = item.dsn
    return dsn is not None and Notify.SUCCESS in dsn.notify


def at_connection_limit(result: TransactionResult) -> bool:
    """Whether the server refused ``result``'s MAIL with a ``421`` for its limit of messages
    per connection (class ``connection`` in reasons.toml: Exim's "421 too many messages in
    this connection"). The message was not tried: it goes on the next connection without
    an attempt counted, as one whose MAIL the server closed on without a word does."""
    mail = result.mail
    return mail is not None and mail.code == 421 and classify_reply(mail) is ReasonClass.CONNECTION


def refused_before_cut(result: TransactionResult) -> frozenset[str]:
    """The recipients of a transaction cut short before its content went (a ``421`` to
    RCPT, the connection lost or timed out; ``result``: the replies that came before it)
    whose own reply refused them: they are decided by it, as in any transaction. Not one
    refused only for the server's limit of recipients (they were not tried), and none
    when MAIL was not accepted (a pipelined RCPT is then refused for that alone)."""
    if result.mail is None or not is_positive(result.mail, stage=Stage.MAIL):
        return frozenset()
    return frozenset(
        address
        for address, reply in result.rcpt
        if not is_positive(reply, stage=Stage.RCPT) and not _limit_reached(reply)
    )


def _limit_reached(reply: SMTPReply) -> bool:
    enhanced = reply.enhanced
    if enhanced is None:
        # A 552 to RCPT is read as 452 (RFC 5321 §4.5.3.1.10: RFC 821 listed 552 for
        # "too many recipients"). Were it a full mailbox, the next transaction, with the
        # recipient refused again and none accepted, decides it as such.
        return reply.code in (452, 552)
    return reply.code >= 400 and enhanced.endswith(".5.3") and enhanced.count(".") == 2


def _uncertain_reason(cause: DeliveryError | None) -> tuple[str, ReasonClass]:
    """The reason of a delivery left uncertain by ``cause``: a reply that broke the
    protocol is named (what the peer sent is worth knowing), as is a reply that did not
    come in time; anything else is a lost connection, or the worker's own stop."""
    if isinstance(cause, Abandoned):
        return (
            "the worker stopped after the final dot, before the reply; delivery uncertain",
            ReasonClass.CONNECTION,
        )
    if isinstance(cause, SMTPProtocolError | SMTPTimeout):
        text = cause.text
        quoted = "".join(c if c.isprintable() else "?" for c in text[:_MAX_QUOTED])
        if len(text) > _MAX_QUOTED:
            quoted += f"… ({len(text) - _MAX_QUOTED} more characters)"
        if isinstance(cause, SMTPTimeout):
            # The server held the connection and never answered: no connection was lost,
            # and how long it was given is worth knowing (timeouts.data_end).
            why = f"no reply to the final dot: {quoted}; delivery uncertain"
            return why, ReasonClass.CONNECTION
        return (
            f"protocol error after the final dot: {quoted}; delivery uncertain",
            ReasonClass.PROTOCOL,
        )
    return "connection lost after the final dot; delivery uncertain", ReasonClass.CONNECTION


_STARTTLS_FIRST = 530
"""The reply of a server that takes commands only after STARTTLS (RFC 3207 §4)."""


class Where:
    """Where an attempt went, for the history (a connection's or just a host's)."""

    __slots__ = (
        "dsn",
        "host",
        "ip",
        "port",
        "tls_cipher",
        "tls_policy",
        "tls_skipped",
        "tls_version",
    )

    def __init__(
        self,
        host: str | None = None,
        ip: str | None = None,
        port: int | None = None,
        tls_version: str | None = None,
        tls_cipher: str | None = None,
        tls_policy: str | None = None,
        dsn: bool = True,
        tls_skipped: bool = False,
    ) -> None:
        self.host = host
        self.ip = ip
        self.port = port
        self.tls_version = tls_version
        self.tls_cipher = tls_cipher
        self.tls_policy = tls_policy
        self.dsn = dsn
        """Whether the server offers DSN (RFC 3461), so that a message's request went with
        it; True where no connection says otherwise (no notice of ours is then owed)."""
        self.tls_skipped = tls_skipped
        """The connection is in plaintext because the host's TLS handshake failed (now,
        or recently: remembered; under any policy source), not by policy: see
        :func:`_outcome`."""

    @classmethod
    def of(cls, conn: SMTPConnection, requirement: TLSRequirement | None = None) -> Where:
        """Where ``conn`` goes; ``requirement`` is the TLS policy it was opened under."""
        return cls(
            conn.host,
            conn.ip,
            conn.port,
            conn.tls_version,
            conn.tls_cipher,
            requirement.label if requirement is not None else None,
            "DSN" in conn.extensions,
            conn.tls_fallback is not None or (requirement is not None and requirement.tls_failed),
        )


class Outcomes:
    """Builds recipient results with the configured retry policy, clock and randomness."""

    def __init__(
        self, config: Config, *, clock: Callable[[], datetime], rng: random.Random
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng
        table()  # read the reply classes now, not at the first failure on the event loop

    def now(self) -> datetime:
        """The worker's clock: what results are stamped with."""
        return self._clock()

    def from_transaction(
        self, item: WorkItem, result: TransactionResult, started: float, where: Where
    ) -> list[RecipientResult]:
        """Results for every recipient of ``item`` from one transaction's replies."""
        if result.mail is None or not is_positive(result.mail, stage=Stage.MAIL):
            reply = result.mail
            outcome = _outcome(reply, Stage.MAIL, where)
            refused = _reason(reply)
            return [
                self._result(item, r, outcome, started, where, reply=reply, reason=refused)
                for r in item.recipients
            ]
        by_address = {r.address: r for r in item.recipients}
        results: list[RecipientResult] = []
        accepted: list[LeasedRecipient] = []
        for address, reply in result.rcpt:
            recipient = by_address[address]
            if is_positive(reply, stage=Stage.RCPT):
                accepted.append(recipient)
            else:
                outcome = _outcome(reply, Stage.RCPT, where)
                results.append(
                    self._result(
                        item,
                        recipient,
                        outcome,
                        started,
                        where,
                        reply=reply,
                        reason=classify_reply(reply),
                        hard=self._hard(outcome, reply.code, reply.enhanced, reply.text),
                    )
                )
        if not accepted:
            return results
        if result.uncertain:
            outcome = (
                AttemptOutcome.TEMPORARY
                if self._config.retry_uncertain
                else AttemptOutcome.DELIVERED
            )
            error, why = _uncertain_reason(result.cause)
            results.extend(
                self._result(
                    item,
                    r,
                    outcome,
                    started,
                    where,
                    error=error,
                    uncertain=True,
                    reason=why,
                )
                for r in accepted
            )
            return results
        decisive: SMTPReply | None
        stage = Stage.DATA_END
        if result.data is None or not is_positive(result.data, stage=Stage.DATA):
            decisive, stage = result.data, Stage.DATA
        else:
            decisive = result.final
        outcome = _outcome(decisive, stage, where)
        # A 250 to the final dot is the common case: classified never, not once per result.
        reason = None if outcome is AttemptOutcome.DELIVERED else _reason(decisive)
        # A refusal after DATA names one recipient only when the transaction had one.
        hard = (
            decisive is not None
            and len(accepted) == 1
            and self._hard(outcome, decisive.code, decisive.enhanced, decisive.text)
        )
        relayed = outcome is AttemptOutcome.DELIVERED and not where.dsn and asks_success(item)
        results.extend(
            self._result(
                item,
                r,
                outcome,
                started,
                where,
                reply=decisive,
                reason=reason,
                hard=hard,
                relayed=relayed,
            )
            for r in accepted
        )
        return results

    def from_error(
        self,
        item: WorkItem,
        exc: DeliveryError,
        started: float,
        where: Where,
        recipients: Sequence[LeasedRecipient] | None = None,
    ) -> list[RecipientResult]:
        """The same failure for every recipient of ``item`` (or of ``recipients``). A local
        resource shortage was no attempt at the destination: its results say so
        (:attr:`RecipientResult.attempted`), and are due again soon."""
        outcome = (
            AttemptOutcome.PERMANENT
            if isinstance(exc, PermanentFailure)
            else AttemptOutcome.TEMPORARY
        )
        # The server's reply as it sent it, not the error's sentence around it (which
        # names the host, already recorded, and the command: perhaps another recipient's
        # RCPT). A code without a reply is mailstrom's own (a SIZE or SMTPUTF8 refusal
        # made before anything was sent, a null MX): its text is all there is.
        reply = exc.reply
        if reply is None and exc.code is not None:
            reply = SMTPReply(code=exc.code, enhanced=exc.enhanced, text=exc.text)
        error = None if reply is not None else exc.text
        reason = error_reason(exc, reply)
        hard = self._hard(outcome, exc.code, exc.enhanced, reply.text if reply else None)
        own = reply is not None and exc.reply is None
        attempted = not isinstance(exc, LocalResourceShortage)
        return [
            self._result(
                item,
                r,
                outcome,
                started,
                where,
                reply=reply,
                error=error,
                reason=reason,
                hard=hard,
                own_reply=own,
                attempted=attempted,
            )
            for r in (item.recipients if recipients is None else recipients)
        ]

    def _hard(
        self, outcome: AttemptOutcome, code: int | None, enhanced: str | None, text: str | None
    ) -> bool:
        """Whether this refusal (its codes and reply ``text``) puts its recipients on the
        suppression list."""
        return is_hard_bounce(
            outcome, code=code, enhanced=enhanced, codes=self._config.suppress_on, text=text
        )

    def is_expired(self, item: WorkItem) -> bool:
        """Whether ``item``'s message is past the expiry its sender set."""
        return item.expires_at is not None and self._clock() >= item.expires_at

    def expired(self, item: WorkItem, *, why: str = "expired") -> list[RecipientResult]:
        """Every recipient of ``item`` failed with the reason class ``expired`` (``why``
        its text): no connection is made for a message past its expiry, nor for one the
        retry policy gives up on before it could be attempted again."""
        now = self._clock()
        attempt = Attempt(
            at=now,
            outcome=AttemptOutcome.PERMANENT,
            error=why,
            reason_class=ReasonClass.EXPIRED,
        )
        return [
            RecipientResult(
                message_id=item.message_id,
                address=r.address,
                state=RecipientState.FAILED,
                attempt=attempt,
                lease_token=item.lease_token,
                ref=r.ref,
                queued_at=r.created_at,
                size=len(item.data),
                envelope_from=item.envelope_from,
                dkim=item.dkim,
                attempted=False,  # no server was asked: see RecipientResult.attempted
            )
            for r in item.recipients
        ]

    def _result(
        self,
        item: WorkItem,
        recipient: LeasedRecipient,
        outcome: AttemptOutcome,
        started: float,
        where: Where,
        *,
        reply: SMTPReply | None = None,
        error: str | None = None,
        uncertain: bool = False,
        reason: ReasonClass | None = None,
        hard: bool = False,
        own_reply: bool = False,
        relayed: bool = False,
        attempted: bool = True,
    ) -> RecipientResult:
        now = self._clock()
        # A peer's reply may be a megabyte (and a protocol error quotes one): cut here as
        # the store cuts it, so that the attempt log and on_result get what is recorded.
        if reply is not None:
            text = bounded_text(reply.text)
            if text is not reply.text:
                reply = SMTPReply(code=reply.code, enhanced=reply.enhanced, text=text)
        if error is not None:
            error = bounded_text(error)
        attempt = Attempt(
            at=now,
            outcome=outcome,
            duration=time.monotonic() - started,
            mx_host=where.host,
            ip=where.ip,
            port=where.port,
            tls_version=where.tls_version,
            tls_cipher=where.tls_cipher,
            reply=reply,
            error=error,
            uncertain=uncertain,
            reason_class=reason,
            tls_policy=where.tls_policy,
        )
        state, next_at = self._decide(recipient, outcome, now, attempted)
        if next_at is not None and item.expires_at is not None and next_at > item.expires_at:
            # The next try would come after the message's expiry: it is made at the expiry
            # instead, where the recipient fails as "expired" without a connection.
            next_at = max(now, item.expires_at)
        return RecipientResult(
            message_id=item.message_id,
            address=recipient.address,
            state=state,
            attempt=attempt,
            lease_token=item.lease_token,
            next_attempt_at=next_at,
            ref=recipient.ref,
            queued_at=recipient.created_at,
            size=len(item.data),
            envelope_from=item.envelope_from,
            hard_bounce=hard and state is RecipientState.FAILED,
            own_reply=own_reply,
            relayed=relayed,
            dkim=item.dkim,
            attempted=attempted,
        )

    def _decide(
        self, recipient: LeasedRecipient, outcome: AttemptOutcome, now: datetime, attempted: bool
    ) -> tuple[RecipientState, datetime | None]:
        if outcome is AttemptOutcome.DELIVERED:
            return RecipientState.DELIVERED, None
        if outcome is AttemptOutcome.PERMANENT:
            return RecipientState.FAILED, None
        if not attempted:
            # This host's trouble: no attempt spent, nor the destination's backoff grown.
            when = next_try_unattempted(
                queued_at=recipient.created_at, now=now, rng=self._rng, policy=self._config.retry
            )
        else:
            when = next_attempt(
                attempts=recipient.attempts + 1,
                queued_at=recipient.created_at,
                now=now,
                rng=self._rng,
                policy=self._config.retry,
            )
        if when is None:
            return RecipientState.FAILED, None
        return RecipientState.DEFERRED, when


def _outcome(reply: SMTPReply | None, stage: Stage, where: Where) -> AttemptOutcome:
    if reply is None:
        return AttemptOutcome.TEMPORARY
    if reply.code == _STARTTLS_FIRST and where.tls_skipped:
        # RFC 3207 §4: the server takes mail over TLS only. Our plaintext stands in for a
        # handshake that failed, perhaps for a moment (a timeout): this session is refused,
        # not the mail, which goes over TLS once the handshake is tried again.
        return AttemptOutcome.TEMPORARY
    return classify(reply, stage=stage)


def _reason(reply: SMTPReply | None) -> ReasonClass:
    # No reply where one decides (MAIL, DATA): the connection gave out before it came.
    return ReasonClass.CONNECTION if reply is None else classify_reply(reply)
