"""Fetching MTA-STS TXT records and policy files (RFC 8461 §3.1, §3.3).

The TXT lookup goes through the worker's own dnspython resolver (``Config.dns``). So does
the address of ``mta-sts.<domain>``: the HTTPS request is made to that address with the
name in SNI, the ``Host`` header and the certificate check, so a test's loopback DNS server
can point the name at a loopback HTTPS server, and production uses the same resolver as
for MX records. Targets the route policy refuses (loopback, link-local, unless
``allow_loopback``) are refused here too (:mod:`mailstrom.mtasts.https`, shared with the
TLS report POST).

The fetch is bounded: one deadline (``MTASTSConfig.timeout``) for connecting, the headers
and the body, a body of at most :data:`~mailstrom.mtasts.policy.MAX_POLICY_SIZE` octets
(read as a stream and cut, and never decompressed: a ``Content-Encoding`` is refused),
no redirects followed, a certificate valid for
``mta-sts.<domain>``, and a fresh client per fetch so that no connection made for one
name is ever reused for another.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mailstrom.config import MTASTSConfig
from mailstrom.domains import IDNA
from mailstrom.errors import ConfigError, LocalResourceShortage, local_shortage
from mailstrom.message.chars import shorten
from mailstrom.mtasts import https
from mailstrom.mtasts.policy import MAX_POLICY_SIZE, TOO_LARGE, Policy, PolicyError, parse_policy
from mailstrom.routing.lookup import unanswered
from mailstrom.routing.policy import RoutePolicy

if TYPE_CHECKING:
    import httpx

WELL_KNOWN = "/.well-known/mta-sts.txt"
FETCH_ERROR = "sts-policy-fetch-error"
WEBPKI_INVALID = "sts-webpki-invalid"
_NO_ADDRESS = "sts-fetch-no-address"


class NotServed(PolicyError):
    """An answer that is no policy (RFC 8461 §3.3: a policy comes with HTTP 200, and
    redirects are not followed): a fetch error at this address, which leaves the host's
    next address to fetch from."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason, result_type=FETCH_ERROR, code=code)


class DNSTrouble(Exception):
    """A lookup that failed for a reason other than "no such record": try again later."""


def require_httpx() -> None:
    """Raise :class:`~mailstrom.errors.ConfigError` when the ``mta-sts`` extra is missing.

    httpx itself is imported only by a fetch (it costs ~50 ms, and a worker without
    MTA-STS never needs it)."""
    try:
        import httpx  # noqa: F401
    except ImportError:  # pragma: no cover - the extra is missing
        raise ConfigError("MTA-STS needs httpx: pip install 'mailstrom[mta-sts]'") from None


NO_RECORD_TTL = float("inf")
"""The TTL :func:`txt_records` gives "no such record": how long to believe it is the
caller's choice (a worker's ``recheck``)."""


def a_label(domain: str) -> str | None:
    """``domain`` as the lower-case A-label the policy is looked up and cached under, or
    None when it is no valid domain name (an address literal, say)."""
    text = domain.strip().rstrip(".")
    if not text or text.startswith("["):
        return None
    try:
        return dns.name.from_text(text, idna_codec=IDNA).canonicalize().to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


async def txt_records(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[list[str], float]:
    """The TXT records of ``name`` (each record's strings joined) and their TTL; no
    records → ``([], NO_RECORD_TTL)``. Raises :class:`DNSTrouble` for SERVFAIL, timeouts
    and the like.

    The TTL is the smallest of the records' and of the CNAMEs that led to them: a domain
    whose MTA-STS a provider runs points ``_mta-sts`` at the provider's record, and a
    moved CNAME is a new policy id as much as a changed record is."""
    try:
        qname = dns.name.from_text(name, idna_codec=IDNA)
    except dns.name.NameTooLong:
        # "_mta-sts." (or "_smtp._tls.") before a long domain (245 characters or more)
        # makes a name over 255 octets: no such record can exist, and calling it a
        # failed lookup would have a REQUIRETLS message wait for one.
        return [], NO_RECORD_TTL
    try:
        answer = await resolver.resolve(qname, dns.rdatatype.TXT, search=False)
    except dns.resolver.NoAnswer as exc:
        if (why := unanswered(exc)) is not None:  # no NODATA: a referral, truncated
            raise DNSTrouble(f"TXT lookup of {name} failed: {why}") from exc
        return [], NO_RECORD_TTL
    except dns.resolver.NXDOMAIN:
        return [], NO_RECORD_TTL
    except (dns.exception.DNSException, OSError) as exc:
        raise DNSTrouble(f"TXT lookup of {name} failed: {exc}") from exc
    records = [
        b"".join(rdata.strings).decode("utf-8", "replace")
        for rdata in answer
        if rdata.rdtype == dns.rdatatype.TXT
    ]
    return records, float(answer.chaining_result.minimum_ttl if answer.rrset is not None else 0)


async def _get(
    host: str, ip: str, config: MTASTSConfig, timeouts: httpx.Timeout, source: str | None
) -> bytes:
    body = bytearray()
    async with (
        https.client(
            config.tls_context or https.default_context(config.ca_file), config.timeout, source
        ) as http,
        https.stream_at(
            http,
            "GET",
            host=host,
            ip=ip,
            port=config.port,
            path=WELL_KNOWN,
            headers={"Accept-Encoding": "identity"},
            timeouts=timeouts,
        ) as response,
    ):
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("location", "")[:200]
            raise NotServed(
                f"{ip}: redirects ({status}) to {location!r}; redirects are not followed "
                "(RFC 8461 §3.3)",
                "sts-fetch-http-redirect",
            )
        if status != 200:
            # One code per status: h11 takes three digits only, so there are at most 900.
            raise NotServed(f"{ip}: answered HTTP {status}", f"sts-fetch-http-{status}")
        # Trimmed of HTTP's white space only (SP, HTAB): str.strip() would also take the
        # U+00A0 or U+0085 that a header's obs-text octets decode to.
        media = response.headers.get("content-type", "").split(";")[0].strip(" \t").lower()
        if media != "text/plain":
            raise PolicyError(
                f"policy served as {media or 'no type'!r}, not text/plain",
                code="sts-policy-not-text-plain",
            )
        encoding = response.headers.get("content-encoding", "").strip(" \t").lower()
        if encoding not in ("", "identity"):
            # We asked for identity. Decoding is what would make the size limit useless: a
            # few KB of "gzip, gzip" inflate to gigabytes in one step, before any check.
            raise PolicyError(
                f"policy served with Content-Encoding {shorten(encoding, 40)} (identity asked)",
                result_type=FETCH_ERROR,
                code="sts-fetch-content-encoding",
            )
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} octets", code=TOO_LARGE)
    return bytes(body)


