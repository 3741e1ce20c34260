"""A ``mailstrom worker`` killed mid-delivery (SIGKILL: the OOM killer, ``kill -9``): the
next worker delivers what it held within seconds (SQLite) or once the dead one went unseen
for the store URL's ``dead_after`` (PostgreSQL), not once its lease expires."""

from __future__ import annotations

import signal
import time

import pytest

from tests.cli.conftest import MailEnv, ended
from tests.cli.test_delivery import send


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_what_a_killed_worker_leased_is_delivered_by_the_next_one(
    mail_env: MailEnv, store: str, request: pytest.FixtureRequest
) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    if store == "postgres":
        # Two seconds unseen makes a worker dead here (two minutes by default).
        url = request.getfixturevalue("postgres_url")
        cli.env["MAILSTROM_STORE"] = f"{url}?dead_after=2s"
    cli.env.update(
        # Only a lease given back explains a delivery within the test's waits.
        MAILSTROM_LEASE_FOR="10m",
        # The first worker waits for the reply to the dot far longer than the test does.
        MAILSTROM_TIMEOUTS_DATA_END="120",
    )
    mx.stall_on = "dot"  # takes the content, then never answers
    message_id = send(cli, "--text", "Hi Bob")
    first = cli.popen("worker", "--no-live")
    try:
        mx.wait_for_received(1, timeout=30)  # in DATA: the first worker holds the lease
        mx.stall_on = None  # the next attempt is answered
    finally:
        ended(first, signal.SIGKILL)

    second = cli.popen("worker", "--no-live")
    started = time.monotonic()
    try:
        [delivered] = mx.wait_for_messages(1, timeout=20)  # far below lease_for
    finally:
        _, err = ended(second)
    if store == "postgres":
        # Not before the second worker had looked, unbroken, for dead_after.
        assert time.monotonic() - started >= 2.0
    assert delivered.rcpt_tos == ("bob@example.test",)
    assert "gave back 1 recipients leased by lease holder" in err, err
    status = cli.ok("status", "--json", message_id).json()
    assert status["state"] == "delivered"
    assert len(mx.received) == 2  # the killed attempt, and the one that delivered
