"""The summary ``mailstrom send --wait`` prints for recipients still deferred."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailstrom.cli.send import print_deferred
from mailstrom.status import MessageStatus, RecipientState, RecipientStatus


def test_a_retry_on_another_day_says_which_day(capsys: pytest.CaptureFixture[str]) -> None:
    """Was "deferred until 09:30 UTC" for a retry the next day (after a long backoff or
    a destination's pause): read as within the hour, hours before it comes."""
    retry = datetime(2026, 12, 5, 9, 30, tzinfo=UTC)
    status = MessageStatus(
        id="0" * 32,
        state=RecipientState.DEFERRED,
        envelope_from="app@client.test",
        size=100,
        created_at=datetime(2026, 12, 4, 23, 50, tzinfo=UTC),
        recipients=(
            RecipientStatus(
                address="bob@example.test", state=RecipientState.DEFERRED, next_attempt_at=retry
            ),
        ),
    )
    print_deferred(status)
    assert capsys.readouterr().out.split("\n") == [
        "",
        "bob@example.test: deferred until 2026-12-05 09:30 UTC",
        "",
    ]
