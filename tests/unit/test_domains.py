"""Domain names: what the strict, letter-digit-hyphen form takes that DKIM and the doctor
use, beside the lenient one the Message-ID domain keeps."""

from __future__ import annotations

import pytest

from mailstrom.config import Config
from mailstrom.domains import MAX_DOMAIN, a_label, domain_name, helo_name_problem, ldh_domain_name
from mailstrom.errors import ConfigError

# Names DNS can hold but no RFC 5321 Domain is (RFC 6376 §3.5's d= is one).
NOT_LDH = [
    "ex=ample.com",
    "ex{ample}.com",
    "ex/ample.com",
    "ex*ample.com",
    "_dmarc.example.com",
    "-lead.example.com",
    "trail-.example.com",
    "ex\\065ample.com",  # a DNS escape, for "exAample.com"
]


@pytest.mark.parametrize("name", NOT_LDH)
def test_names_dns_can_hold_but_smtp_cannot_are_refused(name: str) -> None:
    domain_name(name)  # the lenient form takes them (a Message-ID's domain may be so)
    with pytest.raises(ValueError, match="not a letter-digit-hyphen domain name"):
        ldh_domain_name(name)


@pytest.mark.parametrize("name", ["ex,ample.com", "ex:ample.com", "ex[ample].com", "a]b.com"])
def test_names_no_message_id_can_hold_are_refused(name: str) -> None:
    # RFC 5322 specials (§3.2.3) cannot be in a Message-ID's id-right (§3.6.4), which
    # prepare() checks: a message_id_domain like these was taken by Config, and then every
    # message was refused ("id_domain ... is not an ASCII domain name").
    with pytest.raises(ValueError, match="not a fully qualified domain name"):
        domain_name(name)
    with pytest.raises(ConfigError, match="message_id_domain"):
        Config(message_id_domain=name)


@pytest.mark.parametrize(
    "name", ["", "..", "com", "user@", "ex ample.com", "ex;ample.com", "a" * 64 + ".com"]
)
def test_what_is_no_domain_name_at_all_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="domain name"):
        ldh_domain_name(name)


def test_the_normal_form() -> None:
    assert ldh_domain_name(" Mail.Example.COM. ") == "mail.example.com"
    assert ldh_domain_name("Bücher.Example") == "xn--bcher-kva.example"  # as domain_name does
    assert ldh_domain_name("3com.example") == "3com.example"


def test_at_most_253_characters() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == MAX_DOMAIN == 253
    assert ldh_domain_name(longest) == longest
    with pytest.raises(ValueError, match="got 255"):
        ldh_domain_name("e." + longest)


def test_huge_input_is_not_echoed() -> None:
    with pytest.raises(ValueError, match=r"…\(9926 more\)…") as caught:
        ldh_domain_name("=" * 10_000 + ".com")
    assert len(str(caught.value)) < 300


def test_a_labels_are_idna_2008_as_email_validator_and_dnspython_make_them() -> None:
    assert a_label("Straße.DE") == "xn--strae-oqa.de"  # IDNA 2003 would say strasse.de
    assert a_label("mail.Example.COM") == "mail.example.com"
    assert helo_name_problem("mail.straße.de") is None
    with pytest.raises(ValueError, match="no A-label form"):
        a_label("a\u200db.de")  # a joiner where IDNA 2008 allows none


@pytest.mark.parametrize("name", ["192.0.2.1", "10.1.2.3", "mail.example.123", "1.2.3.4."])
def test_a_name_whose_last_label_is_all_digits_is_no_smtp_domain(name: str) -> None:
    # RFC 1123 §2.1 and RFC 3696 §2: a top-level label is never all digits, so such a name
    # is an IPv4 address written bare, no host name; EHLO wants the literal [192.0.2.1]
    # (RFC 5321 §4.1.3), and Postfix's reject_invalid_helo_hostname refuses "EHLO 192.0.2.1".
    assert helo_name_problem(name) is not None
    with pytest.raises(ValueError, match="not a letter-digit-hyphen domain name"):
        ldh_domain_name(name)
    with pytest.raises(ConfigError, match=r"helo_name .*\[192\.0\.2\.1\]"):
        Config(helo_name=name)
    assert helo_name_problem("[192.0.2.1]") is None
    assert ldh_domain_name("3com.example") == "3com.example"  # digits elsewhere are fine
    assert ldh_domain_name("4.3.2.1.in-addr.arpa") == "4.3.2.1.in-addr.arpa"
