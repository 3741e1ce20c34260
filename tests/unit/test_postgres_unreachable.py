"""Which PostgreSQL failures say the server could not be reached (StoreUnreachable: a
worker that meets them for long may be taken for dead by those that reach it) rather than
a statement the server refused, which every worker meets alike."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest

from mailstrom.errors import (
    StoreAccessDenied,
    StoreError,
    StoreLocked,
    StoreRefusedData,
    StoreUnreachable,
)
from mailstrom.stores.postgres.sql import translate_errors


def _raised(exc: Exception) -> StoreError:
    with pytest.raises(StoreError) as caught, translate_errors("beat_holder"):
        raise exc
    assert caught.value.__cause__ is exc
    assert "beat_holder" in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 1.00 sec"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        psycopg.errors.ConnectionFailure("connection failure"),
        psycopg.errors.TooManyConnections("sorry, too many clients already"),
    ],
    ids=type,
)
def test_a_server_out_of_reach_is_unreachable(exc: Exception) -> None:
    assert isinstance(_raised(exc), StoreUnreachable)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.IdleSessionTimeout("terminating connection due to idle-session timeout"),
        psycopg.errors.IdleInTransactionSessionTimeout(
            "terminating connection due to idle-in-transaction timeout"
        ),
    ],
    ids=type,
)
def test_a_session_the_server_ended_for_idling_is_unreachable(exc: Exception) -> None:
    """The server closed the connection (``idle_session_timeout``, or
    ``idle_in_transaction_session_timeout`` while this process was stopped or starved
    mid-transaction), as with ``pg_terminate_backend`` (57P01): it went away mid-call,
    which the server did not refuse every worker alike. Both were a plain StoreError, the
    second (class 25, an InternalError to psycopg) by way of the catch-all."""
    assert isinstance(_raised(exc), StoreUnreachable)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (
            psycopg.errors.InsufficientPrivilege("permission denied for table x"),
            StoreAccessDenied,
        ),
        (psycopg.errors.UndefinedTable('relation "lease_holders" does not exist'), StoreError),
        (psycopg.errors.DiskFull("could not extend file"), StoreError),
        (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"), StoreLocked),
        (psycopg.errors.CheckViolation("new row violates check constraint"), StoreRefusedData),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__,
)
def test_a_statement_the_server_refused_is_not(exc: Exception, kind: type[StoreError]) -> None:
    raised = _raised(exc)
    assert type(raised) is kind and not isinstance(raised, StoreUnreachable)
