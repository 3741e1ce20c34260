"""Settings of the test project: the mailstrom app and backend, and nothing else."""

import json
import os

SECRET_KEY = "only-for-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["mailstrom.contrib.django"]
DATABASES: dict[str, object] = {}
EMAIL_BACKEND = "mailstrom.contrib.django.EmailBackend"
DEFAULT_FROM_EMAIL = "Site <site@sender.test>"
SERVER_EMAIL = "errors@sender.test"
MAILSTROM = json.loads(os.environ.get("DJANGO_MAILSTROM_JSON", '{"store": "memory:"}'))
