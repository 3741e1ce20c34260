"""mailstrom for Django: an email backend, settings in ``settings.MAILSTROM``, and the
``manage.py mailstrom_worker`` command.

.. code-block:: python

    # settings.py
    INSTALLED_APPS = [..., "mailstrom.contrib.django"]   # for mailstrom_worker and checks
    EMAIL_BACKEND = "mailstrom.contrib.django.EmailBackend"
    # or, from Django 6.1 (which deprecates EMAIL_BACKEND):
    # MAILERS = {"default": {"BACKEND": "mailstrom.contrib.django.EmailBackend"}}
    MAILSTROM = {
        "store": f"sqlite:///{BASE_DIR / 'mail.db'}",
        "helo_name": "mail.example.com",
        "worker": "process",     # or "thread", or None with manage.py mailstrom_worker
    }

See ``docs/django.md``.
"""

from mailstrom.contrib.django.backend import EmailBackend
from mailstrom.contrib.django.shared import get_mailstrom, shutdown

__all__ = ["EmailBackend", "get_mailstrom", "shutdown"]
