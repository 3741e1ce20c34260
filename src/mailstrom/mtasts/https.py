"""HTTPS to a name at an address mailstrom chose: what the MTA-STS policy fetch and the
TLS report POST (RFC 8460 §5.4) have in common.

Both go to a host a remote domain names, so both must not become a way into the sender's
own network. The name's addresses are looked up here, through mailstrom's resolver (the
one MX lookups use: one view of DNS, and a test's loopback DNS server works), addresses
the :class:`~mailstrom.routing.policy.RoutePolicy` refuses are dropped, and the request is
made to one of the others with the name in SNI, the ``Host`` header and the certificate
check. Letting httpx resolve the name would connect wherever the system resolver points
it, 127.0.0.1 included, and resolving once to check and again to connect would let the
name change in between.

The client follows no redirects, reads no proxy settings from the environment, and keeps
no connection for another request. The callers bound the whole exchange with
``asyncio.timeout``; each request's own timeouts come from the time left to that deadline
(:func:`timeouts_before`, taken again for each address tried), so that connecting ends
before the deadline does. A connection that timed out (``httpx.ConnectTimeout``) sent
nothing, so the callers go on to the host's next address with the time that is left, and
say so (:func:`connect_timed_out`) rather than that the deadline was reached.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mailstrom._version import __version__
from mailstrom.domains import IDNA
from mailstrom.routing.lookup import unanswered
from mailstrom.routing.policy import RoutePolicy
from mailstrom.safetext import safe_text
from mailstrom.tls.trust import verifying_context

if TYPE_CHECKING:
    import httpcore
    import httpx

MAX_ADDRESSES = 3
"""Addresses of a name tried at most."""

_NAMED_REFUSED = 3
"""Refused addresses named in a :class:`NoUsableAddress` reason."""

USER_AGENT = f"mailstrom/{__version__}"


class NoUsableAddress(Exception):
    """No address a request to this host may go to: the host is a refused address, its
    name has none or only refused ones, or the lookup failed. The text says which;
    ``temporary`` whether asking again may help (the lookup failed)."""

    def __init__(self, text: str, *, temporary: bool = False) -> None:
        super().__init__(text)
        self.temporary = temporary


def is_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (as a URL holds it, without brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def route_policy_for(*, allow_loopback: bool, source_address: str | None) -> RoutePolicy:
    """The route policy of a request to a host a remote domain names (the MTA-STS policy
    host, a TLS report collector), from the ``Config`` fields of those names: never this
    host, its link or a network no Internet host is in (unless ``allow_loopback``), and
    only addresses of ``source_address``'s IP version, which a connection bound to it
    reaches (:func:`client`), as routes do."""
    version = None if source_address is None else ipaddress.ip_address(source_address).version
    return RoutePolicy(allow_loopback=allow_loopback, refuse_private=True, ip_version=version)


def _refused(address: str, route_policy: RoutePolicy) -> str | None:
    kind = route_policy.refused(address)
    return None if kind is None else f"{address} ({kind})"


async def usable_addresses(
    resolver: dns.asyncresolver.Resolver, host: str, route_policy: RoutePolicy
) -> list[str]:
    """The addresses (at most :data:`MAX_ADDRESSES`) a request to ``host`` may go to:
    ``host`` itself when it is an address the route policy admits, else the A and AAAA
    addresses of the name it admits. Raises :class:`NoUsableAddress`.

    One family's lookup failing (SERVFAIL, a timeout, a referral) leaves the other's
    addresses to try, as for an MX host: the failure is the reason only when nothing else
    was found.
    With the policy's ``ip_version`` (``source_address``'s), only that family is looked
    up: a connection bound to the source address reaches no other."""
    version = route_policy.ip_version
    if is_address(host):
        kind = route_policy.refused(host)
        if kind is not None:
            raise NoUsableAddress(f"refused {kind} address {host}")
        if version is not None and ipaddress.ip_address(host).version != version:
            raise NoUsableAddress(f"{host} is no IPv{version} address, which source_address is")
        return [host]
    # A zone may answer with thousands of addresses (a 64 KB answer over TCP): only the
    # first MAX_ADDRESSES usable ones are kept, and the first few refused ones for the
    # reason; a dict keeps them in order without a quadratic "in" test on a list.
    found: dict[str, None] = {}
    refused_ones: list[str] = []
    failed: Exception | None = None
    a, aaaa = dns.rdatatype.A, dns.rdatatype.AAAA
    for rdtype in (a, aaaa) if version is None else (a,) if version == 4 else (aaaa,):
        if len(found) >= MAX_ADDRESSES:
            break  # IPv4 filled every place: the IPv6 addresses would never be tried
        try:
            answer = await resolver.resolve(
                dns.name.from_text(host, idna_codec=IDNA), rdtype, search=False
            )
        except dns.resolver.NoAnswer as exc:
            if (why := unanswered(exc)) is not None:  # no NODATA: a referral, truncated
                failed = failed or LookupError(why)
            continue
        except dns.resolver.NXDOMAIN:
            continue
        except (dns.exception.DNSException, OSError) as exc:
            failed = failed or exc
            continue
        for rdata in answer:
            address: str = rdata.address
            refused = _refused(address, route_policy)
            if refused is None:
                found[address] = None
                if len(found) >= MAX_ADDRESSES:
                    break
            elif len(refused_ones) < _NAMED_REFUSED:
                refused_ones.append(refused)
    if not found and failed is not None:
        also = f" (and only refused addresses: {', '.join(refused_ones)})"
        raise NoUsableAddress(
            f"address lookup of {host} failed: {failed}{also if refused_ones else ''}",
            temporary=True,
        ) from failed
    if not found:
        why = f"only refused addresses: {', '.join(refused_ones)}" if refused_ones else "no address"
        if version is not None:
            why = why.replace("address", f"IPv{version} address", 1) + " (source_address is one)"
        raise NoUsableAddress(f"{host} has {why}")
    return list(found)


@functools.cache
def default_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The context checking certificates against ``ca_file``, or the system's trust store
    (as for SMTP), made once: loading a trust store takes milliseconds. Out of
    descriptors, :class:`~mailstrom.errors.LocalResourceShortage` (none kept)."""
    return verifying_context(ca_file)


