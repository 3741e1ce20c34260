import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from mailstrom import Config, RetryPolicy
from mailstrom.errors import ConfigError


def test_defaults_follow_rfc_5321() -> None:
    config = Config(helo_name="mail.example.com")
    assert config.smtp_port == 25
    assert config.timeouts.greeting == 300
    assert config.timeouts.data_end == 600
    assert config.retry.min_delay == timedelta(minutes=5)
    assert config.retry.max_delay == timedelta(hours=1)


@pytest.mark.parametrize(
    "bad",
    [
        {"helo_name": ""},
        {"helo_name": "two words"},
        {"smtp_port": 0},
        {"smtp_port": 70000},
        {"max_connections": 0},
        {"lease_batch": 0},
        {"max_leased_bytes": 0},
        {"max_leased_bytes": -1},
        {"lease_for": timedelta(0)},
        {"lease_for": timedelta(milliseconds=1)},
        {"lease_for": timedelta(milliseconds=99)},
    ],
)
def test_bad_values_raise_config_error(bad: dict[str, object]) -> None:
    options: dict[str, object] = {"helo_name": "mail.example.com", **bad}
    with pytest.raises(ConfigError):
        Config(**options)  # type: ignore[arg-type]


def test_a_retry_range_that_is_empty_is_refused() -> None:
    """Refused by RetryPolicy itself now, before any Config holds it."""
    with pytest.raises(ConfigError, match="min_delay must not exceed"):
        Config(retry=RetryPolicy(min_delay=timedelta(hours=2), max_delay=timedelta(hours=1)))


# --- hardening #14: secrets ------------------------------------------------------------------


def test_auth_without_tls_is_refused() -> None:
    """Hardening #14: AUTH over relay.tls = none (cleartext password) is a ConfigError."""
    from mailstrom import RelayConfig, RelayTLS

    with pytest.raises(ConfigError, match="allow_plaintext_auth"):
        RelayConfig(host="smtp.example.net", tls=RelayTLS.NONE, username="app", password="p")
    # Allowed when said explicitly, and of course over TLS or without AUTH.
    RelayConfig(
        host="127.0.0.1", tls=RelayTLS.NONE, username="app", password="p", allow_plaintext_auth=True
    )
    RelayConfig(host="smtp.example.net", tls=RelayTLS.STARTTLS, username="app", password="p")
    RelayConfig(host="smtp.example.net", tls=RelayTLS.IMPLICIT, username="app", password="p")
    RelayConfig(host="127.0.0.1", tls=RelayTLS.NONE)


def test_repr_hides_the_password() -> None:
    """Hardening #14: repr(RelayConfig) and repr(Config) never show the password."""
    from mailstrom import RelayConfig

    relay = RelayConfig(host="smtp.example.net", username="app", password="hunter2-secret")
    config = Config(helo_name="mail.example.com", relay=relay)
    for text in (repr(relay), repr(config), str(config)):
        assert "hunter2-secret" not in text
        assert "password='***'" in text
        assert "username='app'" in text
    assert "password=None" in repr(RelayConfig(host="smtp.example.net"))


def test_dkim_must_be_a_dkim_config() -> None:
    from mailstrom.dkim import DKIMConfig

    assert Config(helo_name="mail.example.com", dkim=DKIMConfig()).dkim == DKIMConfig()
    with pytest.raises(ConfigError, match="dkim must be a DKIMConfig, not dict"):
        Config(helo_name="mail.example.com", dkim={"keys": []})  # type: ignore[arg-type]


# --- numbers: NaN, infinity and wrong types are refused, not taken for "no limit" ----------

NAN = float("nan")
INF = float("inf")
HUGE = timedelta.max

INT_FIELDS = (
    "smtp_port",
    "max_message_size",
    "max_recipients",
    "max_connections",
    "max_per_destination",
    "max_messages_per_connection",
    "lease_batch",
    "max_leased_bytes",
    "mx_address_limit",
    "mx_session_limit",
)


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF, 5.0, True, "5", None])
def test_integer_limits_must_be_integers(name: str, value: object) -> None:
    """A NaN or infinite limit would switch the limit off (``n > nan`` is false), a
    string would fail later with a raw TypeError: each is a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=name):
        Config(helo_name="mail.example.com", **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [NAN, INF, 12.0, True, "12", 0, -1, 2**63])
def test_the_mx_host_limit_is_a_positive_integer_or_none(value: object) -> None:
    """None (the default) considers twice ``mx_address_limit`` MX hosts; anything but a
    whole number from 1 to the largest integer setting is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="mx_host_limit"):
        Config(helo_name="mail.example.com", mx_host_limit=value)  # type: ignore[arg-type]
    assert Config(helo_name="mail.example.com", mx_host_limit=1).mx_host_limit == 1


