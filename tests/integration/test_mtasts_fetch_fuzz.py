"""No HTTPS server makes the MTA-STS fetch misbehave.

A raw asyncio TLS server on 127.0.0.1 (certificate for ``mta-sts.example.org`` from the
session's trustme CA) answers the policy request with a hypothesis-generated response:
any status line (HTTP/1.1, HTTP/1.0, odd codes, garbage), headers picked from what a
sloppy or hostile server sends (no, wrong or 8-bit ``Content-Type``, redirects, a
``Content-Encoding``, wrong, repeated or missing ``Content-Length``, chunked or broken
chunked framing, 8-bit and over-long fields), and a body (a valid policy, a mutated one,
random octets, one past the size limit, one that never ends), written in pieces, dripped,
cut short or followed by silence. Whatever it does, :func:`fetch_policy`:

1. returns a :class:`Policy` or raises :class:`PolicyError`, never anything else;
2. ends within the fetch's deadline (plus a little): no hang on a dripping server;
3. gives a reason that is safe text and short, with an RFC 8460 failure type;
4. returns a policy only for a 200 with ``text/plain`` and no ``Content-Encoding``,
   whose body is within the size limit;
5. leaves asyncio nothing to log.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (60 by default), for a longer
search by hand: ``MAILSTROM_FUZZ_EXAMPLES=2000 pytest --timeout=0
tests/integration/test_mtasts_fetch_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import pytest
import trustme
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.config import MTASTSConfig
from mailstrom.mtasts.fetch import WELL_KNOWN, fetch_policy
from mailstrom.mtasts.policy import MAX_POLICY_SIZE, Policy, PolicyError
from mailstrom.routing import make_resolver
from mailstrom.routing.policy import RoutePolicy
from mailstrom.safetext import is_safe
from mailstrom.tlsrpt.sessions import ResultType
from tests.fixtures.dns_server import LoopbackDNS

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "60"))
TIMEOUT = 0.4
"""The fetch's deadline (``MTASTSConfig.timeout``) in these examples."""
BOUND = TIMEOUT + 1.0
"""Longest a fetch may take: its deadline and some slack for a loaded machine."""
MAX_REASON = 1000
"""Characters a failure reason may have: it is logged and kept as a report's reason code."""
DRIP = 0.01
"""Seconds between two pieces of a dripped answer."""
POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmax_age: 86400\r\n"

# --- what the server says ------------------------------------------------------------------

STATUS_LINES = st.one_of(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.0 200 OK",
            b"HTTP/1.1 200 ",
            b"HTTP/1.1 200",
            b"HTTP/1.1 301 Moved",
            b"HTTP/1.1 302 Found",
            b"HTTP/1.1 304 Not Modified",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 500 Oops",
            b"HTTP/1.1 204 No Content",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x",
            b"HTTP/2 200",
            b"HTTP/1.1 200 \xc3\xa4\xff\x1b[2J",
            b"http/1.1 200 ok",
            b"HTTP/1.1 0200 OK",
            b"HTTP/1.1 2" + b"\x1b" * 12_000,  # quoted by h11: 48 KB of escapes
            b"HTTP/1.1 200 " + b"\xff" * 12_000,
        ]
    ),
    st.integers(0, 1200).map(lambda code: b"HTTP/1.1 %d X" % code),
    st.binary(max_size=60),
)

CONTENT_TYPES = st.sampled_from(
    [
        b"text/plain",
        b"text/plain; charset=utf-8",
        b"TEXT/PLAIN",
        b" text/plain ;",
        b"text/html",
        b"text/plain, text/html",
        b"",
        b"text/pl\xe4in",
        b"\xff\xfe",
        b"application/octet-stream",
    ]
)
EXTRA_HEADERS = st.sampled_from(
    [
        b"Content-Encoding: gzip",
        b"Content-Encoding: gzip, gzip",
        b"Content-Encoding: identity",
        b"Content-Encoding: br",
        b"Content-Encoding: \xff",
        b"Location: https://elsewhere.example/p.txt",
        b"Location: https://\xe4\x1b[2J/\xff",
        b"Location: " + b"x" * 3000,
        b"Connection: close",
        b"Connection: keep-alive",
        b"X-Eight-Bit: \xc3\xa4\xff\x00",
        b"X-Long: " + b"y" * 20_000,
        b"No colon here",
        b" folded: continuation",
        b"Content-Length: -1",
        b"Content-Length: 1e3",
        b"Content-Length: 99999999999999999999",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: identity",
    ]
)


