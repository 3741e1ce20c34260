"""A small HTTP server beside a worker: ``/metrics`` for Prometheus, ``/healthz`` for
supervisors and load balancers.

It runs on a thread of its own (stdlib ``http.server``), so a scrape never waits for the
worker's event loop and a busy loop never delays a scrape; what it reads are snapshots the
worker hands over (thread-safe) and the store (thread-safe). Loopback by default: metrics
say how much mail goes where, which is nobody else's business.

``/healthz`` answers 200 with ``{"status": "ok", ...}`` while the worker runs, its event loop
answers within two seconds, the store answers a cheap query and the worker's own store
calls succeed; otherwise 503 with ``"status": "fail"`` and what failed. From the stop
signal on, while the worker drains (it takes no new work), 503 with ``"status":
"draining"``: a readiness check, which fails as the worker goes away. ``mailstrom
worker`` serves before its store opens: while it waits for it, 503 with ``"status":
"waiting"`` (:mod:`mailstrom.ops.sources`).
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mailstrom.errors import ConfigError
from mailstrom.loopback import is_loopback, names_loopback
from mailstrom.ops.guarded_http import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    GuardedHTTPServer,
    GuardedRequestHandler,
)
from mailstrom.status import MetricsSnapshot, WorkerStatus
from mailstrom.stores.base import Store
from mailstrom.stores.url import redact_url

if TYPE_CHECKING:
    from mailstrom.ops.sources import StoreWait

log = logging.getLogger("mailstrom.ops")

LOOP_TIMEOUT = 2.0
"""Seconds the worker's event loop has to answer a health check."""
STORE_TIMEOUT = 3.0
"""Seconds the store has to answer a health check (a stopped PostgreSQL server can
otherwise hold a connection attempt for the pool's whole timeout)."""
METRICS_EXTRA = "pip install 'mailstrom[metrics]'"

