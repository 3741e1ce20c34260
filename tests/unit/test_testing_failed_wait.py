"""The message of a receiving server's failed wait (testing/_receiving.py) names the last
few messages that arrived: it reads those few, not every message the server holds."""

from __future__ import annotations

import pytest

from mailstrom.testing import _receiving
from mailstrom.testing._receiving import ReceivedMessage, ReceivingServer


def _arrived(i: int) -> ReceivedMessage:
    return ReceivedMessage(
        mail_from="app@example.com",
        rcpt_tos=(f"u{i}@example.org",),
        content=f"Subject: number {i}\r\nFrom: app@example.com\r\n\r\nHi\r\n".encode(),
        mail_options=(),
        rcpt_options=(),
        tls=False,
        tls_version=None,
        helo="client.example",
        auth_login=None,
        peer=("127.0.0.1", 40000),
        reply="250 2.0.0 OK",
    )


def test_a_failed_wait_parses_only_the_messages_it_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every message that had arrived was parsed (for its Subject) to name the last ten,
    # under the server's lock: with 10,000 of 100 kB in, the failed wait took 7 s, and
    # the server's loop, which records under that lock, waited as long.
    server = ReceivingServer(
        host="127.0.0.1",
        pipelining=True,
        eightbitmime=True,
        enhancedstatuscodes=True,
        tls_broken=False,
        greeting=None,
        ehlo_reply=None,
        auth=None,
    )
    server.connections = 1
    for i in range(500):
        server._note_rcpt(f"u{i}@example.org", "250 2.1.5 OK")
        server.record(_arrived(i), accepted=True)
    parsed: list[bytes] = []
    parse = _receiving.parse_message

    def counted(data: bytes) -> object:
        parsed.append(data)
        return parse(data)

    monkeypatch.setattr(_receiving, "parse_message", counted)
    with pytest.raises(AssertionError) as failed:
        server.wait_for_received(501, timeout=0)
    text = str(failed.value)
    assert "received 500 messages, expected 501" in text
    assert "(490 earlier), from 'app@example.com' to ['u490@example.org'] 'number 490'" in text
    assert text.endswith("'number 499', answered '250 2.0.0 OK'")
    assert "(490 earlier), u490@example.org: '250 2.1.5 OK'" in text
    assert len(parsed) == 10
