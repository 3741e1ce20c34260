"""How mailstrom logs: silent as a library, readable attempt records, lines above the live view."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from mailstrom.cli.logs import JSONFormatter, KeyValueFormatter, configure_logging
from mailstrom.runtime.attemptlog import ATTEMPT_LOGGER, log_attempt
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult
from tests.cli.conftest import MailEnv, clean_env


def deferred_result() -> RecipientResult:
    return RecipientResult(
        message_id="0190f3a2c4e1b7d08a4f2c6e9b1d3f57",
        address="bob@example.test",
        lease_token="t1",
        state=RecipientState.DEFERRED,
        attempt=Attempt(
            at=datetime(2024, 1, 1, tzinfo=UTC),
            outcome=AttemptOutcome.TEMPORARY,
            duration=0.25,
            mx_host="mx.example.test",
            ip="192.0.2.1",
            port=25,
            reply=SMTPReply(code=451, enhanced="4.7.1", text="Greylisted, try later"),
        ),
        next_attempt_at=datetime(2024, 1, 1, 0, 5, tzinfo=UTC),
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[_Capture]:
    handler = _Capture()
    logger = logging.getLogger(ATTEMPT_LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_library_prints_nothing_when_logging_is_not_configured() -> None:
    """Hardening #19: without logging configured, an attempt prints no bare "attempt" line.

    In a fresh interpreter, as an application that never touches logging: before the
    NullHandler, Python's last-resort handler wrote ``attempt`` on stderr for every
    deferred attempt.
    """
    code = (
        "import mailstrom\n"
        "from tests.cli.test_logging import deferred_result\n"
        "from mailstrom.runtime.attemptlog import log_attempt\n"
        "log_attempt(deferred_result())\n"
    )
    root = Path(__file__).parents[2]
    env = clean_env(root)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""


def test_package_logger_has_a_null_handler() -> None:
    """Hardening #19: the ``mailstrom`` logger carries a NullHandler (library convention)."""
    import mailstrom  # noqa: F401  (importing the package installs it)

    handlers = logging.getLogger("mailstrom").handlers
    # configure_logging (the CLI) replaces it; a library user keeps it.
    if not any(isinstance(h, logging.StreamHandler) for h in handlers):
        assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_attempt_record_reads_as_a_sentence(captured: _Capture) -> None:
    """Hardening #19: an attempt record's message says what happened, not just "attempt"."""
    log_attempt(deferred_result())
    [record] = captured.records
    assert record.getMessage() == (
        "deferred bob@example.test via mx.example.test [192.0.2.1]: 451 4.7.1 Greylisted, try later"
    )
    assert record.levelno == logging.WARNING
    assert getattr(record, "event", None) == "attempt"
    # What a plain application setup (logging.basicConfig) prints.
    assert logging.Formatter("%(levelname)s %(name)s %(message)s").format(record) == (
        "WARNING mailstrom.attempts deferred bob@example.test via mx.example.test [192.0.2.1]: "
        "451 4.7.1 Greylisted, try later"
    )


def test_attempt_message_without_host_or_reply(captured: _Capture) -> None:
    """Hardening #19: an attempt that reached no host still reads well."""
    result = RecipientResult(
        message_id="m1",
        address="carol@nowhere.test",
        lease_token="t1",
        state=RecipientState.FAILED,
        attempt=Attempt(
            at=datetime(2024, 1, 1, tzinfo=UTC),
            outcome=AttemptOutcome.PERMANENT,
            error="nowhere.test: no such domain",
        ),
    )
    log_attempt(result)
    [record] = captured.records
    assert record.getMessage() == "failed carol@nowhere.test: nowhere.test: no such domain"


def test_attempt_message_is_built_only_when_formatted(captured: _Capture) -> None:
    """Hardening #19: the hot path does not build the text; a disabled level builds nothing."""
    log_attempt(deferred_result())
    [record] = captured.records
    assert not isinstance(record.msg, str)  # formatted by getMessage(), i.e. by a handler
    logger = logging.getLogger(ATTEMPT_LOGGER)
    logger.setLevel(logging.ERROR)
    log_attempt(deferred_result())
    assert len(captured.records) == 1


def test_message_id_field_does_not_collide_with_message(captured: _Capture) -> None:
    """Hardening #19: the message id is ``message_id``; ``message`` stays the log text."""
    log_attempt(deferred_result())
    [record] = captured.records
    line = KeyValueFormatter().format(record)
    assert " event=attempt message_id=0190f3a2c4e1b7d08a4f2c6e9b1d3f57 " in line
    assert " message=" not in line
    obj = json.loads(JSONFormatter().format(record))
    assert obj["event"] == "attempt"
    assert obj["message_id"] == "0190f3a2c4e1b7d08a4f2c6e9b1d3f57"
    assert "message" not in obj