@pytest.mark.parametrize("name", ["poll_interval", "connection_idle"])
@pytest.mark.parametrize("value", [NAN, INF, -1.0, True, "5", 1e300])
def test_seconds_must_be_finite_numbers(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name):
        Config(helo_name="mail.example.com", **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["lease_for", "idempotency_window", "tls_remember_broken", "suppress_for", "delay_warning"],
)
@pytest.mark.parametrize("value", [HUGE, -timedelta(seconds=1), 60, "1h"])
def test_durations_must_be_bounded_timedeltas(name: str, value: object) -> None:
    """Beyond 100 years ``now + duration`` overflows at run time (a raw OverflowError in
    the worker or at every send); a number is not a timedelta."""
    with pytest.raises(ConfigError, match=name):
        Config(helo_name="mail.example.com", **{name: value})  # type: ignore[arg-type]


def test_good_numbers_are_still_accepted() -> None:
    config = Config(
        helo_name="mail.example.com",
        connection_idle=0,
        poll_interval=0.05,
        max_recipients=2**40,
        tls_remember_broken=timedelta(0),
        suppress_for=timedelta(days=365),
    )
    assert config.connection_idle == 0 and config.max_recipients == 2**40


def _nested() -> list[tuple[Callable[..., object], dict[str, object], str]]:
    from mailstrom import DNSConfig, HookConfig, Lane, MTASTSConfig, RelayConfig, Timeouts
    from mailstrom.dkim import DKIMConfig
    from mailstrom.policy.shaping import ShapingConfig

    hook = {"url": "https://app.example/h", "secret": "s" * 16}
    cases: list[tuple[Callable[..., object], dict[str, object], str]] = []
    for name in ("connect", "greeting", "command", "data_init", "data_block", "data_end"):
        cases += [(Timeouts, {name: v}, name) for v in (NAN, INF, 0, "30")]
    cases += [(DNSConfig, {"port": v}, "dns.port") for v in (NAN, 53.0, True, 0, 70000)]
    cases += [(DNSConfig, {"timeout": v}, "dns.timeout") for v in (NAN, INF, 0)]
    cases += [(RelayConfig, {"host": "r.example", "port": v}, "relay.port") for v in (NAN, 0)]
    cases += [(HookConfig, {**hook, "timeout": v}, "hook.timeout") for v in (NAN, INF, 301)]
    cases += [(HookConfig, {**hook, "batch": v}, "hook.batch") for v in (NAN, 5.5, True)]
    cases += [(HookConfig, {**hook, "retry_max": v}, "hook.retry_max") for v in (NAN, INF, 86_401)]
    cases += [(HookConfig, {**hook, "retry_min": v}, "hook.retry_min") for v in (0, 400)]
    concurrency = (0, 65, 2.0, True)
    cases += [(HookConfig, {**hook, "concurrency": v}, "hook.concurrency") for v in concurrency]
    cases += [(MTASTSConfig, {"port": v}, "mta_sts.port") for v in (NAN, 443.0)]
    cases += [(MTASTSConfig, {"timeout": v}, "mta_sts.timeout") for v in (NAN, INF)]
    cases += [(MTASTSConfig, {"recheck": v}, "mta_sts.recheck") for v in (NAN, INF, True)]
    cases += [(Lane, {"name": "bulk", "share": v}, "share") for v in (NAN, INF, True, 2)]
    for name in ("min_delay", "max_delay", "max_age"):
        cases += [(RetryPolicy, {name: v}, name) for v in (HUGE, 300)]
    cases += [(RetryPolicy, {"multiplier": v}, "multiplier") for v in (NAN, INF, 0.5)]
    cases += [(RetryPolicy, {"jitter": v}, "jitter") for v in (NAN, INF, -0.1, 2)]
    cases += [(RetryPolicy, {"max_attempts": v}, "max_attempts") for v in (NAN, 0, 2.0)]
    cases += [(ShapingConfig, {"pause_max": v}, "pause_max") for v in (HUGE, 60)]
    cases += [(ShapingConfig, {"refresh": v}, "refresh") for v in (NAN, INF, True)]
    cases += [(DKIMConfig, {"expire": v}, "dkim.expire") for v in (HUGE, 3600)]
    return cases


