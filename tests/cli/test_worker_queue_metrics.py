"""The store's counts (``mailstrom_queue_*``, ``mailstrom_workers``) describe the whole
store, and every worker on it exported them alike: ``metrics.queue = false`` leaves them
to one exporter, so that a ``sum()`` over the workers counts the queue once."""

from __future__ import annotations

from tests.cli.conftest import MailEnv
from tests.cli.test_delivery import send
from tests.cli.test_worker_metrics_wait import WorkerProcess

STORE_FAMILIES = ("mailstrom_queue_messages", "mailstrom_queue_held_messages", "mailstrom_workers")


def test_only_the_worker_that_exports_the_store_counts_has_them(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    send(cli, "--text", "Hi")
    exporting = WorkerProcess(cli, "sqlite:///queue.db")
    cli.env["MAILSTROM_METRICS_QUEUE"] = "false"
    quiet = None
    try:
        quiet = WorkerProcess(cli, "sqlite:///queue.db")
        exporting.stderr.wait_for('"worker started"')
        quiet.stderr.wait_for('"worker started"')
        mail_env.mx.wait_for_messages(1, timeout=30)
        counted, left_out = exporting.metrics(), quiet.metrics()
        assert counted["mailstrom_queue_messages"] == 1
        assert counted["mailstrom_workers"] >= 1  # the other one may not be seen yet
        assert not [name for name in STORE_FAMILIES if name in left_out], left_out
        # The worker's own numbers are still there, to be summed over the workers.
        assert left_out["mailstrom_worker_up"] == 1
        assert "mailstrom_in_flight_recipients" in left_out
        assert sum(m.get("mailstrom_queue_messages", 0) for m in (counted, left_out)) == 1
    finally:
        for worker in (exporting, quiet):
            if worker is not None:
                code, err = worker.stopped(timeout=30)
                assert code == 0, err
