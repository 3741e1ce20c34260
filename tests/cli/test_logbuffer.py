"""The worker's buffered log handler: every line comes out, in order, and promptly."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from mailstrom.cli.logbuffer import BufferedStreamHandler
from mailstrom.cli.logs import KeyValueFormatter, configure_logging


class _Stream(io.StringIO):
    """A stream that counts its writes and says when one happens."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = threading.Event()

    def write(self, text: str) -> int:
        self.writes += 1
        n = super().write(text)
        self.written.set()
        return n


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("mailstrom.test_logbuffer")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def _handler(stream: _Stream, **kwargs: float) -> BufferedStreamHandler:
    handler = BufferedStreamHandler(stream, **kwargs)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return handler


def test_info_lines_are_held_and_all_written_on_close(logger: logging.Logger) -> None:
    stream = _Stream()
    handler = _handler(stream, interval=3600)
    logger.addHandler(handler)
    for i in range(1000):
        logger.info("line %d", i)
    assert stream.getvalue() == ""  # held: nothing written per line
    handler.close()
    assert stream.getvalue() == "".join(f"INFO line {i}\n" for i in range(1000))
    assert stream.writes == 1


def test_held_lines_come_out_within_the_interval_without_close(logger: logging.Logger) -> None:
    stream = _Stream()
    handler = _handler(stream, interval=0.05)
    logger.addHandler(handler)
    logger.info("one")
    logger.info("two")
    assert stream.written.wait(10), "the timer never wrote the held lines"
    assert stream.getvalue() == "INFO one\nINFO two\n"
    # And again after a quiet spell: the timer sleeps until a line is held.
    stream.written.clear()
    logger.info("three")
    assert stream.written.wait(10)
    assert stream.getvalue() == "INFO one\nINFO two\nINFO three\n"
    assert stream.writes == 2


def test_a_warning_writes_at_once_with_what_was_held(logger: logging.Logger) -> None:
    stream = _Stream()
    handler = _handler(stream, interval=3600)
    logger.addHandler(handler)
    logger.info("delivered")
    logger.warning("deferred")
    assert stream.getvalue() == "INFO delivered\nWARNING deferred\n"
    logger.error("failed")
    assert stream.getvalue().endswith("WARNING deferred\nERROR failed\n")


def test_a_full_buffer_is_written_at_once(logger: logging.Logger) -> None:
    stream = _Stream()
    handler = _handler(stream, interval=3600, max_chars=100)
    logger.addHandler(handler)
    for i in range(30):
        logger.info("line %02d", i)  # 13 characters each
    # Written whenever 100 characters are held: 3 times (8 lines each), 6 lines held.
    assert stream.writes == 3
    assert stream.getvalue() == "".join(f"INFO line {i:02d}\n" for i in range(24))
    handler.flush()
    assert stream.getvalue().endswith("INFO line 29\n")


def test_configure_logging_buffers_only_when_asked() -> None:
    stream = _Stream()
    root = logging.getLogger("mailstrom")
    try:
        plain = configure_logging("text", stream=stream)  # type: ignore[arg-type]
        assert type(plain) is logging.StreamHandler
        logging.getLogger("mailstrom.worker").info("plain")
        assert "event=plain" in stream.getvalue()
        buffered = configure_logging("text", stream=stream, buffered=True)  # type: ignore[arg-type]
        assert isinstance(buffered, BufferedStreamHandler)
        assert isinstance(buffered.formatter, KeyValueFormatter)
        logging.getLogger("mailstrom.worker").info("held")
        assert "event=held" not in stream.getvalue()
        # Configuring again writes what the replaced handler held.
        configure_logging("json", stream=stream)  # type: ignore[arg-type]
        assert "event=held" in stream.getvalue()
    finally:
        root.handlers[:] = [logging.NullHandler()]
        root.propagate = True
        root.setLevel(logging.NOTSET)


def test_closing_over_a_closed_stream_is_quiet(logger: logging.Logger) -> None:
    stream = _Stream()
    handler = _handler(stream, interval=3600)
    logger.addHandler(handler)
    logger.info("held")
    stream.close()
    handler.close()  # the held line cannot be written; closing still ends the handler
    logger.removeHandler(handler)
