"""Helpers for the tests of ``mailstrom.contrib.django`` against the loopback MX, and for
what differs between the Django versions the tests run on (Django 5.2 LTS on Python 3.11,
Django 6 on 3.12+). Import it after :func:`tests.django_project.configure`."""

from __future__ import annotations

import warnings
from email.mime.base import MIMEBase
from pathlib import Path
from typing import Any

import django
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.test import override_settings

from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory

DOMAINS = ("example.org", "example.net")

# Django 6.1 replaced EMAIL_BACKEND and get_connection() by settings.MAILERS and
# mail.mailers, and deprecated the fail_silently argument of send_mail() and friends.
HAS_MAILERS = django.VERSION >= (6, 1)


def silently() -> dict[str, Any]:
    """The arguments that make ``send_mail()`` and ``send_mass_mail()`` fail silently:
    ``fail_silently=True`` before Django 6.1, the test project's "silent" mailer (whose
    OPTIONS say ``fail_silently``) from 6.1."""
    return {"using": "silent"} if HAS_MAILERS else {"fail_silently": True}


def django_smtp_backend(host: str, port: int) -> BaseEmailBackend:
    """Django's own SMTP backend for ``host:port``, made as each Django version wants it
    (6.1 deprecates constructing it directly)."""
    if not HAS_MAILERS:
        return DjangoSMTPBackend(host=host, port=port)
    smtp = {"BACKEND": "django.core.mail.backends.smtp.EmailBackend"}
    with override_settings(MAILERS={"smtp": {**smtp, "OPTIONS": {"host": host, "port": port}}}):
        backend: BaseEmailBackend = mail.mailers["smtp"]
    return backend


def attach_mime_base(message: mail.EmailMessage, part: MIMEBase) -> None:
    """``message.attach(part)``: Django 6.1 deprecates MIMEBase parts (for MIMEPart) but
    still sends them, and applications keep attaching them until it stops, so the tests
    keep sending them."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "MIMEBase attachments are deprecated", PendingDeprecationWarning
        )
        message.attach(part)


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
