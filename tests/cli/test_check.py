"""``mailstrom check`` against the loopback DNS and SMTP fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cli.conftest import MailEnv
from tests.cli.test_errors import assert_one_line_error
from tests.fixtures.smtp_server import ReceivingServer


def test_check_reports_mx_tls_and_verified_certificate(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    mail_env.dns.a("client.test", "127.0.0.1")
    report = cli.ok("check", "--json", "example.test").json()

    assert report["implicit_mx"] is False
    assert report["dns_error"] is None
    [host] = report["hosts"]
    assert (host["name"], host["preference"]) == ("mx.test", 10)
    [address] = host["addresses"]
    assert address["ip"] == "127.0.0.1"
    assert address["port"] == mail_env.mx.port
    assert address["connected"] is True
    assert address["starttls"] is True
    assert "PIPELINING" in address["extensions"]
    assert address["tls_version"].startswith("TLSv1")
    assert address["tls_cipher"]
    assert address["certificate_verified"] is True
    assert "mx.test" in address["certificate"]["names"]
    assert address["certificate"]["expires"]
    assert address["usable"] is True
    helo = report["helo"]
    assert helo["name"] == "client.test"
    assert helo["addresses"] == ["127.0.0.1"]
    # The fixture serves no PTR records: forward and reverse cannot match.
    assert helo["forward_confirmed"] is False

    text = cli.ok("check", "example.test").out
    assert "MX 10 mx.test" in text
    assert "STARTTLS:    offered" in text
    assert "certificate: verified" in text
    assert "would deliver over TLS" in text
    assert "HELO name client.test" in text


def test_check_unverifiable_certificate_under_verify_policy(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    del cli.env["MAILSTROM_TLS_CA"]  # the system trust store does not know the test CA
    result = cli("check", "--tls", "verify", "--json", "example.test")
    assert result.code == 69
    [address] = result.json()["hosts"][0]["addresses"]
    assert address["certificate_verified"] is False
    assert "certificate" in address["certificate_error"]
    assert address["tls_version"]  # the handshake itself works unverified
    assert address["verdict"].startswith("would defer (tls=verify)")


def test_check_without_starttls_and_implicit_mx(
    mail_env: MailEnv, smtp_server: Callable[..., ReceivingServer]
) -> None:
    plain = smtp_server(host="127.0.0.2", starttls=False)
    mail_env.dns.a("plain.test", "127.0.0.2")  # no MX: the A record stands in
    cli = mail_env.cli
    cli.env["MAILSTROM_SMTP_PORT"] = str(plain.port)
    report = cli.ok("check", "--json", "plain.test").json()
    assert report["implicit_mx"] is True
    [address] = report["hosts"][0]["addresses"]
    assert address["starttls"] is False
    assert address["tls_version"] is None
    assert address["verdict"] == "would deliver in plaintext (no STARTTLS)"

    required = cli("check", "--tls", "required", "plain.test")
    assert required.code == 69
    assert "would defer (tls=required)" in required.out


def test_check_null_mx_and_unreachable(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    mail_env.dns.null_mx("nomail.test")
    result = cli("check", "--json", "nomail.test")
    assert result.code == 69
    report = result.json()
    assert report["dns_permanent"] is True
    assert report["dns_error"]
    assert report["hosts"] == []

    mail_env.dns.servfail("broken.test")
    assert cli("check", "broken.test").code == 75

    mail_env.dns.mx("down.test", [(5, "down-mx.test")])
    mail_env.dns.a("down-mx.test", "127.0.0.3")  # nothing listens there
    down = cli("check", "--json", "down.test")
    assert down.code == 69
    [address] = down.json()["hosts"][0]["addresses"]
    assert address["connected"] is False
    assert address["error"]


def test_check_resolves_as_the_worker_does_with_a_source_address(mail_env: MailEnv) -> None:
    # "It resolves the domain as the worker does", but its router left out the IP version
    # of source_address: it showed, and probed from that address, MX hosts the worker
    # skips (an IPv6-only one for an IPv4 source_address), each a "would defer".
    cli = mail_env.cli
    cli.env["MAILSTROM_SOURCE_ADDRESS"] = "127.0.0.1"
    mail_env.dns.mx("six.test", [(10, "mx6.six.test"), (20, "mx.test")])
    mail_env.dns.aaaa("mx6.six.test", "::1")
    report = cli.ok("check", "--json", "six.test").json()
    assert [host["name"] for host in report["hosts"]] == ["mx.test"]


def test_check_helo_name_with_a_u_label_is_forward_confirmed_by_its_a_label(
    mail_env: MailEnv,
) -> None:
    # EHLO sends the A-label, which is also all a PTR record can name.
    cli = mail_env.cli
    cli.env["MAILSTROM_HELO_NAME"] = "clïent.test"
    mail_env.dns.a("xn--clent-dta.test", "127.0.0.1")
    mail_env.dns.ptr("127.0.0.1", "xn--clent-dta.test")
    helo = cli.ok("check", "--json", "example.test").json()["helo"]
    assert helo["addresses"] == ["127.0.0.1"]
    assert helo["ptr"] == {"127.0.0.1": ["xn--clent-dta.test"]}
    assert helo["forward_confirmed"] is True


def test_check_helo_ptr_lookup_failure_is_reported_not_taken_for_no_ptr(
    mail_env: MailEnv,
) -> None:
    mail_env.dns.a("client.test", "127.0.0.1")
    mail_env.dns.servfail("1.0.0.127.in-addr.arpa")
    cli = mail_env.cli
    helo = cli.ok("check", "--json", "example.test").json()["helo"]
    assert helo["forward_confirmed"] is False
    assert helo["ptr"] == {}  # not known: no empty list, which says there is no PTR
    assert "PTR lookup for 127.0.0.1 failed" in (helo["error"] or ""), helo

    text = cli.ok("check", "example.test").out
    assert "PTR 127.0.0.1" not in text
    assert "problem:     PTR lookup for 127.0.0.1 failed" in text
    assert "do not match" not in text
    assert "could not be checked" in text


def test_check_helo_lookups_answered_with_a_referral_are_failures_not_no_records(
    mail_env: MailEnv,
) -> None:
    # A DNS server that does not resolve recursively answers with a referral, which
    # says nothing of whether the records exist: the HELO name was reported as one
    # "with no A or AAAA record", and an address as one without a PTR record.
    cli = mail_env.cli
    mail_env.dns.referral("client.test")
    helo = cli.ok("check", "--json", "example.test").json()["helo"]
    assert "no A or AAAA record" not in (helo["error"] or ""), helo
    assert "A lookup failed" in (helo["error"] or ""), helo
    assert "referral" in (helo["error"] or ""), helo

    mail_env.dns.a("client.test", "127.0.0.1")
    mail_env.dns.referral("1.0.0.127.in-addr.arpa")
    helo = cli.ok("check", "--json", "example.test").json()["helo"]
    assert helo["ptr"] == {}, helo  # not known: no empty list, which says there is none
    assert "PTR lookup for 127.0.0.1 failed" in (helo["error"] or ""), helo


def test_check_helo_name_that_is_an_address_literal(mail_env: MailEnv) -> None:
    # helo_name may be an address literal (RFC 5321 §4.1.3). It was looked up as a DNS
    # name ("[127.0.0.1]" A and AAAA), and reported as a name without addresses.
    cli = mail_env.cli
    cli.env["MAILSTROM_HELO_NAME"] = "[127.0.0.1]"
    mail_env.dns.ptr("127.0.0.1", "client.test")
    mail_env.dns.reset_counts()
    helo = cli.ok("check", "--json", "example.test").json()["helo"]
    assert helo["addresses"] == ["127.0.0.1"]
    assert helo["ptr"] == {"127.0.0.1": ["client.test"]}
    assert helo["forward_confirmed"] is False
    assert "address literal" in (helo["error"] or ""), helo
    assert "no A or AAAA record" not in (helo["error"] or "")
    asked = {name for name, rtype in mail_env.dns.query_counts() if rtype in ("A", "AAAA")}
    assert not any("[" in name for name in asked), asked


def test_check_helo_looks_up_the_ptr_of_ten_addresses_at_most(mail_env: MailEnv) -> None:
    # The HELO name's RRsets hold as many addresses as DNS gives (thousands over TCP), and
    # each PTR lookup may cost the whole DNS timeout.
    addresses = [f"127.0.1.{i}" for i in range(1, 41)]
    mail_env.dns.a("client.test", *addresses)
    mail_env.dns.reset_counts()
    helo = mail_env.cli.ok("check", "--json", "example.test").json()["helo"]
    asked = [name for name, rtype in mail_env.dns.query_counts() if rtype == "PTR"]
    assert len(asked) == 10, asked
    assert len(helo["ptr"]) == 10
    assert len(helo["addresses"]) == 40


@pytest.mark.parametrize("domain", ["", " ", ".", "a..example", "a" * 64 + ".example"])
def test_check_of_no_domain_name_is_a_usage_error(mail_env: MailEnv, domain: str) -> None:
    """An argument DNS cannot name (empty, an empty or over-long label) was checked all
    the same: a report of an "invalid recipient domain", and exit 69 as for a domain
    that takes no mail, where it is the command line that is wrong."""
    result = mail_env.cli("check", domain)
    assert_one_line_error(
        result, 64, "argument domain", "not a domain name", f"{domain[:20]!r}"[:-1]
    )


def test_check_of_an_address_checks_its_domain(mail_env: MailEnv) -> None:
    """A pasted address was looked up as one name with the "@" escaped ("bob\\@example
    .test"): an NXDOMAIN report and exit 69. ``doctor`` takes an address's domain too."""
    mail_env.dns.a("client.test", "127.0.0.1")
    report = mail_env.cli.ok("check", "--json", "bob@example.test").json()
    assert report["domain"] == "example.test"
    assert report["dns_error"] is None
    assert [host["name"] for host in report["hosts"]] == ["mx.test"]


@pytest.mark.parametrize("domain", ["exa mple.test", "exa\tmple.test", "bob@", "a@b@"])
def test_check_of_a_name_no_mail_domain_can_be_is_a_usage_error(
    mail_env: MailEnv, domain: str
) -> None:
    """White space was escaped into the name looked up, as "@" was: an NXDOMAIN report
    and exit 69 for what is a mistake on the command line."""
    result = mail_env.cli("check", domain)
    assert_one_line_error(result, 64, "argument domain", "not a domain name")
