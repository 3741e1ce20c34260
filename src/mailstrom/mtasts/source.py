"""The MTA-STS policy to apply to a destination domain now (RFC 8461 §5.1).

:class:`PolicySource` looks up the domain's ``_mta-sts`` TXT record and compares its ``id``
with the policy cached in the store (shared by every worker):

* same id and the cached policy has not aged out (``max_age``) → the cached policy, fetched
  again once half its lifetime (at most a day) has passed (RFC 8461 §10.2), and kept when
  that fails;
* a new id, no cached policy, or an aged-out one → fetch over HTTPS, cache and apply it;
  when the fetch fails, the cached policy stays and applies while it is fresh (an attacker
  who blocks the fetch cannot remove a policy), else the domain has none for now;
* no TXT record, an unusable one, or a DNS failure → the cached policy while it is fresh,
  refreshed under its id as above (a policy is withdrawn with ``mode: none``, not by
  removing the record: RFC 8461 §8.3), else none.

Each answer is remembered by this worker for ``MTASTSConfig.recheck`` seconds (never longer
than the TXT record's TTL), and concurrent calls for one domain share one lookup, so a
stream of mail to a domain costs one TXT query per recheck interval, not one per message.
Failures are logged with their reason and passed to ``on_failure`` for TLS reports, at
most one per lookup: the first found.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import dns.asyncresolver

from mailstrom.config import Config, MTASTSConfig
from mailstrom.errors import LocalResourceShortage, StoreError, local_shortage
from mailstrom.mtasts.fetch import FETCH_ERROR, DNSTrouble, a_label, fetch_policy, txt_records
from mailstrom.mtasts.https import route_policy_for
from mailstrom.mtasts.policy import CachedPolicy, Mode, PolicyError, parse_sts_record
from mailstrom.stores.base import Store

log = logging.getLogger("mailstrom.mtasts")

StoreCall = Callable[..., Awaitable[Any]]
FailureHook = Callable[[str, PolicyError, CachedPolicy | None], None]
"""Called with (domain, error, policy applied anyway) when a record or policy is unusable,
or the record's lookup failed."""

_FAILURE_RECHECK = 60.0
"""Seconds a worker waits before looking again after a lookup or fetch failed."""
MAX_REMEMBERED = 10_000
"""Domains remembered at most per worker (beyond that the oldest answers are dropped)."""
LOOKUP_FAILED = "sts-record-lookup-failed"
"""The ``failure-reason-code`` of a ``_mta-sts`` lookup that failed (SERVFAIL, a timeout)."""


