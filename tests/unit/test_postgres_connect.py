"""The parameters mailstrom adds to a PostgreSQL URL so that a server that vanished is
noticed within about a minute (stores/postgres/connect.py); the URL's own win."""

from __future__ import annotations

import psycopg
import pytest

from mailstrom.stores.postgres.connect import connection_options

URL = "postgresql://mail@db.internal/mail"


@pytest.fixture(autouse=True)
def no_env_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)


def test_a_bare_url_gets_keepalives_a_user_timeout_and_a_connect_timeout() -> None:
    options = connection_options(URL)
    assert options["keepalives"] == "1"
    assert options["keepalives_idle"] == "30"
    assert options["keepalives_interval"] == "10"
    assert options["keepalives_count"] == "3"
    assert options["connect_timeout"] == "10"
    if psycopg.pq.version() >= 120000:
        assert options["tcp_user_timeout"] == "60000"
    else:  # an older libpq refuses the keyword
        assert "tcp_user_timeout" not in options


@pytest.mark.parametrize(
    "url",
    [
        URL + "?keepalives_idle=5&connect_timeout=3",
        "host=db.internal dbname=mail keepalives_idle=5 connect_timeout=3",
    ],
)
def test_what_the_url_sets_is_left_to_it(url: str) -> None:
    options = connection_options(url)
    assert "keepalives_idle" not in options and "connect_timeout" not in options
    assert options["keepalives_count"] == "3"


def test_the_callers_connect_timeout_rounds_up_to_a_second() -> None:
    assert connection_options(URL, connect_timeout=0.2)["connect_timeout"] == "1"
    assert connection_options(URL, connect_timeout=30)["connect_timeout"] == "30"


def test_pgconnect_timeout_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "4")
    assert "connect_timeout" not in connection_options(URL)
