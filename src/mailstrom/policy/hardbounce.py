"""Which permanent refusals put an address on the suppression list (pure).

A refusal counts when its RFC 3463 enhanced code, or its basic code, is one of the
configured codes (:attr:`~mailstrom.config.Config.suppress_on`). The default list holds the
refusals that say the address cannot take mail at all, ever: the mailbox does not exist
(``5.1.1``; Microsoft's ``5.1.10`` "recipient not found", which RFC 7505 also gives a null
MX), the domain does not exist (``5.1.2``) or accepts no mail (``556``, RFC 7504), the
mailbox is disabled (``5.2.1``). A full mailbox (``5.2.2``), a policy or content refusal
(``5.7.x``) or a rate limit says something about this message or this moment, not about
the address, and is left out.

A refusal is judged by its enhanced code, and a reply without one at its start by the
one qmail ends its text with ("550 sorry, no mailbox here by that name. (#5.1.1)"), as
:mod:`mailstrom.policy.reasons` reads it. A provider's words are read as the code they
stand for where the reply table (``reasons.toml``) gives a rule for them a ``status``:
Exchange Online's directory-based edge blocking refuses an address its organisation does
not have with ``550 5.4.1 Recipient address rejected: Access denied``, and Yahoo and AOL
with ``554 delivery error: dd This user doesn't have a yahoo.com account`` (no enhanced
code), each "the mailbox does not exist" (``5.1.1``); 5.4.1 in general, "no answer from
host" (RFC 3463), says nothing about the address and stays as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailstrom.policy.reasons import qmail_status, stands_for
from mailstrom.status import AttemptOutcome, SMTPReply

DEFAULT_SUPPRESS_ON = ("5.1.1", "5.1.2", "5.1.10", "5.2.1", "556")
"""The codes that suppress an address unless configured otherwise."""

# re.ASCII: a reply's codes are ASCII digits (smtp/replies.py), so "5.\u0661.1" (a str
# pattern's \d takes it) would be a configured code that never matches anything.
_CODE = re.compile(r"^5(?:\.\d{1,3}\.\d{1,3}|\d\d)$", re.ASCII)


def check_codes(codes: Iterable[str]) -> tuple[str, ...]:
    """``codes`` as a tuple, each a permanent enhanced code (``5.1.1``) or basic code
    (``556``) as a string; raises ValueError naming the first that is neither, or when
    ``codes`` is no collection of them (a string alone, a number, None)."""
    if isinstance(codes, str | bytes) or not isinstance(codes, Iterable):
        raise ValueError(f"expected a list of status codes like 5.1.1 or 556, got {codes!r}")
    result = []
    for code in codes:
        if not isinstance(code, str) or not _CODE.match(code.strip()):
            raise ValueError(f"expected permanent status codes like 5.1.1 or 556, got {code!r}")
        result.append(code.strip())
    return tuple(result)


def is_hard_bounce(
    outcome: AttemptOutcome,
    *,
    code: int | None,
    enhanced: str | None,
    codes: Iterable[str],
    text: str | None = None,
) -> bool:
    """Whether a refusal with this outcome, these codes and this reply ``text`` suppresses
    its address (the codes as :func:`refusal_status` reads them).

    >>> is_hard_bounce(AttemptOutcome.PERMANENT, code=550, enhanced="5.1.1",
    ...                codes=DEFAULT_SUPPRESS_ON)
    True
    >>> is_hard_bounce(AttemptOutcome.PERMANENT, code=552, enhanced="5.2.2",
    ...                codes=DEFAULT_SUPPRESS_ON)
    False
    """
    if outcome is not AttemptOutcome.PERMANENT:
        return False
    enhanced = refusal_status(code, enhanced, text)
    wanted = set(codes)
    return (enhanced is not None and enhanced in wanted) or (
        code is not None and str(code) in wanted
    )


def refusal_status(code: int | None, enhanced: str | None, text: str | None) -> str | None:
    """The enhanced code a refusal (``code``, its own ``enhanced`` code, its ``text``) is
    judged by: the one the reply table says its words stand for (Exchange Online's ``550
    5.4.1 Recipient address rejected: Access denied`` and Yahoo's ``554 ... doesn't have a
    yahoo.com account`` as ``5.1.1``), else its own, or without one qmail's "(#5.1.1)"
    ending the text.

    >>> refusal_status(550, None, "sorry, no mailbox here by that name. (#5.1.1)")
    '5.1.1'
    >>> refusal_status(550, None, "sorry, no mailbox here by that name. (#4.1.1)")
    >>> refusal_status(550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)")
    '5.1.1'
    >>> refusal_status(550, "5.4.1", "No answer from host")
    '5.4.1'
    >>> refusal_status(554, None, "delivery error: dd This user doesn't have a yahoo.com account")
    '5.1.1'
    """
    if code is not None and text:
        status = stands_for(SMTPReply(code=code, enhanced=enhanced, text=text))
        if status is not None:
            return status
        if enhanced is None:
            enhanced = qmail_status(code, text)
    return enhanced


def is_late_hard_bounce(
    status: str,
    *,
    code: int | None,
    codes: Iterable[str],
    diagnostic_status: str | None = None,
    remote_mta: bool = False,
    diagnostic: str | None = None,
) -> bool:
    """Whether a delivery status notification's ``Status`` (and the SMTP codes of its
    diagnostic, if any: ``code``, ``diagnostic_status``; the relayed reply itself,
    ``diagnostic``, read as :func:`refusal_status` reads a reply) suppresses the address:
    a permanent status among ``codes``, or ``5.0.0``, the status without detail, when the
    diagnostic gives no code of its own and the report names no ``Remote-MTA``
    (``remote_mta``).

    >>> is_late_hard_bounce("5.0.0", code=None, codes=DEFAULT_SUPPRESS_ON)
    True
    >>> is_late_hard_bounce("5.0.0", code=552, diagnostic_status="5.2.2",
    ...                     codes=DEFAULT_SUPPRESS_ON)
    False
    >>> is_late_hard_bounce("5.7.1", code=550, codes=DEFAULT_SUPPRESS_ON)
    False
    >>> is_late_hard_bounce("5.0.0", code=None, codes=DEFAULT_SUPPRESS_ON, remote_mta=True)
    False
    """
    if not status.startswith("5."):
        return False
    if status == "5.0.0":
        # Exim writes 5.0.0 for every failed address (deliver.c) and the remote reply in
        # an smtp; Diagnostic-Code: a full mailbox (552 5.2.2) or a spam refusal (550
        # 5.7.1) relayed so is judged by that reply's codes. Only a 5.0.0 without one
        # (Exim's unrouteable address, an unknown local user) suppresses as such, and
        # only when no remote host was tried: with a Remote-MTA and no reply of its own,
        # Exim gave up on a host that never answered (retries timed out), which says
        # nothing about the address.
        if code is None and diagnostic_status is None:
            return not remote_mta
        return is_hard_bounce(
            AttemptOutcome.PERMANENT,
            code=code,
            enhanced=diagnostic_status,
            codes=codes,
            text=diagnostic,
        )
    return is_hard_bounce(
        AttemptOutcome.PERMANENT, code=code, enhanced=status, codes=codes, text=diagnostic
    )