async def _direct(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return method(*args, **kwargs)


class PolicySource:
    """Answers "which MTA-STS policy applies to this domain now?" for one worker."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        resolver: dns.asyncresolver.Resolver,
        store_call: StoreCall = _direct,
        clock: Callable[[], datetime],
        on_failure: FailureHook | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.mta_sts is not None
        self._settings: MTASTSConfig = config.mta_sts
        self._store = store
        self._resolver = resolver
        self._store_call = store_call
        self._clock = clock
        self._monotonic = monotonic
        self._on_failure = on_failure
        # The policy host is the domain's choice, as a TLS report collector is: never one on
        # the sender's own network (mtasts/https.py); reached from source_address.
        self._route_policy = route_policy_for(
            allow_loopback=config.allow_loopback, source_address=config.source_address
        )
        self._source_address = config.source_address
        # domain -> (until, policy, why none is known: a failed lookup or fetch, or None)
        self._known: dict[str, tuple[float, CachedPolicy | None, str | None]] = {}
        self._flights: dict[str, asyncio.Task[CachedPolicy | None]] = {}

    def known(self, domain: str) -> tuple[bool, CachedPolicy | None]:
        """(True, policy) when this worker's answer for ``domain`` is still good, without
        a coroutine; (False, None) when :meth:`policy` must be awaited."""
        entry = self._known.get(domain)
        if entry is not None and self._monotonic() < entry[0]:
            return True, entry[1]
        return False, None

    def unknown(self, domain: str) -> str | None:
        """Why no policy of ``domain`` is known, when that is because the ``_mta-sts``
        record could not be looked up or the policy it announces could not be fetched
        (and none cached is fresh); None when it was looked up (with or without a
        policy), or not yet. Such a domain may have a policy that vouches for its MX
        hosts, which a REQUIRETLS message must wait for (RFC 8689 §4.2.1). The last
        answer counts even when it is due to be looked up again (``recheck = 0`` makes it
        so at once): the decision asking has just made it."""
        entry = self._known.get(domain)
        return None if entry is None else entry[2]

    async def policy(self, domain: str) -> CachedPolicy | None:
        """The policy to apply to mail for ``domain`` (lower-case A-label), or None.

        A policy whose mode is ``none`` is returned as it is: it says the domain has no
        requirements, and it is cached like any other.
        """
        ready, cached = self.known(domain)
        if ready:
            return cached
        name = a_label(domain)
        if name is None:
            self._remember(domain, None, self._settings.recheck)
            return None
        if name != domain:
            # A Unicode or mixed-case spelling: answered, and remembered, as its A-label.
            found = await self.policy(name)
            entry = self._known.get(name)
            if entry is not None:
                self._known[domain] = entry
            return found
        flight = self._flights.get(domain)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._resolve(domain))
            self._flights[domain] = flight
            flight.add_done_callback(lambda _: self._flights.pop(domain, None))
        return await asyncio.shield(flight)

    def _remember(
        self,
        domain: str,
        value: CachedPolicy | None,
        seconds: float,
        unknown: str | None = None,
    ) -> None:
        if len(self._known) >= MAX_REMEMBERED:
            for key in list(self._known)[: MAX_REMEMBERED // 10]:
                del self._known[key]
        why = unknown if value is None else None
        if value is not None:
            # Never past the policy's own clock: a max_age shorter than ``recheck`` must
            # not keep an expired policy applying, nor skip its refresh.
            now = self._clock()
            seconds = min(seconds, (value.look_again_at(now) - now).total_seconds())
        self._known[domain] = (self._monotonic() + max(seconds, 0.0), value, why)

    def _failed(
        self, domain: str, error: PolicyError, applied: CachedPolicy | None, *, report: bool = True
    ) -> None:
        kept = f"; the cached policy (id {applied.policy_id}) still applies" if applied else ""
        log.warning("MTA-STS policy of %s ignored: %s%s", domain, error.reason, kept)
        if self._on_failure is not None and report:
            self._on_failure(domain, error, applied)

    async def _cached(self, domain: str) -> CachedPolicy | None:
        try:
            found: CachedPolicy | None = await self._store_call(self._store.mta_sts_policy, domain)
        except StoreError as exc:
            log.warning("MTA-STS cache of %s unreadable: %s", domain, exc)
            return None
        return found

    async def _rebased(
        self, domain: str, kept: CachedPolicy | None, now: datetime
    ) -> CachedPolicy | None:
        """``kept``, whose refresh failed at ``now``, as :meth:`CachedPolicy.rebased` has
        it, and cached so for every worker: kept as a clock since set back stamped it, it
        applied to that clock's expiry (a year past its max_age) while every refresh
        failed."""
        rebased = None if kept is None else kept.rebased(now)
        if rebased is None or rebased is kept:
            return kept
        # Only over the row it came from: another worker whose fetch succeeded meanwhile
        # saved a newer policy, which this older one must not replace. (Read, then written:
        # one saved in between is replaced, but this one's refresh is due, so the next
        # look at the domain fetches it again.)
        if await self._cached(domain) == kept:
            try:
                await self._store_call(self._store.save_mta_sts_policy, rebased)
            except StoreError as exc:
                log.warning("MTA-STS policy of %s not cached: %s", domain, exc)
        return rebased

    async def _resolve(self, domain: str) -> CachedPolicy | None:
        recheck = self._settings.recheck
        unusable: PolicyError | None = None
        policy_id: str | None = None
        not_looked_up: str | None = None
        shortage: OSError | None = None
        try:
            records, ttl = await txt_records(self._resolver, f"_mta-sts.{domain}")
        except DNSTrouble as exc:
            shortage = local_shortage(exc.__cause__) if exc.__cause__ is not None else None
            not_looked_up = f"its _mta-sts record was not looked up: {exc}"
            # A policy not retrieved (RFC 8460 §4.3.2.2), counted as a failed fetch is: the
            # day's report then says why the policy went unseen, or was not refreshed.
            unusable = PolicyError(str(exc), result_type=FETCH_ERROR, code=LOOKUP_FAILED)
            ttl = _FAILURE_RECHECK
        else:
            try:
                policy_id = parse_sts_record(records)
            except PolicyError as exc:
                unusable, ttl = exc, min(ttl, _FAILURE_RECHECK)
        cached = await self._cached(domain)
        now = self._clock()
        # An expired policy is never applied (RFC 8461 §5.1), however its record went.
        fresh = cached if cached is not None and cached.fresh(now) else None
        if shortage is not None:
            # No socket for the query (EMFILE): this host's trouble, not the domain's, so
            # neither reported (a policy fetch error in its TLS report) nor remembered. A
            # cached policy applies; without one the delivery waits (no attempt) rather
            # than go as if the domain had none.
            if fresh is None:
                raise LocalResourceShortage(f"MTA-STS: TXT lookup of _mta-sts.{domain}", shortage)
            return fresh
        if unusable is not None:
            self._failed(domain, unusable, fresh)
        if policy_id is None and fresh is not None and fresh.refresh_due(now):
            # Refreshed under its id all the same (RFC 8461 §3.3): a policy is withdrawn
            # with mode none (§8.3), and an attacker who hides a record or makes its lookup
            # fail (§10.2) made a policy the domain still serves lapse at its max_age.
            policy_id = fresh.policy_id
        same = fresh is not None and fresh.policy_id == policy_id
        if policy_id is None or (same and fresh is not None and not fresh.refresh_due(now)):
            self._remember(domain, fresh, min(recheck, ttl), unknown=not_looked_up)
            return fresh
        try:
            policy = await fetch_policy(
                domain,
                resolver=self._resolver,
                config=self._settings,
                route_policy=self._route_policy,
                source_address=self._source_address,
            )
        except LocalResourceShortage:
            # No descriptor for the fetch (its CA file, socket or address lookup): as for
            # the TXT lookup above, neither reported nor remembered; a fresh cached policy
            # applies, and without one the delivery waits (no attempt).
            if fresh is None:
                raise
            return fresh
        except PolicyError as exc:
            # One lookup is one failure in TLS reports: with the record unusable (or not
            # looked up), that one was passed on already, and a refresh under the cached id
            # failing too is only logged (else the count would depend on whether a refresh
            # was due).
            self._failed(domain, exc, fresh, report=unusable is None)
            fresh = await self._rebased(domain, fresh, now)
            # A refresh ahead of time is in no hurry: try again after ``recheck``.
            self._remember(
                domain,
                fresh,
                recheck if same else min(recheck, _FAILURE_RECHECK),
                unknown=f"the policy its _mta-sts record announces was not fetched: {exc.reason}",
            )
            return fresh
        new = CachedPolicy.of(domain, policy_id, policy, self._clock())
        try:
            await self._store_call(self._store.save_mta_sts_policy, new)
        except StoreError as exc:
            log.warning("MTA-STS policy of %s not cached: %s", domain, exc)
        if policy.mode is not Mode.NONE:
            log.info("MTA-STS policy of %s (id %s): mode %s", domain, policy_id, policy.mode)
        if policy.ignored:
            log.warning(
                "MTA-STS policy of %s (id %s): mx lines ignored, not a host name or *.name: %s",
                domain,
                policy_id,
                ", ".join(repr(value[:60]) for value in policy.ignored[:5]),
            )
        self._remember(domain, new, min(recheck, ttl))
        return new
