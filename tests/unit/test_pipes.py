"""The frames between a worker process and its parent (runtime/pipes.py)."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import sys
from datetime import UTC, datetime

import pytest

from mailstrom.dkim import DKIMAlgorithm, DKIMSignature
from mailstrom.runtime.pipes import read_frame, result_from_wire, result_to_wire, write_frame
from mailstrom.status import (
    Attempt,
    AttemptOutcome,
    DKIMStatus,
    ReasonClass,
    RecipientState,
    SMTPReply,
)
from mailstrom.stores.base import RecipientResult

AT = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.mark.parametrize(
    "result",
    [
        RecipientResult(
            message_id="m1",
            address="bob@example.org",
            state=RecipientState.DEFERRED,
            lease_token="t1",
            next_attempt_at=AT,
            ref=42,
            queued_at=AT,
            size=1234,
            envelope_from="app@example.com",
            attempt=Attempt(
                at=AT,
                outcome=AttemptOutcome.TEMPORARY,
                duration=0.25,
                mx_host="mx.example.org",
                ip="192.0.2.1",
                port=25,
                tls_version="TLSv1.3",
                tls_cipher="TLS_AES_256_GCM_SHA384",
                reply=SMTPReply(code=451, enhanced="4.7.1", text="Greylisted\nsee you"),
                error=None,
                uncertain=False,
                reason_class=ReasonClass.GREYLISTED,
            ),
        ),
        RecipientResult(
            message_id="m2",
            address="ü@example.org",
            state=RecipientState.FAILED,
            lease_token="t2",
            attempt=Attempt(
                at=AT,
                outcome=AttemptOutcome.PERMANENT,
                error="null MX",
                reason_class=ReasonClass.ROUTING,
            ),
        ),
        RecipientResult(
            message_id="m3",
            address="carol@example.org",
            state=RecipientState.DELIVERED,
            lease_token="t3",
            attempt=Attempt(at=AT, outcome=AttemptOutcome.DELIVERED),
        ),
    ],
)
def test_a_result_crosses_the_pipe_unchanged(result: RecipientResult) -> None:
    stream = io.BytesIO()
    write_frame(stream, "results", [result_to_wire(result)])
    stream.seek(0)
    kind, payload = read_frame(stream) or ("", None)
    assert kind == "results"
    assert [result_from_wire(w) for w in payload] == [result]


def test_every_field_of_a_result_crosses_the_pipe() -> None:
    """Each field, none at its default: on_result of a worker process got the attempt's
    tls_policy and the result's own_reply and hard_bounce at their defaults, where a
    worker thread's had them (and a field added later fails here until it crosses)."""
    result = RecipientResult(
        message_id="m4",
        address="dave@example.org",
        state=RecipientState.FAILED,
        lease_token="t4",
        next_attempt_at=AT,
        ref=7,
        queued_at=AT,
        size=99,
        envelope_from="app@example.com",
        own_reply=True,
        hard_bounce=True,
        notice='{"v":1}',
        relayed=True,  # of a delivery only: here every field is set, to see it cross
        attempted=False,
        dkim=DKIMStatus(
            signatures=(
                DKIMSignature(
                    domain="example.com", selector="s2027", algorithm=DKIMAlgorithm.RSA_SHA256
                ),
            )
        ),
        attempt=Attempt(
            at=AT,
            outcome=AttemptOutcome.PERMANENT,
            duration=1.5,
            mx_host="mx.example.org",
            ip="2001:db8::1",
            port=2525,
            tls_version="TLSv1.2",
            tls_cipher="ECDHE-RSA-AES128-GCM-SHA256",
            reply=SMTPReply(code=550, enhanced="5.1.1", text="no such user"),
            error="refused",
            uncertain=True,
            reason_class=ReasonClass.MAILBOX,
            tls_policy="dane",
        ),
    )
    for part in (result, result.attempt):
        for field in dataclasses.fields(part):
            if field.default is not dataclasses.MISSING:
                assert getattr(part, field.name) != field.default, field.name
    stream = io.BytesIO()
    write_frame(stream, "results", [result_to_wire(result)])
    stream.seek(0)
    _, payload = read_frame(stream) or ("", None)
    assert [result_from_wire(w) for w in payload] == [result]


def test_a_cut_frame_reads_as_the_end() -> None:
    data = pickle.dumps(("status", None))
    stream = io.BytesIO(len(data).to_bytes(4, "big") + data[:-1])
    assert read_frame(stream) is None


def test_a_garbled_length_is_refused_before_it_is_read() -> None:
    # Text where a header should be ("garb" is 1.7 GB): read as a frame's length, it had
    # 1.7 GB allocated for it and swallowed every later frame until the stream's end,
    # which then read as a clean one.
    read, write = os.pipe()
    os.write(write, b"garbage! and more text")
    os.close(write)
    with open(read, "rb") as stream, pytest.raises(ValueError, match="1734439522 bytes"):
        read_frame(stream)


def test_a_large_batch_of_results_crosses_in_frames_the_reader_takes() -> None:
    # A loop turn's results went in one frame, however many (``lease_batch`` has no
    # upper bound): split, none comes near the largest frame a reader takes.
    from mailstrom.runtime.child import RESULTS_PER_FRAME, _Outbox

    result = RecipientResult(
        message_id="m",
        address="carol@example.org",
        state=RecipientState.DELIVERED,
        lease_token="t",
        attempt=Attempt(at=AT, outcome=AttemptOutcome.DELIVERED),
    )
    stream = io.BytesIO()
    outbox = _Outbox(stream)
    outbox._results = [result] * (2 * RESULTS_PER_FRAME + 1)
    outbox._flush()
    stream.seek(0)
    sizes = []
    while (frame := read_frame(stream)) is not None:
        sizes.append(len(frame[1]))
    assert sizes == [RESULTS_PER_FRAME, RESULTS_PER_FRAME, 1]


def _forwarded(record: logging.LogRecord) -> list[tuple[str, object]]:
    from mailstrom.runtime.child import _ForwardLogs, _Outbox

    stream = io.BytesIO()
    _ForwardLogs(_Outbox(stream)).emit(record)
    stream.seek(0)
    frames = []
    while (frame := read_frame(stream)) is not None:
        frames.append(frame)
    return frames


def test_a_forwarded_record_carries_its_traceback_alone() -> None:
    # Cut from the formatted record at its first line end, the traceback began with the
    # second line of a message of several.
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("mailstrom.x", logging.ERROR, "f.py", 1, "one\ntwo", (), exc_info)
    [(kind, fields)] = _forwarded(record)
    assert kind == "log" and isinstance(fields, dict)
    assert fields["msg"] == "one\ntwo"
    assert fields["exc_text"].startswith("Traceback")
    assert fields["exc_text"].endswith("ValueError: boom")


def test_a_record_that_cannot_be_sent_is_loggings_error_not_the_callers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An extra that does not pickle raised into the worker code that logged it.
    record = logging.LogRecord("mailstrom.x", logging.INFO, "f.py", 1, "hi %s", (), None)
    record.fields = {"hook": lambda: None}
    assert _forwarded(record) == []
    bad_args = logging.LogRecord("mailstrom.x", logging.INFO, "f.py", 1, "%d", ("x",), None)
    assert _forwarded(bad_args) == []
    assert capsys.readouterr().err.count("--- Logging error ---") == 2
