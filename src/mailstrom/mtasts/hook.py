"""MTA-STS as a source of TLS requirements for :class:`~mailstrom.tls.decide.TLSDecider`.

For each MX host the engine is about to connect to, :meth:`MTASTSHook.requirement` looks at
the destination domain's policy (:class:`~mailstrom.mtasts.source.PolicySource`):

* no policy, or mode ``none`` → nothing to say (the next source or the default decides);
* ``enforce`` and the host matches an ``mx`` pattern → TLS with a certificate valid for the
  host name (``TLSMode.VERIFY``, the same checks as ``tls = "verify"``); a connection that
  cannot have it fails, and with every host failing the mail is deferred, never sent in
  plaintext or to an unverified peer (RFC 8461 §5);
* ``enforce`` and the host matches no pattern → this host is refused (a temporary failure:
  RFC 8461 §5.1 never bounces on a policy alone);
* ``testing`` → the connection first asks for what ``enforce`` would (VERIFY) and, when
  that fails, the engine connects again as it would without a policy
  (:attr:`~mailstrom.tls.requirement.TLSRequirement.fallback`); the failure is counted for
  TLS reports (RFC 8460) either way.

:meth:`MTASTSHook.observe` is told how each connection under an MTA-STS requirement went,
and counts it in the :class:`~mailstrom.tlsrpt.recorder.SessionRecorder`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from mailstrom.config import Config
from mailstrom.errors import DeliveryError, TemporaryFailure
from mailstrom.mtasts.fetch import require_httpx
from mailstrom.mtasts.policy import CachedPolicy, Mode, PolicyError, mx_matches
from mailstrom.mtasts.source import MAX_REMEMBERED, PolicySource, StoreCall
from mailstrom.routing import make_resolver
from mailstrom.stores.base import Store
from mailstrom.tls.decide import Destination
from mailstrom.tls.requirement import PolicySource as Source
from mailstrom.tls.requirement import TLSMode, TLSRequirement
from mailstrom.tlsrpt.recorder import SessionRecorder, classify
from mailstrom.tlsrpt.sessions import PolicyType, ResultType

_ENHANCED = "4.7.5"
"""RFC 3463 "cryptographic failure": what RFC 7672 uses for the same kind of refusal."""
_NOT_LISTED = "mx-not-listed-in-policy"
"""The failure reason code of an MX host that matches no pattern (RFC 8460 leaves it to
the reporter; ``validation-failure`` is its type)."""


class MTASTSHook:
    """The ``mta-sts`` policy source of the TLS decision (see the module docstring)."""

    name = "mta-sts"

    def __init__(self, source: PolicySource, recorder: SessionRecorder | None = None) -> None:
        self._source = source
        self._recorder = recorder
        self._applied: dict[str, CachedPolicy] = {}

    def policy_failed(self, domain: str, error: PolicyError, applied: CachedPolicy | None) -> None:
        """A record or policy of ``domain`` was unusable (the source's ``on_failure``)."""
        if self._recorder is None:
            return
        text = applied.policy.text if applied is not None else ""
        self._recorder.failure(
            domain,
            PolicyType.STS if applied is not None else PolicyType.NO_POLICY,
            text,
            ResultType(error.result_type),
            code=error.code,
        )

    async def requirement(
        self, destination: Destination, default: TLSRequirement
    ) -> TLSRequirement | None:
        known, cached = self._source.known(destination.domain)
        if not known:
            cached = await self._source.policy(destination.domain)
        if cached is None or cached.policy.mode is Mode.NONE:
            self._applied.pop(destination.domain, None)
            return None
        if len(self._applied) >= MAX_REMEMBERED:
            self._applied.clear()  # a bound; the next call for each domain fills it again
        self._applied[destination.domain] = cached
        policy, host = cached.policy, destination.mx_host
        pattern = next((p for p in policy.mx if mx_matches(p, host)), None)
        about = f"MTA-STS policy of {destination.domain} ({policy.mode}, id {cached.policy_id})"
        if pattern is None:
            if policy.mode is Mode.ENFORCE:
                # No connection is made: the refusal is this session. (In testing mode
                # one is, or an idle one reused: observe() counts the new ones.)
                self._count_failure(cached, host, "", ResultType.VALIDATION_FAILURE, _NOT_LISTED)
                raise TemporaryFailure(
                    f"{about} does not list MX host {host} (mx: {', '.join(policy.mx)})",
                    enhanced=_ENHANCED,
                    host=host,
                )
            return TLSRequirement(
                mode=default.mode,
                source=Source.MTA_STS,
                detail="testing",
                reason=f"{about}: {host} matches no mx pattern (testing: delivered anyway)",
            )
        reason = f"{about}: {host} matches mx {pattern}"
        if policy.mode is Mode.ENFORCE or default.mode in (TLSMode.VERIFY, TLSMode.DANE):
            return TLSRequirement(
                mode=TLSMode.VERIFY if policy.mode is Mode.ENFORCE else default.mode,
                source=Source.MTA_STS,
                detail=policy.mode.value,
                reason=reason,
                mx_listed=True,
            )
        # Testing: try what enforce would ask, and deliver as before when it fails —
        # except a REQUIRETLS message, which never goes without verified TLS (RFC 8689).
        return TLSRequirement(
            mode=TLSMode.VERIFY,
            source=Source.MTA_STS,
            detail="testing",
            reason=reason,
            mx_listed=True,
            fallback=None if destination.require_tls else default.mode,
        )

    async def lists_mx_host(self, destination: Destination) -> bool:
        """Whether the domain's policy (enforce or testing) lists its MX host: it vouches
        for the host for REQUIRETLS (RFC 8689 §4.2.1), also when a ``tls.domains`` entry
        decided the connection's TLS and this source was not asked. Counts nothing: the
        policy does not decide the connection."""
        known, cached = self._source.known(destination.domain)
        if not known:
            cached = await self._source.policy(destination.domain)
        return (
            cached is not None
            and cached.policy.mode is not Mode.NONE
            and cached.policy.allows(destination.mx_host)
        )

    def policy_unknown(self, domain: str) -> str | None:
        """Why ``domain``'s policy is not known now, when a lookup or fetch failed (see
        :meth:`PolicySource.unknown`): the decider then defers a REQUIRETLS message that
        nothing else vouches for, rather than failing it for good."""
        return self._source.unknown(domain)

    def observe(
        self,
        domain: str,
        requirement: TLSRequirement,
        host: str,
        ip: str,
        error: DeliveryError | None,
    ) -> None:
        """How a connection opened under an MTA-STS ``requirement`` went (None: it
        succeeded). :class:`~mailstrom.tlsrpt.observer.SessionObserver` calls it for those
        connections, and for those to a host a testing policy does not list that went in
        plaintext for remembered broken TLS; it counts the others (DANE, no policy)."""
        cached = self._applied.get(domain)
        if self._recorder is None or cached is None:
            return
        if not cached.policy.allows(host):
            # Testing mode, a host the policy does not list: the session is that failure,
            # however TLS then went under the default's mode (or in plaintext, the host's
            # TLS remembered broken). Counted per new connection, as every session is:
            # not when an idle one is reused, nor when none was made (refused...).
            if error is None or classify(error) is not None:
                self._count_failure(cached, host, ip, ResultType.VALIDATION_FAILURE, _NOT_LISTED)
            return
        if requirement.source is not Source.MTA_STS:
            return
        if error is None:
            if requirement.mode is TLSMode.VERIFY:
                self._recorder.success(cached.domain, PolicyType.STS, cached.policy.text)
            return
        found = classify(error)
        if found is not None:
            self._count_failure(cached, host, ip, *found)

    def _count_failure(
        self, cached: CachedPolicy, host: str, ip: str, kind: ResultType, code: str
    ) -> None:
        if self._recorder is not None:
            self._recorder.failure(
                cached.domain, PolicyType.STS, cached.policy.text, kind, mx=host, ip=ip, code=code
            )


def for_worker(
    config: Config,
    store: Store,
    recorder: SessionRecorder | None,
    *,
    store_call: StoreCall,
    clock: Callable[[], datetime],
) -> MTASTSHook | None:
    """The MTA-STS source a worker runs with, counting into ``recorder`` (None: no
    counting), or None when ``config.mta_sts`` is off. Raises
    :class:`~mailstrom.errors.ConfigError` when the ``mta-sts`` extra (httpx) is missing."""
    if config.mta_sts is None:
        return None
    require_httpx()
    hook: MTASTSHook | None = None

    def failed(domain: str, error: PolicyError, applied: CachedPolicy | None) -> None:
        if hook is not None:
            hook.policy_failed(domain, error, applied)

    source = PolicySource(
        config,
        store,
        resolver=make_resolver(config.dns),
        store_call=store_call,
        clock=clock,
        on_failure=failed,
    )
    hook = MTASTSHook(source, recorder)
    return hook
