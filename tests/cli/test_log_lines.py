"""The worker's log lines, byte for byte: what the faster formatting must keep writing.

The expected lines were written by the formatters before they were made faster (one dict,
a function call and ``json.dumps`` per value); each case is a record the worker logs, or a
value the generic formatting must quote or render the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstrom.cli.logs import JSONFormatter, KeyValueFormatter
from mailstrom.runtime.attemptlog import ATTEMPT_LOGGER, AttemptText, attempt_fields
from mailstrom.safetext import escaped_json
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
from mailstrom.stores.base import RecipientResult

CREATED = 1767225600.0456  # 2026-01-01T00:00:00.045Z
AT = datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
QUEUED = datetime(2026, 1, 1, tzinfo=UTC)


def _delivered() -> RecipientResult:
    return RecipientResult(
        message_id="0190f3a2c4e1b7d08a4f2c6e9b1d3f57",
        address="bob@example.org",
        lease_token="t1",
        state=RecipientState.DELIVERED,
        attempt=Attempt(
            at=AT,
            outcome=AttemptOutcome.DELIVERED,
            duration=0.41234,
            mx_host="mx1.example.org",
            ip="192.0.2.10",
            port=25,
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            tls_policy="opportunistic",
            reply=SMTPReply(code=250, enhanced="2.0.0", text="Ok: queued as 4Vb1"),
        ),
        queued_at=QUEUED,
        size=2048,
        envelope_from="app@example.com",
    )


def _deferred() -> RecipientResult:
    return RecipientResult(
        message_id="m2",
        address="carol@example.net",
        lease_token="t1",
        state=RecipientState.DEFERRED,
        attempt=Attempt(
            at=AT,
            outcome=AttemptOutcome.TEMPORARY,
            duration=0.25,
            mx_host="mx.example.net",
            ip="2001:db8::25",
            port=25,
            reply=SMTPReply(code=451, enhanced="4.7.1", text="Greylisted, try later"),
            reason_class=ReasonClass.GREYLISTED,
            tls_policy="mta-sts testing",
        ),
        next_attempt_at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC),
        queued_at=QUEUED,
        size=900,
        envelope_from="",
    )


def _failed_with_help() -> RecipientResult:
    return RecipientResult(
        message_id="m3",
        address="dave@gmail.test",
        lease_token="t1",
        state=RecipientState.FAILED,
        attempt=Attempt(
            at=AT,
            outcome=AttemptOutcome.PERMANENT,
            duration=1.0,
            mx_host="gmail-smtp-in.l.google.test",
            ip="192.0.2.26",
            port=25,
            reply=SMTPReply(
                code=550,
                enhanced="5.7.26",
                text="Unauthenticated mail is not accepted; set up SPF or DKIM. - gsmtp",
            ),
            reason_class=ReasonClass.AUTHENTICATION,
        ),
        queued_at=QUEUED,
        size=1,
        envelope_from="app@example.com",
    )


def _quoting() -> RecipientResult:
    # Quotes, backslashes, '=' and control characters in the text, a null sender, an
    # uncertain outcome, no reply (the local error instead).
    return RecipientResult(
        message_id="m4",
        address='"odd=local\\part"@example.org',
        lease_token="t1",
        state=RecipientState.DEFERRED,
        attempt=Attempt(
            at=AT,
            outcome=AttemptOutcome.TEMPORARY,
            duration=30.0,
            mx_host="mx.example.org",
            error='lost after DATA: "peer\treset"\nagain\x7f',
            uncertain=True,
            reason_class=ReasonClass.CONNECTION,
        ),
        next_attempt_at=datetime(2026, 1, 1, 0, 1, 30, tzinfo=UTC),
        envelope_from="",
    )


def _unicode() -> RecipientResult:
    # Printable non-ASCII stays bare; with a space, or an invisible character, quoted.
    return RecipientResult(
        message_id="m5",
        address="jörg@bücher.example",
        lease_token="t1",
        state=RecipientState.DELIVERED,
        attempt=Attempt(
            at=AT,
            outcome=AttemptOutcome.DELIVERED,
            mx_host="mx.bücher.example",
            reply=SMTPReply(code=250, text="Grüße, angenommen"),
        ),
        envelope_from="zero\u200bwidth@example.com",
    )


RESULTS = {
    "delivered": _delivered,
    "deferred": _deferred,
    "failed": _failed_with_help,
    "quoting": _quoting,
    "unicode": _unicode,
}


class Color(StrEnum):
    RED = "red"
    DARK = "dark red"


class Size(IntEnum):
    BIG = 7


def _record(
    level: int,
    msg: object,
    *,
    name: str = "mailstrom.worker",
    args: tuple[object, ...] = (),
    event: object = None,
    fields: object = None,
    exc: bool = False,
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ConnectionError("cannot reach postgresql://mail:s3cret@db.example/mail")
        except ConnectionError:
            import sys

            exc_info = sys.exc_info()
    record = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    record.created = CREATED
    if event is not None:
        record.event = event
    if fields is not None:
        record.fields = fields
    return record


def _attempt_record(result: RecipientResult) -> logging.LogRecord:
    level = logging.INFO if result.state is RecipientState.DELIVERED else logging.WARNING
    return _record(
        level,
        AttemptText(result),
        name=ATTEMPT_LOGGER,
        event="attempt",
        fields=attempt_fields(result),
    )


def _other_records() -> dict[str, logging.LogRecord]:
    return {
        "started": _record(
            logging.INFO, "worker started", fields={"store": "sqlite:///var/mail.db"}
        ),
        "no fields, args": _record(logging.WARNING, "lease %s of %d lost", args=("x y", 3)),
        "values": _record(
            logging.INFO,
            "values",
            fields={
                "ok": False,
                "yes": True,
                "n": None,
                "zero": 0,
                "neg": -1.5,
                "inf": math.inf,
                "nan": math.nan,
                "big": 10**20,
                "empty": "",
                "list": ["a", 1, None],
                "dict": {"k": "v w"},
                "when": datetime(2026, 1, 1, tzinfo=UTC),
                "color": Color.RED,
                "dark": Color.DARK,
                "size": Size.BIG,
                "bytes": b"\x00ab",
            },
        ),
        "field overrides head": _record(
            logging.ERROR, "x", event="ignored", fields={"event": "mine", "level": None, "a": 1}
        ),
        "event not a string": _record(logging.INFO, "the message", event=42, fields={}),
        "fields not a mapping": _record(logging.INFO, "m", fields=["a", "b"]),
        "exception": _record(logging.ERROR, "store lost", exc=True, fields={"n": 1}),
        "odd logger": _record(logging.INFO, "e=v", name="mailstrom.odd name"),
    }


def _cases() -> dict[str, logging.LogRecord]:
    cases = {name: _attempt_record(build()) for name, build in RESULTS.items()}
    cases.update(_other_records())
    return cases


# Written by the formatters before they were made faster (see the module docstring).
_EXPECTED = json.loads((Path(__file__).parents[1] / "samples" / "log_lines.json").read_text())
EXPECTED_TEXT: dict[str, str] = _EXPECTED["text"]
EXPECTED_JSON: dict[str, str] = _EXPECTED["json"]


def _strip_traceback(line: str) -> str:
    # A traceback names this file's lines; compare what the formatting does around it.
    if "Traceback" not in line:
        return line
    return line.split("Traceback", 1)[0] + line.rsplit("ConnectionError", 1)[-1]


@pytest.mark.parametrize("name", sorted(_cases()))
def test_key_value_lines_are_unchanged(name: str) -> None:
    line = KeyValueFormatter().format(_cases()[name])
    assert _strip_traceback(line) == EXPECTED_TEXT[name]


@pytest.mark.parametrize("name", sorted(_cases()))
def test_json_lines_are_unchanged(name: str) -> None:
    line = JSONFormatter().format(_cases()[name])
    assert _strip_traceback(line) == EXPECTED_JSON[name]


def test_the_same_formatter_repeats_itself() -> None:
    """The per-formatter cache of line heads gives every line its own level and event."""
    formatter = KeyValueFormatter()
    cases = _cases()
    first = {name: formatter.format(record) for name, record in cases.items()}
    again = {name: formatter.format(record) for name, record in cases.items()}
    assert first == again
    assert " level=warning logger=mailstrom.attempts event=attempt " in first["deferred"]
    assert " level=info logger=mailstrom.attempts event=attempt " in first["delivered"]


def _generic_line(fields: dict[str, Any]) -> str:
    """How a field is written, spelled out the slow way: the reference for any text."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, str) and (
            value == "" or not value.isprintable() or any(c in value for c in ' "=\\')
        ):
            parts.append(f"{key}={escaped_json(json.dumps(value, ensure_ascii=False))}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


# Shared by every example, so that values it remembers as plain are reused across them.
_SHARED = KeyValueFormatter()


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=30), max_size=6))
def test_any_text_is_quoted_when_it_must_be(fields: dict[str, str]) -> None:
    record = _record(logging.INFO, "m", event="e", fields=fields)
    line = _SHARED.format(record)
    head = "ts=2026-01-01T00:00:00.045Z level=info logger=mailstrom.worker event=e"
    # Keys named like the head's replace its values; leave those to the fixed cases.
    if not {"ts", "level", "logger", "event"} & fields.keys():
        body = _generic_line(fields)
        assert line == (f"{head} {body}" if body else head)