def test_send_wait_prints_no_bare_attempt_lines(mail_env: MailEnv) -> None:
    """Hardening #19: ``mailstrom send --wait`` with a deferral prints no bare "attempt"."""
    mail_env.mx.rcpt_replies["later@example.test"] = "451 4.7.1 Try again later"
    result = mail_env.cli(
        "send", "--from", "a@client.test", "--to", "later@example.test", "--wait", "--timeout", "3"
    )
    assert result.code == 75, result.err
    assert "attempt" not in result.err_lines
    assert result.err == ""


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_log_lines_go_through_the_live_view_console() -> None:
    """Hardening #19: while the live view draws, log lines are printed through its console.

    Written straight to the terminal (stderr), they landed inside a frame and were torn or
    painted over by the next refresh.
    """
    from mailstrom.cli.live import run_with_live_view
    from mailstrom.config import Config
    from mailstrom.runtime.worker import Worker
    from mailstrom.stores import MemoryStore

    terminal_stderr = _TTY()
    screen = _TTY()
    handler = configure_logging("text", level=logging.WARNING, stream=terminal_stderr)
    logger = logging.getLogger("mailstrom")
    store = MemoryStore()
    try:
        worker = Worker(Config(helo_name="client.test"), store)

        def on_started() -> None:
            logging.getLogger("mailstrom.worker").warning("something to say")

        console = Console(file=screen, force_terminal=True, width=200)
        await run_with_live_view(
            worker, store, [], once=True, drain_timeout=0, on_started=on_started, console=console
        )
        assert terminal_stderr.getvalue() == ""
        assert 'event="something to say"' in screen.getvalue()
        # The terminal handler is back once the view is gone.
        assert logger.handlers == [handler]
    finally:
        store.close()
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_key_value_lines_escape_alike_on_a_stream_that_is_not_utf8(encoding: str) -> None:
    """key=value lines with standard error in a locale that is not UTF-8: a character past
    the encoding came out as the stream's escape ("\\xe9", "\\U0001f600"), which is no
    escape of a quoted value (a JSON string) and was taken literally in a bare one, and one
    inside it came out as it is. Every value past ASCII is a quoted string with JSON
    escapes there, read back as it was."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="backslashreplace")
    handler = configure_logging("text", stream=stream)
    logger = logging.getLogger("mailstrom")
    fields = {"rcpt": "josé@exämple.test", "reply": "550 café 😀 \u202e refusé", "n": 3}
    try:
        logging.getLogger("mailstrom.worker").warning("arrivé", extra={"fields": fields})
        handler.flush()
        stream.flush()
        written = stream.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]
        pairs = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "\n]+)', written))
        assert pairs["rcpt"] == '"jos\\u00e9@ex\\u00e4mple.test"'
        assert json.loads(pairs["rcpt"]) == fields["rcpt"]
        assert json.loads(pairs["reply"]) == fields["reply"]
        assert json.loads(pairs["event"]) == "arrivé"
        assert pairs["n"] == "3" and pairs["logger"] == "mailstrom.worker"
    finally:
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_json_lines_stay_json_on_a_stream_that_is_not_utf8() -> None:
    """--log-format json with standard error in a locale that is not UTF-8: a reply's "é"
    or emoji came out as the stream's "\\xe9" escape, which is no JSON (the collector
    dropped the line). Characters past ASCII are JSON escapes there."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="latin-1", errors="backslashreplace")
    handler = configure_logging("json", stream=stream)
    logger = logging.getLogger("mailstrom")
    reply = "550 café 😀 \u202e refusé"
    try:
        logging.getLogger("mailstrom.worker").warning("attempt", extra={"fields": {"reply": reply}})
        handler.flush()
        stream.flush()
        written = stream.buffer.getvalue()  # type: ignore[attr-defined]
        assert written.isascii()
        assert json.loads(written)["reply"] == reply
    finally:
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


async def test_library_warnings_go_through_the_live_view_console_too() -> None:
    """The warnings of the libraries the worker drives (psycopg's pool, asyncio) are
    logged by the root logger's handler, the worker's own: while the view drew, only the
    handler of mailstrom's logger printed above it, and a library's line was written
    straight to the terminal, inside a frame, to be painted over by the next refresh."""
    from mailstrom.cli.live import run_with_live_view
    from mailstrom.config import Config
    from mailstrom.runtime.worker import Worker
    from mailstrom.stores import MemoryStore

    top = logging.getLogger()
    theirs = top.handlers[:]  # pytest's: the worker's root has none of its own
    top.handlers[:] = []
    terminal_stderr = _TTY()
    screen = _TTY()
    handler = configure_logging("text", level=logging.WARNING, stream=terminal_stderr)
    logger = logging.getLogger("mailstrom")
    store = MemoryStore()
    try:
        assert top.handlers == [handler]
        worker = Worker(Config(helo_name="client.test"), store)

        def on_started() -> None:
            logging.getLogger("psycopg.pool").warning("error connecting in 'mailstrom'")

        console = Console(file=screen, force_terminal=True, width=200)
        await run_with_live_view(
            worker, store, [], once=True, drain_timeout=0, on_started=on_started, console=console
        )
        assert terminal_stderr.getvalue() == ""
        assert "error connecting in 'mailstrom'" in screen.getvalue()
        # The terminal handler is back on both once the view is gone.
        assert logger.handlers == [handler]
        assert top.handlers == [handler]
    finally:
        store.close()
        handler.close()
        top.handlers[:] = theirs
        logging.captureWarnings(False)
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_python_warnings_are_log_lines_of_the_format_too(fmt: str) -> None:
    """A library's warning through Python's ``warnings`` (a UserWarning, a RuntimeWarning
    such as "coroutine ... was never awaited") was printed by Python itself: two lines of
    bare text, its source line indented, among the JSON lines, which the collector could
    not parse. Once the worker configures logging, they are records of the format."""
    script = (
        "import warnings\n"
        "from mailstrom.cli.logs import configure_logging\n"
        f"configure_logging({fmt!r})\n"
        "warnings.warn('the peer said\\nlevel=error forged', UserWarning)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=clean_env(Path.cwd()),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    [line] = lines
    if fmt == "json":
        record = json.loads(line)
        assert (record["level"], record["logger"]) == ("warning", "py.warnings")
        assert "the peer said\nlevel=error forged" in record["event"]
    else:
        assert line.startswith("ts=") and "level=warning logger=py.warnings" in line
