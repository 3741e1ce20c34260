"""Deliver one work item — one message's recipients at one domain — and say what happened.

The rules (RFC 5321 §5.1 and DESIGN.md): try MX hosts in order and every address of each;
a connection failure, a refused greeting or a failed TLS negotiation moves on to the next
address; once a transaction has started, the server's replies decide per recipient. The
outcome of each recipient is turned into a :class:`RecipientResult` with the retry policy.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from mailstrom.config import Config, RelayTLS, TLSPolicy
from mailstrom.errors import DeliveryError, PermanentFailure, TemporaryFailure
from mailstrom.message import downgrade_to_7bit
from mailstrom.policy import Stage, classify, is_positive, next_attempt
from mailstrom.routing import MXHost, Route, Router
from mailstrom.runtime.connection import (
    SMTPConnection,
    StartTLS,
    TLSHandshakeError,
    TLSVerifyError,
    TransactionResult,
)
from mailstrom.runtime.pool import ConnectionPool, PoolKey
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores.base import LeasedRecipient, RecipientResult, WorkItem

log = logging.getLogger("mailstrom.delivery")

_STARTTLS_FOR_POLICY = {
    TLSPolicy.OPPORTUNISTIC: StartTLS.OPPORTUNISTIC,
    TLSPolicy.REQUIRED: StartTLS.REQUIRED,
    TLSPolicy.VERIFY: StartTLS.VERIFY,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Where:
    """Where an attempt went, for the history."""

    host: str | None = None
    ip: str | None = None
    port: int | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None


class Deliverer:
    """Turns work items into recipient results; shares one router and one pool."""

    def __init__(
        self,
        config: Config,
        *,
        router: Router,
        pool: ConnectionPool,
        clock: Callable[[], datetime],
        rng: random.Random,
    ) -> None:
        self._config = config
        self._router = router
        self._pool = pool
        self._clock = clock
        self._rng = rng

    async def deliver(self, item: WorkItem) -> list[RecipientResult]:
        started = time.monotonic()
        try:
            async with self._pool.slot(item.domain):
                route = await self._route(item.domain)
                return await self._deliver_via(route, item, started)
        except DeliveryError as exc:
            return self._all(item, exc, started, _Where(host=exc.host))
        except Exception as exc:
            # A bug must not leave the recipients leased forever or lose them: record a
            # temporary failure so the retry policy (and its max age) still applies.
            log.exception("delivery of %s to %s crashed", item.message_id, item.domain)
            error = TemporaryFailure(f"internal error: {type(exc).__name__}: {exc}")
            return self._all(item, error, started, _Where())

    async def _route(self, domain: str) -> Route:
        relay = self._config.relay
        if relay is not None:
            host = MXHost(name=relay.host, preference=0, addresses=(relay.host,))
            return Route(domain=domain, hosts=(host,), implicit=False)
        return await self._router.route(domain)

    async def _deliver_via(
        self, route: Route, item: WorkItem, started: float
    ) -> list[RecipientResult]:
        last_error: DeliveryError = TemporaryFailure(
            "no MX host could be reached", host=route.hosts[0].name if route.hosts else None
        )
        for host in route.hosts:
            for ip in host.addresses:
                try:
                    conn, key = await self._connect(host.name, ip)
                except DeliveryError as exc:
                    last_error = exc
                    continue
                try:
                    result = await self._send(conn, item)
                except PermanentFailure as exc:
                    # SIZE or SMTPUTF8 refused before anything was sent: final for all.
                    self._pool.release(key, conn)
                    exc.host = exc.host or host.name
                    return self._all(item, exc, started, self._where(conn))
                except DeliveryError as exc:
                    # Lost before the final dot: nothing was delivered, another host may do.
                    self._pool.discard(conn)
                    exc.host = exc.host or host.name
                    last_error = exc
                    continue
                except BaseException:
                    self._pool.discard(conn)
                    raise
                self._pool.release(key, conn)
                return self._interpret(item, result, started, self._where(conn))
        if isinstance(last_error, PermanentFailure):
            # A 5xx greeting refuses the connection, not the recipients: with every host
            # exhausted the mail is deferred, as the issue and Postfix have it.
            last_error = TemporaryFailure(
                last_error.text,
                code=last_error.code,
                enhanced=last_error.enhanced,
                host=last_error.host,
            )
        return self._all(item, last_error, started, _Where(host=last_error.host))

    async def _connect(self, host: str, ip: str) -> tuple[SMTPConnection, PoolKey]:
        config = self._config
        relay = config.relay
        port = relay.port if relay else config.smtp_port
        if relay is not None:
            mode = {
                RelayTLS.NONE: StartTLS.NEVER,
                RelayTLS.STARTTLS: StartTLS.VERIFY if relay.verify else StartTLS.REQUIRED,
                RelayTLS.IMPLICIT: StartTLS.NEVER,
            }[relay.tls]
        else:
            mode = _STARTTLS_FOR_POLICY[config.tls]
        key = PoolKey(host=host, ip=ip, port=port, tls_mode=mode)

        async def open_with(starttls: StartTLS) -> SMTPConnection:
            return await SMTPConnection.open(
                host=host,
                ip=ip,
                port=port,
                helo_name=config.helo_name,
                timeouts=config.timeouts,
                starttls=starttls,
                tls_context=config.tls_context,
                implicit_tls=relay is not None and relay.tls is RelayTLS.IMPLICIT,
                source_address=config.source_address,
                auth=(relay.username, relay.password or "")
                if relay is not None and relay.username
                else None,
            )

        async def opener() -> SMTPConnection:
            try:
                return await open_with(mode)
            except TLSVerifyError:
                raise
            except TLSHandshakeError:
                if mode is not StartTLS.OPPORTUNISTIC:
                    raise
                # As MTAs do: a broken TLS stack on the peer must not stop mail; the same
                # host is tried again in plaintext on a fresh connection.
                return await open_with(StartTLS.NEVER)

        return await self._pool.acquire(key, opener), key

    async def _send(self, conn: SMTPConnection, item: WorkItem) -> TransactionResult:
        data = item.data
        eightbit = item.eightbit
        if eightbit and "8BITMIME" not in conn.extensions:
            data = downgrade_to_7bit(data)
            eightbit = False
        return await conn.send(
            envelope_from=item.envelope_from,
            recipients=[r.address for r in item.recipients],
            data=data,
            smtputf8=item.smtputf8,
            eightbit=eightbit,
        )

    @staticmethod
    def _where(conn: SMTPConnection) -> _Where:
        return _Where(
            host=conn.host,
            ip=conn.ip,
            port=conn.port,
            tls_version=conn.tls_version,
            tls_cipher=conn.tls_cipher,
        )

    # --- turning replies into per-recipient results -------------------------------------

    def _interpret(
        self, item: WorkItem, result: TransactionResult, started: float, where: _Where
    ) -> list[RecipientResult]:
        by_address = {r.address: r for r in item.recipients}
        if result.mail is None or not is_positive(result.mail, stage=Stage.MAIL):
            reply = result.mail
            outcome = _outcome(reply, Stage.MAIL)
            return [
                self._result(item, r, outcome, started, where, reply=reply) for r in item.recipients
            ]
        results: list[RecipientResult] = []
        accepted: list[LeasedRecipient] = []
        for address, reply in result.rcpt:
            recipient = by_address[address]
            if is_positive(reply, stage=Stage.RCPT):
                accepted.append(recipient)
            else:
                outcome = classify(reply, stage=Stage.RCPT)
                results.append(self._result(item, recipient, outcome, started, where, reply=reply))
        if not accepted:
            return results
        if result.uncertain:
            outcome = (
                AttemptOutcome.TEMPORARY
                if self._config.retry_uncertain
                else AttemptOutcome.DELIVERED
            )
            for recipient in accepted:
                results.append(
                    self._result(
                        item,
                        recipient,
                        outcome,
                        started,
                        where,
                        error="connection lost after the final dot; delivery uncertain",
                        uncertain=True,
                    )
                )
            return results
        decisive: SMTPReply | None
        stage = Stage.DATA_END
        if result.data is None or not is_positive(result.data, stage=Stage.DATA):
            decisive, stage = result.data, Stage.DATA
        else:
            decisive = result.final
        outcome = _outcome(decisive, stage)
        for recipient in accepted:
            results.append(self._result(item, recipient, outcome, started, where, reply=decisive))
        return results

    def _all(
        self, item: WorkItem, exc: DeliveryError, started: float, where: _Where
    ) -> list[RecipientResult]:
        outcome = (
            AttemptOutcome.PERMANENT
            if isinstance(exc, PermanentFailure)
            else AttemptOutcome.TEMPORARY
        )
        reply = (
            SMTPReply(code=exc.code, enhanced=exc.enhanced, text=exc.text)
            if exc.code is not None
            else None
        )
        error = None if reply is not None else exc.text
        return [
            self._result(item, r, outcome, started, where, reply=reply, error=error)
            for r in item.recipients
        ]

    def _result(
        self,
        item: WorkItem,
        recipient: LeasedRecipient,
        outcome: AttemptOutcome,
        started: float,
        where: _Where,
        *,
        reply: SMTPReply | None = None,
        error: str | None = None,
        uncertain: bool = False,
    ) -> RecipientResult:
        now = self._clock()
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
        )
        state, next_at = self._decide(recipient, outcome, now)
        return RecipientResult(
            message_id=item.message_id,
            address=recipient.address,
            state=state,
            attempt=attempt,
            next_attempt_at=next_at,
        )

    def _decide(
        self, recipient: LeasedRecipient, outcome: AttemptOutcome, now: datetime
    ) -> tuple[RecipientState, datetime | None]:
        if outcome is AttemptOutcome.DELIVERED:
            return RecipientState.DELIVERED, None
        if outcome is AttemptOutcome.PERMANENT:
            return RecipientState.FAILED, None
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


def _outcome(reply: SMTPReply | None, stage: Stage) -> AttemptOutcome:
    if reply is None:
        return AttemptOutcome.TEMPORARY
    return classify(reply, stage=stage)
