"""``mailstrom worker --once`` whose clock is too far from the PostgreSQL server's: it
leases nothing, does not hang, and exits 75 (try again later) saying why. The command runs
in a wrapper that gives its worker a clock off by $TEST_CLOCK_OFFSET seconds
(tests/support/skew.py); the worker's reaction itself: tests/integration/
test_postgres_clock_skew.py."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom.status import RecipientState
from mailstrom.stores.postgres import PostgresStore
from tests.cli.conftest import CLI, MailEnv
from tests.contract.support import message
from tests.support.skew import OFFSET_VARIABLE

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).parents[2]


def skewed(cli: CLI, offset: float) -> CLI:
    env = dict(cli.env)
    env[OFFSET_VARIABLE] = str(offset)
    env["MAILSTROM_LEASE_FOR"] = "30s"  # a third of it, 10 s, is the limit
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return dataclasses.replace(cli, env=env, module="tests.support.skew")


def test_worker_once_with_a_clock_too_far_off_exits_75_and_leases_nothing(
    postgres_url: str, mail_env: MailEnv
) -> None:
    with PostgresStore(postgres_url) as store:
        mid = store.enqueue(message(), now=datetime.now(UTC))
    result = skewed(mail_env.cli, -45.0)(
        "worker", "--once", "--no-live", "--store", postgres_url, timeout=30
    )
    assert result.code == 75, result.err
    [error] = [line for line in result.err_lines if "level=error" in line]
    assert "this worker's clock is 45.0 s behind PostgreSQL server" in error
    last = result.err_lines[-1]
    assert last.startswith("mailstrom: --once took no new work: clock: 45.0 s behind ")
    assert last.endswith("; due mail stays queued")
    with PostgresStore(postgres_url) as store:
        recipients = store.status(mid).recipients
    assert {(r.state, r.attempts) for r in recipients} == {(RecipientState.QUEUED, 0)}
    assert mail_env.mx.received == []


def test_worker_once_in_step_exits_0(postgres_url: str, mail_env: MailEnv) -> None:
    """The same wrapper with the clock right: the exit 75 is the skew's."""
    with PostgresStore(postgres_url) as store:
        store.enqueue(message(), now=datetime.now(UTC))
    result = skewed(mail_env.cli, 0.0)(
        "worker", "--once", "--no-live", "--store", postgres_url, timeout=30
    )
    assert result.code == 0, result.err
    assert "clock" not in result.err
