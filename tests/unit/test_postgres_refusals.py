"""Which failed PostgreSQL connections are a refusal (StoreAccessDenied: not worth waiting
for) rather than a server that is not there to ask (a StoreError, waited out)."""

from __future__ import annotations

import pytest

from mailstrom.stores.postgres.connect import refuses_access


@pytest.mark.parametrize(
    ("message", "refused"),
    [
        ('FATAL:  password authentication failed for user "mail"', True),
        ('FATAL:  role "mail" does not exist', True),
        ('FATAL:  database "mail" does not exist', True),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "mail"', True),
        ('FATAL:  role "mail" is not permitted to log in', True),
        ("fe_sendauth: no password supplied", True),
        ("Connection refused\n\tIs the server running on that host?", False),
        ("FATAL:  the database system is starting up", False),
        ("FATAL:  sorry, too many clients already", False),
        ('could not translate host name "db" to address: Name or service not known', False),
        ("timeout expired", False),
    ],
)
def test_which_connection_failures_are_refusals(message: str, refused: bool) -> None:
    assert refuses_access(f'connection to server at "db", port 5432 failed: {message}') is refused
