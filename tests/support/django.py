"""Helpers for the tests of ``mailstrom.contrib.django`` against the loopback MX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory

DOMAINS = ("example.org", "example.net")


def loopback_mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> ReceivingServer:
    """A receiver that is the MX of :data:`DOMAINS`."""
    server = smtp_server()
    for domain in DOMAINS:
        dns_server.mx(domain, [(10, "mx.test")])
    dns_server.a("mx.test", server.host)
    return server


def mailstrom_setting(
    dns: LoopbackDNS, mx: ReceivingServer, tmp_path: Path, **extra: Any
) -> dict[str, Any]:
    """``settings.MAILSTROM`` for the loopback MX, as a project would write it (JSON-able,
    so a ``manage.py`` subprocess can be given the same)."""
    return {
        "store": f"sqlite:///{tmp_path / 'mail.db'}",
        "helo_name": "client.test",
        "allow_loopback": True,
        "smtp_port": mx.port,
        "dns": {"nameservers": [dns.address], "port": dns.port, "timeout": 2},
        "timeouts": {"connect": 2, "greeting": 2, "command": 2, "data_end": 2},
        "worker": "thread",
        **extra,
    }