@dataclass(frozen=True, slots=True)
class Response:
    status: bytes
    content_type: bytes | None
    extra: tuple[bytes, ...]
    body: bytes
    framing: str
    """``length`` (a correct Content-Length), ``wrong-length``, ``chunked``,
    ``bad-chunked`` or ``close`` (no length: the body ends when the connection does)."""
    endless: bool
    """After the head, an endless body (chunks or raw octets)."""
    splits: int
    """How many pieces the response is written in."""
    drip: bool
    """Pieces come ``DRIP`` seconds apart."""
    cut: int | None
    """Hang up after this many octets."""
    silent_after: int | None
    """Stop writing after this many octets, and never close."""

    def head(self) -> bytes:
        lines = [self.status]
        if self.content_type is not None:
            lines.append(b"Content-Type: " + self.content_type)
        lines.extend(self.extra)
        if self.framing == "length":
            lines.append(b"Content-Length: %d" % len(self.body))
        elif self.framing == "wrong-length":
            lines.append(b"Content-Length: %d" % (len(self.body) * 2 + 1))
        elif self.framing in ("chunked", "bad-chunked"):
            lines.append(b"Transfer-Encoding: chunked")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def wire(self) -> bytes:
        if self.framing == "chunked":
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.body), self.body) if self.body else b""
            return self.head() + (body or b"0\r\n\r\n")
        if self.framing == "bad-chunked":
            return self.head() + b"zz\r\n" + self.body
        return self.head() + self.body

    @property
    def encoded(self) -> bool:
        return any(
            h.lower().startswith(b"content-encoding:") and b"identity" not in h.lower()
            for h in self.extra
        )


def _mutate(data: bytes, where: int, what: bytes) -> bytes:
    at = where % (len(data) + 1)
    return data[:at] + what + data[at:]


BODIES = st.one_of(
    st.just(POLICY),
    st.just(POLICY.replace(b"\r\n", b"\n")),
    st.just(gzip.compress(POLICY)),
    st.just(gzip.compress(gzip.compress(POLICY))),
    st.builds(_mutate, st.just(POLICY), st.integers(0, 200), st.binary(min_size=1, max_size=8)),
    st.binary(max_size=300),
    st.integers(MAX_POLICY_SIZE - 10, MAX_POLICY_SIZE + 10).map(lambda n: (POLICY + b"x" * n)[:n]),
    st.just(POLICY + b"#" * (MAX_POLICY_SIZE * 2)),
)

responses = st.builds(
    Response,
    status=st.one_of(st.just(b"HTTP/1.1 200 OK"), STATUS_LINES),  # half of them good
    content_type=st.one_of(st.just(b"text/plain"), st.none(), CONTENT_TYPES),
    extra=st.one_of(st.just(()), st.lists(EXTRA_HEADERS, max_size=3).map(tuple)),
    body=st.one_of(st.just(POLICY), BODIES),
    framing=st.one_of(
        st.just("length"), st.sampled_from(["wrong-length", "chunked", "bad-chunked", "close"])
    ),
    endless=st.sampled_from([False, False, False, True]),
    splits=st.integers(1, 6),
    drip=st.booleans(),
    cut=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 400)),
    silent_after=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 400)),
)

# --- the server --------------------------------------------------------------------------


async def answer(response: Response, writer: asyncio.StreamWriter) -> None:
    wire = response.wire()
    if response.cut is not None:
        wire = wire[: response.cut]
    if response.silent_after is not None:
        wire = wire[: response.silent_after]
    step = max(1, len(wire) // response.splits)
    for start in range(0, len(wire), step):
        writer.write(wire[start : start + step])
        await writer.drain()
        if response.drip:
            await asyncio.sleep(DRIP)
    if response.endless and response.cut is None and response.silent_after is None:
        chunk = (
            b"1000\r\n" + b"#" * 4096 + b"\r\n" if response.framing == "chunked" else b"#" * 4096
        )
        while True:  # until the client hangs up (a write then fails) or the example ends
            writer.write(chunk)
            await writer.drain()
            if response.drip:
                await asyncio.sleep(DRIP)
    if response.silent_after is not None:
        await asyncio.sleep(3600)


async def serve(response: Response, server_context: ssl.SSLContext) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The client may hang up at any moment, and the example's end cancels what is left:
        # neither is the server's failure, and neither may reach asyncio's log.
        with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError, EOFError):
            try:
                await reader.readuntil(b"\r\n\r\n")
                await answer(response, writer)
            finally:
                writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)


