"""``mailstrom worker``: deliver queued mail until SIGTERM/SIGINT (or, with --once, until
nothing is due), logging one structured line per attempt."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections import deque
from typing import TYPE_CHECKING

from mailstrom.cli.context import open_store, settings_from
from mailstrom.cli.exits import EX_CONFIG, EX_OK, EX_TEMPFAIL, CLIError
from mailstrom.cli.logs import configure_logging
from mailstrom.cli.output import is_tty
from mailstrom.cli.parsing import Subparsers, seconds_arg, setting_arg
from mailstrom.cli.signals import STOP_SIGNALS, EarlyStops, early_stops, run_until_signalled
from mailstrom.errors import ConfigError
from mailstrom.runtime.loops import run as run_loop
from mailstrom.runtime.store_opening import StoreOpener
from mailstrom.runtime.worker import Worker
from mailstrom.settings import Settings
from mailstrom.stores.base import RecipientResult, Store
from mailstrom.stores.url import redact_url

if TYPE_CHECKING:
    from mailstrom.ops.server import OpsServer
    from mailstrom.ops.sources import WorkerSources

EPILOG = """\
examples:
  mailstrom worker                                  # until SIGTERM or Ctrl-C
  mailstrom worker --once                           # deliver what is due, then exit
  mailstrom worker --log-format json --no-live      # for systemd/journald or a collector
  mailstrom worker --store postgresql://mailstrom@db/mailstrom   # one of many workers
  mailstrom worker --metrics 127.0.0.1:9466         # Prometheus /metrics and /healthz
  MAILSTROM_HOOK_SECRET=... mailstrom worker --hook https://app.example/mail-events

On SIGTERM, SIGINT or SIGHUP the worker stops leasing, lets deliveries in flight finish for up to
--drain-timeout seconds, and gives the rest back to the queue, due at once. A second signal
stops at once (unfinished work is still given back).
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker",
        parents=parents,
        help="deliver queued mail",
        description="Deliver queued mail: lease due recipients, send them to their MX hosts "
        "(or the relay), and record each outcome. Logs one line per attempt on stderr. "
        "Several workers may share a PostgreSQL store.",
        epilog=EPILOG,
    )
    add_worker_options(p)
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=setting_arg("metrics.listen", "--metrics"),
        default=None,
        help="serve Prometheus /metrics and /healthz there (port alone: on 127.0.0.1; "
        "needs mailstrom[metrics]); the setting metrics.listen",
    )
    p.add_argument(
        "--hook",
        metavar="URL",
        type=setting_arg("hook.url", "--hook"),
        default=None,
        help="POST every recorded result there as signed JSON, in batches, from the "
        "store's outbox (the secret: hook.secret or MAILSTROM_HOOK_SECRET)",
    )
    p.set_defaults(handler=worker_command)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``mailstrom worker`` (also those of Django's ``mailstrom_worker``)."""
    parser.add_argument("--once", action="store_true", help="exit when nothing is due")
    parser.add_argument(
        "--drain-timeout",
        type=seconds_arg,
        default=30.0,
        metavar="S",
        help="seconds in-flight deliveries get to finish on stop (default 30)",
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="key=value or JSON lines"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="least severe level logged (default info)",
    )
    parser.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="no live view on a terminal; log lines only",
    )
    parser.add_argument(
        "--no-log-buffer",
        dest="log_buffer",
        action="store_false",
        help="write each log line at once (default: in batches, at most 0.1 s late, so a "
        "SIGKILL loses at most the last 0.1 s of lines)",
    )


def worker_command(args: argparse.Namespace) -> int:
    from mailstrom.stores.url import StoreKind, parse_store_url

    settings = settings_from(args)
    if parse_store_url(settings.store_url).kind is StoreKind.MEMORY:
        # Made empty in this process, which no other can queue into: the worker would run
        # for ever (or exit 0 with --once) and deliver nothing. (Django's command refuses
        # it too, and so does every command that changes the store: exit 78.)
        raise CLIError(
            "a worker cannot deliver from a memory store: it lives and dies with this "
            "process, so no other can queue mail into it; set store to a SQLite file or "
            "a PostgreSQL URL",
            EX_CONFIG,
        )
    return run_worker(settings, args)


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Deliver with ``settings`` as the options in ``args`` (:func:`add_worker_options`)
    say; the command line's settings come from its file, environment and options, the
    Django command's from ``settings.MAILSTROM``."""
    # Stop signals are handled from the start, before the store opens and the loop runs.
    with early_stops() as early:
        # A process starts with the signal mask of the thread that started it: one blocking
        # SIGTERM (a supervisor written in Python, leaving signals to its main thread) left
        # the worker deaf to every stop signal, running until SIGKILL. (Unblocked once
        # handled: one pending meanwhile comes now.)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return _deliver(settings, args, early)


