"""Settings of the test project: the mailstrom app and backend, and nothing else."""

import json
import os

import django

SECRET_KEY = "only-for-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["mailstrom.contrib.django"]
DATABASES: dict[str, object] = {}
if django.VERSION >= (6, 1):
    # Django 6.1 deprecates EMAIL_BACKEND (a warning, an error in the tests) for MAILERS.
    # "silent" is the 6.1 way to fail silently: send_mail(fail_silently=True) is deprecated.
    MAILERS = {
        "default": {"BACKEND": "mailstrom.contrib.django.EmailBackend"},
        "silent": {
            "BACKEND": "mailstrom.contrib.django.EmailBackend",
            "OPTIONS": {"fail_silently": True},
        },
    }
else:
    EMAIL_BACKEND = "mailstrom.contrib.django.EmailBackend"
DEFAULT_FROM_EMAIL = "Site <site@sender.test>"
SERVER_EMAIL = "errors@sender.test"
MAILSTROM = json.loads(os.environ.get("DJANGO_MAILSTROM_JSON", '{"store": "memory:"}'))