@pytest.mark.parametrize(("kind", "options", "named"), _nested())
def test_nested_configs_refuse_bad_numbers(
    kind: Callable[..., object], options: dict[str, object], named: str
) -> None:
    """Every dataclass nested in Config checks its numbers as Config does."""
    with pytest.raises(ConfigError, match=named):
        kind(**options)


def _switches() -> list[tuple[Callable[..., object], dict[str, object], str]]:
    from mailstrom import DNSConfig, MTASTSConfig, RelayConfig
    from mailstrom.dkim import DKIMConfig
    from mailstrom.policy.shaping import ShapingConfig

    relay = {"host": "r.example"}
    kinds: list[tuple[Callable[..., object], dict[str, object], str]] = [
        (Config, {"helo_name": "mail.example.com"}, name)
        for name in (
            "allow_loopback",
            "retry_uncertain",
            "events",
            "tlsrpt_record",
            "bounce_notices",
        )
    ]
    kinds += [
        (DNSConfig, {}, "dnssec"),
        (RelayConfig, relay, "verify"),
        (RelayConfig, relay, "allow_plaintext_auth"),
        (MTASTSConfig, {}, "report"),
        (ShapingConfig, {}, "provider_defaults"),
        (DKIMConfig, {}, "required"),
    ]
    return kinds


@pytest.mark.parametrize(("kind", "options", "name"), _switches())
@pytest.mark.parametrize("value", ["false", "no", "", 0, 1, None])
def test_switches_must_be_true_or_false(
    kind: Callable[..., object], options: dict[str, object], name: str, value: object
) -> None:
    """A switch was read for its truth: allow_loopback="false" delivered to loopback,
    dnssec="false" believed the resolver's AD bit, allow_plaintext_auth="no" sent the
    relay password in cleartext. Anything but a bool is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=name):
        kind(**options, **{name: value})


def test_nested_configs_must_be_their_dataclasses() -> None:
    with pytest.raises(ConfigError, match="timeouts must be a Timeouts, not dict"):
        Config(helo_name="mail.example.com", timeouts={"connect": 1})  # type: ignore[arg-type]


# --- helo_name: an RFC 5321 Domain or an address literal, since it is sent in EHLO --------


@pytest.mark.parametrize(
    "name",
    [
        "mail@evil.com",
        "x>y.example.com",
        "a;b",
        "a" * 300,
        "a" * 64 + ".example.com",
        "mail.example.com\x00",
        "mail.example.com.",
        "-mail.example.com",
        "mail_1.example.com",
        "[1.2.3]",
        "[IPv6:fe80::1%eth0]",
        "[mail.example.com]",
    ],
)
def test_helo_name_must_be_a_domain_or_address_literal(name: str) -> None:
    with pytest.raises(ConfigError, match="helo_name"):
        Config(helo_name=name)


@pytest.mark.parametrize(
    "name",
    [
        "mail.example.com",
        "localhost",
        "MX-1.Example.COM",
        "bücher.example",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "a" * 63 + ".example.com",
    ],
)
def test_helo_name_accepts_domains_u_labels_and_literals(name: str) -> None:
    assert Config(helo_name=name).helo_name == name


def test_default_helo_name_falls_back_when_the_host_name_is_not_a_domain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine named like ``my_laptop`` must not make every ``Config()`` fail."""
    import socket

    monkeypatch.setattr(socket, "getfqdn", lambda: "my_laptop.corp.example")
    assert Config().helo_name == "localhost"
    monkeypatch.setattr(socket, "getfqdn", lambda: "mail.example.com")
    assert Config().helo_name == "mail.example.com"


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_relay_tls_given_as_a_string_is_its_member(tls: str) -> None:
    """relay.tls given as the member's value ("none", as Config's tls may be) was kept as a
    string: the check that AUTH needs TLS compared it with RelayTLS.NONE by identity and
    let a username over "none" through, the opener took "implicit" for STARTTLS, and the
    TLS decision raised AttributeError in the worker."""
    from mailstrom import RelayConfig, RelayTLS
    from mailstrom.tls.decide import TLSDecider

    relay = RelayConfig(host="smtp.example.net", tls=tls)  # type: ignore[arg-type]
    assert relay.tls is RelayTLS(tls)
    TLSDecider.for_config(Config(helo_name="mail.example.com", relay=relay))
    if tls == "none":
        with pytest.raises(ConfigError, match="allow_plaintext_auth"):
            RelayConfig(host="smtp.example.net", tls=tls, username="app", password="p")  # type: ignore[arg-type]