_Answer = tuple[int, str, bytes, Mapping[str, str]]
"""A page's status, Content-Type, body and further headers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """One health check: ``ok`` decides 200 or 503; ``details`` is the JSON body."""

    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


class HealthCheck:
    """Whether a worker and its store are alive (callable from any thread).

    ``status`` gives the worker's status, ``responsive`` says whether its event loop
    answers (``Worker.responsive``); the store is asked for its suspensions, a read of a
    table of a few rows whatever the queue holds.
    """

    def __init__(
        self,
        *,
        status: Callable[[], WorkerStatus],
        responsive: Callable[[float], bool],
        store: Store,
    ) -> None:
        self._status = status
        self._responsive = responsive
        self._store = store
        self._ping: _Ping | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Health:
        status = self._status()
        loop_ok = status.running and self._responsive(LOOP_TIMEOUT)
        waiting = None
        if status.running and not loop_ok:
            # The loop may wait in a store call (SQLite: a write lock held elsewhere, up to
            # busy_timeout), which is the store's trouble, not a frozen loop; read after
            # the wait, which it may have entered meanwhile.
            waiting = self._status().store_wait_since
        store_error = self._ping_store()
        if loop_ok or not status.running:
            loop = "ok" if loop_ok else "stopped"
        else:
            loop = "not responding" if waiting is None else "waiting for the store"
        worker: dict[str, Any] = {
            "running": status.running,
            "loop": loop,
            "in_flight": status.in_flight,
            "sessions": status.sessions,
            "unrecorded": status.unrecorded,
        }
        if status.error is not None:
            worker["error"] = status.error
        if status.paused is not None:
            worker["paused"] = status.paused  # alive and answering: not a failure of health
        # Asked to stop (SIGTERM): it finishes what it holds and goes, taking no new work.
        # A readiness check fails from now on, so that whoever routes to it or counts on
        # it (a load balancer, a rolling update) learns it now, not once it is gone.
        draining = status.running and status.stopping
        if draining:
            worker["draining"] = True
        store: dict[str, Any] = {"ok": store_error is None}
        if store_error is not None:
            store["error"] = store_error
        elif status.store_error is not None:
            store["worker_error"] = status.store_error  # failing for the worker, retried
        if waiting is not None:
            store["worker_waiting_since"] = waiting.isoformat()
        # The worker's own store calls failing is a failure too: the ping is a read, and
        # reads go on while writes fail (a write lock held elsewhere, a full disk, a
        # read-only database), so a worker that could neither lease nor record answered
        # "ok". It retries by itself; this says it is not doing its work meanwhile.
        healthy = loop_ok and store_error is None and status.store_error is None
        ok = healthy and not draining
        return Health(
            ok=ok,
            details={
                "status": "ok" if ok else "draining" if healthy else "fail",
                "time": datetime.now(UTC).isoformat(),
                "worker": worker,
                "store": store,
            },
        )

    def _ping_store(self) -> str | None:
        with self._lock:
            ping = self._ping
            if ping is None or ping.done.is_set():
                ping = self._ping = _Ping()
                # A daemon thread: a ping hanging on a dead database must not hold up exit.
                threading.Thread(
                    target=ping.run, args=(self._store,), name="mailstrom-health", daemon=True
                ).start()
        # A check made while another one's ping runs shares it (two probes at once are
        # usual: a liveness and a readiness probe), waiting for what is left of its time;
        # one that hangs past it fails every check at once rather than pile up threads.
        left = ping.started + STORE_TIMEOUT - time.monotonic()
        if left <= 0 or not ping.done.wait(left):
            return f"the store did not answer within {STORE_TIMEOUT:g} s"
        return ping.error


class _Ping:
    """One store check on a thread of its own."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.error: str | None = None

    def run(self, store: Store) -> None:
        try:
            # Not next_due: it may write (it dates undated rows, and brings back the
            # recipients of a timed suspension that has ended).
            store.suspensions(now=datetime.now(UTC))
        except Exception as exc:
            # Not only StoreError (whose text is redacted already): a driver's own error
            # that escaped the store may quote its connection string too.
            self.error = redact_url(f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()


class OpsServer:
    """Serves ``/metrics`` (Prometheus text format, or OpenMetrics to a scraper whose
    ``Accept`` asks for it) and ``/healthz`` (JSON) on a thread, to GET and HEAD.

    >>> server = OpsServer("127.0.0.1", 9466, snapshot=ms.metrics, health=check)  # doctest: +SKIP
    >>> server.start(); ...; server.close()  # doctest: +SKIP

    ``store_wait`` adds ``mailstrom_store_waiting`` and ``mailstrom_store_open_failures``
    (a worker that serves before its store opens: :mod:`mailstrom.ops.sources`).

    ``port=0`` takes a free port (see :attr:`port`). Without prometheus-client installed
    the constructor raises :class:`~mailstrom.errors.ConfigError` naming the extra.

    On a loopback address it answers only requests whose ``Host`` names this host by a
    loopback name or address (400 otherwise), as the dashboard does without a token: the
    metrics name the domains mailed most, and a page on another site must not read them
    by rebinding its own name to 127.0.0.1 (:mod:`mailstrom.loopback`).

    It may listen on any address (Kubernetes scrapes a pod's address), so no client can
    take more than ``max_connections`` threads, nor hold one longer than
    ``request_timeout`` seconds to send its request (or to read the answer): see
    :mod:`mailstrom.ops.guarded_http`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        snapshot: Callable[[], MetricsSnapshot],
        health: Callable[[], Health],
        store_wait: Callable[[], StoreWait] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        try:
            from prometheus_client.exposition import choose_encoder

            from mailstrom.ops.exporter import registry_for
        except ImportError as exc:
            raise ConfigError(
                f"metrics need prometheus-client, which cannot be loaded ({exc}): {METRICS_EXTRA}"
            ) from None
        registry = registry_for(snapshot, store_wait=store_wait)

        def metrics(request: Message) -> _Answer:
            # The library's negotiation, as its own server has it: OpenMetrics for a
            # scraper that asks for it (Prometheus does, first), the text format otherwise;
            # gzipped for one that accepts gzip (Prometheus does), as that server does.
            try:
                encoder, content_type = choose_encoder(request.get("Accept", ""))
            except (TypeError, ValueError):
                # It compares a version's parts as numbers, and raises for one that is not
                # ("version=1.0.0-rc1"): a client's error, no 500 with a traceback logged.
                # An Accept the server cannot read is disregarded (RFC 9110 §12.5.1).
                encoder, content_type = choose_encoder("")
            body = encoder(registry)
            # What the answer was chosen by, for a cache between scraper and worker.
            headers = {"Vary": "Accept, Accept-Encoding"}
            if accepts_gzip(", ".join(request.get_all("Accept-Encoding") or ())):
                body = gzip.compress(body)
                headers["Content-Encoding"] = "gzip"
            return 200, content_type, body, headers

        def healthz(request: Message) -> _Answer:
            result = health()
            body = json.dumps(result.details).encode() + b"\n"
            return (200 if result.ok else 503), "application/json", body, {}

        routes = {"/metrics": metrics, "/healthz": healthz}

        class Handler(GuardedRequestHandler):
            server_version = "mailstrom"
            sys_version = ""
            on_loopback = True  # set from the address bound, below

            def do_GET(self) -> None:
                self._answer()

            def do_HEAD(self) -> None:
                # What GET would answer, its health check and Content-Length included,
                # without the body (RFC 9110 §9.3.2): probes and checkers use HEAD.
                self._answer()

            def _not_allowed(self) -> None:
                # A method HTTP defines but these pages do not take: 405 and what they
                # take (RFC 9110 §15.5.6), not the stdlib's 501 "no such method".
                self._send(405, "text/plain", b"only GET and HEAD\n", {"Allow": "GET, HEAD"})

            do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed
            do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

            def _answer(self) -> None:
                # Without the white space a field line's value may end with (RFC 9112
                # §5.1), which http.client leaves in it: "127.0.0.1 " names this host.
                hosts = [h.strip(" \t") for h in self.headers.get_all("Host") or []]
                if len(hosts) > 1 or (not hosts and self.request_version >= "HTTP/1.1"):
                    # RFC 9112 §3.2: 400, not a guess at which one (a proxy may take
                    # another than the check below would).
                    self._send(400, "text/plain", b"a request needs one Host header\n")
                    return
                authority, path = split_target(self.path)
                named = authority if authority is not None else hosts[0] if hosts else None
                if self.on_loopback and not names_loopback(named):
                    self._send(400, "text/plain", b"ask by a loopback name: Host: 127.0.0.1\n")
                    return
                route = routes.get(path)
                if route is None:
                    self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")
                    return
                try:
                    code, content_type, body, headers = route(self.headers)
                except Exception:
                    log.exception("serving %s failed", self.path)
                    code, content_type, body, headers = 500, "text/plain", b"internal error\n", {}
                self._send(code, content_type, body, headers)

            def _send(
                self,
                code: int,
                content_type: str,
                body: bytes,
                headers: Mapping[str, str] | None = None,
            ) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape every few seconds is not worth a log line

        self._httpd = GuardedHTTPServer(
            (host, port), Handler, max_connections=max_connections, request_timeout=request_timeout
        )
        # The address bound, not the one named: a name ("LOCALHOST", the machine's own
        # name, which Debian maps to 127.0.1.1) may resolve to loopback too.
        Handler.on_loopback = is_loopback(str(self._httpd.server_address[0]))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="mailstrom-ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose for port 0)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving, close the socket and hang up on connections still open, whose
        threads end with them (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5.0)
        self._httpd.server_close()


def split_target(target: str) -> tuple[str | None, str]:
    """A request-target's authority (None in the usual origin-form, ``/path?query``) and
    path. RFC 9112 §3.2.2 has a server accept the absolute-form too,
    ``http://host:port/path`` (a client that takes it for a proxy sends it), and take the
    host from there, not from ``Host``.

    >>> split_target("/metrics?x=1"), split_target("http://127.0.0.1:9466/healthz")
    ((None, '/metrics'), ('127.0.0.1:9466', '/healthz'))
    """
    if target.startswith("/"):
        return None, target.partition("?")[0]
    try:
        parts = urlsplit(target)
    except ValueError:  # "http://[::1/": an unclosed IPv6 address
        return None, target
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None, target  # "*" or a stranger form: no such page
    return parts.netloc, parts.path or "/"


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header value takes gzip: prometheus-client's rule
    (``gzip`` among the codings listed, in any case), except that ``gzip;q=0`` says
    "not gzip" (RFC 9110 §12.5.3, a weight of 0 is "not acceptable").

    >>> [accepts_gzip(v) for v in ("gzip, deflate", "br, GZIP;q=0.5", "gzip;q=0", "")]
    [True, True, False, False]
    """
    for coding in accept_encoding.split(","):
        name, *params = coding.split(";")
        if name.strip().lower() != "gzip":
            continue
        weights = [v for k, _, v in (p.partition("=") for p in params) if k.strip().lower() == "q"]
        try:
            if weights and float(weights[0]) == 0:
                continue
        except ValueError:
            pass  # a weight that is no number: gzip is named, as the library reads it
        return True
    return False


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` → (host, port); loopback
    (127.0.0.1) when no host is given. An IPv6 address without brackets is refused.

    >>> parse_listen("9466"), parse_listen("0.0.0.0:9466"), parse_listen("[::1]:9466")
    (('127.0.0.1', 9466), ('0.0.0.0', 9466), ('::1', 9466))
    """
    if not text.isascii():  # an address or a name, and digits: int() takes "\u0669" as 9
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9466) in ASCII, got {text!r}")
    host, port = "127.0.0.1", text.strip()
    if port.startswith("["):
        host, _, rest = port[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif ":" in port:
        host, _, port = port.rpartition(":")
        if ":" in host:
            # A bare IPv6 address: split at its last colon "::1" was host ":" on port 1,
            # and "::1:9466" may be port 9466 or the address ::1:9466. As in a URL, then.
            raise ValueError(
                f"expected HOST:PORT with an IPv6 address in brackets (e.g. [::1]:9466), "
                f"got {text!r}"
            )
        host = host or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9466), got {text!r}")
    return host, int(port)
