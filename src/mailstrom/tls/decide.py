"""The per-destination TLS decision: what a connection to (domain, MX host) requires.

The delivery engine asks :meth:`TLSDecider.requirement` once for every MX host it is
about to connect to (before opening, or before taking an idle connection keyed by the
answer's mode) and hands the :class:`~mailstrom.tls.requirement.TLSRequirement` to the
opener. The decision, in order:

1. A relay (``Config.relay``) decides alone (source ``relay``).
2. An entry of the per-domain table (``Config.tls_domains``) is the operator's word:
   ``none``, ``opportunistic``, ``required`` and ``verify`` apply as they are; ``dane``
   and ``dane-only`` ask the DANE source (``dane-only`` refuses a host without usable
   TLSA records; ``TLS-Required: No`` skips DANE under ``dane``, then opportunistic).
3. Otherwise the **policy sources** are asked in order, and the first that answers
   decides: DANE first (RFC 7672 §1.3: DANE wins over MTA-STS for a host that has TLSA
   records), then MTA-STS, then any other source given. DANE's answer for a host whose
   TLSA records are all unusable (TLS required, unauthenticated) does not end the
   search: it is the default the later sources are given, and MTA-STS still applies
   (a global ``verify``, which authenticates, stays the default instead).
   A message carrying ``TLS-Required: No`` (RFC 8689 §4) skips them.
4. Otherwise the global ``Config.tls`` applies. Its levels ``dane`` and ``dane-only`` ask
   the DANE source first; ``TLS-Required: No`` skips that for ``dane`` (then
   opportunistic), not for ``dane-only`` (the operator's own demand).

An opportunistic answer becomes plaintext when the host's TLS handshake failed recently
(:class:`BrokenTLS`, shared through the store), and so does an opportunistic fallback of
MTA-STS testing (:meth:`TLSDecider.fallback`); no other mode ever does.

How MTA-STS (or any other source) plugs in
------------------------------------------
A source is any object with ``name`` and an async ``requirement(destination, default)``
method (:class:`PolicySourceHook`). It gets the :class:`Destination` (policy domain, MX
host, whether the MX records were DNSSEC-validated...) and the requirement that applies
if no source answers, and returns:

* ``None`` — nothing to say for this destination: the next source, then the default,
  decides. (MTA-STS without a policy, or mode ``none``.)
* a :class:`~mailstrom.tls.requirement.TLSRequirement` — e.g. MTA-STS enforce for a
  matching MX: ``TLSRequirement(mode=TLSMode.VERIFY, source=PolicySource.MTA_STS,
  detail="enforce", reason="MTA-STS policy id 2024...: mx pattern *.example.com")``;
  testing mode: the default's mode with ``source=MTA_STS, detail="testing"``.
* or raise a :class:`~mailstrom.errors.DeliveryError` (``TemporaryFailure``) — this host
  must not be used now (MTA-STS enforce and the MX matches no pattern); the engine moves
  on to the next MX host and, when none is left, defers with that error's text.

A source may also have an async ``lists_mx_host(destination)``: whether its published
policy lists the MX host, which vouches for the host for REQUIRETLS (RFC 8689 §4.2.1)
also where the source did not decide (a ``tls.domains`` entry asks no source).

Give it as ``TLSDecider.for_config(config, mta_sts=source)`` (it goes after DANE), or
as ``sources=`` for full control of the order. A :class:`VERIFY
<mailstrom.tls.requirement.TLSMode>` requirement is checked against the MX host name with
``Config.tls_context``, exactly as ``tls = "verify"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from mailstrom.config import Config, RelayTLS
from mailstrom.errors import DaneRequired, RequireTLSFailure, TemporaryFailure
from mailstrom.policy.throttle import CLOCK_SET_BACK
from mailstrom.tls.levels import TLSPolicy
from mailstrom.tls.requirement import PolicySource, TLSMode, TLSRequirement

log = logging.getLogger("mailstrom.tls")

_MODE_OF_LEVEL = {
    TLSPolicy.NONE: TLSMode.NONE,
    TLSPolicy.OPPORTUNISTIC: TLSMode.OPPORTUNISTIC,
    TLSPolicy.REQUIRED: TLSMode.REQUIRED,
    TLSPolicy.VERIFY: TLSMode.VERIFY,
    # Without usable TLSA records, "dane" is opportunistic (Postfix's level "dane").
    TLSPolicy.DANE: TLSMode.OPPORTUNISTIC,
    TLSPolicy.DANE_ONLY: TLSMode.DANE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """Where a connection is about to go, as the TLS decision sees it."""

    domain: str
    """The policy domain: the recipient domain (lower-case, as leased)."""
    mx_host: str
    """The MX host name to connect to (lower-case A-label, no final dot)."""
    mx_secure: bool = False
    """The MX records (or the implicit MX's own address records) were DNSSEC-validated:
    the resolver is trusted (``dns.dnssec``) and set the AD bit."""
    host_secure: bool = False
    """The host's address records were DNSSEC-validated."""
    tls_optional: bool = False
    """The message carries ``TLS-Required: No`` (RFC 8689 §4)."""
    tls_report: bool = False
    """The message is a mailed TLS report (also ``tls_optional``): RFC 8460 §3 leaves
    its own sessions out of the next report, a failed TLSA lookup of its host too."""
    require_tls: bool = False
    """The message asks for REQUIRETLS (RFC 8689): only authenticated TLS will do."""
    mx_canonical: str | None = None
    """The CNAME-expanded name of ``mx_host`` when it is an alias (``host_secure`` then
    says whether the whole chain validated), else None (RFC 7672 §2.2.3)."""
    next_hops: tuple[str, ...] = ()
    """The domain whose MX records named ``mx_host`` (lower-case A-label; the name the MX
    lookup asked for) and, when it is an alias, its CNAME expansion, which a DANE-TA(2)
    certificate may name too (RFC 7672 §3.2.2; :attr:`Route.next_hops
    <mailstrom.routing.route.Route.next_hops>`). Empty for an implicit MX (no MX records:
    ``mx_host`` is that domain already) and when no MX lookup was made (a relay)."""


class PolicySourceHook(Protocol):
    """A source of TLS requirements (DANE, MTA-STS...): see the module docstring."""

    name: str

    async def requirement(
        self, destination: Destination, default: TLSRequirement
    ) -> TLSRequirement | None: ...


class BrokenTLS:
    """Hosts whose TLS handshake failed, until when (monotonic clock), with the store as
    the shared memory of every worker when one is given (see :meth:`load`).

    In memory this is a dict; :meth:`note` also calls ``on_note`` (the worker writes the
    entry to the store) and :meth:`load` replaces what is known with the store's view.
    """

    def __init__(
        self,
        remember_for: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_note: Callable[[str, float, str], None] | None = None,
    ) -> None:
        self.remember_for = remember_for
        self._clock = clock
        self._until: dict[str, float] = {}
        self._on_note = on_note

    def broken(self, host: str) -> bool:
        """Whether ``host``'s TLS is known to be broken now."""
        until = self._until.get(host)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[host]
            return False
        return True

    def note(self, host: str, reason: str) -> None:
        """``host``'s TLS handshake failed (under the opportunistic policy)."""
        if self.remember_for <= 0:
            return
        self._until[host] = self._clock() + self.remember_for
        if self._on_note is not None:
            self._on_note(host, self.remember_for, reason)

    def load(self, remaining: dict[str, float]) -> None:
        """Add what the store knows, ``{host: seconds still to remember}`` (the later
        time wins), and forget what expired.

        A note with more than ``remember_for`` and
        :data:`~mailstrom.policy.throttle.CLOCK_SET_BACK` left was written by a clock
        since set back (a host a day ahead, corrected by NTP), as a pause that starts that
        far ahead is (:func:`~mailstrom.policy.throttle.pause_runs`): kept, the store's
        entry sent the host's mail in plaintext for the whole step, and each read made it
        whole again here. It is passed over; a handshake that still fails notes the host
        anew. (A worker configured for over an hour less than the one that noted it
        passes it over too, and pays one handshake for it.)"""
        now = self._clock()
        longest = self.remember_for + CLOCK_SET_BACK.total_seconds()
        known = {h: u for h, u in self._until.items() if u > now}
        for host, seconds in remaining.items():
            if 0 < seconds <= longest:
                known[host] = max(known.get(host, 0.0), now + seconds)
        self._until = known


class TLSDecider:
    """Decides the :class:`~mailstrom.tls.requirement.TLSRequirement` of each connection
    (see the module docstring for the order)."""

    def __init__(
        self,
        config: Config,
        *,
        sources: Sequence[PolicySourceHook] = (),
        broken: BrokenTLS | None = None,
    ) -> None:
        self._config = config
        self._table = config.tls_table
        self._sources = tuple(sources)
        self._dane = next((s for s in self._sources if s.name == "dane"), None)
        self.broken = (
            broken if broken is not None else BrokenTLS(config.tls_remember_broken.total_seconds())
        )
        self._default = self._level(config.tls, PolicySource.DEFAULT, "tls = " + config.tls)
        self._relay: TLSRequirement | None = None
        if config.relay is not None:
            relay = config.relay
            mode = {
                RelayTLS.NONE: TLSMode.NONE,
                RelayTLS.STARTTLS: TLSMode.VERIFY if relay.verify else TLSMode.REQUIRED,
                # Implicit TLS wraps the connection itself (see the opener), as checked.
                RelayTLS.IMPLICIT: TLSMode.VERIFY if relay.verify else TLSMode.REQUIRED,
            }[relay.tls]
            self._relay = TLSRequirement(
                mode=mode, source=PolicySource.RELAY, reason=f"relay.tls = {relay.tls.value}"
            )

    @classmethod
    def for_config(
        cls,
        config: Config,
        *,
        mta_sts: PolicySourceHook | None = None,
        dane: PolicySourceHook | None = None,
        broken: BrokenTLS | None = None,
    ) -> TLSDecider:
        """The decider ``config`` asks for: DANE when ``dns.dnssec`` is set (``dane``
        replaces the default DANE source), then ``mta_sts`` when given."""
        sources: list[PolicySourceHook] = []
        if dane is not None:
            sources.append(dane)
        elif config.dns.dnssec:
            from mailstrom.tls.dane import DaneSource

            sources.append(DaneSource.for_config(config))
        if mta_sts is not None:
            sources.append(mta_sts)
        return cls(config, sources=sources, broken=broken)

    @staticmethod
    def _level(level: TLSPolicy, source: PolicySource, reason: str) -> TLSRequirement:
        return TLSRequirement(mode=_MODE_OF_LEVEL[level], source=source, reason=reason)

    async def requirement(self, destination: Destination) -> TLSRequirement:
        """What a connection to ``destination`` requires. Raises
        :class:`~mailstrom.errors.TemporaryFailure` when the host must not be used now
        (a TLSA lookup failed, ``dane-only`` without usable TLSA records: a
        :class:`~mailstrom.errors.DaneRequired` DANE's ``on_failure`` is told of, a source's
        refusal), and :class:`~mailstrom.errors.RequireTLSFailure` (5.7.30) for a
        REQUIRETLS message to a destination whose policy is ``none``.

        For REQUIRETLS (RFC 8689 §4.2.1) the MX host itself must be vouched for: by DANE,
        by the domain's MTA-STS policy listing it, or by MX records (an implicit MX's
        address records) that DNSSEC validated (``dns.dnssec``); a relay is the
        operator's own choice. Otherwise a certificate valid for the MX host name proves
        nothing (whoever forged the MX answer named a host of theirs) and the message fails
        with 5.7.30. Then a requirement that does not authenticate the server
        (opportunistic, required) becomes ``verify``: the certificate must be valid for the
        MX host name; remembered broken TLS never turns it into plaintext."""
        chosen = await self._decide(destination)
        if not destination.require_tls:
            return self._remembered(destination, chosen)
        if chosen.mode is TLSMode.DANE:
            return chosen
        if chosen.mode is TLSMode.NONE:
            raise RequireTLSFailure(
                f"REQUIRETLS: the TLS policy for {destination.domain} is none "
                f"({chosen.reason}); the message must not go without authenticated TLS",
                code=550,
                enhanced="5.7.30",
                host=destination.mx_host,
            )
        if not self._mx_vouched_for(destination, chosen) and not await self._listed(destination):
            self._defer_while_unknown(destination)
            raise RequireTLSFailure(
                f"REQUIRETLS: MX host {destination.mx_host} of {destination.domain} comes "
                "from DNS records that DNSSEC did not validate, and neither DANE nor an "
                "MTA-STS policy vouches for it (RFC 8689 §4.2.1); the message must not "
                "go to a host an attacker could have named",
                code=550,
                enhanced="5.7.30",
                host=destination.mx_host,
            )
        if chosen.authenticated:
            return chosen
        return TLSRequirement(
            mode=TLSMode.VERIFY,
            source=chosen.source,
            reason=f"REQUIRETLS: certificate verified for {destination.mx_host} "
            f"(instead of {chosen.label}: {chosen.reason})",
            detail=chosen.detail,
        )

    async def _listed(self, destination: Destination) -> bool:
        """Whether a source's published policy lists the MX host (``lists_mx_host``: the
        MTA-STS source's, enforce or testing), whatever decided the connection's TLS. A
        ``tls.domains`` entry asks no source: its level stays, but the domain's policy
        still vouches for the host (RFC 8689 §4.2.1), as it does without the entry; else
        a REQUIRETLS message to a domain given a stricter level failed for good."""
        for source in self._sources:
            lists: Callable[[Destination], Awaitable[bool]] | None = getattr(
                source, "lists_mx_host", None
            )
            if lists is not None and await lists(destination):
                return True
        return False

    def _defer_while_unknown(self, destination: Destination) -> None:
        """TemporaryFailure when a source could not learn whether it vouches for the MX
        host (an MTA-STS record or policy that a DNS or HTTPS failure kept from us): the
        policy may well list the host, and a REQUIRETLS message failed for good then
        would have been delivered a minute later."""
        for source in self._sources:
            unknown: Callable[[str], str | None] | None = getattr(source, "policy_unknown", None)
            why = unknown(destination.domain) if unknown is not None else None
            if why is not None:
                raise TemporaryFailure(
                    f"REQUIRETLS: nothing vouches for MX host {destination.mx_host} of "
                    f"{destination.domain} yet: {why} (RFC 8689 §4.2.1); tried again later",
                    enhanced="4.4.3",  # RFC 3463: directory server failure
                    host=destination.mx_host,
                )

    def _mx_vouched_for(self, destination: Destination, chosen: TLSRequirement) -> bool:
        """Whether the MX host is known to be the domain's, not only what a DNS answer
        said (RFC 8689 §4.2.1): DNSSEC-validated MX records from a resolver trusted to
        validate, the domain's MTA-STS policy listing it, or the relay."""
        if chosen.source is PolicySource.RELAY:
            return True
        if chosen.source is PolicySource.MTA_STS and chosen.mx_listed:
            return True
        return self._config.dns.dnssec and destination.mx_secure

    async def _decide(self, destination: Destination) -> TLSRequirement:
        if self._relay is not None:
            return self._relay
        tls_optional = destination.tls_optional and not destination.require_tls
        # TLS-Required: No ignores the recipient's DANE records under the level "dane"
        # (an entry of the table, or the global one) as it does when DANE is a source;
        # "dane-only" is the operator's own demand, like "verify".
        entry = self._table.match(destination.domain)
        if entry is not None:
            pattern, level = entry
            chosen = self._level(level, PolicySource.TABLE, f"tls.domains: {pattern} = {level}")
            if level is TLSPolicy.DANE and tls_optional:
                return TLSRequirement(
                    mode=chosen.mode,
                    source=PolicySource.TLS_REQUIRED_NO,
                    reason=f"TLS-Required: No (RFC 8689 §4): DANE not applied ({chosen.reason})",
                )
            if level in (TLSPolicy.DANE, TLSPolicy.DANE_ONLY):
                chosen = await self._dane_level(destination, chosen, level)
            return chosen
        default = self._default
        level = self._config.tls
        if level is TLSPolicy.DANE_ONLY or (level is TLSPolicy.DANE and not tls_optional):
            default = await self._dane_level(destination, default, level)
            if default.mode is TLSMode.DANE:
                return default
        if tls_optional:
            if self._sources:
                return TLSRequirement(
                    mode=default.mode,
                    source=PolicySource.TLS_REQUIRED_NO,
                    reason="TLS-Required: No (RFC 8689 §4): DANE and MTA-STS not applied",
                )
            return default
        for source in self._sources:
            answer = await source.requirement(destination, default)
            if answer is None:
                continue
            if answer.source is not PolicySource.DANE or answer.mode is TLSMode.DANE:
                return answer
            # DANE without usable records: TLS is required but nothing authenticated, so
            # no DANE validation fails that MTA-STS could override (RFC 8461 §2). The
            # sources after it still apply, with this as the floor they are told of; a
            # default that authenticates the server already (tls = "verify") is above that
            # floor, and stays.
            if not default.authenticated:
                default = answer
        return default

    async def _dane_level(
        self, destination: Destination, chosen: TLSRequirement, level: TLSPolicy
    ) -> TLSRequirement:
        answer = None
        if self._dane is not None:
            answer = await self._dane.requirement(destination, chosen)
        if level is not TLSPolicy.DANE_ONLY:
            return chosen if answer is None else answer
        if answer is not None and answer.mode is TLSMode.DANE:
            return answer
        # Validated TLSA records that are all unusable make DANE ask for unauthenticated
        # TLS (RFC 7672 §2.2), which dane-only does not take, as Postfix's does not.
        what = (
            "has TLSA records but none usable for SMTP"
            if answer is not None
            else "has no usable DNSSEC-validated TLSA records"
        )
        refused = DaneRequired(
            f"TLS policy dane-only ({chosen.reason}): {destination.mx_host} {what}",
            unusable=answer is not None,
            host=destination.mx_host,
        )
        # No connection says why the host was not used: DANE's failure hook (TLS reports)
        # is told, as of a failed TLSA lookup (RFC 8460 §4.3.2.1: "dane-required").
        told: Callable[[Destination, TemporaryFailure], None] | None = getattr(
            self._dane, "on_failure", None
        )
        if told is not None:
            told(destination, refused)
        raise refused

    def fallback(self, need: TLSRequirement, host: str, why: str) -> TLSRequirement:
        """What to connect to ``host`` again with when a connection under ``need``, which
        has a :attr:`~mailstrom.tls.requirement.TLSRequirement.fallback` (MTA-STS testing),
        failed TLS (``why``): its fallback mode; when that is opportunistic and the host's
        TLS handshake failed recently, plaintext at once, as for any opportunistic answer
        (the handshake is not tried again, nor its timeout waited for)."""
        mode = need.fallback if need.fallback is not None else need.mode
        reason = f"{need.reason}; enforce would fail: {why}"
        if mode is TLSMode.OPPORTUNISTIC and self.broken.broken(host):
            mode = TLSMode.NONE
            reason = f"TLS with {host} failed recently: plaintext ({reason})"
        return replace(
            need, mode=mode, fallback=None, reason=reason, tls_failed=mode is TLSMode.NONE
        )

    def _remembered(self, destination: Destination, chosen: TLSRequirement) -> TLSRequirement:
        if chosen.mode is TLSMode.OPPORTUNISTIC and self.broken.broken(destination.mx_host):
            return TLSRequirement(
                mode=TLSMode.NONE,
                source=PolicySource.REMEMBERED,
                reason=f"TLS with {destination.mx_host} failed recently: plaintext "
                f"({chosen.reason})",
                # Which decision this replaces: TLS reports count the session under the
                # policy that was applied to it, which only this requirement knows.
                detail=chosen.source.value,
                tls_failed=True,
            )
        return chosen
