"""``mailstrom doctor`` through the installed command, against the loopback DNS server and
a loopback receiver: a well-configured domain, a misconfigured one, and each check's
passing and failing case."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailstrom.doctor.dkim import public_key, record_for
from tests.cli.conftest import CLI, MailEnv
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import ReceivingServer, free_loopback_port
from tests.support.dkim import EC_SECP112R1, EC_SECP112R1_SPKI
from tests.support.private_hosts import private_mounts

GOOD = "sender.test"
BAD = "bad.test"
HELO = "client.test"  # the cli fixture's MAILSTROM_HELO_NAME
BLOCKLIST = "bl.test"


def write_key(path: Path, bits: int = 2048) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return record_for(public_key(path.read_bytes()))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """RSA keys made once per module (2048-bit generation is slow on two shared cores)."""
    folder = tmp_path_factory.mktemp("dkim")
    made = {}
    for name, bits in (("good", 2048), ("other", 2048), ("small", 1024)):
        path = folder / f"{name}.pem"
        made[name] = (path, write_key(path, bits))
    return made


def publish_good(dns: LoopbackDNS, keys: dict[str, tuple[Path, str]]) -> None:
    dns.ptr("127.0.0.1", HELO)
    dns.a(HELO, "127.0.0.1")
    dns.txt(HELO, "v=spf1 a -all")
    dns.txt(GOOD, "google-site-verification=abc", "v=spf1 ip4:127.0.0.1 -all")
    dns.mx(GOOD, [(10, "mx.test")])
    dns.txt(f"s1._domainkey.{GOOD}", keys["good"][1])
    dns.txt(f"_dmarc.{GOOD}", f"v=DMARC1; p=reject; rua=mailto:dmarc@{GOOD}")


def doctor(env: MailEnv, *args: str, **extra: str) -> tuple[int, Any]:
    """Run ``doctor --json`` with the probe on the loopback receiver."""
    result = env.cli(
        "doctor",
        "--json",
        "--probe",
        f"127.0.0.1:{env.mx.port}",
        "--dnsbl",
        BLOCKLIST,
        *args,
    )
    assert result.err == "", result.err
    return result.code, result.json()


def by_name(report: Any) -> dict[str, list[dict[str, Any]]]:
    checks: dict[str, list[dict[str, Any]]] = {}
    for c in report["checks"]:
        checks.setdefault(c["name"], []).append(c)
    return checks


def good_env(env: MailEnv, keys: dict[str, tuple[Path, str]]) -> CLI:
    publish_good(env.dns, keys)
    env.cli.env["MAILSTROM_SOURCE_ADDRESS"] = "127.0.0.1"
    return env.cli


def test_well_configured_domain_passes_every_check(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    good_env(mail_env, keys)
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{keys['good'][0]}", GOOD)
    assert code == 0, report
    assert report["verdict"] == "pass"
    assert report["ip"] == "127.0.0.1"
    checks = by_name(report)
    assert set(checks) == {
        "outgoing-ip",
        "port-25",
        "ptr",
        "helo",
        "spf",
        "spf-helo",
        "mx",
        "dkim",
        "dmarc",
        "dnsbl",
    }
    assert all(c["status"] == "pass" for c in report["checks"]), report
    assert checks["port-25"][0]["summary"].startswith("answered: 220")
    assert "forward-confirmed" in checks["ptr"][0]["summary"]
    assert "RSA 2048 bits" in checks["dkim"][0]["summary"]
    assert "would pass DMARC (p=reject)" in checks["dmarc"][0]["summary"]
    assert checks["dnsbl"][0]["subject"] == BLOCKLIST

    text = mail_env.cli(
        "doctor",
        "--probe",
        f"127.0.0.1:{mail_env.mx.port}",
        "--dnsbl",
        BLOCKLIST,
        "--dkim",
        f"{GOOD}:s1:{keys['good'][0]}",
        GOOD,
    )
    assert text.code == 0
    assert "Sender doctor for sender.test" in text.out
    assert "How to fix" not in text.out
    assert "Verdict: every check passed" in text.out


def test_an_internationalized_helo_name_is_judged_as_ehlo_sends_it(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    # EHLO sends a U-label HELO name as its A-label, and a PTR record can only hold that.
    good_env(mail_env, keys)
    helo, sent = "clïent.test", "xn--clent-dta.test"
    mail_env.cli.env["MAILSTROM_HELO_NAME"] = helo
    mail_env.dns.ptr("127.0.0.1", sent)
    mail_env.dns.a(sent, "127.0.0.1")
    mail_env.dns.txt(sent, "v=spf1 a -all")
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{keys['good'][0]}", GOOD)
    [helo_check] = by_name(report)["helo"]
    assert helo_check["status"] == "pass", helo_check
    assert helo_check["subject"] == sent
    assert code == 0, report


def test_misconfigured_domain_names_the_records_to_publish(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    dns = mail_env.dns
    dns.a(HELO, "127.0.0.1")  # HELO points elsewhere than the outgoing address
    dns.txt(f"s1._domainkey.{BAD}", keys["other"][1])  # someone else's key
    dns.a(f"2.0.0.127.{BLOCKLIST}", "127.0.0.2")  # RFC 5782's always-listed test entry
    dns.txt(f"2.0.0.127.{BLOCKLIST}", "Listed: see http://bl.test/lookup?127.0.0.2")
    args = ["--ip", "127.0.0.2", "--dkim", f"{BAD}:s1:{keys['good'][0]}", BAD]
    code, report = doctor(mail_env, *args)
    assert code == 2
    assert report["verdict"] == "fail"
    checks = by_name(report)
    status = {name: [c["status"] for c in cs] for name, cs in checks.items()}
    assert status == {
        "outgoing-ip": ["pass"],
        "port-25": ["pass"],
        "ptr": ["fail"],
        "helo": ["fail"],
        "spf": ["fail"],
        "spf-helo": ["warn"],
        "mx": ["fail"],
        "dkim": ["fail"],
        "dmarc": ["warn"],
        "dnsbl": ["fail"],
    }
    good_record = keys["good"][1]
    assert checks["spf"][0]["fix"].startswith(
        'publish TXT at bad.test: "v=spf1 ip4:127.0.0.2 ~all"'
    )
    assert checks["dkim"][0]["fix"] == (
        f'replace the TXT record at s1._domainkey.bad.test by "{good_record}"'
    )
    assert "not the public half" in checks["dkim"][0]["summary"]
    assert checks["dmarc"][0]["fix"].startswith(
        'publish TXT at _dmarc.bad.test: "v=DMARC1; p=none; rua=mailto:dmarc@bad.test"'
    )
    assert checks["ptr"][0]["fix"].endswith("ask for PTR 2.0.0.127.in-addr.arpa → client.test")
    assert checks["helo"][0]["fix"] == "publish A record client.test → 127.0.0.2"
    assert "LISTED (127.0.0.2): Listed: see http://bl.test/lookup" in checks["dnsbl"][0]["summary"]

    text = mail_env.cli(
        "doctor", "--probe", f"127.0.0.1:{mail_env.mx.port}", "--dnsbl", BLOCKLIST, *args
    )
    assert text.code == 2
    assert "How to fix:" in text.out
    assert 'publish TXT at bad.test: "v=spf1 ip4:127.0.0.2 ~all"' in text.out
    assert f'replace the TXT record at s1._domainkey.bad.test by "{good_record}"' in text.out
    assert "publish A record client.test → 127.0.0.2" in text.out
    assert "Verdict: receivers will reject or junk this mail" in text.out

    # --bulk makes the missing DMARC record a failure too.
    _, bulk = doctor(mail_env, "--bulk", *args)
    assert by_name(bulk)["dmarc"][0]["status"] == "fail"


def test_outgoing_address_and_port_25(mail_env: MailEnv, keys: dict[str, tuple[Path, str]]) -> None:
    good_env(mail_env, keys)
    del mail_env.cli.env["MAILSTROM_SOURCE_ADDRESS"]
    # Found by routing towards the probe: loopback, which receivers never see.
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{keys['good'][0]}", GOOD)
    assert code == 1
    [outgoing] = by_name(report)["outgoing-ip"]
    assert outgoing["status"] == "warn"
    assert outgoing["subject"] == "127.0.0.1"
    assert "--ip ADDRESS" in outgoing["fix"]

    # Nothing listens on the probe's port: outbound SMTP refused; the fix is relay mode.
    closed = free_loopback_port("127.0.0.1")
    result = mail_env.cli(
        "doctor",
        "--json",
        "--no-dnsbl",
        "--ip",
        "127.0.0.1",
        "--probe",
        f"127.0.0.1:{closed}",
        GOOD,
    )
    assert result.code == 2
    [port] = by_name(result.json())["port-25"]
    assert port["status"] == "fail"
    assert "refused or unreachable" in port["summary"]
    assert "relay.host" in port["fix"]

    # The default target comes from DNS: the probe domain's first MX (doctor.probe).
    mail_env.cli.env["MAILSTROM_DOCTOR_PROBE"] = "example.test"  # MX mx.test → 127.0.0.1
    result = mail_env.cli("doctor", "--json", "--no-dnsbl", "--ip", "127.0.0.1", GOOD)
    [port] = by_name(result.json())["port-25"]
    assert port["status"] == "pass"
    assert port["subject"] == f"mx.test (127.0.0.1):{mail_env.mx.port}"

    # Relay mode: port 25 is not needed, and the relay's address is unknown.
    mail_env.cli.env["MAILSTROM_RELAY_HOST"] = "relay.test"
    result = mail_env.cli("doctor", "--json", "--no-dnsbl", GOOD)
    checks = by_name(result.json())
    assert checks["port-25"][0]["status"] == "skip"
    assert checks["outgoing-ip"][0]["status"] == "skip"
    assert checks["spf"][0]["status"] == "skip"


def test_fcrdns_mismatched_names(mail_env: MailEnv, keys: dict[str, tuple[Path, str]]) -> None:
    good_env(mail_env, keys)
    dns = mail_env.dns
    # The PTR names a host that does not resolve back.
    dns.ptr("127.0.0.1", "host-127-0-0-1.isp.test")
    _, report = doctor(mail_env, GOOD)
    ptr, helo = by_name(report)["ptr"][0], by_name(report)["helo"][0]
    assert ptr["status"] == "fail"
    assert ptr["fix"] == "publish A record host-127-0-0-1.isp.test → 127.0.0.1"
    assert helo["status"] == "warn"  # resolves, but is not the PTR name

    # Forward-confirmed, but under another name than HELO: set helo_name to it, or the PTR.
    dns.a("host-127-0-0-1.isp.test", "127.0.0.1")
    _, report = doctor(mail_env, GOOD)
    ptr, helo = by_name(report)["ptr"][0], by_name(report)["helo"][0]
    assert ptr["status"] == "pass"
    assert helo["status"] == "warn"
    assert helo["fix"].startswith('set helo_name = "host-127-0-0-1.isp.test", or')

    # A temporary failure decides nothing: exit 75 when nothing failed outright.
    dns.ptr("127.0.0.1", HELO)
    dns.servfail(f"_dmarc.{GOOD}")
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{keys['good'][0]}", GOOD)
    assert by_name(report)["dmarc"][0]["status"] == "unknown"
    assert code == 75


def test_spf_fails_then_passes_once_the_suggested_record_is_published(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    good_env(mail_env, keys)
    dns = mail_env.dns
    dns.txt(GOOD, "v=spf1 include:_spf.provider.test -all")
    dns.txt("_spf.provider.test", "v=spf1 ip4:192.0.2.0/24 -all")
    _, report = doctor(mail_env, GOOD)
    [spf] = by_name(report)["spf"]
    assert spf["status"] == "fail"
    assert spf["summary"].startswith("fail:")
    wanted = "v=spf1 ip4:127.0.0.1 include:_spf.provider.test -all"
    assert spf["fix"] == (
        f'replace TXT at {GOOD} "v=spf1 include:_spf.provider.test -all" by "{wanted}"'
    )
    dns.txt(GOOD, wanted)  # the include still resolves through the loopback server
    _, report = doctor(mail_env, GOOD)
    assert by_name(report)["spf"][0]["status"] == "pass"
    assert mail_env.dns.queries("_spf.provider.test", "TXT") >= 1

    # Two SPF records: a permanent error, and the fix merges them.
    dns.txt(GOOD, "v=spf1 ip4:127.0.0.1 -all", "v=spf1 mx -all")
    _, report = doctor(mail_env, GOOD)
    [spf] = by_name(report)["spf"]
    assert spf["status"] == "fail"
    assert "permerror" in spf["summary"]
    assert '"v=spf1 ip4:127.0.0.1 mx -all"' in spf["fix"]

    # The HELO identity: no record is a warning.
    dns.delete(HELO)
    dns.a(HELO, "127.0.0.1")
    _, report = doctor(mail_env, GOOD)
    [helo_spf] = by_name(report)["spf-helo"]
    assert helo_spf["status"] == "warn"
    assert (
        helo_spf["fix"] == f'publish TXT at {HELO}: "v=spf1 a -all" (the host may send as itself)'
    )


def test_dkim_key_size_revocation_and_missing_record(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    good_env(mail_env, keys)
    dns = mail_env.dns
    small_path, small_record = keys["small"]
    dns.txt(f"small._domainkey.{GOOD}", small_record)
    dns.txt(f"gone._domainkey.{GOOD}", "v=DKIM1; k=rsa; p=")
    code, report = doctor(
        mail_env,
        "--dkim",
        f"{GOOD}:s1:{keys['good'][0]}",
        "--dkim",
        f"{GOOD}:small:{small_path}",
        "--dkim",
        f"{GOOD}:gone:{keys['good'][0]}",
        "--dkim",
        f"{GOOD}:absent:{keys['good'][0]}",
        GOOD,
    )
    assert code == 2
    dkim = {c["subject"]: c for c in by_name(report)["dkim"]}
    assert dkim[f"s1._domainkey.{GOOD}"]["status"] == "pass"
    assert dkim[f"small._domainkey.{GOOD}"]["status"] == "warn"
    assert "1024 bits" in dkim[f"small._domainkey.{GOOD}"]["summary"]
    assert dkim[f"gone._domainkey.{GOOD}"]["status"] == "fail"
    assert "revoked" in dkim[f"gone._domainkey.{GOOD}"]["summary"]
    absent = dkim[f"absent._domainkey.{GOOD}"]
    assert absent["status"] == "fail"
    assert absent["fix"] == f'publish TXT at absent._domainkey.{GOOD}: "{keys["good"][1]}"'

    # No key at all: a warning, and DMARC then rests on SPF alone.
    _, report = doctor(mail_env, GOOD)
    checks = by_name(report)
    assert checks["dkim"][0]["status"] == "warn"
    assert checks["dmarc"][0]["status"] == "warn"
    assert "SPF alone" in checks["dmarc"][0]["summary"]


def test_dkim_keys_on_curves_openssl_cannot_load(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    """A private or a published key that cryptography cannot load is a failed check (or,
    configured, a configuration error), never the command's crash."""
    good_env(mail_env, keys)
    ec_key = mail_env.workdir / "ec.pem"
    ec_key.write_bytes(EC_SECP112R1)
    ec_key.chmod(0o600)
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{ec_key}", GOOD)
    [dkim] = by_name(report)["dkim"]
    assert (code, dkim["status"]) == (2, "fail")
    assert "unsupported kind of key" in dkim["summary"]

    config = mail_env.workdir / "ec.toml"
    config.write_text(
        f'[[dkim.keys]]\ndomain = "{GOOD}"\nselector = "s1"\nprivate_key = "{ec_key}"\n'
    )
    configured = mail_env.cli("--config", str(config), "doctor", "--no-dnsbl", GOOD)
    assert configured.code == 78
    assert "unsupported kind of private key" in configured.err

    p = base64.b64encode(EC_SECP112R1_SPKI).decode()
    mail_env.dns.txt(f"s1._domainkey.{GOOD}", f"v=DKIM1; k=rsa; p={p}")
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{keys['good'][0]}", GOOD)
    [dkim] = by_name(report)["dkim"]
    assert (code, dkim["status"]) == (2, "fail")
    assert "not the public half" in dkim["summary"]


