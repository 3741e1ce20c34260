"""``check`` judges a DANE-TA certificate as delivery does: one issued for the checked
domain, whose validated MX records name the host, matches (RFC 7672 §3.2.2); one for
another domain does not, and the verdict names the names that were tried."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trustme

from mailstrom.testing.smtp import start_receiving_server
from tests.cli.conftest import DOMAIN, OTHER_DOMAIN, MailEnv
from tests.support.certs import chain_with_anchor, der, server_context


@pytest.mark.parametrize(("checked", "matches"), [(DOMAIN, True), (OTHER_DOMAIN, False)])
def test_check_accepts_a_dane_ta_certificate_for_the_checked_domain(
    mail_env: MailEnv, tmp_path: Path, checked: str, matches: bool
) -> None:
    ca = trustme.CA()
    mx = start_receiving_server(server_context(tmp_path, *chain_with_anchor(ca, DOMAIN)))
    try:
        dns = mail_env.dns
        anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
        dns.tlsa("_25._tcp.mx.test", (2, 0, 1, anchor))
        dns.authenticated(everything=True)
        mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
        mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
        result = mail_env.cli("check", "--json", checked)
        [host] = result.json()["hosts"]
        assert host["tls_policy"] == "dane"
        [address] = host["addresses"]
        if matches:
            assert result.code == 0, result.err
            assert address["dane"].startswith("matched DANE-TA"), address["dane"]
        else:
            assert result.code != 0
            assert f"not valid for mx.test or {OTHER_DOMAIN}" in address["dane"]
            assert address["usable"] is False
    finally:
        mx.stop()


def test_check_follows_an_aliased_domain_to_its_expansions_certificate(
    mail_env: MailEnv, tmp_path: Path
) -> None:
    ca = trustme.CA()
    mx = start_receiving_server(server_context(tmp_path, *chain_with_anchor(ca, DOMAIN)))
    try:
        dns = mail_env.dns
        dns.cname("alias.example", DOMAIN)
        anchor = hashlib.sha256(der(ca.cert_pem.bytes())).digest()
        dns.tlsa("_25._tcp.mx.test", (2, 0, 1, anchor))
        dns.authenticated(everything=True)
        mail_env.cli.env["MAILSTROM_SMTP_PORT"] = str(mx.port)
        mail_env.cli.env["MAILSTROM_DNS_DNSSEC"] = "true"
        result = mail_env.cli("check", "--json", "alias.example")
        assert result.code == 0, result.err
        report = result.json()
        assert report["alias_of"] == DOMAIN
        [host] = report["hosts"]
        [address] = host["addresses"]
        assert address["dane"].startswith("matched DANE-TA"), address["dane"]
        text = mail_env.cli("check", "alias.example")
        assert f"alias of:    {DOMAIN}" in text.out
    finally:
        mx.stop()