@pytest.mark.parametrize("tls", ["tls", "", 1, None])
def test_relay_tls_must_name_a_mode(tls: object) -> None:
    from mailstrom import RelayConfig

    with pytest.raises(ConfigError, match=r"relay\.tls must be one of"):
        RelayConfig(host="smtp.example.net", tls=tls)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["gmail.com", b"gmail.com", 5, (1,), ("gmail.com", None)])
def test_metrics_domains_must_be_domain_names(value: object) -> None:
    """A string was split into one-letter "domains" (metrics_domains="gmail.com" counted
    g, m, a...), and a sequence holding something else raised AttributeError."""
    with pytest.raises(ConfigError, match="metrics_domains"):
        Config(helo_name="mail.example.com", metrics_domains=value)  # type: ignore[arg-type]


def test_metrics_domains_takes_any_sequence_of_names() -> None:
    config = Config(helo_name="mail.example.com", metrics_domains=[" Gmail.com", "yahoo.com"])  # type: ignore[arg-type]
    assert config.metrics_domains == ("gmail.com", "yahoo.com")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"username": "app"}, "relay.password: required with relay.username"),
        ({"username": "app", "password": ""}, "relay.password: required with relay.username"),
        ({"password": "s3cret"}, "relay.username: required with relay.password"),
    ],
)
def test_relay_credentials_come_in_pairs(options: dict[str, str], named: str) -> None:
    """A username without a password authenticated with an empty one (which AUTH PLAIN
    cannot carry, RFC 4616 §2): a MAILSTROM_RELAY_PASSWORD missing from the worker's
    environment, the file holding the username, deferred every message at the relay for
    days. A password without a username was never sent, and mail went unauthenticated.
    Both are refused where the relay is configured, in Python and in the settings."""
    from mailstrom import RelayConfig
    from mailstrom.settings import env_name, load_settings

    with pytest.raises(ConfigError, match=named) as caught:
        RelayConfig(host="smtp.example.net", **options)
    assert "s3cret" not in str(caught.value)
    env = {env_name(f"relay.{k}"): v for k, v in options.items() if v}
    with pytest.raises(ConfigError, match=named.partition(":")[0]):
        load_settings(
            env={"HOME": "/nonexistent", "MAILSTROM_RELAY_HOST": "r.example", **env}, search=False
        )