def test_values_remembered_as_plain_stay_bounded() -> None:
    """The formatter remembers text that needed no quotes, a bounded number of values."""
    formatter = KeyValueFormatter()
    for i in range(10_000):
        line = formatter.format(_record(logging.INFO, "m", fields={"id": f"v{i}", "q": "a b"}))
        assert line.endswith(f' id=v{i} q="a b"')
    assert 0 < len(formatter._plain) <= 4097
    long_value = "x" * 10_000
    line = formatter.format(_record(logging.INFO, "m", fields={"v": long_value}))
    assert line.endswith(f" v={long_value}")
    assert long_value not in formatter._plain


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JSONFormatter()])
def test_text_that_would_rewrite_a_terminal_is_escaped(formatter: logging.Formatter) -> None:
    """JSON leaves C1 controls (U+009B is a CSI to terminals that take 8-bit controls),
    DEL and the bidirectional overrides as they are: written raw, a reply or a name
    could recolour or reorder what the operator reads. They are \\u escapes, the same
    JSON value."""
    hostile = "ok\u009b31m \u202edelivered\x7f \u2066x"
    line = formatter.format(_record(logging.INFO, "m", fields={"reason": hostile}))
    assert line.isprintable()
    assert "\\u009b31m \\u202edelivered\\u007f \\u2066x" in line
    if isinstance(formatter, JSONFormatter):
        assert json.loads(line)["reason"] == hostile


def test_the_delay_of_an_attempt_before_its_queueing_time_is_zero() -> None:
    """The message was queued by a host whose clock runs ahead of the worker's (or the
    worker's clock was stepped back since): its attempt seems to come before it was
    queued. The log line said ``delay=-4.5``, a time no delivery takes, where the queue
    delay metric counts 0."""
    result = dataclasses.replace(_delivered(), queued_at=AT + timedelta(seconds=4.5))
    assert attempt_fields(result)["delay"] == 0.0
