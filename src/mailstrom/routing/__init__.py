"""Planning where mail goes: MX lookup (RFC 5321 §5.1) and recipient grouping.

* :class:`Router` resolves a domain to a :class:`Route`: its MX hosts sorted by
  preference, equal preferences shuffled, each with its addresses (IPv4 first, then IPv6,
  each family shuffled on every use);
  no MX records → the domain's own addresses (``implicit=True``); null MX, NXDOMAIN or no
  address at all → :class:`~mailstrom.errors.PermanentFailure`; SERVFAIL, timeouts and MX
  hosts without addresses → :class:`~mailstrom.errors.TemporaryFailure`.
* Every route obeys a :class:`RoutePolicy` (hardening finding #6): at most
  ``mx_address_limit`` addresses (default 5), a bounded amount of DNS work per lookup, and
  no loopback, unspecified or link-local target unless ``allow_loopback`` — a domain whose
  every address is refused fails permanently (5.4.4).
* :meth:`Router.cached` answers synchronously from the cache; :meth:`Router.route` awaits
  a lookup when needed. :meth:`Router.for_config` builds the router a
  :class:`~mailstrom.config.Config` asks for.
* :func:`group_by_domain` splits recipients into one group per destination domain.

>>> from mailstrom.config import DNSConfig
>>> router = Router(DNSConfig(nameservers=("127.0.0.1",), port=5353))
"""

from mailstrom.routing.policy import RoutePolicy
from mailstrom.routing.route import MXHost, Route, group_by_domain
from mailstrom.routing.router import Router, make_resolver

__all__ = ["MXHost", "Route", "RoutePolicy", "Router", "group_by_domain", "make_resolver"]
