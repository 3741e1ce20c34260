"""The one message for a missing optional dependency of the test kit."""

from __future__ import annotations

EXTRA = "testing"


def missing_extra(exc: ImportError) -> ImportError:
    """An ImportError saying which extra brings the module ``exc`` could not import.

    :func:`~mailstrom.testing.capture` and the ``mailstrom_outbox`` fixture need nothing
    beyond mailstrom; the loopback servers need aiosmtpd, dnslib and trustme.
    """
    return ImportError(
        f"mailstrom's loopback DNS and SMTP servers need {exc.name or 'a module'!s}, which "
        f"is not installed: pip install 'mailstrom[{EXTRA}]'",
        name=exc.name,
    )
