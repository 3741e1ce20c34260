"""``python manage.py mailstrom_worker``: ``mailstrom worker`` with ``settings.MAILSTROM``.

The options, the logging, the signal handling (SIGTERM drains, a second signal stops at
once) and the exit codes are those of ``mailstrom worker``: both run
:func:`mailstrom.cli.worker.run_worker`. Only the settings come from elsewhere: the Django
setting instead of a TOML file, ``MAILSTROM_*`` variables and ``--store``-like options.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from mailstrom.cli.exits import EX_CONFIG, EX_USAGE, exit_code_for, reason_for
from mailstrom.cli.worker import add_worker_options, run_worker
from mailstrom.contrib.django.conf import SETTING, load
from mailstrom.stores.url import StoreKind, parse_store_url


class Command(BaseCommand):
    help = (
        "Deliver the mail queued by mailstrom's email backend, until SIGTERM/SIGINT (or, "
        "with --once, until nothing is due). Settings come from settings.MAILSTROM; the "
        "options are those of `mailstrom worker`."
    )
    # The worker needs no database of Django's; checks would only slow every restart.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        add_worker_options(parser)

    def run_from_argv(self, argv: list[str]) -> None:
        try:
            super().run_from_argv(argv)
        except SystemExit as exc:
            # argparse exits 2 for a bad command line (an unknown option, a bad value),
            # which a supervisor cannot tell from a worker's own failure; `mailstrom
            # worker` exits 64 (EX_USAGE), as docs/cli.md says. Nothing of mailstrom's exits 2
            # here: the worker's own codes are sysexits' (exit_code_for).
            if exc.code == 2:
                raise SystemExit(EX_USAGE) from None
            raise

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            conf = load(getattr(settings, SETTING, None))
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc), returncode=EX_CONFIG) from exc
        if parse_store_url(conf.settings.store_url).kind is StoreKind.MEMORY:
            # The web processes queue into memory stores of their own: this worker would
            # run for ever (or exit 0 with --once) and deliver none of their mail.
            raise CommandError(
                f"{SETTING}: store: a memory store is this command's own, so the mail the "
                "web processes queue is not in it; set store to a SQLite file or a "
                "PostgreSQL URL (or let the web processes deliver: worker 'thread')",
                returncode=EX_CONFIG,
            )
        namespace = argparse.Namespace(**options)
        try:
            code = run_worker(conf.settings, namespace)
        except Exception as exc:
            if options.get("traceback"):
                raise
            # One line and the exit code of `mailstrom worker` (74 for a damaged store, 75
            # for an unreachable one, 70 for a bug...), so a supervisor can tell them apart.
            raise CommandError(reason_for(exc), returncode=exit_code_for(exc)) from exc
        if code:
            raise CommandError(f"the worker exited with status {code}", returncode=code)
