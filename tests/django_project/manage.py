#!/usr/bin/env python
"""``manage.py`` of the test project (run as ``python tests/django_project/manage.py``)."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # The repository root, so that ``tests.django_project`` imports from anywhere.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
