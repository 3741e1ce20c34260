"""The worker's live view on a terminal: totals, work in flight, queue counts, recent attempts.

The head line's state word says how the worker is, not only whether it runs: "store
trouble" while the store keeps failing, "draining" once asked to stop (it finishes what it
holds), "paused" while it takes no new work; below it, one
line per problem in the status's own words (the store's error, the pause's reason, a clock
the worker judges off by more than :data:`~mailstrom.runtime.worker_clock.WARN_SKEW`, the
error it stopped on). A healthy worker's view has no such line.

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
from mailstrom.cli.signals import EarlyStops, run_until_signalled
from mailstrom.runtime.worker import Worker
from mailstrom.status import QueueStats, RecipientState, WorkerStatus
from mailstrom.stores.base import RecipientResult, Store

REFRESH_SECONDS = 0.5
_STYLE = {
    RecipientState.DELIVERED: "green",
    RecipientState.DEFERRED: "yellow",
    RecipientState.FAILED: "red",
}
PROBLEM_CHARS = 300
"""Characters of a problem's text kept before it is made printable: the text comes from
exceptions and peers and may be long (a query, a reply); the line is cut to the terminal's
width anyway, and the frame is redrawn twice a second."""


def _state_word(s: WorkerStatus) -> tuple[str, str]:
    """The head line's word for the worker's state, and its style: the worst first."""
    if not s.running:
        return "stopped", "red"
    if s.store_error is not None:
        return "store trouble", "red"
    if s.stopping:
        # Asked to stop: it finishes what it holds and takes no new work, paused or not.
        return "draining", "yellow"
    if s.paused is not None:
        return "paused", "yellow"
    return "running", "green"


def _quoted(text: str) -> str:
    """Text from an exception or a peer, bounded and on one printable line."""
    if len(text) > PROBLEM_CHARS:
        text = text[:PROBLEM_CHARS] + "…"
    return cell(text)


def _problems(s: WorkerStatus) -> list[tuple[str, str]]:
    """One ``(line, style)`` per trouble the status reports; none when all is fine."""
    lines: list[tuple[str, str]] = []
    if s.store_error is not None:
        noun = "result" if s.unrecorded == 1 else "results"
        held = f" ({s.unrecorded} {noun} not recorded yet)" if s.unrecorded > 0 else ""
        lines.append((f"store failing, retrying: {_quoted(s.store_error)}{held}", "red"))
    if s.paused is not None:
        lines.append((f"paused, takes no new work: {_quoted(s.paused)}", "yellow"))
    # A pause's reason already gives the skew: one line is enough. The worker's verdict,
    # not the raw skew: a reading a slow round trip leaves uncertain warns of nothing.
    elif s.clock_warning and s.clock_skew is not None:
        side = "ahead of" if s.clock_skew > 0 else "behind"
        lines.append((f"clock {abs(s.clock_skew):.1f} s {side} the store's server", "yellow"))
    if s.dead and s.error is not None:
        lines.append((f"error: {_quoted(s.error)}", "red"))
    return lines


def render(worker: Worker, stats: QueueStats | None, recent: Sequence[RecipientResult]) -> Group:
    """One frame of the view."""
    s = worker.status
    head = Text.assemble(
        ("mailstrom worker ", "bold"),
        _state_word(s),
        f"   in flight: {s.in_flight}   delivered: {s.delivered}"
        f"   deferred: {s.deferred}   failed: {s.failed}",
    )
    parts: list[Table | Text] = [head]
    for line, style in _problems(s):
        # Text, not markup: the line quotes exceptions and peers. One screen line each.
        parts.append(Text(f"  {line}", style=style, no_wrap=True, overflow="ellipsis"))
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
    """While inside, the handlers of the logger and of the root logger that write to a
    terminal print through ``console`` instead (same format and level); handlers writing
    to files or pipes are left alone. The root's too: the worker's handler is also the
    root's (:func:`~mailstrom.cli.logs.configure_logging`), for the warnings of the
    libraries it drives, which were written straight into the view's frame."""
    replacements: dict[logging.Handler, logging.Handler] = {}
    swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
    for logger in (logging.getLogger(logger_name), logging.getLogger()):
        for handler in list(logger.handlers):
            if not (isinstance(handler, logging.StreamHandler) and is_tty(handler.stream)):
                continue
            replacement = replacements.get(handler)
            if replacement is None:
                handler.flush()  # lines it holds come before the view
                replacement = replacements[handler] = ConsoleLogHandler(console)
                replacement.setFormatter(handler.formatter)
                replacement.setLevel(handler.level)
            # In place: the order of a logger's handlers stays as it was.
            logger.handlers[logger.handlers.index(handler)] = replacement
            swapped.append((logger, handler, replacement))
    try:
        yield
    finally:
        for logger, original, replacement in reversed(swapped):
            if replacement in logger.handlers:
                logger.handlers[logger.handlers.index(replacement)] = original


@contextlib.contextmanager
def _shown(live: Live) -> Iterator[Live]:
    """``live`` started and stopped, whatever became of the terminal meanwhile: one hung up
    (a closed window or ssh session, whose SIGHUP stops the worker) fails every write with
    EIO, and the last frame's failing made a worker that had drained and given back all
    it should exit 70, "internal error". The view only shows: it ends with the terminal."""
    with contextlib.suppress(OSError):
        live.start(refresh=True)
    try:
        yield live
    finally:
        with contextlib.suppress(OSError):
            live.stop()  # puts back what start() changed before it writes, whatever comes


def _paint(live: Live, frame: Group) -> None:
    """Show ``frame``, unless the terminal is gone (see :func:`_shown`)."""
    with contextlib.suppress(OSError):
        live.update(frame, refresh=True)


async def run_with_live_view(
    worker: Worker,
    store: Store,
    recent: Sequence[RecipientResult],
    *,
    once: bool,
    drain_timeout: float,
    on_started: Callable[[], None] | None = None,
    console: Console | None = None,
    early: EarlyStops | None = None,
) -> None:
    """Run the worker (stopping on signals, ``early`` ones too: see
    :func:`run_until_signalled`) while the view repaints on ``console`` (default: standard
    output)."""
    stats: QueueStats | None = None
    with (
        _shown(
            Live(
                render(worker, stats, recent), console=console, auto_refresh=False, transient=False
            )
        ) as live,
        logs_above(live.console),
    ):

        async def paint() -> None:
            nonlocal stats
            while True:
                with contextlib.suppress(Exception):  # a view glitch must not stop delivery
                    stats = await asyncio.to_thread(store.stats)
                _paint(live, render(worker, stats, recent))
                await asyncio.sleep(REFRESH_SECONDS)

        painter = asyncio.create_task(paint())
        try:
            await run_until_signalled(
                worker, once=once, drain=drain_timeout, on_started=on_started, early=early
            )
        finally:
            painter.cancel()
            await asyncio.gather(painter, return_exceptions=True)
            with contextlib.suppress(Exception):  # the final counts, after the last record
                stats = await asyncio.to_thread(store.stats)
            _paint(live, render(worker, stats, recent))
