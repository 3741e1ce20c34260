"""Reply and exception classification."""

from __future__ import annotations

import pytest

from mailstrom.errors import (
    MailstromError,
    PermanentFailure,
    SMTPConnectError,
    SMTPTimeout,
    TemporaryFailure,
)
from mailstrom.policy import Stage, classify, classify_exception, is_positive
from mailstrom.status import AttemptOutcome, SMTPReply

DELIVERED, TEMPORARY, PERMANENT = (
    AttemptOutcome.DELIVERED,
    AttemptOutcome.TEMPORARY,
    AttemptOutcome.PERMANENT,
)


def reply(code: int, enhanced: str | None = None) -> SMTPReply:
    return SMTPReply(code=code, enhanced=enhanced, text="text")


@pytest.mark.parametrize(
    ("code", "enhanced", "stage", "expected"),
    [
        (250, "2.0.0", Stage.DATA_END, DELIVERED),
        (251, None, Stage.DATA_END, DELIVERED),
        (421, "4.3.2", Stage.GREETING, TEMPORARY),
        (554, None, Stage.GREETING, PERMANENT),
        (451, "4.3.0", Stage.MAIL, TEMPORARY),
        (550, "5.7.1", Stage.MAIL, PERMANENT),
        (450, "4.2.1", Stage.RCPT, TEMPORARY),
        (550, "5.1.1", Stage.RCPT, PERMANENT),
        (553, "5.1.3", Stage.RCPT, PERMANENT),
        # RFC 5321 §4.5.3.1.10: "too many recipients" is temporary at RCPT only.
        (552, "5.5.3", Stage.RCPT, TEMPORARY),
        (552, "5.3.4", Stage.DATA_END, PERMANENT),
        (552, "5.3.4", Stage.MAIL, PERMANENT),
        (554, "5.6.0", Stage.DATA, PERMANENT),
        (451, None, Stage.DATA_END, TEMPORARY),
        (554, "5.7.1", Stage.DATA_END, PERMANENT),
        # The basic reply code wins over an enhanced code of another class.
        (550, "4.2.2", Stage.RCPT, PERMANENT),
        (451, "5.7.1", Stage.RCPT, TEMPORARY),
        (250, "5.0.0", Stage.DATA_END, DELIVERED),
        # Protocol violations: retry rather than lose mail.
        (354, None, Stage.RCPT, TEMPORARY),
        (354, None, Stage.DATA_END, TEMPORARY),
        (250, None, Stage.DATA, TEMPORARY),
        (199, None, Stage.MAIL, TEMPORARY),
        (600, None, Stage.RCPT, TEMPORARY),
        (99, None, Stage.RCPT, TEMPORARY),
    ],
)
def test_classify(code: int, enhanced: str | None, stage: Stage, expected: AttemptOutcome) -> None:
    assert classify(reply(code, enhanced), stage=stage) is expected


@pytest.mark.parametrize(
    ("code", "stage"),
    [(220, Stage.GREETING), (250, Stage.EHLO), (250, Stage.MAIL), (251, Stage.RCPT),
     (354, Stage.DATA), (334, Stage.AUTH), (235, Stage.AUTH)],
)  # fmt: skip
def test_positive_replies_end_nothing_before_data_end(code: int, stage: Stage) -> None:
    assert is_positive(reply(code), stage=stage)
    with pytest.raises(ValueError, match="positive"):
        classify(reply(code), stage=stage)


@pytest.mark.parametrize(
    ("code", "stage", "positive"),
    [
        (250, Stage.DATA_END, True),
        (354, Stage.DATA, True),
        (250, Stage.DATA, False),
        (354, Stage.RCPT, False),
        (334, Stage.MAIL, False),
        (450, Stage.RCPT, False),
        (550, Stage.DATA_END, False),
    ],
)
def test_is_positive(code: int, stage: Stage, positive: bool) -> None:
    assert is_positive(reply(code), stage=stage) is positive


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (PermanentFailure("null MX", code=556, enhanced="5.1.10"), PERMANENT),
        (TemporaryFailure("servfail"), TEMPORARY),
        (SMTPTimeout("slow"), TEMPORARY),
        (SMTPConnectError("refused"), TEMPORARY),
        (ConnectionRefusedError(), TEMPORARY),
        (OSError("network unreachable"), TEMPORARY),
        (TimeoutError(), TEMPORARY),
        (MailstromError("other"), TEMPORARY),
        (RuntimeError("bug"), TEMPORARY),
    ],
)
def test_classify_exception(exc: BaseException, expected: AttemptOutcome) -> None:
    assert classify_exception(exc) is expected


def test_stage_values_are_stable_strings() -> None:
    assert Stage.DATA_END.value == "data_end"
    assert Stage("rcpt") is Stage.RCPT
