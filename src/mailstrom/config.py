"""Configuration: one frozen dataclass with documented defaults."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from enum import StrEnum

from mailstrom.arguments import member_of, word_of
from mailstrom.bounds import (
    check_bool,
    check_duration,
    check_int,
    check_number,
    check_port,
    check_seconds,
)
from mailstrom.dkim.config import DKIMConfig
from mailstrom.domains import (
    MAX_DOMAIN,
    a_label,
    default_helo_name,
    domain_name,
    helo_name_problem,
    is_public_name,
)
from mailstrom.errors import ConfigError
from mailstrom.message.chars import shorten, utf8_encodable
from mailstrom.policy.hardbounce import DEFAULT_SUPPRESS_ON, check_codes
from mailstrom.policy.retry import RetryPolicy
from mailstrom.policy.shaping import ShapingConfig
from mailstrom.suppression import BYPASSABLE, SuppressionSource
from mailstrom.tls.levels import TLSPolicy as TLSPolicy  # re-exported: its old home
from mailstrom.tls.table import PolicyTable
from mailstrom.tls_spec import TLSContextSpec
from mailstrom.tls_spec import portable_trust as portable_trust  # re-exported: its old home
from mailstrom.tls_spec import trusting as trusting  # re-exported: its old home


class EventLoop(StrEnum):
    """The event loop a worker runs on when it starts its own (see runtime/loops.py)."""

    AUTO = "auto"
    """uvloop when installed (the ``mailstrom[fast]`` extra), else asyncio's."""
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


class RelayTLS(StrEnum):
    """How to secure the connection to a smarthost."""

    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


