"""``mailstrom worker --metrics`` while it drains: from the stop signal on, /healthz says
the worker is going away (503 ``"draining"``), so that a load balancer or an orchestrator
takes it out of rotation rather than count on it until it is gone."""

from __future__ import annotations

import signal

from tests.cli.conftest import MailEnv
from tests.cli.test_delivery import send
from tests.cli.test_worker_metrics_wait import WorkerProcess
from tests.support.waiting import eventually


def test_healthz_is_503_draining_from_the_stop_signal_until_the_worker_ends(
    mail_env: MailEnv,
) -> None:
    """It answered 200 "ok" through the whole drain (up to --drain-timeout, 30 s by
    default), as if the worker would go on delivering."""
    cli, mx = mail_env.cli, mail_env.mx
    cli.env["MAILSTROM_TIMEOUTS_COMMAND"] = "60"  # the stalled delivery outlasts the test
    mx.stall_on = "mail"  # a delivery in flight, which the drain waits for
    send(cli, "--text", "Hi")
    worker = WorkerProcess(cli, "sqlite:///queue.db", "--drain-timeout", "60")
    try:
        assert eventually(lambda: "MAIL" in mx.commands, within=30), mx.commands
        code, body = worker.healthz()
        assert (code, body["status"]) == (200, "ok"), body
        assert body["worker"]["in_flight"] == 1
        assert worker.metrics()["mailstrom_worker_draining"] == 0

        worker.proc.send_signal(signal.SIGTERM)  # the first: drain
        worker.stderr.wait_for('"stopping"')
        # The line is logged just before the stop is asked for, in the same callback.
        assert eventually(lambda: worker.healthz()[0] == 503, within=5), worker.healthz()
        code, body = worker.healthz()
        assert body["status"] == "draining", body
        assert body["worker"]["running"] is True and body["worker"]["draining"] is True
        assert body["worker"]["in_flight"] == 1  # still finishing what it holds
        assert body["store"] == {"ok": True}
        samples = worker.metrics()  # up until it ends, and saying it drains meanwhile
        assert (samples["mailstrom_worker_up"], samples["mailstrom_worker_draining"]) == (1, 1)
    finally:
        code, err = worker.stopped(timeout=30)  # the second signal: stop at once
    assert code == 0, err
    assert err.count('"stopping"') == 1, err
