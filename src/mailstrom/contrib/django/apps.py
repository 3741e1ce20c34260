"""The Django application: ``INSTALLED_APPS = [..., "mailstrom.contrib.django"]`` adds the
``mailstrom_worker`` command and a system check of ``settings.MAILSTROM``. The email
backend works without it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import django
from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from mailstrom.contrib.django.conf import SETTING, UNUSED_CREDENTIALS, UNUSED_TIMEOUT, load
from mailstrom.errors import InvalidMessage, NoDKIMKey

if TYPE_CHECKING:
    from mailstrom.dkim.config import DKIMConfig

BACKEND = "mailstrom.contrib.django.EmailBackend"


class MailstromConfig(AppConfig):
    name = "mailstrom.contrib.django"
    label = "mailstrom"
    verbose_name = "mailstrom"

    def ready(self) -> None:
        checks.register(check_settings, "mailstrom")


def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """``manage.py check``: report a ``settings.MAILSTROM`` that would not load (an
    unknown key, a bad value, a bad store URL) before the first email finds it, and
    default senders and ADMINS or MANAGERS mailstrom would refuse."""
    if app_configs is not None and apps.get_app_config("mailstrom") not in app_configs:
        return []
    try:
        conf = load(getattr(settings, SETTING, None))
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="See docs/django.md.", id="mailstrom.E001")]
    if not _mailstrom_sends_mail():
        return []
    warnings = []
    for name, why in (
        ("DEFAULT_FROM_EMAIL", "it is the From of mail sent without from_email"),
        ("SERVER_EMAIL", "error reports to ADMINS come from it, and fail silently"),
    ):
        refusal = _refusal(str(getattr(settings, name)), dkim=conf.settings.config.dkim)
        if refusal is not None:
            warnings.append(
                checks.Warning(
                    f"{name} = {getattr(settings, name)!r} is refused by mailstrom: "
                    f"{refusal.reason}",
                    hint=f"Set {name} to an address of your domain: {why}.",
                    id="mailstrom.W001",
                )
            )
    for name, why in (
        ("ADMINS", "mail_admins() and Django's error reports"),
        ("MANAGERS", "mail_managers() and the broken link reports"),
    ):
        for address in _recipients_of(getattr(settings, name, None)):
            refusal = _refusal(address)
            if refusal is not None:
                warnings.append(
                    checks.Warning(
                        f"{name} holds {address!r}, which mailstrom refuses: {refusal.reason}",
                        hint=(
                            f"{why} send one message to all of {name}, failing silently: "
                            "mailstrom refuses it whole, so none of them gets it."
                        ),
                        id="mailstrom.W001",
                    )
                )
    warnings.extend(_unused_smtp_settings())
    return warnings


def _unused_smtp_settings() -> list[Any]:
    """Django's SMTP settings that promise something mailstrom's backend does not do: a
    bound on the send, a login. Only those the project set, to a value: with MAILERS
    (Django 6.1) they are given as a mailer's OPTIONS, which the backend warns of."""
    if django.VERSION >= (6, 1) and hasattr(settings, "MAILERS"):
        return []

    def given(name: str) -> bool:
        # Read only when set: Django 6.1 warns when code outside Django reads them.
        return settings.is_overridden(name) and getattr(settings, name) not in (None, "")

    found = []
    if given("EMAIL_TIMEOUT"):
        found.append(
            checks.Warning(
                f"EMAIL_TIMEOUT is set, and mailstrom's backend does not use it: {UNUSED_TIMEOUT}.",
                hint="Remove it, or set the store's and MAILSTROM['timeouts'] bounds.",
                id="mailstrom.W002",
            )
        )
    credentials = [name for name in ("EMAIL_HOST_USER", "EMAIL_HOST_PASSWORD") if given(name)]
    if credentials:
        found.append(
            checks.Warning(
                f"{' and '.join(credentials)} {'is' if len(credentials) == 1 else 'are'} "
                f"set, and mailstrom's backend does not use them: {UNUSED_CREDENTIALS}.",
                hint="Remove them, or give them to the relay: MAILSTROM['relay'].",
                id="mailstrom.W002",
            )
        )
    return found


def _recipients_of(value: object) -> list[str]:
    """The addresses of ``ADMINS`` or ``MANAGERS``: ``(name, address)`` pairs, or from
    Django 6 addresses. An entry of another shape is Django's to report."""
    if not isinstance(value, list | tuple):
        return []
    addresses = []
    for entry in value:
        if isinstance(entry, list | tuple) and len(entry) == 2:
            entry = entry[1]
        if isinstance(entry, str):
            addresses.append(entry)
    return addresses


def _mailstrom_sends_mail() -> bool:
    """Whether the project sends its mail through mailstrom's backend: ``EMAIL_BACKEND``,
    or from Django 6.1 the ``BACKEND`` of any ``MAILERS`` entry (a message without
    ``from_email`` takes ``DEFAULT_FROM_EMAIL`` whichever mailer sends it)."""
    if django.VERSION >= (6, 1) and hasattr(settings, "MAILERS"):
        # With MAILERS, reading EMAIL_BACKEND raises AttributeError.
        mailers: dict[str, dict[str, Any]] = settings.MAILERS
        return any(_is_ours(config.get("BACKEND")) for config in mailers.values())
    # Only when the project set it: Django 6.1 warns when code outside Django reads it,
    # and its default (the SMTP backend) is not ours anyway.
    return settings.is_overridden("EMAIL_BACKEND") and _is_ours(settings.EMAIL_BACKEND)


def _is_ours(path: object) -> bool:
    """Whether the backend at ``path`` sends through mailstrom: ours under any of its
    names (``mailstrom.contrib.django.backend.EmailBackend`` too), or a project's
    subclass of it. One that cannot be imported is Django's to report when it sends, not
    this check's (whatever its module raises: a check must not stop ``runserver``)."""
    if path == BACKEND:
        return True
    if not isinstance(path, str):
        return False
    # Here, not at the top: the app is loaded by django.setup() in every process, and the
    # backend brings in the facade.
    from mailstrom.contrib.django.backend import EmailBackend

    try:
        backend = import_string(path)
    except Exception:
        return False
    return isinstance(backend, type) and issubclass(backend, EmailBackend)


def _refusal(address: str, *, dkim: DKIMConfig | None = None) -> InvalidMessage | None:
    """Why mailstrom refuses ``address`` in a message, or None; with ``dkim``, as the
    From of a message: ``dkim.required`` refuses a From domain no key aligns with
    (NoDKIMKey), so every error report from such a ``SERVER_EMAIL`` was lost."""
    # Here, not at the top: see _is_ours. As the backend checks it, so that an address
    # Django cannot write (a local part that is not ASCII) is reported too.
    from mailstrom.contrib.django.backend import parse_django_mailbox

    try:
        mailbox = parse_django_mailbox("from_email", address)
    except InvalidMessage as exc:
        return exc
    # The domain as the signer looks it up (Envelope.from_domains).
    domain = mailbox.address.envelope.rpartition("@")[2]
    if dkim is not None and dkim.required and not dkim.keys_for([domain]):
        return NoDKIMKey(
            f"dkim.required is set and no DKIM key is configured for {domain}, so every "
            "message from it is refused",
            domains=(domain,),
        )
    return None