def test_dmarc_policy_and_alignment(mail_env: MailEnv, keys: dict[str, tuple[Path, str]]) -> None:
    good_env(mail_env, keys)
    dns = mail_env.dns
    key = ("--dkim", f"{GOOD}:s1:{keys['good'][0]}")
    # Neither SPF nor DKIM aligned: DMARC fails.
    dns.txt(GOOD, "v=spf1 -all")
    _, report = doctor(mail_env, GOOD)
    [dmarc] = by_name(report)["dmarc"]
    assert dmarc["status"] == "fail"
    assert "would fail DMARC (p=reject)" in dmarc["summary"]

    # A subdomain without its own record gets the organizational domain's sp= policy.
    dns.txt(f"_dmarc.{GOOD}", "v=DMARC1; p=reject; sp=none")
    sub = f"news.{GOOD}"
    dns.txt(f"s1._domainkey.{sub}", keys["good"][1])
    _, report = doctor(mail_env, "--dkim", f"{sub}:s1:{keys['good'][0]}", sub)
    [dmarc] = by_name(report)["dmarc"]
    assert dmarc["subject"] == f"_dmarc.{GOOD}"
    assert "p=none" in dmarc["summary"]
    # Relaxed alignment: a key for the parent domain aligns with mail from the subdomain.
    _, report = doctor(mail_env, *key, sub)
    # (the subdomain has no SPF record, but an aligned DKIM signature is enough)
    assert by_name(report)["dmarc"][0]["status"] == "pass"
    # p=none is a warning for bulk senders, with the stricter record to publish.
    _, report = doctor(mail_env, "--bulk", *key, sub)
    [dmarc] = by_name(report)["dmarc"]
    assert dmarc["status"] == "warn"
    assert "p=none" in dmarc["summary"]

    # Strict DKIM alignment: the parent's key no longer counts for the subdomain.
    dns.txt(f"_dmarc.{GOOD}", "v=DMARC1; p=quarantine; adkim=s")
    _, report = doctor(mail_env, *key, sub)
    assert by_name(report)["dmarc"][0]["status"] == "fail"

    # A malformed record.
    dns.txt(f"_dmarc.{GOOD}", "v=DMARC1; p=block")
    _, report = doctor(mail_env, *key, GOOD)
    [dmarc] = by_name(report)["dmarc"]
    assert dmarc["status"] == "fail"
    assert "p=block is not one of none, quarantine, reject" in dmarc["summary"]


