"""REQUIRETLS (RFC 8689) on MAIL FROM in the sans-IO session. No sockets."""

from __future__ import annotations

import pytest

from mailstrom.smtp import ClientSession, LocalProtocolError, Reply


def ready(ehlo: bytes) -> ClientSession:
    session = ClientSession(helo_name="client.test")
    session.receive_data(b"220 mx.test ESMTP\r\n")
    assert isinstance(session.next_event(), Reply)
    session.ehlo()
    session.receive_data(ehlo)
    assert isinstance(session.next_event(), Reply)
    return session


def test_requiretls_goes_on_mail_from_when_offered() -> None:
    session = ready(b"250-mx.test\r\n250-PIPELINING\r\n250 REQUIRETLS\r\n")
    line = session.mail("a@example.com", requiretls=True)
    assert line == b"MAIL FROM:<a@example.com> REQUIRETLS\r\n"


def test_requiretls_rides_in_a_pipelined_envelope() -> None:
    session = ready(b"250-mx.test\r\n250-PIPELINING\r\n250 REQUIRETLS\r\n")
    batch = session.envelope("a@example.com", ["b@example.org"], requiretls=True)
    assert batch.startswith(b"MAIL FROM:<a@example.com> REQUIRETLS\r\nRCPT TO:<b@example.org>")


def test_requiretls_is_refused_locally_when_not_offered() -> None:
    session = ready(b"250-mx.test\r\n250 PIPELINING\r\n")
    with pytest.raises(LocalProtocolError, match="REQUIRETLS"):
        session.mail("a@example.com", requiretls=True)
    assert session.mail("a@example.com") == b"MAIL FROM:<a@example.com>\r\n"
