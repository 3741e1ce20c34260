"""What the doctor finds: one :class:`Check` per question, each with a status and its fix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

QUOTED = 60
"""Characters of a published record a summary quotes at most: a record is whatever its
publisher wrote, up to 64 KiB, and a summary is one line."""


def piece(text: str, limit: int = QUOTED) -> str:
    """``text`` from a record for a summary: as it is when short, else cut in the middle,
    saying how much was left out.

    >>> piece("p=bogus"), piece("x" * 100, 10)
    ('p=bogus', 'xxxxx…(90 more)…xxxxx')
    """
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…({len(text) - 2 * half} more)…{text[-half:]}"


def listed(items: Sequence[str], most: int = 5, sep: str = ", ") -> str:
    """The first ``most`` of ``items`` joined, and how many more there are: an RRset
    holds as many records as its publisher likes.

    >>> listed(["a", "b", "c"], 2)
    'a, b and 1 more'
    """
    more = len(items) - most
    return sep.join(items[:most]) + (f" and {more} more" if more > 0 else "")


MOST_SHOWN = 10
"""Records of one answer a check's details show at most: an RRset holds as many as its
publisher likes (thousands of short TXT records fit in 64 KiB), and the text report
prints each detail under the fix."""


def capped(lines: Sequence[str], most: int = MOST_SHOWN) -> tuple[str, ...]:
    """The first ``most`` of ``lines`` (records, one a line) for a check's details, and
    a line counting the others.

    >>> capped(["TXT a: 1", "TXT a: 2", "TXT a: 3"], 2)
    ('TXT a: 1', 'TXT a: 2', '… and 1 more')
    """
    more = len(lines) - most
    return tuple(lines[:most]) + ((f"… and {more} more",) if more > 0 else ())


class Status(StrEnum):
    """The verdict of one check, from best to worst for the exit code's purposes."""

    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    """Receivers will be satisfied on this point."""
    SKIP = "skip"
    """Not applicable here (e.g. the port 25 probe in relay mode)."""
    WARN = "warn"
    """Mail flows, but some receivers will score it down or a rule is only half met."""
    UNKNOWN = "unknown"
    """Could not be decided now (a DNS server failed or timed out): try again later."""
    FAIL = "fail"
    """Receivers such as Gmail will reject or junk the mail until this is fixed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One check's outcome.

    ``fix`` is what to do, as exactly as the doctor can say it: the DNS record to
    publish (name, type and value), the setting to change, or whom to ask.
    """

    name: str
    """Which check: ``outgoing-ip``, ``port-25``, ``ptr``, ``helo``, ``spf``,
    ``spf-helo``, ``mx``, ``dkim``, ``dmarc``, ``dnsbl``, ``tls``."""
    subject: str
    """What was looked at: an address, a DNS name, a blocklist zone."""
    status: Status
    summary: str
    """One line: what was found."""
    details: tuple[str, ...] = ()
    """Further lines: records seen, the evaluation's steps."""
    fix: str | None = None


@dataclass(slots=True, kw_only=True)
class DoctorReport:
    """Everything the doctor found about one sending domain."""

    domain: str
    helo_name: str
    ip: str | None = None
    """The outgoing address the IP-based checks used (None: none could be found); the
    first of :attr:`ips`."""
    ips: tuple[str, ...] = ()
    """Every outgoing address the IP-based checks judged: on a host that sends over IPv4
    and IPv6 (no ``source_address``, no ``--ip``), one of each, in the order found."""
    relay: str | None = None
    checks: list[Check] = field(default_factory=list)

    def add(self, checks: Check | Sequence[Check]) -> None:
        self.checks.extend([checks] if isinstance(checks, Check) else checks)

    def find(self, name: str) -> list[Check]:
        return [c for c in self.checks if c.name == name]

    @property
    def worst(self) -> Status:
        """The worst status of any check (PASS when there are none)."""
        order = list(Status)
        return max((c.status for c in self.checks), key=order.index, default=Status.PASS)