def _deliver(settings: Settings, args: argparse.Namespace, early: EarlyStops) -> int:
    live = args.live and is_tty()
    level = getattr(logging, args.log_level.upper())
    # Under the live view the attempts are on screen; the log shows only trouble.
    log_handler = configure_logging(
        args.log_format,
        level=max(level, logging.WARNING) if live else level,
        buffered=args.log_buffer,
    )
    with contextlib.ExitStack() as stack:
        # Lines held in the buffer come out before anything the caller prints (an error).
        stack.callback(log_handler.flush)
        opener = StoreOpener(lambda: open_store(settings.store_url))
        ops = None
        if settings.metrics_listen is not None:
            # Before the store: while the worker waits for it, a probe or a scrape learns
            # so (instead of "connection refused", as from a dead process), and a bad
            # address fails now rather than once the database is up.
            ops = _serve_ops(settings.metrics_listen, opener)
            stack.callback(ops[0].close)
        store = _open_worker_store(opener, early, once=args.once)
        if store is None:  # stopped while waiting for the store: nothing was leased
            logging.getLogger("mailstrom.worker").info("worker stopped before its store opened")
            return EX_OK
        # Closed as soon as the worker has stopped, before the loop ends (see
        # runtime.loops.run), and here should the loop never run.
        closing = stack.enter_context(contextlib.ExitStack())
        closing.callback(store.close)
        recent: deque[RecipientResult] = deque(maxlen=12)

        worker = Worker(settings.config, store, on_result=recent.appendleft)
        if ops is not None:
            server, sources = ops
            sources.attach(worker, store, queue=settings.metrics_queue)
            # Closed (again: close() is idempotent) before the store, so that no scrape
            # or health check reads a closed store.
            closing.callback(server.close)

        def on_started() -> None:
            # Logged once signals are handled, so a supervisor seeing it can stop us cleanly.
            logging.getLogger("mailstrom.worker").info(
                "worker started", extra={"fields": {"store": redact_url(settings.store_url)}}
            )
            log_handler.flush()  # at once: a supervisor or a test may be waiting for it

        if live:
            from mailstrom.cli.live import run_with_live_view

            run_loop(
                run_with_live_view(
                    worker,
                    store,
                    recent,
                    once=args.once,
                    drain_timeout=args.drain_timeout,
                    on_started=on_started,
                    early=early,
                ),
                settings.config.event_loop,
                then=closing.close,
            )
        else:
            run_loop(
                run_until_signalled(
                    worker,
                    once=args.once,
                    drain=args.drain_timeout,
                    on_started=on_started,
                    early=early,
                ),
                settings.config.event_loop,
                then=closing.close,
            )
        s = worker.status
        logging.getLogger("mailstrom.worker").info(
            "worker stopped",
            extra={
                "fields": {"delivered": s.delivered, "deferred": s.deferred, "failed": s.failed}
            },
        )
        if args.once and s.paused is not None:
            # It ended because it may not lease, not because nothing is due: say so, and
            # exit "try again later" so that cron or a script does not take it for done.
            raise CLIError(
                f"--once took no new work: {s.paused}; due mail stays queued", EX_TEMPFAIL
            )
    return EX_OK


def _open_worker_store(opener: StoreOpener, early: EarlyStops, *, once: bool) -> Store | None:
    """The worker's store. One that does not answer yet (PostgreSQL restarting, or not up
    at boot) is waited for by ``opener``, with backoff and a log line per try, until it
    opens or a SIGTERM/SIGINT/SIGHUP ends the wait (None). With ``--once`` (from cron, say) it is
    not: the command exits 75 at once, and the next run tries again instead of runs piling
    up (a signal still ends its one try: None). What waiting cannot mend exits at once
    either way (74 damaged, 78 refused)."""
    with early.calling(opener.stop):  # stop() is reentrant
        return opener.open(wait=not once)


def _serve_ops(listen: str, opener: StoreOpener) -> tuple[OpsServer, WorkerSources]:
    """/metrics and /healthz, serving from a thread from now on: a worker waiting for its
    store (``opener``) until the sources are attached to the worker."""
    from mailstrom.ops.server import OpsServer, parse_listen
    from mailstrom.ops.sources import WorkerSources

    host, port = parse_listen(listen)
    sources = WorkerSources(opener)
    try:
        server = OpsServer(
            host,
            port,
            snapshot=sources.snapshot,
            health=sources.health,
            store_wait=sources.store_wait,
        )
    except OSError as exc:
        raise ConfigError(f"--metrics {listen}: cannot listen: {exc.strerror or exc}") from None
    server.start()
    logging.getLogger("mailstrom.worker").info(
        "serving metrics", extra={"fields": {"url": f"{server.url}/metrics"}}
    )
    return server, sources
