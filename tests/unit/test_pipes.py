"""The frames between a worker process and its parent (runtime/pipes.py)."""

from __future__ import annotations

import io
import pickle
from datetime import UTC, datetime

import pytest

from mailstrom.runtime.pipes import read_frame, result_from_wire, result_to_wire, write_frame
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, RecipientState, SMTPReply
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


def test_a_cut_frame_reads_as_the_end() -> None:
    data = pickle.dumps(("status", None))
    stream = io.BytesIO(len(data).to_bytes(4, "big") + data[:-1])
    assert read_frame(stream) is None
