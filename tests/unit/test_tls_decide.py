"""The per-destination TLS decision: its order of precedence, as pure logic."""

from __future__ import annotations

import pytest

from mailstrom.config import Config, DNSConfig, RelayConfig, TLSPolicy
from mailstrom.errors import RequireTLSFailure, TemporaryFailure
from mailstrom.tls.decide import BrokenTLS, Destination, TLSDecider
from mailstrom.tls.headers import tls_required_no
from mailstrom.tls.requirement import PolicySource, TLSARecord, TLSMode, TLSRequirement

DEST = Destination(domain="example.org", mx_host="mx.example.org", mx_secure=True, host_secure=True)


class Source:
    """A policy source answering with a fixed requirement (or None), counting its calls."""

    def __init__(self, name: str, answer: TLSRequirement | None) -> None:
        self.name = name
        self.answer = answer
        self.calls: list[tuple[Destination, TLSRequirement]] = []

    async def requirement(
        self, destination: Destination, default: TLSRequirement
    ) -> TLSRequirement | None:
        self.calls.append((destination, default))
        return self.answer


DANE = TLSRequirement(
    mode=TLSMode.DANE,
    source=PolicySource.DANE,
    tlsa=(TLSARecord(usage=3, selector=1, matching=1, data=b"x" * 32),),
)
STS = TLSRequirement(
    mode=TLSMode.VERIFY, source=PolicySource.MTA_STS, detail="enforce", mx_listed=True
)


def config(**kwargs: object) -> Config:
    return Config(helo_name="mx.test", **kwargs)  # type: ignore[arg-type]


async def test_the_global_policy_is_the_default() -> None:
    need = await TLSDecider(config(tls=TLSPolicy.VERIFY)).requirement(DEST)
    assert need.mode is TLSMode.VERIFY and need.source is PolicySource.DEFAULT
    assert need.label == "verify"


async def test_a_table_entry_overrides_the_global_policy_and_the_sources() -> None:
    sts = Source("mta-sts", STS)
    decider = TLSDecider(config(tls_domains={"example.org": "none"}), sources=[sts])
    need = await decider.requirement(DEST)
    assert need.mode is TLSMode.NONE and need.source is PolicySource.TABLE
    assert "example.org = none" in need.reason
    assert sts.calls == []


async def test_dane_comes_before_mta_sts() -> None:
    dane, sts = Source("dane", DANE), Source("mta-sts", STS)
    decider = TLSDecider(config(), sources=[dane, sts])
    assert await decider.requirement(DEST) is DANE
    assert sts.calls == []


async def test_mta_sts_decides_when_dane_has_nothing_to_say() -> None:
    dane, sts = Source("dane", None), Source("mta-sts", STS)
    decider = TLSDecider(config(), sources=[dane, sts])
    need = await decider.requirement(DEST)
    assert need is STS and need.label == "mta-sts enforce"
    # The source is told what applies without it.
    assert sts.calls[0][1].mode is TLSMode.OPPORTUNISTIC


UNUSABLE = TLSRequirement(mode=TLSMode.REQUIRED, source=PolicySource.DANE)
"""What DANE says of a host whose validated TLSA records are all unusable (PKIX usages
0 and 1, a common mistake): TLS, unauthenticated (RFC 7672 §2.2)."""


@pytest.mark.parametrize("level", [TLSPolicy.OPPORTUNISTIC, TLSPolicy.DANE])
async def test_dane_without_usable_records_leaves_mta_sts_enforce_in_force(
    level: TLSPolicy,
) -> None:
    """No DANE validation took place, so none fails that MTA-STS could override (RFC
    8461 §2): the domain's enforce policy still wants a verified certificate (and a
    listed MX host), with TLS required by DANE as the floor the policy is told of."""
    dane, sts = Source("dane", UNUSABLE), Source("mta-sts", STS)
    decider = TLSDecider(config(tls=level, dns=DNSConfig(dnssec=True)), sources=[dane, sts])
    need = await decider.requirement(DEST)
    assert need is STS
    assert sts.calls[0][1] is UNUSABLE


async def test_dane_without_usable_records_decides_when_mta_sts_has_nothing_to_say() -> None:
    decider = TLSDecider(config(), sources=[Source("dane", UNUSABLE), Source("mta-sts", None)])
    assert await decider.requirement(DEST) is UNUSABLE


async def test_for_config_puts_the_mta_sts_hook_after_dane() -> None:
    sts = Source("mta-sts", STS)
    decider = TLSDecider.for_config(config(), mta_sts=sts, dane=Source("dane", None))
    assert await decider.requirement(DEST) is STS


async def test_tls_required_no_skips_the_sources() -> None:
    dane = Source("dane", DANE)
    decider = TLSDecider(config(), sources=[dane])
    need = await decider.requirement(
        Destination(domain="example.org", mx_host="mx.example.org", tls_optional=True)
    )
    assert need.mode is TLSMode.OPPORTUNISTIC
    assert need.source is PolicySource.TLS_REQUIRED_NO
    assert dane.calls == []