@pytest.mark.parametrize(
    ("username", "password", "named"),
    [
        ("app", "s3cret\udce9", "relay.password"),
        ("app", "s3cret\0x", "relay.password"),
        ("app\udce9", "s3cret", "relay.username"),
        ("a\0pp", "s3cret", "relay.username"),
    ],
)
def test_relay_credentials_must_go_as_utf8_without_nul(
    username: str, password: str, named: str
) -> None:
    """AUTH sends the username and password as UTF-8, PLAIN with NULs between them (RFC
    4616 §2). A password from a variable that is not UTF-8 (a lone surrogate) crashed
    every delivery with UnicodeEncodeError ("internal error", deferred); one holding a
    TOML "\\u0000" split the token at the wrong place, and the relay refused every
    message (501). Both are refused where the relay is configured, the password unshown."""
    from mailstrom import RelayConfig
    from mailstrom.settings import load_settings

    with pytest.raises(ConfigError, match=named) as caught:
        RelayConfig(host="smtp.example.net", username=username, password=password)
    assert "s3cret" not in str(caught.value)
    env = {
        "HOME": "/nonexistent",
        "MAILSTROM_RELAY_HOST": "r.example",
        "MAILSTROM_RELAY_USERNAME": username,
        "MAILSTROM_RELAY_PASSWORD": password,
    }
    with pytest.raises(ConfigError, match=named) as caught:
        load_settings(env=env, search=False)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"host": ""}, "relay.host"),
        ({"host": " "}, "relay.host"),
        ({"host": "smtp.example.net "}, "relay.host"),
        ({"host": "smtp.example.net\n"}, "relay.host"),
        ({"host": None}, "relay.host"),
        ({"host": 25}, "relay.host"),
        ({"host": "smtp.example.net", "username": 5}, "relay.username"),
        ({"host": "smtp.example.net", "username": "app", "password": b"p"}, "relay.password"),
    ],
)
def test_relay_names_must_be_strings(options: dict[str, object], named: str) -> None:
    """A relay host that is no name (empty, with a space, not a string) was kept: every
    delivery then failed its lookup and every message was deferred; a username or
    password that is no string failed at AUTH, in the worker."""
    from mailstrom import RelayConfig

    with pytest.raises(ConfigError, match=named):
        RelayConfig(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"url": 5, "secret": "s"}, "hook.url"),
        ({"url": None, "secret": "s"}, "hook.url"),
        ({"url": b"https://app.example/h", "secret": "s"}, "hook.url"),
        ({"url": "https://app.example/h", "secret": 5}, "hook.secret"),
        ({"url": "https://app.example/h", "secret": b"whsec"}, "hook.secret"),
    ],
)
def test_hook_url_and_secret_must_be_strings(options: dict[str, object], named: str) -> None:
    """A URL that is no string raised AttributeError; a secret that is no string was
    kept, and signing each request failed in the worker."""
    from mailstrom import HookConfig

    with pytest.raises(ConfigError, match=named) as caught:
        HookConfig(**options)  # type: ignore[arg-type]
    assert "whsec" not in str(caught.value)


def test_a_hook_secret_with_octets_that_are_not_utf8_is_refused() -> None:
    """A secret read from the environment with an octet that is not UTF-8 (kept by Python
    as a lone surrogate) was taken, and signing each request raised UnicodeEncodeError in
    the worker: every batch failed, for ever, and no event went. Refused at the start
    now, without showing the secret."""
    import os

    from mailstrom import HookConfig
    from mailstrom.settings import load_settings

    secret = os.fsdecode(b"whsec-0123456789\xff")
    with pytest.raises(ConfigError, match=r"hook\.secret") as caught:
        HookConfig(url="https://app.example/h", secret=secret)
    assert "whsec" not in str(caught.value)
    env = {"MAILSTROM_HOOK_URL": "https://app.example/h", "MAILSTROM_HOOK_SECRET": secret}
    with pytest.raises(ConfigError, match=r"hook\.secret"):
        load_settings(env=env, search=False)


@pytest.mark.parametrize("address", ["10.0.0.300", "", " 192.0.2.10", "mail.example.com", 5])
def test_source_address_must_be_an_ip_address(address: object) -> None:
    """Anything else failed at every connection, and the error blamed the MX host
    ("cannot connect to 192.0.2.1 port 25: Name or service not known")."""
    with pytest.raises(ConfigError, match="source_address"):
        Config(helo_name="mail.example.com", source_address=address)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["192.0.2.10", "2001:db8::10", "127.0.0.1"])
def test_source_address_takes_ip_addresses(address: str) -> None:
    assert Config(helo_name="mail.example.com", source_address=address).source_address == address


# --- TLS contexts and CA files: checked where they are given --------------------------


def _contexts() -> list[tuple[Callable[..., object], dict[str, object], str]]:
    from mailstrom import MTASTSConfig

    cases: list[tuple[Callable[..., object], dict[str, object], str]] = []
    for value in ("/etc/ssl/certs/ca.pem", True, 5, {"cafile": "ca.pem"}, ssl):
        cases.append(
            (Config, {"helo_name": "mail.example.com", "tls_context": value}, "tls_context")
        )
        cases.append((MTASTSConfig, {"tls_context": value}, r"mta_sts\.tls_context"))
    return cases


@pytest.mark.parametrize(("kind", "options", "named"), _contexts())
def test_tls_contexts_must_be_ssl_contexts(
    kind: Callable[..., object], options: dict[str, object], named: str
) -> None:
    """A tls_context that is no SSLContext (a CA file's name, say) was kept: the worker
    then failed with AttributeError at every TLS connection (or when it started its
    process), far from the setting. A ConfigError naming it now."""
    with pytest.raises(ConfigError, match=named):
        kind(**options)


