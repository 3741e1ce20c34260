"""The per-domain TLS policy table: parsing, validation and matching."""

from __future__ import annotations

import pytest

from mailstrom.config import Config, DNSConfig, TLSPolicy
from mailstrom.errors import ConfigError
from mailstrom.tls.table import PolicyTable


def test_exact_entry_matches_case_insensitively() -> None:
    table = PolicyTable.parse({"Example.COM.": "verify"})
    assert table.match("example.com") == ("example.com", TLSPolicy.VERIFY)
    assert table.match("EXAMPLE.com.") == ("example.com", TLSPolicy.VERIFY)
    assert table.match("other.com") is None


def test_wildcard_matches_names_under_it_only() -> None:
    table = PolicyTable.parse({"*.bank.example": "required"})
    assert table.match("www.bank.example") == ("*.bank.example", TLSPolicy.REQUIRED)
    assert table.match("a.b.bank.example") == ("*.bank.example", TLSPolicy.REQUIRED)
    assert table.match("bank.example") is None
    assert table.match("notbank.example") is None


def test_exact_beats_wildcard_and_nearest_wildcard_wins() -> None:
    table = PolicyTable.parse(
        {"*.example": "verify", "*.bank.example": "required", "legacy.bank.example": "none"}
    )
    assert table.match("legacy.bank.example") == ("legacy.bank.example", TLSPolicy.NONE)
    assert table.match("www.bank.example") == ("*.bank.example", TLSPolicy.REQUIRED)
    assert table.match("shop.example") == ("*.example", TLSPolicy.VERIFY)


def test_unicode_names_are_matched_as_a_labels() -> None:
    table = PolicyTable.parse({"bücher.example": "verify"})
    assert table.match("xn--bcher-kva.example") == ("xn--bcher-kva.example", TLSPolicy.VERIFY)
    assert table.match("BÜCHER.example") is not None


def test_unicode_names_are_read_by_idna_2008_as_recipient_domains_are() -> None:
    # IDNA 2003 (Python's "idna" codec) maps ß to ss: the entry would miss the domain
    # mail is addressed to (xn--strae-oqa.de) and apply to another one (strasse.de).
    table = PolicyTable.parse({"straße.de": "verify", "*.faß.de": "none"})
    assert table.match("xn--strae-oqa.de") == ("xn--strae-oqa.de", TLSPolicy.VERIFY)
    assert table.match("Straße.de") == ("xn--strae-oqa.de", TLSPolicy.VERIFY)
    assert table.match("strasse.de") is None
    assert table.match("mx.xn--fa-hia.de") == ("*.xn--fa-hia.de", TLSPolicy.NONE)


def test_unicode_names_are_not_lowered_before_idna_maps_them() -> None:
    # str.lower() makes a capital sigma before a digit the final sigma (U+03C2), which
    # IDNA keeps as written: "ΛΣ1" is xn--1-jmby, as prepare() addresses the mail, but
    # its lower() is xn--1-jmbv, another domain, which the entry then named instead.
    table = PolicyTable.parse({"ΛΣ1.example": "verify", "*.ΛΣ2.example": "none"})
    assert table.match("xn--1-jmby.example") == ("xn--1-jmby.example", TLSPolicy.VERIFY)
    assert table.match("ΛΣ1.example") == ("xn--1-jmby.example", TLSPolicy.VERIFY)
    assert table.match("xn--1-jmbv.example") is None
    assert table.match("mx.xn--2-jmby.example") == ("*.xn--2-jmby.example", TLSPolicy.NONE)


@pytest.mark.parametrize(
    "entries",
    [
        {"example.com": "sometimes"},
        {"": "verify"},
        {"*": "verify"},
        {"a.*.example": "verify"},
        {"user@example.com": "verify"},
        {"example..com": "verify"},
        {"example.com": 3},
    ],
)
def test_bad_entries_are_refused_with_a_clear_error(entries: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"tls\.domains"):
        PolicyTable.parse(entries)


def test_config_takes_a_plain_mapping_and_keeps_a_table() -> None:
    config = Config(helo_name="mx.test", tls_domains={"legacy.example": "none"})
    assert isinstance(config.tls_domains, PolicyTable)
    assert config.tls_table.match("legacy.example") == ("legacy.example", TLSPolicy.NONE)
    hash(config)  # still usable as a key


def test_dane_levels_need_a_trusted_resolver() -> None:
    with pytest.raises(ConfigError, match=r"dns\.dnssec"):
        Config(helo_name="mx.test", tls_domains={"*.bank.example": "dane-only"})
    with pytest.raises(ConfigError, match=r"dns\.dnssec"):
        Config(helo_name="mx.test", tls=TLSPolicy.DANE)
    Config(
        helo_name="mx.test",
        dns=DNSConfig(dnssec=True),
        tls_domains={"*.bank.example": "dane-only"},
    )


def test_unknown_global_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="tls must be one of"):
        Config(helo_name="mx.test", tls="maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tls", "relay", "loop"),
    [
        ("Verify", "Implicit", "Asyncio"),
        ("VERIFY", "IMPLICIT", "ASYNCIO"),
        (" verify\t", " implicit\t", " asyncio\t"),
    ],
)
def test_tls_words_are_read_in_any_case_in_every_place(tls: str, relay: str, loop: str) -> None:
    """``tls_domains`` values were folded to lower case and ``tls`` itself was not, so
    ``Config(tls="Verify")`` was refused while ``tls_domains={"x": "Verify"}`` was taken;
    the TOML and environment settings fold every such word. All are read alike now."""
    from mailstrom import RelayConfig
    from mailstrom.config import EventLoop, RelayTLS

    config = Config(helo_name="mx.test", tls=tls, tls_domains={"example.org": tls})  # type: ignore[arg-type]
    assert config.tls is TLSPolicy.VERIFY
    assert config.tls_table.match("example.org") == ("example.org", TLSPolicy.VERIFY)
    assert RelayConfig(host="smtp.example.net", tls=relay).tls is RelayTLS.IMPLICIT  # type: ignore[arg-type]
    assert Config(helo_name="mx.test", event_loop=loop).event_loop is EventLoop.ASYNCIO  # type: ignore[arg-type]
