"""The /metrics and /healthz server as HTTP: the methods it answers, and how (RFC 9110),
asked over raw sockets on loopback as a probe, a load balancer or a scraper would."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from mailstrom.ops.server import Health, OpsServer
from mailstrom.status import MetricsSnapshot, WorkerStatus
from tests.support.private_hosts import private_mounts, run_with_hosts


@pytest.fixture
def server() -> Iterator[OpsServer]:
    served = OpsServer(
        "127.0.0.1",
        0,
        snapshot=lambda: MetricsSnapshot(worker=WorkerStatus(running=True)),
        health=lambda: Health(ok=False, details={"status": "fail"}),
    )
    served.start()
    yield served
    served.close()


def _ask(server: OpsServer, method: str, path: str) -> tuple[bytes, dict[str, str], bytes]:
    """The status line, headers (lower-case names) and body of one request."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_head_answers_as_get_does_without_the_body(server: OpsServer, path: str) -> None:
    """RFC 9110 §9.1: every general-purpose server supports GET and HEAD (uptime checkers
    and load balancers probe with HEAD)."""
    get_status, get_headers, get_body = _ask(server, "GET", path)
    head_status, head_headers, head_body = _ask(server, "HEAD", path)
    assert head_status == get_status
    assert head_headers["content-type"] == get_headers["content-type"]
    assert head_headers["content-length"] == str(len(get_body))
    assert head_body == b""


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""What Prometheus (2.x, 3.x) sends by default when it scrapes."""


def test_metrics_are_openmetrics_to_a_scraper_that_asks_for_them(server: OpsServer) -> None:
    """Prometheus asks for OpenMetrics first (``Accept`` above); the page was always the
    classic text format, whatever was asked. prometheus-client's own negotiation picks
    the format now: OpenMetrics for who asks for it, the text format otherwise."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        openmetrics = client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        text = client.get("/metrics", headers={"Accept": "text/plain"})
        bare = client.get("/metrics", headers={"Accept": ""})
        head = client.head("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text;")
    assert openmetrics.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(openmetrics.text)}
    assert families["mailstrom_worker_up"].samples[0].value == 1
    assert families["mailstrom_results"].type == "counter"
    assert head.headers["content-type"] == openmetrics.headers["content-type"]
    assert head.headers["content-length"] == openmetrics.headers["content-length"]
    for classic in (text, bare):
        assert classic.status_code == 200
        assert classic.headers["content-type"].startswith("text/plain; version=")
        assert "# EOF" not in classic.text
        assert "mailstrom_worker_up 1.0" in classic.text.splitlines()


@pytest.mark.parametrize("accept", [PROMETHEUS_ACCEPT, "text/plain"])
def test_metrics_are_gzipped_to_a_scraper_that_accepts_gzip(server: OpsServer, accept: str) -> None:
    """Prometheus sends ``Accept-Encoding: gzip`` and prometheus-client's own server
    compresses then; the page was always sent as it is. It is gzipped now for a client
    that accepts gzip (HEAD says so too, without a body), and sent as it is otherwise."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        gzipped = client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"})
        head = client.head("/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"})
        plain = client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": "identity"})
        refused = client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip;q=0"})
    assert gzipped.status_code == 200
    assert gzipped.headers["content-encoding"] == "gzip"
    assert int(gzipped.headers["content-length"]) == gzipped.num_bytes_downloaded
    assert gzipped.text == plain.text  # httpx inflated it
    assert "mailstrom_worker_up" in gzipped.text
    assert head.headers["content-encoding"] == "gzip"
    assert head.headers["content-type"] == gzipped.headers["content-type"]
    assert head.content == b""
    for unzipped in (plain, refused):
        assert "content-encoding" not in unzipped.headers
        assert int(unzipped.headers["content-length"]) == len(unzipped.content)


def test_metrics_answers_name_the_headers_they_vary_by(server: OpsServer) -> None:
    """The page's format follows ``Accept`` and its coding ``Accept-Encoding``, but the
    answers sent no ``Vary`` (RFC 9110 §12.5.5), so a cache between scraper and worker
    could hand a gzipped OpenMetrics page to a client that asked for neither."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [
            client.request(method, "/metrics", headers={"Accept": accept, **encoding})
            for method in ("GET", "HEAD")
            for accept in (PROMETHEUS_ACCEPT, "text/plain")
            for encoding in ({"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"})
        ]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["vary"] == "Accept, Accept-Encoding"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_a_method_it_knows_but_does_not_serve_is_a_405_naming_get_and_head(
    server: OpsServer, method: str
) -> None:
    """RFC 9110 §15.5.6: a method the server knows but the resource does not take is a
    405 with an Allow header, not a 501 (which says the server knows no such method)."""
    status, headers, _ = _ask(server, method, "/metrics")
    assert status.startswith(b"HTTP/1.0 405 "), status
    assert headers["allow"] == "GET, HEAD"


def test_an_unknown_method_is_a_501(server: OpsServer) -> None:
    status, _, _ = _ask(server, "BREW", "/metrics")
    assert status.startswith(b"HTTP/1.0 501 "), status


def test_an_absolute_form_target_is_answered_as_its_path(server: OpsServer) -> None:
    """RFC 9112 §3.2.2: a server MUST accept ``GET http://host:port/path`` (what a client
    sends when it takes the server for a proxy); it was a 404."""
    origin_form, _, _ = _ask(server, "GET", "/healthz")
    absolute_form, _, _ = _ask(server, "GET", f"http://127.0.0.1:{server.port}/healthz?x=1")
    assert absolute_form == origin_form == b"HTTP/1.0 503 Service Unavailable"


