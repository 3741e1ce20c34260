"""Bounces that arrive after a server accepted the mail: VERP addresses, reading delivery
status notifications (RFC 3464) and complaints (RFC 5965), and applying them to the store.

>>> from mailstrom.bounces import parse_report, apply_report, verp_address
"""

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports

if TYPE_CHECKING:
    from mailstrom.bounces.apply import BounceAction, BounceOutcome, apply_report
    from mailstrom.bounces.reports import (
        MAX_REPORT,
        Report,
        ReportedRecipient,
        ReportKind,
        parse_report,
    )
    from mailstrom.bounces.verp import is_verp_template, recipient_token, verp_address


__all__ = [
    "MAX_REPORT",
    "BounceAction",
    "BounceOutcome",
    "Report",
    "ReportKind",
    "ReportedRecipient",
    "apply_report",
    "is_verp_template",
    "parse_report",
    "recipient_token",
    "verp_address",
]

# Loaded on first use (PEP 562): importing the package costs only what is touched.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.bounces.apply": (
            "BounceAction",
            "BounceOutcome",
            "apply_report",
        ),
        "mailstrom.bounces.reports": (
            "MAX_REPORT",
            "Report",
            "ReportedRecipient",
            "ReportKind",
            "parse_report",
        ),
        "mailstrom.bounces.verp": (
            "is_verp_template",
            "recipient_token",
            "verp_address",
        ),
    },
)