async def fetch(
    response: Response,
    dns: LoopbackDNS,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> tuple[Policy | PolicyError | BaseException, float]:
    server = await serve(response, server_context)
    port = server.sockets[0].getsockname()[1]
    config = MTASTSConfig(port=port, tls_context=client_context, timeout=TIMEOUT)
    started = time.monotonic()
    outcome: Policy | PolicyError | BaseException
    try:
        async with asyncio.timeout(BOUND * 3):  # the test's own guard against a hang
            outcome = await fetch_policy(
                "example.org",
                resolver=make_resolver(dns.dns_config),
                config=config,
                route_policy=RoutePolicy(allow_loopback=True),
            )
    except Exception as exc:  # what the property is about: kept, then judged
        outcome = exc
    elapsed = time.monotonic() - started
    server.close()
    return outcome, elapsed


@pytest.fixture
def zone(dns_server: LoopbackDNS) -> LoopbackDNS:
    dns_server.a("mta-sts.example.org", "127.0.0.1")
    return dns_server


@pytest.fixture(scope="module")
def server_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("mta-sts.example.org").configure_cert(context)
    return context


def describe(outcome: object) -> str:
    if isinstance(outcome, PolicyError):
        # "cannot fetch https://...: 127.0.0.1: ReadError: ..." → the error's class.
        words = outcome.reason.replace(WELL_KNOWN, "").split(": ")
        what = words[2] if words[0].startswith("cannot fetch") and len(words) > 2 else words[0]
        return f"PolicyError {outcome.result_type}: {what[:40]}"
    return type(outcome).__name__


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(response=responses)
def test_no_server_makes_the_fetch_misbehave(
    response: Response,
    zone: LoopbackDNS,
    server_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    caplog.clear()
    outcome, elapsed = asyncio.run(fetch(response, zone, server_context, client_tls_context))
    gc.collect()  # a future whose exception nobody retrieved says so when it is collected
    event(describe(outcome))
    assert isinstance(outcome, Policy | PolicyError), repr(outcome)
    assert elapsed < BOUND, f"the fetch took {elapsed:.2f}s (deadline {TIMEOUT}s)"
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("asyncio")]
    assert not logged, logged
    if isinstance(outcome, PolicyError):
        assert is_safe(outcome.reason), outcome.reason
        assert len(outcome.reason) <= MAX_REASON, outcome.reason[:200]
        assert outcome.result_type in set(ResultType)
        return
    assert response.status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200", b"HTTP/1.1 100"))
    assert not response.encoded
    assert len(outcome.text.encode()) <= MAX_POLICY_SIZE


# --- what the fuzzing found ----------------------------------------------------------------


def test_a_long_bad_status_line_is_not_quoted_whole(
    zone: LoopbackDNS, server_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    """h11 quotes the bad status line in its error, and the reason quoted that: 48 KB of
    escapes in a log line (and in the TLS report's reason code, cut there)."""
    response = Response(
        status=b"HTTP/1.1 2" + b"\x1b" * 12_000,
        content_type=b"text/plain",
        extra=(),
        body=POLICY,
        framing="length",
        endless=False,
        splits=1,
        drip=False,
        cut=None,
        silent_after=None,
    )
    outcome, _ = asyncio.run(fetch(response, zone, server_context, client_tls_context))
    assert isinstance(outcome, PolicyError)
    assert "illegal status line" in outcome.reason
    assert len(outcome.reason) < 400


@pytest.mark.parametrize("space", [b"\xa0", b"\x85"])
def test_a_media_type_is_trimmed_of_http_white_space_only(
    zone: LoopbackDNS,
    server_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    space: bytes,
) -> None:
    """A Latin-1 NO-BREAK SPACE or NEXT LINE after text/plain was trimmed by str.strip(),
    and the policy taken as served as text/plain."""
    response = Response(
        status=b"HTTP/1.1 200 OK",
        content_type=b"text/plain" + space,
        extra=(),
        body=POLICY,
        framing="length",
        endless=False,
        splits=1,
        drip=False,
        cut=None,
        silent_after=None,
    )
    outcome, _ = asyncio.run(fetch(response, zone, server_context, client_tls_context))
    assert isinstance(outcome, PolicyError)
    assert "not text/plain" in outcome.reason


def test_a_server_breaking_tls_after_the_handshake_is_a_fetch_error(
    zone: LoopbackDNS, server_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    """A record no key decrypts, sent after the answer's head: ssl.SSLError of a read after
    the handshake is no httpx error (httpcore maps it only while connecting), and it left
    fetch_policy as it was, past the worker's policy source, for any policy host to send."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(65536)
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 500\r\n\r\n"
            )
            # Written past the TLS layer: an application data record of noise.
            os.write(tls.fileno(), b"\x17\x03\x03\x00\x40" + b"\x5a" * 64)
            with contextlib.suppress(OSError):
                tls.recv(65536)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    config = MTASTSConfig(
        port=listener.getsockname()[1], tls_context=client_tls_context, timeout=10.0
    )
    try:
        with pytest.raises(PolicyError) as caught:
            asyncio.run(
                fetch_policy(
                    "example.org",
                    resolver=make_resolver(zone.dns_config),
                    config=config,
                    route_policy=RoutePolicy(allow_loopback=True),
                )
            )
    finally:
        thread.join(10)
        listener.close()
    assert caught.value.result_type == ResultType.STS_POLICY_FETCH_ERROR
    assert "TLS" in caught.value.reason
