"""Shared test setup. Services live in tests/fixtures/* as pytest plugins so each can be
read on its own; every one binds to loopback on an ephemeral port and stops afterwards."""

pytest_plugins = [
    "tests.fixtures.dns_server",
    "tests.fixtures.smtp_server",
    "tests.fixtures.postgres",
]