async def test_tls_required_no_skips_dane_under_the_global_dane_level() -> None:
    """``tls = "dane"`` is DANE where the recipient publishes it, as ``dns.dnssec`` alone
    is: ``TLS-Required: No`` (RFC 8689 §5) ignores it alike (TLS reports rely on it)."""
    dane = Source("dane", DANE)
    decider = TLSDecider(config(tls=TLSPolicy.DANE, dns=DNSConfig(dnssec=True)), sources=[dane])
    need = await decider.requirement(
        Destination(domain="example.org", mx_host="mx.example.org", tls_optional=True)
    )
    assert need.mode is TLSMode.OPPORTUNISTIC
    assert need.source is PolicySource.TLS_REQUIRED_NO
    assert dane.calls == []


async def test_tls_required_no_skips_dane_under_a_dane_table_entry() -> None:
    """A ``tls.domains`` entry ``dane`` asks for the recipient's DANE just as the global
    level does: ``TLS-Required: No`` ignores it alike."""
    dane = Source("dane", DANE)
    cfg = config(dns=DNSConfig(dnssec=True), tls_domains={"example.org": "dane"})
    need = await TLSDecider(cfg, sources=[dane]).requirement(
        Destination(domain="example.org", mx_host="mx.example.org", tls_optional=True)
    )
    assert need.mode is TLSMode.OPPORTUNISTIC
    assert need.source is PolicySource.TLS_REQUIRED_NO and "example.org = dane" in need.reason
    assert dane.calls == []


async def test_dane_only_without_tlsa_refuses_the_host() -> None:
    cfg = config(dns=DNSConfig(dnssec=True), tls_domains={"*.example": "dane-only"})
    decider = TLSDecider(cfg, sources=[Source("dane", None)])
    with pytest.raises(TemporaryFailure, match="dane-only"):
        await decider.requirement(Destination(domain="bank.example", mx_host="mx.bank.example"))


async def test_dane_level_without_tlsa_is_opportunistic() -> None:
    cfg = config(dns=DNSConfig(dnssec=True), tls_domains={"example.org": "dane"})
    decider = TLSDecider(cfg, sources=[Source("dane", None)])
    need = await decider.requirement(DEST)
    assert need.mode is TLSMode.OPPORTUNISTIC and need.source is PolicySource.TABLE


async def test_remembered_broken_tls_turns_opportunistic_into_plaintext_only() -> None:
    now = [100.0]
    broken = BrokenTLS(60.0, clock=lambda: now[0])
    broken.note("mx.example.org", "handshake failed")
    decider = TLSDecider(config(), broken=broken)
    need = await decider.requirement(DEST)
    assert need.mode is TLSMode.NONE and need.source is PolicySource.REMEMBERED
    assert need.tls_failed
    strict = TLSDecider(config(tls=TLSPolicy.VERIFY), broken=broken)
    assert (await strict.requirement(DEST)).mode is TLSMode.VERIFY
    now[0] += 61
    assert (await decider.requirement(DEST)).mode is TLSMode.OPPORTUNISTIC


def test_every_plaintext_chosen_for_failed_tls_says_so() -> None:
    """A 530 (STARTTLS first) defers in a session that is plaintext because TLS failed:
    remembered broken, or an MTA-STS testing fallback of either kind. The fallback to
    plaintext for a host remembered broken kept the policy's source, and was missed."""
    broken = BrokenTLS(60.0, clock=lambda: 100.0)
    broken.note("mx.example.org", "handshake failed")
    decider = TLSDecider(config(), broken=broken)
    testing = TLSRequirement(
        mode=TLSMode.VERIFY,
        source=PolicySource.MTA_STS,
        detail="testing",
        fallback=TLSMode.OPPORTUNISTIC,
    )
    remembered = decider.fallback(testing, "mx.example.org", "handshake failed")
    assert remembered.mode is TLSMode.NONE and remembered.tls_failed
    assert remembered.source is PolicySource.MTA_STS
    again = decider.fallback(testing, "mx.other.example", "handshake failed")
    assert again.mode is TLSMode.OPPORTUNISTIC and not again.tls_failed
    plain = TLSRequirement(mode=TLSMode.VERIFY, source=PolicySource.MTA_STS, fallback=TLSMode.NONE)
    assert decider.fallback(plain, "mx.other.example", "certificate expired").tls_failed
    assert not TLSRequirement(mode=TLSMode.NONE, source=PolicySource.DEFAULT).tls_failed


async def test_a_relay_decides_alone() -> None:
    cfg = config(relay=RelayConfig(host="smtp.example.net"), tls_domains={"example.org": "none"})
    need = await TLSDecider(cfg).requirement(DEST)
    assert need.mode is TLSMode.VERIFY and need.source is PolicySource.RELAY