def _unchecking_contexts() -> list[ssl.SSLContext]:
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # checks nothing
    nameless = ssl.create_default_context()
    nameless.check_hostname = False  # the chain, whatever name it is for
    return [server_side, nameless]


@pytest.mark.parametrize("context", _unchecking_contexts())
@pytest.mark.parametrize("where", ["tls_context", "mta_sts.tls_context"])
def test_tls_contexts_must_check_the_host_name(context: ssl.SSLContext, where: str) -> None:
    """A context that does not check the certificate's name (a server-side one, which
    checks no certificate at all, or check_hostname off) was taken: tls = "verify" and
    MTA-STS enforce then delivered to a certificate for any name, MTA-STS policies came
    from any HTTPS server. A ConfigError naming it now."""
    from mailstrom import MTASTSConfig

    make: Callable[[], object] = (
        (lambda: Config(helo_name="mail.example.com", tls_context=context))
        if where == "tls_context"
        else (lambda: MTASTSConfig(tls_context=context))
    )
    with pytest.raises(ConfigError, match=rf"{where}: .*host name"):
        make()


def test_tls_contexts_take_ssl_contexts_and_none() -> None:
    from mailstrom import MTASTSConfig

    context = ssl.create_default_context()
    assert Config(helo_name="mail.example.com", tls_context=context).tls_context is context
    assert MTASTSConfig(tls_context=context).tls_context is context
    assert Config(helo_name="mail.example.com", tls_context=None).tls_context is None


def _ca_files(tmp: Path) -> list[object]:
    (tmp / "empty.pem").write_bytes(b"")
    (tmp / "text.pem").write_text("not a certificate\n")
    return [
        str(tmp / "missing.pem"),
        str(tmp / "empty.pem"),
        str(tmp / "text.pem"),
        str(tmp),
        "ca\0.pem",
        "",
        5,
        b"/etc/ssl/certs/ca-certificates.crt",
    ]


@pytest.mark.parametrize("index", range(8))
def test_mta_sts_ca_file_must_be_a_pem_bundle(tmp_path: Path, index: int) -> None:
    """A CA file that did not exist, was no PEM bundle or no file name was kept, and every
    MTA-STS policy fetch then failed (FileNotFoundError, SSLError or TypeError from the
    context it was loaded into), in the worker, each a fetch error of the recipient's
    domain. A ConfigError naming mta_sts.ca_file now, when the config is made."""
    from mailstrom import MTASTSConfig

    with pytest.raises(ConfigError, match=r"mta_sts\.ca_file"):
        MTASTSConfig(ca_file=_ca_files(tmp_path)[index])  # type: ignore[arg-type]


def test_mta_sts_ca_file_takes_a_pem_bundle(tmp_path: Path) -> None:
    import trustme

    from mailstrom import MTASTSConfig

    pem = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(pem))
    assert MTASTSConfig(ca_file=str(pem)).ca_file == str(pem)


def test_dns_nameservers_given_as_an_iterator_are_kept() -> None:
    """An iterator (a generator, map()) was used up by the check of its addresses and
    kept, empty: the resolver then had no nameserver and every lookup failed, every
    message deferred. The addresses are kept as a tuple."""
    from mailstrom import DNSConfig
    from mailstrom.routing.router import make_resolver

    dns = DNSConfig(nameservers=(s for s in ["192.0.2.53", "2001:db8::53"]), port=5353)  # type: ignore[arg-type]
    assert dns.nameservers == ("192.0.2.53", "2001:db8::53")
    assert [str(ns) for ns in make_resolver(dns).nameservers] == ["192.0.2.53", "2001:db8::53"]
    assert DNSConfig(nameservers=["192.0.2.53"]).nameservers == ("192.0.2.53",)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["192.0.2.53", "", b"192.0.2.53", 5, None])
def test_dns_nameservers_must_be_a_sequence_of_addresses(value: object) -> None:
    """A string was taken for a sequence of one-letter "addresses" ("" for none at all,
    so the system's resolver was used without a word); a number raised TypeError."""
    from mailstrom import DNSConfig

    with pytest.raises(ConfigError, match=r"dns\.nameservers"):
        DNSConfig(nameservers=value)  # type: ignore[arg-type]


