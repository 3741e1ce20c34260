"""What a route lookup gives (:class:`Lookup`: a route, or a :class:`Refusal`), how
long that may be remembered (:data:`NEGATIVE_TTL`, :data:`MAX_TTL`, :data:`FOREVER`),
and the wording of the failures a lookup ends in (RFC 3463 codes).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailstrom.errors import PermanentFailure, TemporaryFailure
from mailstrom.routing.policy import NEVER_A_SERVER, RoutePolicy
from mailstrom.routing.route import Route

NEGATIVE_TTL = 60.0
"""Seconds a nonexistent domain, a null MX or a domain without MX records is remembered
at most; less when the zone says so (:func:`~mailstrom.routing.resolution.negative_ttl`).
Short, so a domain whose owner fixes its DNS gets mail again soon; long enough that a
burst of mail to one bad domain costs one lookup. An incomplete route (a query of it
failed, :class:`Lookup`) is remembered no longer either."""

MAX_TTL = 86_400.0
"""Seconds any route found through DNS is remembered at most, whatever TTL its answers
carry. A hostile or hijacked zone can publish a TTL of 2**31-1 s (68 years, RFC 2181
§8); believed as it is, a route to the hijacker's hosts would outlive the hijack until
the worker restarts. One day is what recursive resolvers cap their caches to (Unbound's
``cache-max-ttl``), and one MX lookup a day per domain costs nothing."""

FOREVER = float("inf")
"""The TTL of what no DNS answer can change (address literals)."""


_NO_ROUTE = "4.4.4"  # RFC 3463: unable to route
_REFUSED_TARGET = "5.4.4"  # RFC 3463: unable to route (see _refused below)
_NAMED_REFUSALS = 3  # refused addresses named in a failure's text


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A permanent routing failure, kept as data so each caller raises a fresh error."""

    text: str
    enhanced: str
    code: int | None = None
    host: str | None = None

    def error(self) -> PermanentFailure:
        return PermanentFailure(self.text, code=self.code, enhanced=self.enhanced, host=self.host)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """What one lookup found: a route or a refusal, cacheable for ``ttl`` seconds (0:
    not at all).

    A route is incomplete when a query of it failed for now (a host's AAAA query timed
    out while its A query answered, a host's SERVFAIL, the lookup's time spent before the
    last hosts): it holds what was found and is cached for :data:`NEGATIVE_TTL` at most,
    after which every query is asked again. Not cached at all, every message to the
    domain waited out the failed query again (``dns.timeout``, 10 s by default); cached
    longer, a host reachable only over the family that failed (an IPv6-only MX host)
    would be left out of the route for that long.

    The route's hosts come in preference order and may hold more addresses than the
    policy's ``mx_address_limit``: shuffling equal preferences and cutting to the limit is
    left to the :class:`~mailstrom.routing.Router`, on every use of the route.
    """

    route: Route | None = None
    refusal: Refusal | None = None
    ttl: float = 0.0

    def unwrap(self) -> Route:
        """The route, or raise the refusal."""
        if self.refusal is not None:
            raise self.refusal.error()
        assert self.route is not None
        return self.route


def _refused(domain: str, refused: list[tuple[str | None, str, str]]) -> Refusal:
    """Every address found for ``domain`` is refused by the policy: (MX host or None,
    address, kind).

    A permanent failure, as the mature MTAs make it: Exim's dnslookup router *declines*
    when ``ignore_target_hosts`` discards every address ("Unrouteable address", bounced),
    and Postfix bounces mail whose best MX is itself with 5.4.6 "loops back to myself".
    We use 5.4.4 "unable to route" (RFC 3463) rather than 5.4.6 "routing loop detected":
    nothing shows that the target is this very mail system, only that it is no mail
    server elsewhere. Retrying could only help a domain that repoints its MX, and the
    refusal is cached no longer than :data:`NEGATIVE_TTL`.
    """
    return Refusal(
        text=f"refusing to deliver to {domain}: every address it routes to is refused: "
        + _refused_why(refused),
        enhanced=_REFUSED_TARGET,
        host=refused[0][0] or domain,
    )


def _refused_why(refused: list[tuple[str | None, str, str]]) -> str:
    """The first refused addresses (:func:`_named`) and why they are."""
    # Only a kind that allow_loopback lifts makes it worth naming: multicast and reserved
    # targets are refused with it on too, and "allow_loopback is off" was then false, or
    # sent the operator to a setting that would not have helped.
    liftable = any(kind not in NEVER_A_SERVER for _, _, kind in refused)
    why = "allow_loopback is off" if liftable else "no mail server has such an address"
    return f"{_named(refused)} ({why})"


def _no_host_names(
    domain: str, literals: list[str], refused: list[tuple[str | None, str, str]]
) -> Refusal:
    """``domain``'s MX hosts are address literals
    (:func:`~mailstrom.routing.answers.literal_exchange`), but for those whose addresses
    are all refused: a permanent failure, as Postfix makes it (5.4.4), remembered no
    longer than :data:`NEGATIVE_TTL` like the refusal of :func:`_refused`."""
    named = ", ".join(literals[:_NAMED_REFUSALS])
    more = f" and {len(literals) - _NAMED_REFUSALS} more" if len(literals) > _NAMED_REFUSALS else ""
    others = f"; the other MX hosts' addresses are refused: {_named(refused)}" if refused else ""
    what = (
        "is an address literal, not a host name"
        if len(literals) == 1
        else "are address literals, not host names"
    )
    return Refusal(
        text=f"no MX host of {domain} can be used: {named}{more} {what} (RFC 5321 §5.1){others}",
        enhanced=_REFUSED_TARGET,
        host=literals[0],
    )


def _named(refused: list[tuple[str | None, str, str]]) -> str:
    """The first refused addresses, each with why and its MX host, and how many more."""
    named = ", ".join(
        f"{address} ({kind}{f', MX {host}' if host else ''})"
        for host, address, kind in refused[:_NAMED_REFUSALS]
    )
    more = f" and {len(refused) - _NAMED_REFUSALS} more" if len(refused) > _NAMED_REFUSALS else ""
    return named + more


def _other_version(text: str, policy: RoutePolicy) -> TemporaryFailure:
    """The failure of a route whose addresses are all of the IP version that
    ``source_address`` cannot reach (``text``, the words before the version it can):
    temporary (4.4.4), as for hosts without addresses, since the setting, not the domain,
    is in the way."""
    return TemporaryFailure(
        f"{text} IPv{policy.ip_version} address (the IP version of source_address)",
        enhanced=_NO_ROUTE,
    )
