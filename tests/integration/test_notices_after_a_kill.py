"""A worker process killed between the write that records a result owing a notice and
the notice's queueing: the next worker queues it, once.

The killed worker is a real ``mailstrom worker`` process, SIGKILLed just after its store
committed the record (``tests.support.killed_after_record``); the next is a worker in
this process on the same store. Both deliver to one aiosmtpd receiver through the
loopback DNS server, which gets the notice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailstrom import DSN, Email, Notify, RecipientState
from mailstrom.bounces import parse_report
from mailstrom.message import prepare
from mailstrom.runtime.worker import Worker
from mailstrom.stores import open_store
from mailstrom.stores.base import Store
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory
from tests.support.delivery import loopback_config
from tests.support.fleet import fleet_env
from tests.support.killed_after_record import ADDRESS_VARIABLE

ROOT = Path(__file__).parents[2]
SENDER = "app@sender.test"


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> ReceivingServer:
    server = smtp_server(starttls=False)
    dns_server.a("mx.test", server.host)
    for domain in ("example.org", "sender.test"):
        dns_server.mx(domain, [(10, "mx.test")])
    server.rcpt_replies["busy@example.org"] = "451 4.2.1 Mailbox busy"
    return server


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()


def _killed_after_recording(
    address: str, url: str, mx: ReceivingServer, dns: LoopbackDNS, home: Path
) -> None:
    """Run a ``mailstrom worker`` process until it is killed just after recording
    ``address``'s result."""
    env = fleet_env(
        url,
        smtp_port=mx.port,
        dns=dns,
        home=home,
        bounce_notices="1",
        delay_warning="1h",
        poll_interval="0.5",
    )
    env[ADDRESS_VARIABLE] = address
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{ROOT}"
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.killed_after_record", "worker", "--no-live"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            _, log = worker.communicate(timeout=60)
        finally:
            worker.kill()
    assert worker.returncode == -signal.SIGKILL, log


async def _next_worker_queues(store: Store, mx: ReceivingServer, dns: LoopbackDNS) -> Any:
    """Run a worker on ``store`` until the receiver got one more message (the notice);
    the message."""
    before = len(mx.messages)
    config = loopback_config(
        dns, mx.port, bounce_notices=True, delay_warning=timedelta(hours=1), poll_interval=0.2
    )
    worker = Worker(config, store)
    run = asyncio.create_task(worker.run())
    try:
        *_, notice = await mx.await_messages(before + 1, within=20)
    finally:
        worker.request_stop(drain_timeout=5)
        await asyncio.wait_for(run, 30)
    return notice


def _queue(store: Store, email: Email, *, now: datetime) -> str:
    # As send_email queues it: prepare() leaves the DSN request to its caller.
    prepared = dataclasses.replace(prepare(email, envelope_from=SENDER), dsn=email.dsn)
    return store.enqueue(prepared, now=now)


@pytest.mark.parametrize("kind", ["delayed", "relayed"])
async def test_a_notice_owed_when_the_worker_was_killed_is_queued_by_the_next(
    kind: str,
    store: Store,
    store_url: str,
    mx: ReceivingServer,
    dns_server: LoopbackDNS,
    tmp_path: Path,
) -> None:
    """Delay warnings and "relayed" notices were made from the write's results in the
    worker's memory and queued after it: a worker killed between the two lost them, and
    the sender never heard. Now the write leaves them owed in the store, as a bounce's,
    and the next worker queues each once."""
    if kind == "delayed":
        # Queued two hours ago (while no worker ran): the first deferral crosses the
        # one-hour delay_warning.
        address = "busy@example.org"
        email = Email(from_=SENDER, to=[address], subject="Quarterly", text="Hello")
        mid = _queue(store, email, now=datetime.now(UTC) - timedelta(hours=2))
        state = RecipientState.DEFERRED
    else:
        # NOTIFY=SUCCESS to a server without DSN (aiosmtpd): the sender is owed a notice.
        address = "ann@example.org"
        dsn = DSN(notify=(Notify.SUCCESS,))
        email = Email(from_=SENDER, to=[address], subject="Quarterly", text="Hello", dsn=dsn)
        mid = _queue(store, email, now=datetime.now(UTC))
        state = RecipientState.DELIVERED

    await asyncio.to_thread(_killed_after_recording, address, store_url, mx, dns_server, tmp_path)
    [recipient] = store.status(mid).recipients
    assert (recipient.state, recipient.attempts) == (state, 1)  # recorded before the kill
    assert len(store.recent()) == 1  # and no notice queued

    notice = await _next_worker_queues(store, mx, dns_server)
    assert notice.rcpt_tos == (SENDER,)
    report = parse_report(notice.content)
    assert report is not None
    [reported] = report.recipients
    assert (reported.final_recipient, reported.action) == (address, kind)
    # Once: the next worker finds nothing more owed.
    assert store.owed_notices() == []
    assert len(store.recent()) == 2