CONNECT_SHARE = 0.45
"""Share of the time left to the caller's deadline that connecting (TCP) and the TLS
handshake each get: httpcore gives each of the two the whole ``connect`` timeout, so
together they end at most 90 % of the way to the deadline. The next address of the host
is then tried with the same share of what is left (a first one that stalls costs 45 % of
the time, not all of it).

They should end by httpx's own timeout, not by the deadline: a ``ConnectTimeout`` says
which address stalled, and leaves time for the next. The tenth of the time left that
remains is the room httpx's timeout needs to fire first on a busy event loop; on a late
one the deadline may still come first, and the handshake it cancels half-way is closed
all the same (:func:`_closing_backend`)."""


def timeouts_before(deadline: asyncio.Timeout) -> httpx.Timeout:
    """The timeouts of a request that the caller bounds with ``deadline``: connecting and
    the TLS handshake end before it (see :data:`CONNECT_SHARE`), by a ``ConnectTimeout``
    that closes the connection; anything else (sending, the answer) may take all the time
    left, and is cut by the deadline itself."""
    import httpx

    when = deadline.when()
    if when is None:  # the caller set no deadline, so none here either
        return httpx.Timeout(None)
    left = max(when - asyncio.get_running_loop().time(), 0.0)
    return httpx.Timeout(left, connect=left * CONNECT_SHARE)


def connect_timed_out(ip: str, timeouts: httpx.Timeout) -> str:
    """Why a request to ``ip`` made with ``timeouts`` failed on an ``httpx.ConnectTimeout``
    (connecting or the TLS handshake): the address and the limit it went past, which is
    less than the caller's deadline (see :data:`CONNECT_SHARE`)."""
    if timeouts.connect is None:  # not raised without a limit; said plainly if it were
        return f"{ip}: connecting timed out"
    return f"{ip}: connecting took more than {timeouts.connect:.3g} s"


def client(
    verify: ssl.SSLContext, timeout: float, source_address: str | None = None
) -> httpx.AsyncClient:
    """A client for one request (see the module docstring). ``timeout`` is per operation:
    :func:`stream_at` replaces it with the timeouts its caller's deadline leaves. Its
    connections are bound to ``source_address`` (``Config.source_address``) when given,
    as every outgoing connection is."""
    import httpcore
    import httpx

    transport = httpx.AsyncHTTPTransport(
        verify=verify,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        local_address=source_address,
    )
    # httpx takes no network backend of its own; its pool's is the one it connects with.
    # (Private to httpx and httpcore: a release that moves it gets the plain backend, and
    # a cancelled handshake's socket waits for the garbage collector, as it did before.)
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.AsyncNetworkBackend):
        pool._network_backend = _closing_backend()(backend)  # type: ignore[union-attr]
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout),
        transport=transport,
    )