MIN_LEASE_FOR = timedelta(milliseconds=100)
"""The shortest ``Config.lease_for``. The heartbeat extends leases every third of it and
fencing looks every twelfth: below this those timers crowd the loop, and a lease runs out
within one store round trip and one SMTP reply, so every transaction risked being taken
over by another worker while on the wire, and sent twice."""
MAX_HOOK_CONCURRENCY = 64
"""Hook requests in flight at once at most (``hook.concurrency``): each is a thread and a
connection of its own while it lasts."""
MAX_HOOK_RETRY = 86_400.0
"""Seconds a failing hook's sender waits at most between requests (``hook.retry_min``,
``hook.retry_max``): a day; the events wait in the outbox meanwhile."""
MIN_SECRET = 16
"""Characters a shared secret (``hook.secret``, the dashboard's ``web.token``) has at
least. 16 random ones are 64 bits as hex digits and 96 in base64, which neither the
dashboard's 10 tries per address in 10 minutes nor an offline search of one signed hook
request gets through; a word or a 6-character one falls to either. ``openssl rand
-base64 24`` makes 32."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds to wait, per RFC 5321 §4.5.3.2 unless noted.

    A reply must be complete within its timeout: part of one (a line of a multi-line
    reply, a byte) does not restart it. The next reply's time starts when the one before
    it is complete. The reply to QUIT gets at most 5 s.
    """

    connect: float = 30.0
    """TCP connect to one address (not in the RFC; Postfix uses 30 s)."""
    greeting: float = 300.0
    command: float = 300.0
    """EHLO, STARTTLS, MAIL, RCPT, RSET, QUIT replies (MAIL and RCPT: 5 min)."""
    data_init: float = 120.0
    """Reply to DATA (2 min)."""
    data_block: float = 180.0
    """Writing one block of the body (3 min): the peer taking some of what this process
    still holds of it, to its final dot."""
    data_end: float = 600.0
    """Reply to the final dot (10 min), from when the dot has left this process."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_seconds(getattr(self, f.name), f"timeouts.{f.name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DNSConfig:
    """Where MX lookups go. Empty ``nameservers`` means the system's resolv.conf."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    """Port of the nameservers: those named, or resolv.conf's."""
    timeout: float = 10.0
    """Total seconds for one domain's route: its MX query and every address query
    together (dnspython's lifetime, shared by all the queries of one lookup)."""
    dnssec: bool = False
    """Trust the resolver to validate DNSSEC: believe the AD bit of its answers (like
    Postfix's ``smtp_dns_support_level = dnssec``) and so use DANE (RFC 7672) for MX hosts
    reached through validated records. Only for a validating resolver on a trusted path
    (the same host, or a protected link)."""

    def __post_init__(self) -> None:
        check_port(self.port, "dns.port")
        check_seconds(self.timeout, "dns.timeout")
        check_bool(self.dnssec, "dns.dnssec")
        given = self.nameservers
        # A string is a sequence too, of one-letter "addresses": refused, not split. An
        # iterator is kept as the tuple it gives, not used up by the check below.
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise ConfigError(
                f"dns.nameservers: expected a sequence of IP addresses, got {shorten(str(given))}"
            )
        servers = tuple(given)
        for server in servers:
            check_nameserver(server)
        object.__setattr__(self, "nameservers", servers)


def check_nameserver(server: object) -> None:
    """ConfigError unless ``server`` is an IP address: the resolver takes nothing else (a
    host name, " ", would raise ValueError at the first lookup, in the worker)."""
    _check_ip_address(server, "dns.nameservers: expected IP addresses")


def check_source_address(address: object) -> None:
    """ConfigError unless ``address`` is an IP address. Anything else (a typo such as
    10.0.0.300, a host name) failed at every connection, and the error blamed the MX
    host ("cannot connect to 192.0.2.1 port 25: Name or service not known"), which was
    then remembered as unreachable; TLS reports need the address as ``sending-mta-ip``."""
    _check_ip_address(address, "source_address: expected an IP address")


def check_tls_context(value: object, where: str) -> None:
    """ConfigError unless ``value`` is None or an :class:`ssl.SSLContext` that checks the
    peer's host name. Anything else (a CA file's name, say) was kept, and failed with
    AttributeError in the worker: at every TLS connection, or when it started its
    process."""
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise ConfigError(
            f"{where}: expected an ssl.SSLContext or None, not {type(value).__name__}"
        )
    # The context is what checks a certificate (tls = "verify", MTA-STS, a verified
    # relay): one that does not check its name (check_hostname off, or a server-side
    # context, which checks no certificate at all) would take any peer's, silently.
    if value is not None and not value.check_hostname:
        raise ConfigError(
            f"{where}: the context does not check the certificate's host name "
            "(check_hostname is off); use ssl.create_default_context() and add your CAs"
        )


def check_ca_file(value: object, where: str) -> None:
    """ConfigError unless ``value`` names a file of PEM CA certificates that OpenSSL loads.
    Anything else was kept, and every use of it failed later, in the worker (a missing
    file, one that holds no certificate, a name that is no string)."""
    if not isinstance(value, str) or not value or "\0" in value:
        shown = shorten(value) if isinstance(value, str | bytes) else type(value).__name__
        raise ConfigError(f"{where}: expected the name of a PEM file, got {shown}")
    # Not a FIFO or a device: OpenSSL would wait on one, or read it for ever.
    try:
        regular = os.path.isfile(value)
        if regular:
            ssl.create_default_context(cafile=value)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot load {shorten(value)}: {exc}") from None
    if not regular:
        raise ConfigError(f"{where}: no such file: {shorten(value)}")


def _check_ip_address(value: object, what: str) -> None:
    try:
        ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        raise ConfigError(f"{what}, got {shorten(str(value))}") from None


_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")
"""A label of a host name as resolvers take it: underscores too (container and other
private names hold them), but nothing that is no part of a name."""


def _relay_host_problem(host: str) -> str | None:
    """Why the relay's ``host`` names no host that can be connected to, or None: an IP
    address or a host name (U-labels allowed, a final dot too). Anything else (a port or
    a scheme written into it, brackets around an IPv6 address) was looked up as a name at
    every delivery, failed, and deferred every message until it expired."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if host.startswith("["):
        return "expected an IPv6 address without brackets (the port goes in relay.port)"
    if ":" in host:
        return (
            "expected a host name or IP address alone (give the port as relay.port, "
            "the TLS mode as relay.tls)"
        )
    name = host.removesuffix(".")
    if not name.isascii():
        try:
            name = a_label(name)
        except ValueError:
            return "not a valid internationalized host name"
    if len(name) > MAX_DOMAIN or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        return "expected a host name (labels of letters, digits and hyphens) or an IP address"
    return None


def _shown_host(host: object) -> str:
    """A relay host refused, as its error quotes it: what comes before its last ``@`` as
    ``***`` (``user:password@smtp.example.net``, credentials written as some tools take
    them, was quoted whole), cut to 80 characters."""
    if isinstance(host, str) and "@" in host:
        host = "***@" + host.rpartition("@")[2]
    return f"{host!r:.80}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    """Send everything through one smarthost instead of MX lookup.

    With a ``username`` the worker authenticates (AUTH PLAIN or LOGIN: the password itself
    goes over the wire), so ``tls=RelayTLS.NONE`` with a username is refused unless
    ``allow_plaintext_auth`` says it is meant. The default is Postfix's hardened pair
    ``smtp_sasl_security_options = noplaintext, noanonymous`` with
    ``smtp_sasl_tls_security_options = noanonymous``: plaintext mechanisms only over TLS.
    The password never appears in ``repr``.

    >>> RelayConfig(host="smtp.example.net", username="app", password="s3cret")
    RelayConfig(host='smtp.example.net', port=587, tls=<RelayTLS.STARTTLS: 'starttls'>, \
username='app', password='***', verify=True, allow_plaintext_auth=False)
    """

    host: str
    port: int = 587
    tls: RelayTLS = RelayTLS.STARTTLS
    username: str | None = None
    password: str | None = None
    verify: bool = True
    allow_plaintext_auth: bool = False
    """Allow AUTH over a connection without TLS (``tls=NONE``), e.g. to a relay on the same
    host or a trusted private link: anyone who can see the traffic then reads the
    password."""

    def __post_init__(self) -> None:
        # A plain string ("implicit", in any case) is taken for the member it names, as
        # Config's tls is: the checks below and the worker compare members.
        tls = word_of(RelayTLS, self.tls)
        if tls is None:
            choices = ", ".join(t.value for t in RelayTLS)
            raise ConfigError(f"relay.tls must be one of {choices}, got {self.tls!r}")
        object.__setattr__(self, "tls", tls)
        if (
            not isinstance(self.host, str)
            or not self.host
            or any(c.isspace() or not c.isprintable() for c in self.host)
        ):
            # Each delivery would look the name up and fail: every message deferred.
            raise ConfigError(
                f"relay.host: expected a host name or address, got {_shown_host(self.host)}"
            )
        problem = _relay_host_problem(self.host)
        if problem is not None:
            raise ConfigError(f"relay.host: {problem}, got {_shown_host(self.host)}")
        for name in ("username", "password"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"relay.{name}: expected a string, not {type(value).__name__}")
            # AUTH sends both as UTF-8, and PLAIN separates them with NULs (RFC 4616 §2:
            # neither may hold one). A lone surrogate (a variable that is not UTF-8)
            # crashed every delivery; a NUL split them wrongly, and the relay refused
            # each. Neither value is shown: the password is a secret.
            if value is not None and ("\0" in value or not utf8_encodable(value)):
                raise ConfigError(
                    f"relay.{name}: holds a NUL character or octets that are not UTF-8 "
                    "(a lone surrogate); AUTH sends it as UTF-8"
                )
        # AUTH PLAIN has no empty password (RFC 4616 §2): a username alone is a password
        # missing from the environment; a password alone would never be sent.
        if self.username and not self.password:
            raise ConfigError(
                "relay.password: required with relay.username (set it in the file or "
                "MAILSTROM_RELAY_PASSWORD)"
            )
        if self.password and not self.username:
            raise ConfigError(
                "relay.username: required with relay.password, which is sent only with one"
            )
        check_port(self.port, "relay.port")
        check_bool(self.verify, "relay.verify")
        check_bool(self.allow_plaintext_auth, "relay.allow_plaintext_auth")
        if (
            self.username is not None
            and self.tls is RelayTLS.NONE
            and not self.allow_plaintext_auth
        ):
            raise ConfigError(
                "relay: a username with relay.tls = none would send the password in "
                "cleartext; use starttls or implicit, or set relay.allow_plaintext_auth = "
                "true if that is really meant"
            )

    def __repr__(self) -> str:
        # The password is a secret: its presence is shown, never its value.
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "password" and value is not None:
                value = "***"
            parts.append(f"{f.name}={value!r}")
        return f"RelayConfig({', '.join(parts)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class HookConfig:
    """Where a worker POSTs delivery events (see ``docs/guide.md``, "Events").

    Every request is signed with HMAC-SHA256 under ``secret`` (the receiver checks it with
    :func:`mailstrom.webhooks.verify_signature`); a request that fails or times out after
    ``timeout`` seconds is retried with backoff, and its events stay in the store's outbox
    until the endpoint answers 2xx. At most ``batch`` events go in one request, and at most
    ``concurrency`` requests (each with a batch of its own) are in flight at once. The
    secret (at least :data:`MIN_SECRET` characters) never appears in ``repr``.

    >>> HookConfig(url="https://app.example/mail-events", secret="whsec-0123456789abcdef")
    HookConfig(url='https://app.example/…', secret='***', timeout=10.0, batch=100, \
retry_min=1.0, retry_max=300.0, concurrency=4)
    """

    url: str
    secret: str
    timeout: float = 10.0
    batch: int = 100
    retry_min: float = 1.0
    retry_max: float = 300.0
    """Seconds to wait after a failed request: ``retry_min`` at first, doubling (±20 %)
    up to ``retry_max`` while the endpoint keeps failing."""
    concurrency: int = 4
    """Requests in flight at once, each with a batch of its own: an endpoint that takes
    a while to answer gets more events a second. One at a time while it fails."""

    def __post_init__(self) -> None:
        check_hook_url(self.url)
        if not isinstance(self.secret, str) or not self.secret:
            # Never shown: a secret.
            raise ConfigError(
                "hook.secret: required with hook.url, a non-empty string (receivers check "
                "signatures)"
            )
        if not utf8_encodable(self.secret):
            # The HMAC key is its UTF-8 (webhooks.sign): an octet that is not UTF-8, as
            # read from the environment (a lone surrogate), raised in every request.
            raise ConfigError(
                "hook.secret: holds octets that are not UTF-8 (or a lone surrogate); the "
                "signing key is the secret's UTF-8"
            )
        if len(self.secret) < MIN_SECRET:
            raise ConfigError(
                f"hook.secret: must be at least {MIN_SECRET} characters (it is "
                f"{len(self.secret)}): anyone with one signed request could try every "
                "shorter key; `openssl rand -base64 24` makes a good one"
            )
        check_seconds(self.timeout, "hook.timeout", maximum=300)
        check_int(self.batch, "hook.batch", maximum=10_000)
        check_int(self.concurrency, "hook.concurrency", maximum=MAX_HOOK_CONCURRENCY)
        check_seconds(self.retry_min, "hook.retry_min", maximum=MAX_HOOK_RETRY)
        check_seconds(self.retry_max, "hook.retry_max", maximum=MAX_HOOK_RETRY)
        if self.retry_min > self.retry_max:
            raise ConfigError(
                f"hook.retry_min: expected at most hook.retry_max ({self.retry_max:g} s),"
                f" got {self.retry_min:g} s"
            )

    def __repr__(self) -> str:
        return (
            f"HookConfig(url={shown_hook_url(self.url)!r}, secret='***', timeout={self.timeout!r}, "
            f"batch={self.batch!r}, retry_min={self.retry_min!r}, retry_max={self.retry_max!r}, "
            f"concurrency={self.concurrency!r})"
        )


def check_hook_url(url: object, where: str = "hook.url") -> None:
    """ConfigError unless ``url`` is an http(s) URL the hook's sender can POST to: a
    host, no credentials (they are not sent, and would be shown), no white space."""
    if not isinstance(url, str):
        raise ConfigError(f"{where}: expected a string, not {type(url).__name__}")
    shown = shown_hook_url(url)
    if "@" in _origin(url)[2]:
        # urllib sends no credentials from a URL: it took "user:password@host" for
        # the host's name, every request failed, and the warning showed the password.
        raise ConfigError(
            f"{where}: credentials in the URL are not sent (requests are signed with "
            f"hook.secret instead): {shown!r}"
        )
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {shown!r}")
    try:
        # What the sender's urllib reads (an IPv6 literal without its "]", a port
        # that is no port): refused here rather than by every request.
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}: {shown!r}") from None
    if not parts.hostname or any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{where}: expected a host and no white space: {shown!r}")
    # The host as urllib connects to it: percent-decoded. A control character, a space or
    # a delimiter ("%2F", "%3A") decoded there failed every request.
    host = urllib.parse.unquote(parts.hostname)
    if any(c.isspace() or not c.isprintable() for c in host) or any(
        host.count(c) > parts.hostname.count(c) for c in ":/?#@[]\\"
    ):
        raise ConfigError(f"{where}: expected a host and no white space: {shown!r}")
    problem = _host_problem(host)
    if problem is not None:
        # The sender's socket looks the host up by its IDNA form, which such a name
        # has not: every request failed and the batch was retried for ever.
        raise ConfigError(f"{where}: host {shorten(host, 80)} {problem}")


def _host_problem(host: str) -> str | None:
    """Why no name lookup can find ``host`` (a URL's host, as ``urlsplit`` gives it), or
    None: a label empty or of more than 63 octets in the IDNA form the socket module
    encodes it to, or more than :data:`MAX_DOMAIN` characters in all (RFC 1035 §2.3.4).
    An address literal passes (it has no empty label and is shorter). A name that is not
    ASCII is taken in the A-labels the sender requests it by (:func:`a_label`, IDNA 2008):
    one that has none is refused."""
    if not host.isascii():
        try:
            host = a_label(host)
        except ValueError:
            return "has no IDNA 2008 form (a label empty, too long, or disallowed)"
    try:
        encoded = host.encode("idna")  # what socket.getaddrinfo() does with a str host
    except UnicodeError:
        return "has an empty label or one of more than 63 octets"
    if len(encoded.removesuffix(b".")) > MAX_DOMAIN:
        return f"is longer than {MAX_DOMAIN} characters"
    return None


def shown_hook_url(url: str) -> str:
    """``url`` as logs and messages show it: its origin, the user information of its
    authority (``user:password@``, RFC 3986 §3.2.1) as ``***@``, and anything after it
    (path, query, fragment) as ``/…``. Logs are read by more people than the
    configuration, and an endpoint's credentials often travel in its query, or in its
    path (``/T000/B000/XXXX``, as Slack-style URLs carry their token). Never raises,
    also for a string that is no URL (then cut at its first ``/``, ``?`` or ``#``).

    >>> shown_hook_url("https://u:pw@app.example:8443/T000/B000/XXXX?token=s3cret#x")
    'https://***@app.example:8443/…'
    >>> shown_hook_url("https://app.example/")
    'https://app.example/'
    """
    scheme, sep, authority, rest = _origin(url)
    if not sep:  # no URL: all that comes before its first "/", "?" or "#" is shown
        authority = scheme + authority
        scheme = ""
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{'/…' if rest.strip('/') else rest}"


_ORIGIN = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*")
"""A URL's scheme and authority (RFC 3986 §3), as ``urlsplit`` cuts them."""


def _origin(url: str) -> tuple[str, str, str, str]:
    """``url`` cut as ``urlsplit`` cuts it, without raising: its scheme, ``://``, its
    authority (up to the first ``/``, ``?`` or ``#``), and the rest (:func:`url_rest`);
    a string without ``://`` has no authority (all of its origin is the scheme part)."""
    rest = url_rest(url)
    scheme, sep, authority = url[: len(url) - len(rest)].partition("://")
    return scheme, sep, authority, rest


def url_rest(url: str) -> str:
    """What follows the scheme and authority of ``url`` (path, query, fragment), which
    :func:`shown_hook_url` does not show; never raises.

    >>> url_rest("https://app.example:8443/T000/XXXX?v=2")
    '/T000/XXXX?v=2'
    """
    found = _ORIGIN.match(url)
    assert found is not None  # every part of the pattern may be empty
    return url[found.end() :]


@dataclass(frozen=True, slots=True, kw_only=True)
class MTASTSConfig:
    """MTA-STS (RFC 8461): honour the policies recipient domains publish.

    With it, every destination domain's ``_mta-sts`` TXT record is looked up (through
    ``Config.dns``) and, when present, its policy fetched from
    ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` and cached in the store for all
    workers. ``enforce`` policies restrict delivery to the listed MX hosts over verified
    TLS; ``testing`` ones only record what would have failed, for TLS reports (RFC 8460).
    Needs the ``mta-sts`` extra (httpx).

    >>> MTASTSConfig(timeout=5.0)  # doctest: +ELLIPSIS
    MTASTSConfig(port=443, ...)
    """

    port: int = 443
    """HTTPS port of ``mta-sts.<domain>`` (443; tests point it at a loopback server)."""
    ca_file: str | None = None
    """PEM file of the CAs that HTTPS certificates must chain to; default: the system's."""
    tls_context: ssl.SSLContext | None = None
    """Context verifying the HTTPS certificate (overrides ``ca_file``; for tests)."""
    timeout: float = 10.0
    """Seconds one policy fetch may take, connection and body together."""
    recheck: float = 300.0
    """Seconds a worker trusts its last look at a domain's TXT record (never longer than
    the record's TTL); 0 looks it up for every delivery attempt."""
    report: bool = True
    """Count every connection's TLS outcome per policy domain in the store for ``mailstrom
    tlsrpt`` (as ``Config.tlsrpt_record`` does, which also works without MTA-STS)."""

    def __post_init__(self) -> None:
        check_port(self.port, "mta_sts.port")
        check_tls_context(self.tls_context, "mta_sts.tls_context")
        if self.ca_file is not None:
            check_ca_file(self.ca_file, "mta_sts.ca_file")
        check_seconds(self.timeout, "mta_sts.timeout", maximum=300)
        check_seconds(self.recheck, "mta_sts.recheck", positive=False, maximum=86400)
        check_bool(self.report, "mta_sts.report")

    def __reduce__(self) -> tuple[object, ...]:
        # An SSLContext cannot cross to a worker process: what it trusts and its settings
        # do (TLSContextSpec), and the other side builds the context again from them.
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tls_context"}
        spec = None if self.tls_context is None else TLSContextSpec.of(self.tls_context)
        return (_rebuild_mta_sts, (options, spec))


def _rebuild_mta_sts(options: dict[str, object], spec: TLSContextSpec | None) -> MTASTSConfig:
    context = None if spec is None else spec.build()
    return MTASTSConfig(tls_context=context, **options)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionConfig:
    """How long finished messages are kept before a worker deletes them, as ``mailstrom
    purge`` would: ``delivered`` for those all of whose recipients were delivered,
    ``failed`` for the other finished ones (a recipient failed or was cancelled), each
    counted from when the message's last recipient finished. None (the default) or zero
    keeps them for ever. A message still owing its sender a notice is kept until the
    notice is queued; pending and held mail is never deleted.

    >>> RetentionConfig(delivered=timedelta(days=30)).failed is None
    True
    """

    delivered: timedelta | None = None
    failed: timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("delivered", "failed"):
            value = getattr(self, name)
            if value is None:
                continue
            check_duration(value, f"retention.{name}", positive=False)
            if value == timedelta(0):
                # "0" is how the settings say "keep": a zero age is never "delete at
                # once", which would lose mail an operator still wants to look at.
                object.__setattr__(self, name, None)

    @property
    def enabled(self) -> bool:
        """Whether any finished mail is ever deleted."""
        return self.delivered is not None or self.failed is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Lane:
    """A priority lane: messages sent with ``priority=name``.

    Lanes are listed in ``Config.lanes`` highest first: a worker leases due work of a lane
    before any of the lanes after it, and puts it ahead of theirs in every destination's
    queue. ``share`` is the largest fraction of the worker's connections
    (``max_connections``) and of the recipients it holds in flight that this lane may
    take, so that bulk mail cannot occupy every connection while transactional mail waits.

    ``bypass_suppression`` names the suppression entries this lane's mail is sent past:
    those of bounces only (``hard_bounce``, ``async_bounce``). A lane for the few
    messages a user asks for (a password reset to an address that bounced and that the
    user says works again) goes out where the list would stop it, while every other lane's
    mail to the address stays suppressed. A complaint's or an operator's entry (an
    unsubscribe, a block) stops every lane's mail.

    >>> Lane(name="bulk", share=0.5)
    Lane(name='bulk', share=0.5, bypass_suppression=())
    """

    name: str
    share: float = 1.0
    bypass_suppression: tuple[SuppressionSource, ...] = ()
    """Sources of the entries that do not stop this lane's mail (of
    :data:`~mailstrom.suppression.BYPASSABLE`; their values are taken too)."""

    def __post_init__(self) -> None:
        from mailstrom.message.attributes import check_lane_name

        try:
            check_lane_name(self.name, what="lanes")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        check_number(self.share, f"lane {self.name!r}: share", maximum=1)
        object.__setattr__(self, "bypass_suppression", self._bypassed())

    def _bypassed(self) -> tuple[SuppressionSource, ...]:
        given = self.bypass_suppression
        what = f"lane {self.name!r}: bypass_suppression"
        if isinstance(given, str) or not isinstance(given, Iterable):
            raise ConfigError(f"{what}: expected a list of sources, got {type(given).__name__}")
        sources: dict[SuppressionSource, None] = {}
        allowed = ", ".join(sorted(BYPASSABLE))
        for value in given:
            source = member_of(SuppressionSource, value)
            if source not in BYPASSABLE:
                shown = repr(value[:40]) if isinstance(value, str) else type(value).__name__
                raise ConfigError(
                    f"{what}: {shown} cannot be bypassed (only {allowed}: a complaint or "
                    "an operator's entry stops every lane's mail)"
                )
            sources[source] = None
        return tuple(sources)


_COUNT_FIELDS = (
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
"""The integer limits of :class:`Config`, each at least 1."""
_SWITCH_FIELDS = (
    "retry_uncertain",
    "allow_loopback",
    "events",
    "tlsrpt_record",
    "bounce_notices",
)
"""The switches of :class:`Config`: ``True`` or ``False``, nothing read for its truth."""
_NESTED: tuple[tuple[str, type], ...] = (
    ("dns", DNSConfig),
    ("timeouts", Timeouts),
    ("retry", RetryPolicy),
    ("relay", RelayConfig),
    ("hook", HookConfig),
    ("retention", RetentionConfig),
)
"""Fields of :class:`Config` holding one of the dataclasses above (relay and hook: or None)."""

DEFAULT_LANES = (Lane(name="transactional", share=1.0), Lane(name="bulk", share=0.75))
"""Transactional mail first, with every connection; bulk mail after it, with at most three
quarters of them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the worker needs; every network dependency can be pointed elsewhere.

    >>> Config(helo_name="mail.example.com", smtp_port=2525,
    ...        dns=DNSConfig(nameservers=("127.0.0.1",), port=5353))  # doctest: +ELLIPSIS
    Config(...)
    """

    helo_name: str = field(default_factory=default_helo_name)
    """The name sent in EHLO: a domain (``mail.example.com``, U-labels allowed) or an
    address literal (``[192.0.2.1]``). Default: the machine's fully qualified name, or
    ``localhost`` when that is not a valid domain."""
    smtp_port: int = 25
    """Port of MX hosts (25 in production; tests point it at a loopback receiver)."""
    dns: DNSConfig = field(default_factory=DNSConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC
    tls_context: ssl.SSLContext | None = None
    """Context for VERIFY (and relay) verification; default: the system trust store.
    Tests pass one trusting their own CA. It must check host names (``check_hostname``),
    else ConfigError."""
    relay: RelayConfig | None = None
    max_message_size: int = 35 * 1024 * 1024
    """Largest encoded message ``send_email`` accepts, in octets."""
    max_recipients: int = 1000
    """Most envelope recipients one message may have (after de-duplication); more raise
    ``TooManyRecipients`` at submission. Bounds the work one ``send_email`` call can ask
    for. The default is Postfix's ``smtpd_recipient_limit``; RFC 5321 §4.5.3.1.8 has
    servers accept at least 100 recipients a message."""
    max_connections: int = 100
    """SMTP connections open at once, over all destinations: every socket counts, from
    the moment it starts to open until it is closed (in use, kept idle for reuse, or
    closing after QUIT); at the limit, idle ones are closed to make room. Also the most
    SMTP sessions running at once."""
    max_per_destination: int = 10
    """SMTP sessions open at once to one destination: a recipient domain (or the relay),
    per worker, its mail that asks for REQUIRETLS or carries ``TLS-Required: No``
    included. Two domains served by the same MX hosts are two destinations, each with
    this many; a shaping rule's ``max_connections`` caps what its domains open together.
    Also the most connections being opened (connect, greeting, EHLO, STARTTLS) to one
    address at once, over all domains: an MX host that never greets holds no more."""
    max_messages_per_connection: int = 100
    """Messages sent over one connection before it is closed."""
    connection_idle: float = 5.0
    """Seconds an idle connection is kept for reuse."""
    retry_uncertain: bool = True
    """Retry an attempt whose connection was lost after the final dot (RFC 5321
    §4.5.3.2.6); False marks such recipients delivered-uncertain instead."""
    lease_for: timedelta = timedelta(minutes=15)
    """How long a leased batch stays with one worker before another may take it. Workers
    sharing a PostgreSQL store rely on their clocks agreeing to well within this: one
    whose clock is more than a third of it from the server's takes no new work until it
    is right (``WorkerStatus.paused``, docs/guide.md). At least 100 ms
    (:data:`MIN_LEASE_FOR`)."""
    lease_batch: int = 500
    """Recipients leased per store round trip."""
    max_leased_bytes: int = 256 * 1024 * 1024
    """Octets of message data one worker holds at most: what its leases read from the
    store (each message's stored size, once per lease), until their recipients are
    recorded. At the limit it leases nothing more until some are; a message larger than
    the limit is still leased, alone, so the most held is this plus one message. Without
    it a queue of large messages made one worker hold up to ``lease_batch`` of them in
    memory (500 of 35 MiB each), and more while slow deliveries kept leases open."""
    poll_interval: float = 5.0
    """Longest idle sleep between store checks when no wake-up arrives."""
    source_address: str | None = None
    """Local IP address to bind outgoing connections to (SMTP, the MTA-STS policy fetch,
    TLS report POSTs). MX, policy host and collector addresses of the other IP version
    are skipped: a socket bound to it cannot reach them."""
    allow_loopback: bool = False
    """Deliver to loopback (127.0.0.0/8, ::1), unspecified (0.0.0.0/8, ::) and link-local
    (169.254.0.0/16, fe80::/10) addresses, IPv4-mapped IPv6 forms included, when MX or
    address records or an address literal (``a@[127.0.0.4]``) name them. Off (the
    default), such addresses are dropped from routes, like Exim's ``ignore_target_hosts``,
    and a domain left with none fails permanently (5.4.4). Tests and demos that deliver to
    a receiver on 127.0.0.1 turn it on."""
    mx_address_limit: int = 5
    """Addresses one delivery attempt may try for a domain, over all its MX hosts, in
    order (Postfix's ``smtp_mx_address_limit``); an address several hosts share counts
    once. Bounds the DNS work per route too: only as many MX hosts are looked up as the
    limit can use, and at most ``mx_host_limit`` are considered (the best by preference;
    a failure says how many were left out)."""
    mx_host_limit: int | None = None
    """MX hosts of a domain considered at most, the best by preference (equal ones drawn
    at random); None: twice ``mx_address_limit``. Hosts are looked up only until the
    route holds ``mx_address_limit`` addresses, so a larger cut costs DNS work only for
    a domain whose better hosts have no usable address (a failure names the cut)."""
    event_loop: EventLoop = EventLoop.AUTO
    """The loop a worker started by mailstrom runs on: uvloop when installed (several
    times faster per message), or asyncio's own."""
    mx_session_limit: int = 2
    """SMTP sessions (connections that got a greeting) one delivery attempt may open
    before it gives up until the next retry (Postfix's ``smtp_mx_session_limit``). Enforced
    by the delivery code; connections that fail before the greeting do not count."""
    remember_unreachable: timedelta = timedelta(minutes=5)
    """How long an address that could not be reached (connection refused or timed out,
    no greeting or no answer to EHLO in time) goes after the other addresses of its
    route, so that each new session does not wait out its timeout again before trying
    the next MX host (Exim keeps a retry time per host for the same reason). It is still
    tried when the others fail, and a session it sets up ends its wait. Remembered per
    worker; zero turns the memory off."""
    metrics_domains: tuple[str, ...] = ()
    """Destination domains counted under their own name in the per-domain metrics; every
    other domain counts as ``other``, so the number of series stays bounded."""
    hook: HookConfig | None = None
    """POST every recorded result to this endpoint (implies ``events``)."""
    events: bool = False
    """Write an event for every recorded result to the store's outbox, in the same
    transaction as the result (for ``mailstrom events`` and hooks). Off, recording does no
    extra work."""

    dkim: DKIMConfig | None = None
    """DKIM signing of every message at submission (``send_email``), with the keys aligned
    with its From domain; ``None`` sends mail unsigned. See :class:`DKIMConfig`."""
    message_id_domain: str | None = None
    """Domain of the Message-IDs mailstrom makes. Default: the From domain when it is a
    public name, else ``helo_name`` when that is one, else ``mailstrom.invalid`` — never
    ``localhost`` or a name private to one network."""
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    """Traffic shaping per destination: limits by recipient domain or MX host, and the
    pause after a throttling reply (see :class:`~mailstrom.policy.shaping.ShapingConfig`
    and docs/guide.md, "Traffic shaping")."""
    mta_sts: MTASTSConfig | None = None
    """Apply recipient domains' MTA-STS policies (RFC 8461); ``None`` ignores them. See
    :class:`MTASTSConfig`."""

    tls_domains: PolicyTable | Mapping[str, str] = field(default_factory=PolicyTable)
    """Per-domain TLS policy levels overriding ``tls`` (Postfix's ``smtp_tls_policy_maps``):
    ``{"example.com": "verify", "legacy.example": "none", "*.bank.example": "dane-only"}``.
    An entry is the operator's word for its domain: MTA-STS and DANE apply only to
    domains without one (and to ``dane``/``dane-only`` entries). Becomes a
    :class:`~mailstrom.tls.table.PolicyTable`."""
    tls_remember_broken: timedelta = timedelta(hours=1)
    """How long a host whose TLS handshake failed is remembered (in the store, shared by
    every worker): under the opportunistic policy it then gets plaintext at once, one
    connection per attempt instead of two. Never under verify, DANE or MTA-STS; zero
    turns the memory off."""
    tlsrpt_record: bool = False
    """Count the TLS outcome of every connection to a recipient's MX host, per policy
    domain and policy type (``sts``, ``tlsa``, ``no-policy-found``), in the store, for the
    daily TLS reports of ``mailstrom tlsrpt`` (RFC 8460), with or without MTA-STS. A
    connection costs no store write: counters are written in batches. ``mta_sts.report``
    (on by default) turns the same counting on whenever ``mta_sts`` is set."""

    @property
    def records_tls_sessions(self) -> bool:
        """Whether workers count TLS sessions for reports (``tlsrpt_record``, or MTA-STS
        with ``report``)."""
        return self.tlsrpt_record or (self.mta_sts is not None and self.mta_sts.report)

    lanes: tuple[Lane, ...] = DEFAULT_LANES
    """Priority lanes, highest first (see :class:`Lane`)."""
    default_priority: str = "transactional"
    """The lane of a message sent without ``priority``; must be one of ``lanes``."""
    idempotency_window: timedelta = timedelta(hours=24)
    """How long an ``idempotency_key`` keeps returning the id of the message first sent
    with it (counted from that first submission)."""

    @property
    def lane_names(self) -> tuple[str, ...]:
        """The names of ``lanes``, highest first."""
        return tuple(lane.name for lane in self.lanes)

    suppress_on: tuple[str, ...] = DEFAULT_SUPPRESS_ON
    """Permanent refusals that put the refused address on the store's suppression list:
    enhanced codes (``5.1.1``) or basic codes (``556``) of an RCPT refusal, of a final-dot
    refusal of a one-recipient transaction, or of a routing failure (NXDOMAIN 5.1.2, null
    MX 556 5.1.10). Later messages to a suppressed address fail at once without a
    connection. Empty: nothing is added automatically (entries can still be added by
    hand or by ``mailstrom bounce``)."""
    suppress_for: timedelta | None = None
    """How long an entry added for a hard bounce lasts; None: until removed."""
    bounce_notices: bool = False
    """Send a bounce message (an RFC 3464 delivery status notification) to the envelope
    sender of a message whose recipients the worker gives up on, for messages without a
    DSN request; a message with one follows its NOTIFY (``mailstrom sendmail`` gives every
    message one, so sendmail mail is bounced by default). Never for the null sender."""
    delay_warning: timedelta | None = None
    """Also send a delay warning (``Action: delayed``) once, by the first attempt that
    defers a recipient this long after queueing, to the senders that would get a bounce
    message (and for a DSN request, only when its NOTIFY includes DELAY or is left to the
    server); None (the default, as Postfix's ``delay_warning_time = 0``): never."""

    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """How long workers keep finished messages (see :class:`RetentionConfig`); by
    default for ever, until ``mailstrom purge`` deletes them."""

    @property
    def outbox(self) -> bool:
        """Whether recorded results also go to the event outbox."""
        return self.events or self.hook is not None

    def __post_init__(self) -> None:
        # A plain string ("uvloop", in any case) is taken for the enum member it names.
        event_loop = word_of(EventLoop, self.event_loop)
        if event_loop is None:
            choices = ", ".join(e.value for e in EventLoop)
            raise ConfigError(f"event_loop must be one of {choices}, got {self.event_loop!r}")
        object.__setattr__(self, "event_loop", event_loop)
        if self.event_loop is EventLoop.UVLOOP and not uvloop_available():
            raise ConfigError(
                "event_loop = uvloop, but uvloop is not installed: pip install 'mailstrom[fast]'"
            )
        # Fail where the bad value is given, not deep inside the worker later.
        problem = helo_name_problem(self.helo_name)
        if problem is not None:
            raise ConfigError(
                f"helo_name {self.helo_name!r:.80}: {problem} (expected a domain like "
                "mail.example.com or an address literal like [192.0.2.1])"
            )
        self._check_numbers()
        check_tls_context(self.tls_context, "tls_context")
        if self.source_address is not None:
            check_source_address(self.source_address)
        given = self.metrics_domains
        # A string is a sequence too, of one-letter "domains": refused, not split.
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise ConfigError(
                f"metrics_domains: expected a sequence of domain names, got {shorten(str(given))}"
            )
        names = tuple(given)
        if not all(isinstance(d, str) for d in names):
            raise ConfigError(f"metrics_domains: expected domain names, got {shorten(str(names))}")
        # As a recipient's domain is stored and counted (lower case, U-labels as
        # A-labels, no final dot): "Bücher.Example" or "example.org." matched none of
        # its recipients otherwise, and all their results counted as "other".
        # Lowered by a_label, not str.lower(), which makes a capital sigma before a
        # hyphen or a digit the final sigma, a letter of another domain's name.
        domains = tuple(d.strip().removesuffix(".") for d in names)
        if any(not d or any(c.isspace() for c in d) for d in domains):
            raise ConfigError(f"metrics_domains: expected domain names, got {domains!r}")
        try:
            domains = tuple(a_label(d) for d in domains)
        except ValueError as exc:
            raise ConfigError(f"metrics_domains: {exc}") from None
        object.__setattr__(self, "metrics_domains", domains)
        if self.dkim is not None and not isinstance(self.dkim, DKIMConfig):
            raise ConfigError(f"dkim must be a DKIMConfig, not {type(self.dkim).__name__}")
        try:
            object.__setattr__(self, "suppress_on", check_codes(self.suppress_on))
        except ValueError as exc:
            raise ConfigError(f"suppress_on: {exc}") from None
        if self.message_id_domain is not None:
            try:
                name = domain_name(self.message_id_domain)
            except ValueError as exc:
                raise ConfigError(f"message_id_domain: {exc}") from None
            if not is_public_name(name):
                raise ConfigError(
                    f"message_id_domain must be a public domain name, not {name!r} (a name "
                    "private to one host or network)"
                )
            object.__setattr__(self, "message_id_domain", name)
        if not isinstance(self.shaping, ShapingConfig):
            raise ConfigError(f"shaping must be a ShapingConfig, not {type(self.shaping).__name__}")
        self._check_tls()
        if self.mta_sts is not None and not isinstance(self.mta_sts, MTASTSConfig):
            raise ConfigError(f"mta_sts must be an MTASTSConfig, not {type(self.mta_sts).__name__}")
        self._check_lanes()

    def _check_numbers(self) -> None:
        # Types too, not only ranges: NaN passes "< 1", and a limit that is NaN or
        # infinite is no limit at all.
        check_port(self.smtp_port, "smtp_port")
        for name in _COUNT_FIELDS:
            check_int(getattr(self, name), name)
        if self.mx_host_limit is not None:  # None: twice mx_address_limit
            check_int(self.mx_host_limit, "mx_host_limit")
        for name in _SWITCH_FIELDS:
            check_bool(getattr(self, name), name)
        check_seconds(self.connection_idle, "connection_idle", positive=False)
        check_seconds(self.poll_interval, "poll_interval")
        check_duration(self.lease_for, "lease_for")
        if self.lease_for < MIN_LEASE_FOR:
            raise ConfigError(
                f"lease_for: at least {MIN_LEASE_FOR.total_seconds() * 1000:.0f} ms (minutes "
                f"in production), got {self.lease_for.total_seconds() * 1000:g} ms"
            )
        check_duration(self.idempotency_window, "idempotency_window")
        check_duration(self.tls_remember_broken, "tls_remember_broken", positive=False)
        check_duration(self.remember_unreachable, "remember_unreachable", positive=False)
        for name in ("suppress_for", "delay_warning"):
            if getattr(self, name) is not None:  # None: no expiry, no warnings
                check_duration(getattr(self, name), name)
        # The nested dataclasses check their own numbers, if they are what they claim.
        for name, kind in _NESTED:
            value = getattr(self, name)
            if not isinstance(value, kind) and not (value is None and name in ("relay", "hook")):
                raise ConfigError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")

    def _check_lanes(self) -> None:
        given = self.lanes
        # One Lane alone (or None) is no sequence of them: tuple() raised a TypeError.
        lanes = tuple(given) if isinstance(given, Iterable) else ()
        if not lanes or not all(isinstance(lane, Lane) for lane in lanes):
            raise ConfigError("lanes: expected one or more Lane values")
        names = [lane.name for lane in lanes]
        if len(set(names)) != len(names):
            raise ConfigError(f"lanes: names must differ, got {names}")
        if self.default_priority not in names:
            raise ConfigError(
                f"default_priority {self.default_priority!r} is not one of the lanes {names}"
            )
        object.__setattr__(self, "lanes", lanes)

    def _check_tls(self) -> None:
        # In any case, as tls_domains' levels and every word of the TOML settings.
        tls = word_of(TLSPolicy, self.tls)
        if tls is None:
            choices = ", ".join(p.value for p in TLSPolicy)
            raise ConfigError(f"tls must be one of {choices}, got {self.tls!r}")
        object.__setattr__(self, "tls", tls)
        table = self.tls_domains
        if not isinstance(table, PolicyTable):
            table = PolicyTable.parse(table)
            object.__setattr__(self, "tls_domains", table)
        dane = {TLSPolicy.DANE, TLSPolicy.DANE_ONLY}
        if not self.dns.dnssec and (self.tls in dane or any(lv in dane for _, lv in table)):
            raise ConfigError(
                "tls: dane and dane-only need a resolver trusted to validate DNSSEC; "
                "set dns.dnssec = true"
            )

    @property
    def tls_table(self) -> PolicyTable:
        """``tls_domains`` as the :class:`~mailstrom.tls.table.PolicyTable` it became."""
        assert isinstance(self.tls_domains, PolicyTable)
        return self.tls_domains