def test_what_a_tls_context_trusts_crosses_to_a_worker_process_as_it_is() -> None:
    import pickle

    import trustme

    from mailstrom.config import MTASTSConfig, portable_trust, trusting
    from mailstrom.tls.trust import verifying_context

    system = ssl.create_default_context()
    assert portable_trust(system) == (True, ())
    rebuilt = trusting(*portable_trust(system))
    # The system's CAs as verifying_context() holds them: its CA directory's as well, which
    # the parent's context trusts too, though OpenSSL reads them only as handshakes need.
    held = rebuilt.get_ca_certs(binary_form=True)
    assert held == verifying_context().get_ca_certs(binary_form=True)
    assert set(system.get_ca_certs(binary_form=True)) <= set(held)

    ca = trustme.CA()
    private = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    own = tuple(private.get_ca_certs(binary_form=True))
    widened = ssl.create_default_context()
    widened.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    if system.get_ca_certs():  # the system's CAs are loaded up front (a CA file)
        # A private CA alone was trusted beside the system's CAs in a worker process.
        assert portable_trust(private) == (False, own)
        assert portable_trust(widened) == (True, own)
    assert tuple(trusting(*portable_trust(private)).get_ca_certs(binary_form=True)) == own
    assert trusting(False, ()).get_ca_certs() == []

    sts = pickle.loads(pickle.dumps(MTASTSConfig(tls_context=private)))
    assert sts.tls_context is not None
    assert tuple(sts.tls_context.get_ca_certs(binary_form=True)) == own


def test_dns_port_applies_to_the_system_nameservers_too() -> None:
    # Set without nameservers, the port was ignored: resolv.conf's servers were asked on 53.
    from mailstrom.config import DNSConfig
    from mailstrom.routing import make_resolver

    assert make_resolver(DNSConfig(port=5353)).port == 5353
    named = make_resolver(DNSConfig(nameservers=("127.0.0.1",), port=5354))
    assert (named.port, named.nameservers) == (5354, ["127.0.0.1"])
    assert make_resolver(DNSConfig()).port == 53
    from mailstrom.doctor.lookup import DNSResolver

    assert DNSResolver(DNSConfig(port=5353))._resolver.port == 5353


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        ("smtp.example.net:587", "relay.port"),
        ("127.0.0.1:2525", "relay.port"),
        ("[::1]", "without brackets"),
        ("[2001:db8::1]:587", "without brackets"),
        ("smtp://smtp.example.net", "relay.port"),
        ("smtp.example.net/", "host name"),
        ("app@smtp.example.net", "host name"),
        ("smtp..example.net", "host name"),
        ("a" * 64 + ".example.net", "host name"),
    ],
)
def test_a_relay_host_that_names_no_host_is_refused(host: str, hint: str) -> None:
    """A relay host with a port (``smtp.example.net:587``, as a URL or a submission client
    writes it), a bracketed IPv6 address or a URL was kept: every delivery then looked
    the whole text up as a name, failed, and every message was deferred until it expired."""
    from mailstrom import RelayConfig
    from mailstrom.settings import load_settings

    with pytest.raises(ConfigError, match=r"relay\.host") as raised:
        RelayConfig(host=host)
    assert hint in str(raised.value)
    with pytest.raises(ConfigError, match=r"relay\.host"):
        load_settings(env={"MAILSTROM_RELAY_HOST": host}, search=False)


@pytest.mark.parametrize(
    "host",
    [
        "smtp.example.net",
        "smtp.example.net.",
        "localhost",
        "mail_relay",
        "127.0.0.1",
        "::1",
        "2001:db8::1",
        "smtp.bücher.example",
        "relay-1.corp",
    ],
)
def test_a_relay_host_may_be_any_host_name_or_address(host: str) -> None:
    from mailstrom import RelayConfig

    assert RelayConfig(host=host).host == host


@pytest.mark.parametrize("secret", ["s", "whsec", "x" * 15])
def test_a_hook_secret_shorter_than_16_characters_is_refused(secret: str) -> None:
    """An HMAC key of one character was taken: a receiver's check of the signature
    then proves little, since the key is guessed offline from one signed request."""
    from mailstrom import HookConfig

    with pytest.raises(ConfigError, match=r"hook\.secret.*16") as caught:
        HookConfig(url="https://app.example/h", secret=secret)
    assert len(secret) < 5 or secret not in str(caught.value)
    HookConfig(url="https://app.example/h", secret="x" * 16)  # the shortest taken
