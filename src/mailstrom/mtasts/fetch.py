"""Fetching MTA-STS TXT records and policy files (RFC 8461 §3.1, §3.3).

The TXT lookup goes through the worker's own dnspython resolver (``Config.dns``). So does
the address of ``mta-sts.<domain>``: the HTTPS request is made to that address with the
name in SNI, the ``Host`` header and the certificate check, so a test's loopback DNS server
can point the name at a loopback HTTPS server, and production uses the same resolver as
for MX records. Targets the route policy refuses (loopback, link-local, unless
``allow_loopback``) are refused here too.

The fetch is bounded: one deadline (``MTASTSConfig.timeout``) for connecting, the headers
and the body, a body of at most :data:`~mailstrom.mtasts.policy.MAX_POLICY_SIZE` octets
(read as a stream and cut, and never decompressed: a ``Content-Encoding`` is refused),
no redirects followed, a certificate valid for
``mta-sts.<domain>``, and a fresh client per fetch so that no connection made for one
name is ever reused for another.
"""

from __future__ import annotations

import asyncio
import functools
import ssl

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mailstrom._version import __version__
from mailstrom.config import MTASTSConfig
from mailstrom.errors import ConfigError
from mailstrom.mtasts.policy import MAX_POLICY_SIZE, Policy, PolicyError, parse_policy
from mailstrom.routing.policy import RoutePolicy
from mailstrom.safetext import safe_text

WELL_KNOWN = "/.well-known/mta-sts.txt"
FETCH_ERROR = "sts-policy-fetch-error"
WEBPKI_INVALID = "sts-webpki-invalid"
_MAX_ADDRESSES = 3
"""Addresses of ``mta-sts.<domain>`` tried at most."""


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
        return dns.name.from_text(text).canonicalize().to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


async def txt_records(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[list[str], float]:
    """The TXT records of ``name`` (each record's strings joined) and their TTL; no
    records → ``([], NO_RECORD_TTL)``. Raises :class:`DNSTrouble` for SERVFAIL, timeouts
    and the like."""
    try:
        answer = await resolver.resolve(dns.name.from_text(name), dns.rdatatype.TXT, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], NO_RECORD_TTL
    except (dns.exception.DNSException, OSError) as exc:
        raise DNSTrouble(f"TXT lookup of {name} failed: {exc}") from exc
    records = [
        b"".join(rdata.strings).decode("utf-8", "replace")
        for rdata in answer
        if rdata.rdtype == dns.rdatatype.TXT
    ]
    return records, float(answer.rrset.ttl if answer.rrset is not None else 0)


async def _addresses(
    resolver: dns.asyncresolver.Resolver, name: str, route_policy: RoutePolicy
) -> list[str]:
    found: list[str] = []
    refused: list[str] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = await resolver.resolve(dns.name.from_text(name), rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except (dns.exception.DNSException, OSError) as exc:
            raise PolicyError(
                f"address lookup of {name} failed: {exc}", result_type=FETCH_ERROR
            ) from exc
        for rdata in answer:
            address: str = rdata.address
            if route_policy.refused(address) is not None:
                refused.append(address)
            elif address not in found:
                found.append(address)
    if not found:
        why = f"only refused addresses ({', '.join(refused[:3])})" if refused else "no address"
        raise PolicyError(f"{name} has {why}", result_type=FETCH_ERROR)
    return found[:_MAX_ADDRESSES]


@functools.cache
def _default_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def _verify_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_MAX_QUOTED = 200
"""Characters of an HTTP error's text kept in a reason: h11 quotes the peer's bad status
line or chunk header in it, up to 16 KiB of octets (64 KiB as escapes)."""


def _quoted(exc: BaseException) -> str:
    text = safe_text(str(exc))
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


async def _get(host: str, ip: str, config: MTASTSConfig) -> bytes:
    import httpx

    url_host = f"[{ip}]" if ":" in ip else ip
    url = f"https://{url_host}:{config.port}{WELL_KNOWN}"
    host_header = host if config.port == 443 else f"{host}:{config.port}"
    context = config.tls_context or _default_context(config.ca_file)
    body = bytearray()
    async with (
        httpx.AsyncClient(
            verify=context,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client,
        client.stream(
            "GET",
            url,
            headers={
                "Host": host_header,
                "Accept-Encoding": "identity",
                "User-Agent": f"mailstrom/{__version__}",
            },
            extensions={"sni_hostname": host},
        ) as response,
    ):
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("location", "")[:200]
            raise PolicyError(
                f"https://{host}{WELL_KNOWN} redirects ({status}) to {location!r}; redirects "
                "are not followed (RFC 8461 §3.3)",
                result_type=FETCH_ERROR,
            )
        if status != 200:
            raise PolicyError(
                f"https://{host}{WELL_KNOWN} answered HTTP {status}", result_type=FETCH_ERROR
            )
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "text/plain":
            raise PolicyError(f"policy served as {media or 'no type'!r}, not text/plain")
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # We asked for identity. Decoding is what would make the size limit useless: a
            # few KB of "gzip, gzip" inflate to gigabytes in one step, before any check.
            raise PolicyError(
                f"policy served with Content-Encoding {encoding[:40]!r} (identity asked)",
                result_type=FETCH_ERROR,
            )
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} octets")
    return bytes(body)


async def fetch_policy(
    domain: str,
    *,
    resolver: dns.asyncresolver.Resolver,
    config: MTASTSConfig,
    route_policy: RoutePolicy,
) -> Policy:
    """Fetch and validate the policy of ``domain`` (lower-case A-label); raise
    :class:`~mailstrom.mtasts.policy.PolicyError` with the reason and its RFC 8460 failure
    type when it cannot be had."""
    require_httpx()
    import httpx

    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(config.timeout):
            last: str = "no address"
            for ip in await _addresses(resolver, host, route_policy):
                try:
                    return parse_policy(await _get(host, ip, config))
                except httpx.ConnectError as exc:
                    verify = _verify_error(exc)
                    if verify is not None:
                        raise PolicyError(
                            f"certificate of {host} not accepted: "
                            f"{verify.verify_message or verify}",
                            result_type=WEBPKI_INVALID,
                        ) from None
                    last = f"{ip}: {_quoted(exc)}"
                except httpx.HTTPError as exc:
                    last = f"{ip}: {type(exc).__name__}: {_quoted(exc)}"
            raise PolicyError(
                f"cannot fetch https://{host}{WELL_KNOWN}: {last}", result_type=FETCH_ERROR
            )
    except TimeoutError:
        raise PolicyError(
            f"fetching https://{host}{WELL_KNOWN} took more than {config.timeout:g} s",
            result_type=FETCH_ERROR,
        ) from None
