"""Does mail to the big mailbox providers go out over TLS?

Gmail's and Yahoo's sender requirements (February 2024) ask every sender to "use a TLS
connection for transmitting email", and bulk senders are held to them. Whether this
machine does is its own configuration's answer, not DNS's: the TLS level of the
provider's domain (``tls.domains``, the operator's word for it, else the global ``tls``).
``none`` sends in plaintext; every other level uses TLS when the receiver offers it,
which these receivers always do. Under a global ``none`` with MTA-STS on, a provider's
enforce policy would still ask for TLS: that is the provider's to publish, and not
judged here (no flag is raised for it).
"""

from __future__ import annotations

from mailstrom.doctor.report import Check, Status, listed
from mailstrom.tls.levels import TLSPolicy
from mailstrom.tls.table import PolicyTable

PROVIDERS = ("gmail.com", "yahoo.com")
"""Domains of the receivers whose sender requirements ask for TLS (Google's and Yahoo's),
as the table would match them (a ``*.com`` entry covers both)."""


def check_tls(
    *, tls: TLSPolicy, tls_domains: PolicyTable, mta_sts: bool, bulk: bool
) -> Check | None:
    """The ``tls`` check: None when mail to every one of :data:`PROVIDERS` may go over
    TLS; otherwise which of them get plaintext, and the setting that says so."""
    entries: dict[str, list[str]] = {}  # the tls.domains pattern → providers it sends plain
    plain_by_default: list[str] = []
    for domain in PROVIDERS:
        entry = tls_domains.match(domain)
        if entry is not None:
            if entry[1] is TLSPolicy.NONE:
                entries.setdefault(entry[0], []).append(domain)
        elif tls is TLSPolicy.NONE and not mta_sts:
            plain_by_default.append(domain)
    plain = [domain for names in entries.values() for domain in names] + plain_by_default
    if not plain:
        return None
    # An entry for the provider itself goes; a wildcard's other domains keep theirs.
    fixes = [
        f'remove tls.domains entry "{pattern}" = "none"'
        if pattern in names
        else "add " + ", ".join(f'tls.domains "{name}" = "opportunistic"' for name in names)
        for pattern, names in entries.items()
    ]
    if plain_by_default:
        fixes.append('set tls = "opportunistic" (the default) or stricter (MAILSTROM_TLS)')
    asks = "require TLS of bulk senders" if bulk else "ask every sender for TLS"
    return Check(
        name="tls",
        subject=", ".join(plain),
        status=Status.FAIL if bulk else Status.WARN,
        summary=f"mail to {listed(plain)} goes out without TLS (tls level none): Gmail "
        f"and Yahoo {asks}",
        fix="; ".join(fixes),
    )
