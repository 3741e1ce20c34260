"""The command's TLS policy features: ``send --require-tls`` and ``check`` with DANE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailstrom.testing.smtp import ReceivingServer, start_receiving_server
from tests.cli.conftest import MailEnv
from tests.support.certs import self_signed, server_context, spki_sha256


def test_send_require_tls_fails_with_5_7_30_without_requiretls(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.env["MAILSTROM_DNS_DNSSEC"] = "true"  # the MX host is vouched for: validated
    mail_env.dns.authenticated(everything=True)
    result = cli(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x",
        "--require-tls", "--wait", "--json",
    )  # fmt: skip
    assert result.code == 69, result.err
    [bob] = result.json()["recipients"]
    assert bob["state"] == "failed" and bob["reply"]["enhanced"] == "5.7.30"
    assert "does not support" in bob["reply"]["text"]
    assert mail_env.mx.messages == []


def test_send_require_tls_is_honoured_by_a_server_offering_it(
    mail_env: MailEnv, smtp_server: Any
) -> None:
    mx = smtp_server(requiretls=True)
    mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
    # REQUIRETLS takes only an MX host that DNSSEC (or MTA-STS) vouches for.
    mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
    mail_env.dns.authenticated(everything=True)
    result = mail_env.cli(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x",
        "--require-tls", "--wait", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    [received] = mx.wait_for_messages(1)
    assert "REQUIRETLS" in received.mail_options and received.tls
    [bob] = result.json()["recipients"]
    assert bob["history"][-1]["tls_policy"] == "verify"


def test_send_require_tls_refuses_an_mx_host_dnssec_does_not_vouch_for(
    mail_env: MailEnv, smtp_server: Any
) -> None:
    """RFC 8689 §4.2.1: without validated MX records (nor DANE, nor MTA-STS) the MX host
    may be an attacker's, whatever certificate it shows: 5.7.30, nothing sent."""
    mx = smtp_server(requiretls=True)
    mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
    result = mail_env.cli(
        "send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x",
        "--require-tls", "--wait", "--json",
    )  # fmt: skip
    assert result.code == 69, result.err
    [bob] = result.json()["recipients"]
    assert bob["state"] == "failed" and bob["reply"]["enhanced"] == "5.7.30"
    assert "DNSSEC" in bob["reply"]["text"]
    assert mx.connections == 0


@pytest.fixture
def dane_mx(mail_env: MailEnv, tmp_path: Path) -> Iterator[tuple[ReceivingServer, bytes]]:
    """A receiver with a self-signed certificate, example.test's MX, all DNSSEC-validated."""
    cert, key = self_signed("mx.test")
    mx = start_receiving_server(server_context(tmp_path, cert, key))
    mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
    mail_env.dns.authenticated(everything=True)
    yield mx, cert
    mx.stop()


def test_check_reports_tlsa_and_dnssec_and_the_dane_match(
    mail_env: MailEnv, dane_mx: tuple[ReceivingServer, bytes]
) -> None:
    _, cert = dane_mx
    digest = spki_sha256(cert)
    mail_env.dns.tlsa("_25._tcp.mx.test", (3, 1, 1, digest))
    mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
    result = mail_env.cli("check", "--json", "example.test")
    assert result.code == 0, result.err
    report = result.json()
    assert report["dnssec"] is True and report["dnssec_trusted"] is True
    [host] = report["hosts"]
    assert host["tlsa"] == [f"3 1 1 {digest.hex()}"] and host["tlsa_dnssec"] is True
    assert host["tls_policy"] == "dane"
    [address] = host["addresses"]
    assert address["dane"].startswith("matched DANE-EE")
    text = mail_env.cli("check", "example.test").out
    assert "TLSA:        validated (AD)" in text and "TLS policy:  dane" in text


def test_check_shows_a_dane_mismatch_as_undeliverable(
    mail_env: MailEnv, dane_mx: tuple[ReceivingServer, bytes]
) -> None:
    other, _ = self_signed("mx.test")
    mail_env.dns.tlsa("_25._tcp.mx.test", (3, 1, 1, spki_sha256(other)))
    mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
    result = mail_env.cli("check", "--json", "example.test")
    assert result.code == 69
    [address] = result.json()["hosts"][0]["addresses"]
    assert address["dane"].startswith("no match") and not address["usable"]


def test_check_reports_tlsa_without_applying_it_when_dnssec_is_not_trusted(
    mail_env: MailEnv, dane_mx: tuple[ReceivingServer, bytes]
) -> None:
    other, _ = self_signed("mx.test")
    mail_env.dns.tlsa("_25._tcp.mx.test", (3, 1, 1, spki_sha256(other)))
    result = mail_env.cli("check", "--json", "example.test")
    assert result.code == 0, result.err
    report = result.json()
    assert report["dnssec"] is True and report["dnssec_trusted"] is False
    [host] = report["hosts"]
    assert host["tlsa"] and host["tls_policy"] == "opportunistic"
    assert "not used: dns.dnssec is off" in mail_env.cli("check", "example.test").out


def test_check_counts_malformed_tlsa_records_instead_of_reporting_none(
    mail_env: MailEnv, dane_mx: tuple[ReceivingServer, bytes]
) -> None:
    # A SHA-256 "digest" of 31 octets: unusable, but published (RFC 7672 §2.2), so
    # delivery requires TLS; "TLSA: none" would say the opposite.
    mail_env.dns.tlsa("_25._tcp.mx.test", (3, 1, 1, b"\x01" * 31))
    mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
    result = mail_env.cli("check", "--json", "example.test")
    assert result.code == 0, result.err
    [host] = result.json()["hosts"]
    assert host["tlsa"] == [] and host["tlsa_malformed"] == 1 and host["tlsa_dnssec"] is True
    assert host["tls_policy"] == "required"
    text = mail_env.cli("check", "example.test").out
    assert "TLSA:        none" not in text
    assert "TLSA:        validated (AD); 1 malformed record(s) ignored" in text
