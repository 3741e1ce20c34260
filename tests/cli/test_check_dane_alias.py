"""``check`` for an MX host that is an alias: it shows the expansion, the TLSA records
delivery would use (RFC 7672 §2.2.3: the validated expansion's first) and a DANE-TA match
for a certificate issued for the expanded name."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trustme

from mailstrom.testing.smtp import start_receiving_server
from tests.cli.conftest import MailEnv
from tests.support.certs import chain_with_anchor, der, server_context

TARGET = "real.hosting.test"


def test_check_follows_a_validated_alias_to_its_tlsa_records(
    mail_env: MailEnv, tmp_path: Path
) -> None:
    ca = trustme.CA()
    chain, key = chain_with_anchor(ca, TARGET)
    mx = start_receiving_server(server_context(tmp_path, chain, key))
    try:
        dns = mail_env.dns
        dns.cname("mx.test", TARGET)
        dns.a(TARGET, mx.host)
        anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
        dns.tlsa(f"_25._tcp.{TARGET}", (2, 0, 1, anchor))
        dns.authenticated(everything=True)
        mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
        mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
        result = mail_env.cli("check", "--json", "example.test")
        assert result.code == 0, result.err
        [host] = result.json()["hosts"]
        assert host["name"] == "mx.test" and host["canonical"] == TARGET
        assert host["tlsa_at"] == f"_25._tcp.{TARGET}." and host["tlsa_dnssec"] is True
        assert host["tls_policy"] == "dane"
        [address] = host["addresses"]
        assert address["dane"].startswith("matched DANE-TA"), address["dane"]
        text = mail_env.cli("check", "example.test").out
        assert f"alias of:    {TARGET}" in text
        assert f"TLSA:        validated (AD) at _25._tcp.{TARGET}." in text
    finally:
        mx.stop()
