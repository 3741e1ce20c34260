"""A store's errors that quote its connection URL, password and all (a driver's message,
as libpq's quoted a URL it could not parse), shown with the password as ``***`` wherever
they go while the worker runs: its log lines, ``worker_status``, ``/healthz`` and the
store check behind it; and the dashboard's page saying the queue cannot be read."""

from __future__ import annotations

import html
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mailstrom import Config, Mailstrom
from mailstrom.errors import StoreUnreachable
from mailstrom.ops.server import HealthCheck, OpsServer
from mailstrom.readmodel.memory import MemoryReadModel
from mailstrom.runtime.worker import Worker
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.operator import Suspension
from mailstrom.web import create_app
from tests.support.ops_http import healthz
from tests.support.waiting import eventually

SECRET = "s3cret-Pa55word"
URL = f"postgresql://app:{SECRET}@db.internal/mail?sslpassword={SECRET}"
SHOWN = "postgresql://app:***@db.internal/mail?sslpassword=***"


class _QuotingStore(SQLiteStore):
    """A store whose calls fail, while told to, with an error quoting its URL: the
    worker's (``leasing``: its lease and its look for the next due) and the health
    check's read (``reading``)."""

    leasing: BaseException | None = None
    reading: BaseException | None = None

    def lease(self, *args: Any, **kwargs: Any) -> Any:
        if self.leasing is not None:
            raise self.leasing
        return super().lease(*args, **kwargs)

    def next_due(self, *, now: datetime) -> datetime | None:
        if self.leasing is not None:
            raise self.leasing
        return super().next_due(now=now)

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        if self.reading is not None:
            raise self.reading
        return super().suspensions(now=now)


@pytest.fixture
def quoting(tmp_path: Path) -> Any:
    store = _QuotingStore(tmp_path / "q.db")
    config = Config(helo_name="client.test", poll_interval=0.05)
    with Mailstrom(config, store=store, worker="thread") as ms:
        worker = ms.worker
        assert isinstance(worker, Worker)
        health = HealthCheck(
            status=lambda: ms.worker_status, responsive=worker.responsive, store=store
        )
        server = OpsServer("127.0.0.1", 0, snapshot=ms.metrics, health=health)
        server.start()
        try:
            assert healthz(server.url)[0] == 200
            yield ms, store, server
        finally:
            store.leasing = store.reading = None
            server.close()
    store.close()


