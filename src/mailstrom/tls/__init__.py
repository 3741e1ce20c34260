"""Outbound TLS policy: what each connection to each MX host requires.

* :mod:`mailstrom.tls.requirement` — :class:`TLSRequirement`, the per-connection decision
  (mode, source, reason, TLSA records).
* :mod:`mailstrom.tls.table` — the per-domain table (``Config.tls_domains``).
* :mod:`mailstrom.tls.decide` — :class:`~mailstrom.tls.decide.TLSDecider`, which the
  delivery engine asks before it opens a connection, and where other policy sources
  (MTA-STS) plug in.

This package's ``__init__`` imports only modules that do not import
:mod:`mailstrom.config` (which itself uses the levels and the table).
"""

from mailstrom.tls.levels import TLSPolicy
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement
from mailstrom.tls.table import PolicyTable

__all__ = [
    "PolicySource",
    "PolicyTable",
    "TLSARecord",
    "TLSMode",
    "TLSPolicy",
    "TLSRequirement",
]