async def fetch_policy(
    domain: str,
    *,
    resolver: dns.asyncresolver.Resolver,
    config: MTASTSConfig,
    route_policy: RoutePolicy,
    source_address: str | None = None,
) -> Policy:
    """Fetch and validate the policy of ``domain`` (lower-case A-label); raise
    :class:`~mailstrom.mtasts.policy.PolicyError` with the reason and its RFC 8460 failure
    type when it cannot be had.

    The addresses of ``mta-sts.<domain>`` that ``route_policy`` admits are tried in
    turn, each connection bound to ``source_address`` when given (use
    :func:`~mailstrom.mtasts.https.route_policy_for` to keep to its IP version): the
    next one after a failed connection and after an answer that is no policy (not 200,
    :class:`NotServed`: one server of several may be down or behind), not after a
    certificate refused or a policy served that is invalid."""
    require_httpx()
    import httpx

    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(config.timeout) as deadline:
            # The last address's failure is the fetch's: its reason, and its code, which
            # leaves out what varies from one fetch to the next (address, time given).
            last, code = "no address", _NO_ADDRESS
            try:
                addresses = await https.usable_addresses(resolver, host, route_policy)
            except https.NoUsableAddress as exc:
                _raise_if_short(exc, f"MTA-STS: address lookup of {host}")
                raise PolicyError(str(exc), result_type=FETCH_ERROR, code=_NO_ADDRESS) from exc
            for ip in addresses:
                timeouts = https.timeouts_before(deadline)  # what is left, for this one
                try:
                    return parse_policy(await _get(host, ip, config, timeouts, source_address))
                except NotServed as exc:
                    last, code = exc.reason, exc.code
                except httpx.ConnectTimeout:
                    # Connecting or the handshake stalled, and was ended well before the
                    # deadline (https.CONNECT_SHARE): the next address gets the time left,
                    # and the reason says what happened, not that the deadline passed.
                    last, code = https.connect_timed_out(ip, timeouts), "sts-fetch-connect-timeout"
                except httpx.TimeoutException:
                    # Reading (or writing) may take all the time left: the deadline is
                    # reached, and reported as such.
                    raise TimeoutError from None
                except httpx.ConnectError as exc:
                    verify = https.verify_error(exc)
                    if verify is not None:
                        raise PolicyError(
                            f"certificate of {host} not accepted: "
                            f"{verify.verify_message or verify}",
                            result_type=WEBPKI_INVALID,
                            # OpenSSL's X509_V_ERR_* number: a small fixed set.
                            code=f"sts-certificate-error-{verify.verify_code}",
                        ) from None
                    _raise_if_short(exc, f"MTA-STS: connecting to {host} at {ip}")
                    last = f"{ip}: {https.quoted(exc)}"
                    code = "sts-fetch-tls-error" if _tls_error(exc) else "sts-fetch-connect-error"
                except httpx.HTTPError as exc:
                    last = f"{ip}: {type(exc).__name__}: {https.quoted(exc)}"
                    code = "sts-fetch-http-error"
            raise PolicyError(
                f"cannot fetch https://{host}{WELL_KNOWN}: {last}",
                result_type=FETCH_ERROR,
                code=code,
            )
    except TimeoutError:
        raise PolicyError(
            f"fetching https://{host}{WELL_KNOWN} took more than {config.timeout:g} s",
            result_type=FETCH_ERROR,
            code="sts-fetch-timeout",
        ) from None


def _raise_if_short(exc: BaseException, what: str) -> None:
    """Raise :class:`~mailstrom.errors.LocalResourceShortage` when ``exc`` came of this
    host's shortage (no socket for the connection or the address lookup: EMFILE): that
    is no fetch error of the domain's, to report or to remember as "no policy". The
    chain is walked as :func:`https.ssl_cause` walks it (httpx wraps httpcore's error,
    which wraps the OSError)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return
        shortage = local_shortage(seen)
        if shortage is not None:
            raise LocalResourceShortage(what, shortage) from None
        seen = seen.__cause__ or seen.__context__


def _tls_error(exc: BaseException) -> bool:
    """Whether an httpx connect error was the TLS handshake's (not TCP's)."""
    return https.ssl_cause(exc, ssl.SSLError) is not None