def test_dmarc_counts_only_the_keys_that_sign_mail_from_the_domain(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    """Mail From a domain is signed by the keys of the most specific key domain aligned
    with it (DKIMConfig.keys_for), and no others: a published key of a sibling or of the
    parent, though its d= would align, signs none of it."""
    good_env(mail_env, keys)
    dns = mail_env.dns
    shop, other, news = f"shop.{GOOD}", f"other.{GOOD}", f"news.{GOOD}"
    dns.txt(f"s1._domainkey.{other}", keys["good"][1])
    # shop has no SPF record: only DKIM could pass DMARC for it.
    code, report = doctor(mail_env, "--dkim", f"{other}:s1:{keys['good'][0]}", shop)
    checks = by_name(report)
    [dmarc] = checks["dmarc"]
    assert (code, dmarc["status"]) == (2, "fail"), dmarc
    assert "would fail DMARC (p=reject)" in dmarc["summary"]
    assert [c["status"] for c in checks["dkim"]] == ["pass", "warn"]
    assert f"no configured DKIM key signs mail From {shop}" in checks["dkim"][1]["summary"]

    # With keys for the parent (published) and for news (not), news mail is signed by the
    # news key only, which no receiver can verify.
    code, report = doctor(
        mail_env,
        "--dkim",
        f"{GOOD}:s1:{keys['good'][0]}",
        "--dkim",
        f"{news}:s1:{keys['other'][0]}",
        news,
    )
    checks = by_name(report)
    assert [c["status"] for c in checks["dkim"]] == ["pass", "fail"]
    assert (code, checks["dmarc"][0]["status"]) == (2, "fail")


def test_records_that_are_not_utf8_leave_the_output_utf8(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    """A record's octets that are no UTF-8 reach neither output raw (CLI.Result decodes
    stdout strictly): escapes in text, U+FFFD in JSON (RFC 8259 §8.1)."""
    good_env(mail_env, keys)
    mail_env.dns.txt(f"_dmarc.{GOOD}", b"v=DMARC1; p=reject; rua=mailto:\xff@sender.test")
    _, report = doctor(mail_env, GOOD)
    [dmarc] = by_name(report)["dmarc"]
    assert "rua=mailto:\ufffd@sender.test" in " ".join(dmarc["details"])
    text = mail_env.cli("doctor", "--probe", f"127.0.0.1:{mail_env.mx.port}", "--no-dnsbl", GOOD)
    assert r"rua=mailto:\xff@sender.test" in text.out


def test_blocklists_listed_refused_and_configured(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    good_env(mail_env, keys)
    dns = mail_env.dns
    dns.a(f"1.0.0.127.{BLOCKLIST}", "127.0.0.4")
    dns.a("1.0.0.127.refusing.test", "127.255.255.254")
    mail_env.cli.env["MAILSTROM_DOCTOR_DNSBLS"] = f"{BLOCKLIST},refusing.test,clean.test"
    result = mail_env.cli("doctor", "--json", "--probe", f"127.0.0.1:{mail_env.mx.port}", GOOD)
    lists = {c["subject"]: c for c in by_name(result.json())["dnsbl"]}
    assert list(lists) == [BLOCKLIST, "refusing.test", "clean.test"]
    assert lists[BLOCKLIST]["status"] == "fail"
    assert lists[BLOCKLIST]["summary"] == "127.0.0.1 is LISTED (127.0.0.4)"
    assert lists["refusing.test"]["status"] == "warn"
    assert "public resolvers" in lists["refusing.test"]["summary"]
    assert lists["clean.test"]["status"] == "pass"
    assert result.code == 2


def test_usage_errors(cli: CLI) -> None:
    assert cli("doctor", "--ip", "not-an-ip", "example.com").code == 64
    # A zone index names an interface of this host: no address receivers could see.
    zoned = cli("doctor", "--ip", "fe80::1%eth0", "example.com")
    assert (zoned.code, zoned.out) == (64, ""), zoned.err
    assert "zone index" in zoned.err
    assert cli("doctor", "--probe", "host:99999", "example.com").code == 64
    assert cli("doctor", "--dkim", "example.com:s1", "example.com").code == 64
    cli.env["MAILSTROM_DOCTOR_PROBE"] = "host:port"
    bad = cli("doctor", "example.com")
    assert bad.code == 78
    assert "doctor.probe" in bad.err


def test_time_limit_from_the_option_and_the_setting(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    # A silent DMARC server: the run ends by the limit, the check says it was cut short,
    # and the verdict is a warning (1), not "run again later" (75).
    good_env(mail_env, keys)
    mail_env.dns.drop(f"_dmarc.{GOOD}")
    mail_env.cli.env["MAILSTROM_DNS_TIMEOUT"] = "30"
    dkim = ("--dkim", f"{GOOD}:s1:{keys['good'][0]}")
    for given in (("--time-limit", "1.5"), ()):
        mail_env.cli.env["MAILSTROM_DOCTOR_TIME_LIMIT"] = "1500ms" if not given else "1h"
        code, report = doctor(mail_env, *given, *dkim, GOOD)
        [dmarc] = by_name(report)["dmarc"]
        assert (dmarc["status"], dmarc["summary"]) == ("warn", "not finished (time limit)")
        assert code == 1, report
        assert by_name(report)["spf"][0]["status"] == "pass"
    del mail_env.cli.env["MAILSTROM_DOCTOR_TIME_LIMIT"]
    for bad in ("0", "-1", "soon"):
        refused = mail_env.cli("doctor", "--time-limit", bad, GOOD)
        assert (refused.code, refused.out) == (64, ""), refused.err
        assert "--time-limit" in refused.err
    mail_env.cli.env["MAILSTROM_DOCTOR_TIME_LIMIT"] = "soon"
    refused = mail_env.cli("doctor", GOOD)
    assert (refused.code, refused.out) == (78, ""), refused.err
    assert "doctor.time_limit" in refused.err


@pytest.mark.parametrize("zone", ["zen..spamhaus.org", "zen spamhaus.org", "bl.test;x"])
def test_a_blocklist_zone_that_is_no_domain_name_is_refused(mail_env: MailEnv, zone: str) -> None:
    """Such a zone was queried: a lookup error ("temporary", exit 75, again on every run)
    or, with a space, a query for a name no list serves, which passed."""
    closed = free_loopback_port("127.0.0.1")
    args = ["--ip", "127.0.0.1", "--probe", f"127.0.0.1:{closed}", "example.com"]
    cli = mail_env.cli
    bad = cli("doctor", "--dnsbl", zone, *args)
    assert (bad.code, bad.out) == (64, ""), bad.out  # refused before any check
    assert "not a letter-digit-hyphen domain name" in bad.err
    cli.env["MAILSTROM_DOCTOR_DNSBLS"] = f"bl.test,{zone}"
    bad = cli("doctor", *args)
    assert (bad.code, bad.out) == (78, ""), bad.out
    assert "doctor.dnsbls: not a letter-digit-hyphen domain name" in bad.err


@pytest.mark.parametrize(
    ("domain", "words"),
    [
        ("user@", "(the domain of 'user@')"),
        ("..", "empty label"),
        ("ex;ample.com", "label 'ex;ample' is not letters, digits and inner hyphens"),
        ("a" * 64 + ".com", "has 64 characters; at most 63"),  # was a "temporary" error
    ],
)
def test_a_domain_argument_that_is_no_domain_is_a_usage_error(
    mail_env: MailEnv, domain: str, words: str
) -> None:
    closed = free_loopback_port("127.0.0.1")
    args = ["--no-dnsbl", "--ip", "127.0.0.1", "--probe", f"127.0.0.1:{closed}"]
    result = mail_env.cli("doctor", *args, domain)
    assert (result.code, result.out) == (64, ""), result.out  # refused before any check
    assert words in result.err


def test_a_dkim_option_with_names_dkim_cannot_use_is_a_usage_error(mail_env: MailEnv) -> None:
    closed = free_loopback_port("127.0.0.1")
    args = ["--no-dnsbl", "--ip", "127.0.0.1", "--probe", f"127.0.0.1:{closed}"]
    bad = mail_env.cli("doctor", *args, "--dkim", "ex=ample.com:s1:/no/key.pem", "example.com")
    assert (bad.code, bad.out) == (64, "")
    assert "not a letter-digit-hyphen domain name" in bad.err


def test_a_dkim_key_file_whose_path_holds_a_colon(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    # DOMAIN:SELECTOR:KEYFILE[:ALGORITHM] was split at every ":": /srv/a:b/k.pem became
    # the key file /srv/a with the "algorithm" b/k.pem, and the check failed an unknown
    # algorithm for a key published right.
    good_env(mail_env, keys)
    pem = keys["good"][0].read_bytes()
    folder = tmp_path / "a:b"
    folder.mkdir()
    paths = [folder / "k.pem", tmp_path / "C:\\keys\\k.pem"]  # the latter one file name
    for path in paths:
        path.write_bytes(pem)
        for given in (f"{path}", f"{path}:rsa-sha256", f"{path}:RSA"):
            code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{given}", GOOD)
            [dkim] = by_name(report)["dkim"]
            assert (code, dkim["status"]) == (0, "pass"), (given, dkim)
        # A final ":ALGORITHM" is still one.
        code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{path}:ed25519", GOOD)
        [dkim] = by_name(report)["dkim"]
        assert dkim["summary"] == "the key is rsa but the algorithm is ed25519", dkim
    bad = mail_env.cli("doctor", "--dkim", f"{GOOD}:s1:{paths[0]}:", GOOD)
    assert bad.code == 64, bad.err


def test_a_dkim_option_with_a_mistyped_algorithm_names_it(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    # Since a key file's path may hold ":", a final ":ALGORITHM" that named no algorithm
    # was read as part of the path: a mistyped "rsa-sha265" ran the doctor, which failed
    # the key for a file it could not read ("...pem:rsa-sha265"), not for the typo.
    good_env(mail_env, keys)
    closed = free_loopback_port("127.0.0.1")
    args = ["--no-dnsbl", "--ip", "127.0.0.1", "--probe", f"127.0.0.1:{closed}"]
    for path in (keys["good"][0], tmp_path / "absent.pem"):
        bad = mail_env.cli("doctor", *args, "--dkim", f"{GOOD}:s1:{path}:rsa-sha265", GOOD)
        assert (bad.code, bad.out) == (64, ""), bad.out  # refused before any check
        assert "unknown algorithm 'rsa-sha265'" in bad.err, bad.err
        assert "rsa-sha256 or ed25519-sha256" in bad.err, bad.err
    # A missing key file in a folder whose name holds ":" is no algorithm, even where
    # the part before the ":" exists (as a folder).
    (tmp_path / "a").mkdir()
    missing = mail_env.cli("doctor", *args, "--dkim", f"{GOOD}:s1:{tmp_path}/a:b/k.pem", GOOD)
    assert "unknown algorithm" not in missing.err, missing.err
    # A key file whose name ends in ":" and letters is still the key file it names.
    named = tmp_path / "k.pem:s2025"
    named.write_bytes(keys["good"][0].read_bytes())
    code, report = doctor(mail_env, "--dkim", f"{GOOD}:s1:{named}", GOOD)
    [dkim] = by_name(report)["dkim"]
    assert (code, dkim["status"]) == (0, "pass"), dkim


def test_no_nameserver_at_all_is_a_configuration_error(cli: CLI, tmp_path: Path) -> None:
    # Without dns.nameservers and with a resolv.conf that names none (or none at all),
    # every lookup failed at once ("All nameservers failed to answer the query"): each
    # DNS check was unknown and the verdict "run again later" (exit 75), which no
    # waiting could change. Run in a mount namespace with an empty /etc/resolv.conf.
    if not private_mounts():
        pytest.skip("needs unshare(1) and mount(8)")
    empty = tmp_path / "resolv.conf"
    empty.write_text("")
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    args = ["doctor", "--ip", "192.0.2.1", "--no-dnsbl", "--probe", "127.0.0.1:1", "example.com"]
    proc = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"),
            *(str(empty), sys.executable, "-m", "mailstrom", *args),
        ],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        check=False,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert (proc.returncode, proc.stdout) == (78, b""), (proc.returncode, err)
    assert "no DNS server to ask" in err, err
    assert "dns.nameservers" in err, err


def test_an_address_or_a_u_label_names_the_domain(
    mail_env: MailEnv, keys: dict[str, tuple[Path, str]]
) -> None:
    good_env(mail_env, keys)
    _, report = doctor(mail_env, f"app@{GOOD.upper()}")
    assert report["domain"] == GOOD
    _, report = doctor(mail_env, "Bücher.test")
    assert report["domain"] == "xn--bcher-kva.test"


def test_missing_extra_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailstrom.cli.main import main

    monkeypatch.setitem(__import__("sys").modules, "spf", None)
    monkeypatch.setenv("MAILSTROM_DNS_NAMESERVERS", "127.0.0.1")
    code = main(["doctor", "--ip", "192.0.2.1", "example.com"])
    assert code == 69
    err = capsys.readouterr().err
    assert "pyspf" in err
    assert "pip install 'mailstrom[doctor]'" in err


_ = Callable, ReceivingServer  # imported for the fixtures' types


def test_a_name_too_long_to_exist_is_no_record_not_a_temporary_error(mail_env: MailEnv) -> None:
    # A domain of 253 characters is a domain; "_dmarc." before it, or an address's labels
    # before a blocklist zone, make a name DNS cannot hold: no record can be there, now or
    # later, so neither is a lookup that failed "for now" (exit 75, run again later).
    long = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 56, "test"])
    assert len(long) == 253
    closed = free_loopback_port("127.0.0.1")
    args = ["--ip", "127.0.0.1", "--probe", f"127.0.0.1:{closed}"]
    result = mail_env.cli("doctor", "--json", *args, "--dnsbl", long[4:], long)
    checks = by_name(result.json())
    assert [c["status"] for c in checks["dmarc"]] == ["warn"], checks["dmarc"]
    assert "no DMARC record" in checks["dmarc"][0]["summary"]
    assert [c["status"] for c in checks["dnsbl"]] == ["pass"], checks["dnsbl"]
    assert result.code == 2  # the closed probe port and the rest fail: a verdict, not 75