@functools.cache
def _closing_backend() -> Callable[[httpcore.AsyncNetworkBackend], httpcore.AsyncNetworkBackend]:
    """httpcore's network backend, with a TLS handshake cancelled half-way closed.

    httpcore (1.0.9) closes the connection of a handshake that fails with an
    ``Exception`` (its own timeout, a refusal) but not of one cancelled: the callers'
    deadline (``asyncio.timeout``) left the socket open, in a reference cycle, until the
    cyclic garbage collector ran. :data:`CONNECT_SHARE` lets httpx's timeout come first,
    but only on a loop that is on time: a late one runs both in the same turn.
    """
    import httpcore

    class Stream(httpcore.AsyncNetworkStream):
        def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
            self._stream = stream

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return await self._stream.read(max_bytes, timeout)

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            await self._stream.write(buffer, timeout)

        async def aclose(self) -> None:
            await self._stream.aclose()

        async def start_tls(
            self,
            ssl_context: ssl.SSLContext,
            server_hostname: str | None = None,
            timeout: float | None = None,
        ) -> httpcore.AsyncNetworkStream:
            try:
                return await self._stream.start_tls(ssl_context, server_hostname, timeout)
            except asyncio.CancelledError:
                await self._stream.aclose()  # (its transport's close comes before any wait)
                raise

        def get_extra_info(self, info: str) -> Any:
            return self._stream.get_extra_info(info)

    class Backend(httpcore.AsyncNetworkBackend):
        def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
            self._backend = backend

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.AsyncNetworkStream:
            stream = await self._backend.connect_tcp(
                host, port, timeout, local_address, socket_options
            )
            return Stream(stream)

        async def connect_unix_socket(
            self,
            path: str,
            timeout: float | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.AsyncNetworkStream:
            return await self._backend.connect_unix_socket(path, timeout, socket_options)

        async def sleep(self, seconds: float) -> None:
            await self._backend.sleep(seconds)

    return Backend


@asynccontextmanager
async def stream_at(
    http: httpx.AsyncClient,
    method: str,
    *,
    host: str,
    ip: str,
    port: int,
    path: str,
    headers: dict[str, str],
    timeouts: httpx.Timeout,
    content: bytes | None = None,
) -> AsyncIterator[httpx.Response]:
    """``http.stream(method, ...)`` to ``https://host:port/path``, made to ``ip``: the
    name (when ``host`` is one) goes in SNI, the ``Host`` header and the certificate
    check. ``path`` includes the query, if any.

    ``timeouts`` are :func:`timeouts_before` the ``asyncio.timeout`` the caller bounds
    the exchange with, taken just before this address is tried. An
    ``httpx.ConnectTimeout`` means nothing was sent and time is left for another address
    (:func:`connect_timed_out` says why this one failed); any other timeout it raises
    (reading, writing) means that deadline is (as good as) reached. TLS that breaks after
    the handshake (a record no key decrypts, an alert) is an ``httpx.NetworkError``, in
    the block too: the request may have been sent."""
    import httpx

    url_host = f"[{ip}]" if ":" in ip else ip
    named = host != ip
    host_header = host if named else url_host
    if port != 443:
        host_header = f"{host_header}:{port}"
    try:
        async with http.stream(
            method,
            f"https://{url_host}:{port}{path}",
            headers={"Host": host_header, "User-Agent": USER_AGENT, **headers},
            content=content,
            timeout=timeouts,
            extensions={"sni_hostname": host} if named else {},
        ) as response:
            yield response
    except ssl.SSLError as exc:
        # httpcore maps ssl.SSLError to ConnectError during the handshake only; one that a
        # later read or write raises (anyio lets all but an EOF out as they are) left the
        # callers, who handle httpx's errors, as it was: the worker's delivery to the
        # domain crashed at each attempt, and `mailstrom tlsrpt --send` ended mid-run.
        raise httpx.NetworkError(f"TLS broken after the handshake: {exc}") from exc


_SSLError = TypeVar("_SSLError", bound=ssl.SSLError)


def ssl_cause(exc: BaseException, kind: type[_SSLError]) -> _SSLError | None:
    """The ``kind`` of ssl error behind an httpx error, if that is what it is."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def verify_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind an httpx error, if that is what it is."""
    return ssl_cause(exc, ssl.SSLCertVerificationError)


MAX_QUOTED = 200
"""Characters of an HTTP error's text kept in a reason: h11 quotes the peer's bad status
line or chunk header in it, up to 16 KiB of octets (64 KiB as escapes)."""


def quoted(exc: BaseException) -> str:
    """``exc``'s text, made safe to print and cut to :data:`MAX_QUOTED` characters."""
    text = safe_text(str(exc))
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."
