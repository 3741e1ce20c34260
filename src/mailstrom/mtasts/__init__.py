"""MTA-STS (RFC 8461): the policies recipient domains publish, fetched, cached and applied.

* :mod:`mailstrom.mtasts.policy` — parsing and validating records and policies (pure);
* :mod:`mailstrom.mtasts.fetch` — the TXT lookup and the HTTPS fetch (httpx);
* :mod:`mailstrom.mtasts.source` — the policy to apply to a domain now: the store's cache,
  refreshed when the TXT id changes or the policy ages out.
"""

from mailstrom.mtasts.policy import CachedPolicy, Mode, Policy, PolicyError, mx_matches

__all__ = ["CachedPolicy", "Mode", "Policy", "PolicyError", "mx_matches"]
