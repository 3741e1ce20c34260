"""The worker's live view on a terminal: totals, work in flight, queue counts, recent attempts.

The view is redrawn on a timer; that timer only paints the screen; the worker itself never
waits on it. While it draws, log lines meant for the terminal are printed through the view's
console, above the view: written straight to the terminal they would land in the middle of
a frame and the next repaint would overwrite them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mailstrom.cli.output import cell, is_tty
from mailstrom.cli.signals import run_until_signalled
from mailstrom.runtime.worker import Worker
from mailstrom.status import QueueStats, RecipientState
from mailstrom.stores.base import RecipientResult, Store

REFRESH_SECONDS = 0.5
_STYLE = {
    RecipientState.DELIVERED: "green",
    RecipientState.DEFERRED: "yellow",
    RecipientState.FAILED: "red",
}


def render(worker: Worker, stats: QueueStats | None, recent: Sequence[RecipientResult]) -> Group:
    """One frame of the view."""
    s = worker.status
    head = Text.assemble(
        ("mailstrom worker ", "bold"),
        ("running" if s.running else "stopped", "green" if s.running else "red"),
        f"   in flight: {s.in_flight}   delivered: {s.delivered}"
        f"   deferred: {s.deferred}   failed: {s.failed}",
    )
    parts: list[Table | Text] = [head]
    if stats is not None:
        queue = Table(title="Queue (recipients)", title_justify="left", box=None)
        for state in RecipientState:
            queue.add_column(state.value, justify="right")
        queue.add_column("held msgs", justify="right")
        queue.add_row(*[str(stats.by_state.get(st, 0)) for st in RecipientState], str(stats.held))
        parts.append(queue)
    attempts = Table(title="Recent attempts", title_justify="left", expand=True)
    # Fixed widths for the short columns; the others share what is left of the line.
    for name, min_width, ratio in (
        ("time", 8, None),
        ("recipient", None, 3),
        ("state", 9, None),
        ("host", None, 2),
        ("tls", 7, None),
        ("reply", None, 4),
    ):
        attempts.add_column(
            name, overflow="ellipsis", no_wrap=True, min_width=min_width, ratio=ratio
        )
    for r in recent:
        attempts.add_row(
            f"{r.attempt.at:%H:%M:%S}",
            # Text, not str: an address or a reply is never read as rich markup.
            Text(cell(r.address)),
            Text(r.state.value, style=_STYLE.get(r.state, "")),
            Text(cell(r.attempt.mx_host)),
            Text(cell(r.attempt.tls_version)),
            Text(cell(r.attempt.reason)),
        )
    parts.append(attempts)
    return Group(*parts)


class ConsoleLogHandler(logging.Handler):
    """Prints each formatted record through a rich console (above a live view)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Text, not a str: a log line is never read as rich markup.
            self.console.print(Text(self.format(record)), soft_wrap=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def logs_above(console: Console, logger_name: str = "mailstrom") -> Iterator[None]:
    """While inside, the logger's handlers that write to a terminal print through
    ``console`` instead (same format and level); handlers writing to files or pipes are
    left alone."""
    logger = logging.getLogger(logger_name)
    swapped: list[tuple[logging.Handler, logging.Handler]] = []
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and is_tty(handler.stream):
            handler.flush()  # lines it holds come before the view
            replacement = ConsoleLogHandler(console)
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            logger.removeHandler(handler)
            logger.addHandler(replacement)
            swapped.append((handler, replacement))
    try:
        yield
    finally:
        for original, console_handler in swapped:
            logger.removeHandler(console_handler)
            logger.addHandler(original)


async def run_with_live_view(
    worker: Worker,
    store: Store,
    recent: Sequence[RecipientResult],
    *,
    once: bool,
    drain_timeout: float,
    on_started: Callable[[], None] | None = None,
    console: Console | None = None,
) -> None:
    """Run the worker (stopping on signals) while the view repaints on ``console``
    (default: standard output)."""
    stats: QueueStats | None = None
    with (
        Live(
            render(worker, stats, recent), console=console, auto_refresh=False, transient=False
        ) as live,
        logs_above(live.console),
    ):

        async def paint() -> None:
            nonlocal stats
            while True:
                with contextlib.suppress(Exception):  # a view glitch must not stop delivery
                    stats = await asyncio.to_thread(store.stats)
                live.update(render(worker, stats, recent), refresh=True)
                await asyncio.sleep(REFRESH_SECONDS)

        painter = asyncio.create_task(paint())
        try:
            await run_until_signalled(worker, once=once, drain=drain_timeout, on_started=on_started)
        finally:
            painter.cancel()
            await asyncio.gather(painter, return_exceptions=True)
            with contextlib.suppress(Exception):  # the final counts, after the last record
                stats = await asyncio.to_thread(store.stats)
            live.update(render(worker, stats, recent), refresh=True)
