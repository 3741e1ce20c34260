"""MX host names a hostile zone can publish, seen through the SMTP connection.

DNS lets a label hold any octet: ``\\000`` sixteen times is a legal label, 64 characters
once written as text. Such a name is no host name, so it cannot go in TLS's SNI (RFC 6066
§3) nor be checked against a certificate; the server behind it may still take mail.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from mailstrom import AsyncMailstrom, Email, RecipientState
from mailstrom.runtime.connection import SMTPConnection, StartTLS, TLSVerifyError
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ServerFactory
from tests.support.delivery import FAST, Results, loopback_config

NUL_LABEL = "\\000" * 16
"""One label of sixteen NUL octets: 64 characters as text, over the 63 ssl's IDNA takes."""


async def test_an_mx_whose_name_cannot_be_sni_still_gets_the_mail_over_tls(
    smtp_server: ServerFactory, dns_server: LoopbackDNS
) -> None:
    """Opportunistic TLS checks no name: the handshake goes without SNI. Before, ssl's
    UnicodeError escaped the connection and the delivery "crashed" (deferred, as an
    internal error, without trying the host at all)."""
    mx = smtp_server()
    host = f"{NUL_LABEL}.odd.test"
    dns_server.mx("odd.example", [(10, host)])
    dns_server.a(host, mx.host)
    results = Results()
    config = loopback_config(dns_server, mx.port)
    async with AsyncMailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = await ms.send_email(
            Email(from_="app@sender.test", to=["bob@odd.example"], subject="Hi", text="Hello")
        )
        await asyncio.to_thread(results.wait_count, 1)
        status = (await ms.query_status(mid)).recipient("bob@odd.example")
    assert status.state is RecipientState.DELIVERED
    assert status.tls is True
    assert len(mx.messages) == 1


@pytest.mark.parametrize("host", [f"{NUL_LABEL}.odd.test", ".".join(["\\000" * 15] * 5)])
async def test_verify_fails_typed_for_an_mx_name_no_certificate_can_hold(
    smtp_server: ServerFactory, client_tls_context: ssl.SSLContext, host: str
) -> None:
    """Under ``verify`` such a name fails as a certificate that does not match it would
    (never plaintext, and a DeliveryError the engine handles), not as a UnicodeError or
    ValueError from ssl."""
    mx = smtp_server()
    with pytest.raises(TLSVerifyError, match="cannot be checked"):
        await SMTPConnection.open(
            host=host,
            ip=mx.host,
            port=mx.port,
            helo_name="client.test",
            timeouts=FAST,
            starttls=StartTLS.VERIFY,
            tls_context=client_tls_context,
        )