def test_an_absolute_form_target_naming_another_host_is_refused_on_loopback(
    server: OpsServer,
) -> None:
    """The target's host is the one the request names (RFC 9112 §3.2.2: the server
    ignores Host then), so the loopback check reads it."""
    status, _, body = _ask(server, "GET", "http://rebound.example/healthz")
    assert status.startswith(b"HTTP/1.0 400 "), status
    assert b"loopback" in body


def test_a_malformed_absolute_form_target_is_a_404(server: OpsServer) -> None:
    status, _, _ = _ask(server, "GET", "http://[::1/healthz")
    assert status.startswith(b"HTTP/1.0 404 "), status


@pytest.mark.parametrize("line", [b"GET /metrics\r\n", b"GET\r\n"])
def test_a_request_line_without_a_version_is_a_400_at_once(server: OpsServer, line: bytes) -> None:
    """``GET /metrics`` CRLF with no HTTP version is an HTTP/0.9 request, which this
    server does not speak (RFC 9112 §2.3 has a server answer HTTP/1.x). The stdlib then
    read on for header lines that never come, holding the connection and a slot until
    the 10 s request deadline (a lone method got a 400 without a status line); it is a
    400, with a status line, and closed at once."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(line)  # and nothing more, the socket left open
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz FOO/1.0\r\n\r\n",
        b"GET /healthz HTTP/0.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /healthz HTTP/1\r\n\r\n",
    ],
)
def test_a_bad_or_pre_1_0_version_is_a_400_with_a_status_line(
    server: OpsServer, request_bytes: bytes
) -> None:
    """A request line whose version is no HTTP/1.x (``FOO/1.0``, ``HTTP/1``) got the
    stdlib's 400 page without a status line or headers, as HTTP/0.9 answers, and an
    explicit ``HTTP/0.9`` got the page itself so: bytes no HTTP/1.x client or proxy can
    read as an answer. Both are a 400 in HTTP/1.0."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]


def _raw(server: OpsServer, request: bytes) -> dict[str, str]:
    """The headers (lower-case names) of the answer to ``request``, sent as it is."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.startswith("HTTP/1.0 "), head[:200]
    return {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
    }


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # 200, a text page
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # 503, JSON
        b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # 404
        b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # 405
        b"GET /metrics HTTP/1.1\r\nHost: rebound.example\r\n\r\n",  # 400
        b"BREW /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # the stdlib's 501
        b"GET /healthz FOO/1.0\r\n\r\n",  # the stdlib's 400 page (HTML)
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    ],
)
def test_every_answer_carries_the_headers_the_dashboards_do(
    server: OpsServer, request_bytes: bytes
) -> None:
    """The dashboard's answers say nosniff, forbid framing, load nothing, send no
    referrer and are not cached; the metrics server's said only no-store (and its
    refusals not even that), so a browser could sniff a reply, its HTML error pages
    (the stdlib's) included, as another type, and another site could frame them."""
    headers = _raw(server, request_bytes)
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"


_IN_NAMESPACE = """
import socket, sys
from mailstrom.ops.server import Health, OpsServer
from mailstrom.status import MetricsSnapshot, WorkerStatus
server = OpsServer(
    "v6only.test",
    0,
    snapshot=lambda: MetricsSnapshot(worker=WorkerStatus(running=True)),
    health=lambda: Health(ok=True, details={}),
)
server.start()
try:
    print(server.url)
    with socket.create_connection(("v6only.test", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\\r\\nHost: [::1]\\r\\n\\r\\n")
        print(sock.recv(100).split(b"\\r\\n")[0].decode())
finally:
    server.close()
"""


@pytest.mark.skipif(not private_mounts(), reason="needs unshare(1) and mount(8)")
def test_a_name_resolving_to_ipv6_only_is_listened_on_there(tmp_path: Path) -> None:
    """``--metrics ip6-localhost:9466`` (Debian's /etc/hosts: ``::1 ip6-localhost``):
    the server bound an IPv4 socket to the name, which glibc answers for IPv4 with
    127.0.0.1, so a scraper resolving the name (to ::1) found nothing listening. A name
    with IPv6 addresses only is bound to them. Run with a private /etc/hosts naming
    ``v6only.test`` ::1 only, in a mount namespace of its own."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 v6only.test\n")
    proc = run_with_hosts(hosts, _IN_NAMESPACE)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    url, status = proc.stdout.decode().splitlines()
    assert url.startswith("http://[::1]:"), url
    assert status.startswith("HTTP/1.0 200 "), status


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0-rc1",
        "application/openmetrics-text; version=v1",
        "text/plain; version=x.y",
    ],
)
def test_an_accept_with_a_version_that_is_no_number_gets_the_text_format(
    server: OpsServer, accept: str, caplog: pytest.LogCaptureFixture
) -> None:
    """prometheus-client's negotiation compares the version's parts as numbers and
    raised TypeError for one that is not (``1.0.0-rc1``): the scraper got a 500 and the
    worker's log an error with a traceback, for each such request any client sent. An
    Accept the server cannot read is disregarded (RFC 9110 §12.5.1): the text format."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answer = client.get("/metrics", headers={"Accept": accept})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "mailstrom_worker_up 1.0" in answer.text.splitlines()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("host", [b"127.0.0.1 ", b"localhost\t", b"127.0.0.1:9466 \t "])
def test_a_host_with_white_space_after_it_names_the_host_before_it(
    server: OpsServer, host: bytes
) -> None:
    """RFC 9112 §5.1: a field line's value may be followed by optional white space, which
    is not part of it. http.client keeps it in the value, and the loopback check took
    ``127.0.0.1 `` for another host: 400 to a request that named this one."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200 "), answer[:200]
    assert b"mailstrom_worker_up 1.0" in answer