def test_a_store_error_quoting_its_url_shows_no_password(
    quoting: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The opener's error was redacted, and a command's error line; once the store was
    open, the same error went as it was into the worker's "store failing" line, its
    worker_status().store_error and /healthz, both as the worker's error and as the
    health check's own."""
    ms, store, server = quoting
    caplog.set_level(logging.WARNING, logger="mailstrom")
    store.leasing = StoreUnreachable(f"connection to {URL} lost")
    assert eventually(lambda: ms.worker_status.store_error is not None, 10)
    status = ms.worker_status.store_error
    assert status is not None and SHOWN in status and SECRET not in status
    code, body = healthz(server.url)
    assert code == 503, body
    assert SHOWN in body["store"]["worker_error"]
    assert SECRET not in json.dumps(body)

    store.reading = StoreUnreachable(f"connection to {URL} lost")
    code, body = healthz(server.url)
    assert code == 503, body
    assert SHOWN in body["store"]["error"]
    assert SECRET not in json.dumps(body)
    assert "store failing" in caplog.text
    assert SECRET not in caplog.text


def test_any_error_of_the_health_check_shows_no_password(quoting: Any) -> None:
    """Not only a StoreError: what a store's driver raises that it did not translate."""
    _, store, server = quoting
    store.reading = RuntimeError(f"cannot connect to {URL}")
    code, body = healthz(server.url)
    assert code == 503, body
    assert body["store"]["error"] == f"RuntimeError: cannot connect to {SHOWN}"
    assert SECRET not in json.dumps(body)


def test_the_error_a_worker_died_of_shows_no_password(quoting: Any) -> None:
    """worker_status().error, which /healthz and the live view show, was the error as
    it was: a driver's own that escaped the store may quote its connection string."""
    ms, store, server = quoting
    store.leasing = RuntimeError(f"cannot connect to {URL}")
    assert eventually(lambda: ms.worker_status.error is not None, 10)
    assert ms.worker_status.error == f"RuntimeError: cannot connect to {SHOWN}"
    code, body = healthz(server.url)
    assert code == 503, body
    assert SECRET not in json.dumps(body)


class _QuotingReadModel(MemoryReadModel):
    def overview(self, *, now: datetime, top: int = 10) -> Any:
        raise StoreUnreachable(f"PostgreSQL store: overview failed: lost {URL}")


def test_the_dashboard_shows_no_store_password(caplog: pytest.LogCaptureFixture) -> None:
    """Its 503 page said "The queue cannot be read right now: " and the error as it was,
    and logged it so."""
    store = MemoryStore()
    app = create_app(store, read_model=_QuotingReadModel(store))
    with (
        caplog.at_level(logging.WARNING, logger="mailstrom.web"),
        TestClient(app, base_url="http://127.0.0.1:8025") as client,
    ):
        page = client.get("/")
    assert page.status_code == 503, page.text
    assert SECRET not in page.text
    assert html.escape(SHOWN) in page.text
    assert "overview failed" in caplog.text
    assert SECRET not in caplog.text


def test_a_store_error_in_an_application_s_own_log_shows_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a caller of the facade gets: its text, its repr, and its traceback as the
    application's own logging formats it."""
    error = StoreUnreachable(f"connection lost: {URL}")
    assert str(error) == f"connection lost: {SHOWN}"
    assert repr(error) == f"StoreUnreachable('connection lost: {SHOWN}')"
    log = logging.getLogger("app")
    with caplog.at_level(logging.ERROR, logger="app"):
        try:
            raise error
        except StoreUnreachable as exc:
            log.exception("sending failed: %r", exc)
    assert SHOWN in caplog.text
    assert SECRET not in caplog.text


def test_a_store_error_s_repr_hides_a_password_quoted_beside_both_quote_marks() -> None:
    """repr() escapes a text that holds both ' and ": redacted after that, a libpq
    ``password='...'`` was no longer recognised and showed."""
    error = StoreUnreachable("""host "db" conninfo password='sec ret' dbname=x""")
    assert "sec ret" not in str(error)
    assert "sec ret" not in repr(error)
    assert repr(error).startswith("StoreUnreachable(")


class _QuotingFileStore(SQLiteStore):
    """A store that fails in a worker process, with an error that quotes its URL and is
    no StoreError (a driver's own), once the file ``trigger`` exists."""

    def __init__(self, path: Path, trigger: Path) -> None:
        super().__init__(path)
        self._trigger = trigger

    def __reduce__(self) -> tuple[Any, ...]:
        return (_QuotingFileStore, (self._path, self._trigger))

    def next_due(self, *, now: datetime) -> datetime | None:
        if self._trigger.exists():
            raise RuntimeError(f"cannot connect to {URL}")
        return super().next_due(now=now)


def test_the_error_a_worker_process_died_of_shows_no_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process sends its parent the error it died of, which the parent's
    worker_status().error showed as it was."""
    # The worker process unpickles the store: it imports this module, as the tests do.
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    trigger = tmp_path / "fail"
    store = _QuotingFileStore(tmp_path / "q.db", trigger)
    config = Config(helo_name="client.test", poll_interval=0.05)
    try:
        with Mailstrom(config, store=store, worker="process") as ms:
            trigger.touch()
            assert eventually(lambda: ms.worker_status.error is not None, 20)
            error = ms.worker_status.error
            trigger.unlink()
            assert error is not None and SHOWN in error, error
            assert SECRET not in error
    finally:
        store.close()