async def test_requiretls_upgrades_an_unauthenticated_policy_to_verify() -> None:
    cfg = config(dns=DNSConfig(dnssec=True))
    need = await TLSDecider(cfg, sources=[Source("dane", None)]).requirement(
        Destination(
            domain="example.org", mx_host="mx.example.org", mx_secure=True, require_tls=True
        )
    )
    assert need.mode is TLSMode.VERIFY and "REQUIRETLS" in need.reason


@pytest.mark.parametrize(
    ("cfg", "mx_secure"),
    [
        (config(), False),
        (config(tls=TLSPolicy.VERIFY), False),
        (config(tls_domains={"example.org": "verify"}), False),
        # The AD bit of a resolver not trusted to validate proves nothing.
        (config(), True),
    ],
)
async def test_requiretls_refuses_an_mx_host_neither_dnssec_nor_mta_sts_vouches_for(
    cfg: Config, mx_secure: bool
) -> None:
    """RFC 8689 §4.2.1: the MX host must come from DNSSEC-validated records or be listed
    by an MTA-STS policy; a certificate valid for a name an attacker put in the MX
    answer proves nothing."""
    with pytest.raises(RequireTLSFailure) as caught:
        await TLSDecider(cfg).requirement(
            Destination(
                domain="example.org",
                mx_host="mx.example.org",
                mx_secure=mx_secure,
                require_tls=True,
            )
        )
    assert caught.value.enhanced == "5.7.30" and "DNSSEC" in caught.value.text


async def test_requiretls_takes_an_mx_host_an_mta_sts_enforce_policy_lists() -> None:
    decider = TLSDecider(config(), sources=[Source("mta-sts", STS)])
    need = await decider.requirement(
        Destination(domain="example.org", mx_host="mx.example.org", require_tls=True)
    )
    assert need is STS


async def test_requiretls_refuses_an_mx_host_a_testing_policy_does_not_list() -> None:
    unlisted = TLSRequirement(
        mode=TLSMode.VERIFY, source=PolicySource.MTA_STS, detail="testing"
    )  # what the hook answers under tls = "verify" for a host matching no pattern
    decider = TLSDecider(config(tls=TLSPolicy.VERIFY), sources=[Source("mta-sts", unlisted)])
    with pytest.raises(RequireTLSFailure):
        await decider.requirement(
            Destination(domain="example.org", mx_host="mx.example.org", require_tls=True)
        )


async def test_requiretls_through_a_relay_verifies_the_relay() -> None:
    cfg = config(relay=RelayConfig(host="smtp.example.net", verify=False))
    need = await TLSDecider(cfg).requirement(
        Destination(domain="example.org", mx_host="smtp.example.net", require_tls=True)
    )
    assert need.mode is TLSMode.VERIFY and need.source is PolicySource.RELAY


async def test_requiretls_keeps_dane_and_ignores_tls_required_no() -> None:
    decider = TLSDecider(config(), sources=[Source("dane", DANE)])
    need = await decider.requirement(
        Destination(
            domain="example.org",
            mx_host="mx.example.org",
            require_tls=True,
            tls_optional=True,
        )
    )
    assert need is DANE


async def test_requiretls_to_a_none_domain_fails_permanently() -> None:
    decider = TLSDecider(config(tls_domains={"example.org": "none"}))
    with pytest.raises(RequireTLSFailure) as caught:
        await decider.requirement(
            Destination(domain="example.org", mx_host="mx.example.org", require_tls=True)
        )
    assert caught.value.enhanced == "5.7.30"


async def test_requiretls_is_never_sent_in_plaintext_for_remembered_broken_tls() -> None:
    broken = BrokenTLS(60.0)
    broken.note("mx.example.org", "handshake failed")
    cfg = config(dns=DNSConfig(dnssec=True))
    need = await TLSDecider(cfg, sources=[Source("dane", None)], broken=broken).requirement(
        Destination(
            domain="example.org", mx_host="mx.example.org", mx_secure=True, require_tls=True
        )
    )
    assert need.mode is TLSMode.VERIFY


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
        (b"Subject: x\r\ntls-required:no  \r\n\r\nbody\r\n", True),
        (b"Subject: x\r\nTLS-Required: Yes\r\n\r\nbody\r\n", False),
        (b"Subject: x\r\nX-TLS-Required: No\r\n\r\nbody\r\n", False),
        (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),
        (b"Subject: TLS-Required: No\r\n\r\n", False),
        # RFC 8689 §5: "TLS-Required:" [FWS] "No" CRLF; FWS may fold the line.
        (b"Subject: x\r\nTLS-Required:\r\n No\r\n\r\nbody\r\n", True),
        (b"Subject: x\r\nTLS-Required: \r\n\tNo\r\n\r\nbody\r\n", True),
        (b"Subject: x\r\nTLS-Required:\r\nNo: x\r\n\r\nbody\r\n", False),
    ],
)
def test_tls_required_no_is_read_from_the_header_only(data: bytes, expected: bool) -> None:
    assert tls_required_no(data) is expected
