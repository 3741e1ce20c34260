"""A minimal Django project for the tests of ``mailstrom.contrib.django``.

Subprocesses run ``manage.py`` with ``MAILSTROM`` given as JSON in
``$DJANGO_MAILSTROM_JSON``; tests in this process call :func:`configure` and change
``MAILSTROM`` with ``override_settings``.
"""

from __future__ import annotations

import importlib

import django
from django.conf import settings as django_settings


def configure() -> None:
    """Configure Django in this process from :mod:`.settings` (once; later calls do
    nothing). pytest-django is not used, so that Django stays out of the other tests."""
    if django_settings.configured:
        return
    project = importlib.import_module("tests.django_project.settings")
    django_settings.configure(
        **{name: getattr(project, name) for name in dir(project) if name.isupper()}
    )
    django.setup()
