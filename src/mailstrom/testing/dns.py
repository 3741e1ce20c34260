"""A real DNS server on loopback serving a mutable in-memory zone.

It is ``dnslib``'s ``DNSServer`` on 127.0.0.1, UDP and TCP on one ephemeral port, answering
from a zone the test edits while it runs. It behaves like a recursive resolver would
towards mailstrom: it follows CNAMEs inside the zone and puts the whole chain in the answer.
Needs the ``testing`` extra (``pip install 'mailstrom[testing]'``).

::

    with LoopbackDNS() as dns:
        dns.mx("example.org", [(10, "mx1.example.org"), (20, "mx2.example.org")])
        dns.a("mx1.example.org", "127.0.0.1")
        dns.aaaa("mx2.example.org", "::1", ttl=30)
        config = Config(dns=dns.dns_config, allow_loopback=True, ...)
        ...
        assert dns.queries("example.org", "MX") == 1

(or ``dns = LoopbackDNS().start()`` ... ``dns.stop()``). :class:`~mailstrom.testing.FakeMX`
wraps one; mailstrom's own test suite has it as the ``dns_server`` fixture.

API of :class:`LoopbackDNS` (names are case-insensitive, with or without the final dot,
Unicode names are stored as their A-label; every record method takes ``ttl=`` (default
300) and *replaces* that name's records of that type):

* ``port``, ``address`` ("127.0.0.1"), ``dns_config`` — a ``DNSConfig(nameservers=
  ("127.0.0.1",), port=port, timeout=2.0)``.
* ``mx(domain, [(preference, host), ...])``, ``a(name, *ips)``, ``aaaa(name, *ips)``,
  ``cname(name, target)``, ``txt(name, *records)``, ``ptr(ip, *names)``. A name is an
  alias or has records of its own: ``cname`` replaces its other records, and any other
  record method its alias.
* ``txt`` takes one string per record; a string longer than 255 octets is sent as several
  character-strings of one record (as a zone file splits a 2048-bit DKIM key), and a
  tuple of strings is one record made of exactly those character-strings.
* ``tlsa(name, (usage, selector, matching, data), ...)`` — TLSA records (RFC 6698), e.g.
  ``tlsa("_25._tcp.mx.example.org", (3, 1, 1, digest))``; ``data`` is bytes or hex.
* ``authenticated(*names)`` — answers about these names (records, NODATA, NXDOMAIN) carry
  the AD bit, as a validating resolver's answers about signed data do; ``authenticated()``
  with ``everything=True`` sets it on every answer. ``unauthenticated(*names)`` undoes it.
* ``null_mx(domain)`` — the RFC 7505 ``MX 0 .``.
* ``soa(zone, minimum=...)`` — an SOA record for ``zone``, which negative answers
  (NXDOMAIN, NODATA) for names at or under it then carry (RFC 2308 §3): their negative
  TTL is the smaller of its TTL and ``minimum``. Without one, negative answers carry no
  SOA and no negative TTL.
* ``wildcard_mx([(preference, host), ...])`` — every name the zone does not hold answers
  MX with these hosts (and has no other records), so mail to any domain goes there.
* ``nxdomain(name)`` — ``name`` does not exist, whatever ``wildcard_mx`` says.
* ``servfail(name)`` — every query for ``name`` gets SERVFAIL (``servfail(name, "CNAME")``:
  only the queries for that type).
* ``drop(name)`` — queries for ``name`` are never answered (the client times out; give
  it a small ``timeout``); ``drop(name, "AAAA")``: only the queries for that type, as a
  server or middlebox that loses AAAA queries does.
* ``referral(name)`` — queries for ``name`` get a referral to the root servers (NOERROR,
  no answer, their NS records, neither AA nor RA), as a server that does not resolve
  recursively answers: no proof that ``name`` lacks the records (RFC 2308 §2.2).
* ``delete(name)`` — forget everything about ``name`` (it becomes NXDOMAIN, or falls
  under ``wildcard_mx``).
* A name not in the zone → NXDOMAIN (unless ``wildcard_mx``); a name in the zone without
  the asked type → NOERROR with an empty answer (dnspython's ``NoAnswer``).
* ``queries(name, rtype) -> int`` counts the queries received for (name, type), e.g.
  ``queries("example.org", "MX")`` (over UDP and TCP: a query asked again over TCP after
  a truncated answer counts twice); ``query_counts()`` gives them all as a dict
  ``{(name, type): count}``; ``reset_counts()`` zeroes them.
* ``reset()`` — forget the whole zone and the counts (one server for many
  hypothesis examples).
* Over TCP, one connection takes several queries, one after another or pipelined
  (RFC 7766 §6.2.1): up to 100, each within 5 s of the connection or of the answer
  before it; then the server closes it.
* ``truncate(name, rtype, keep=1)`` — answer with the TC bit and the first ``keep``
  records only, over TCP too (a broken server or middlebox).
* Over UDP, an answer longer than 512 octets, or than the payload size an EDNS query
  offers, is sent truncated (TC bit, no records), as real servers send it: the client
  asks again over TCP, where it gets the whole answer.
* Names are served octet for octet, odd labels included (``\\000.example.org``,
  ``-.example.org``, ``a\\.b.example.org``: a label holding a dot). A query for a name
  with a label that is not UTF-8 is never answered (dnslib cannot parse it).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.name
import dns.reversename

from mailstrom.config import DNSConfig
from mailstrom.domains import IDNA
from mailstrom.testing._extra import missing_extra

try:
    from dnslib import (
        AAAA,
        CNAME,
        MX,
        NS,
        PTR,
        QTYPE,
        RCODE,
        RR,
        SOA,
        TLSA,
        TXT,
        A,
        DNSError,
        DNSHeader,
        DNSLabel,
        DNSRecord,
    )
    from dnslib.server import DNSHandler, DNSServer
except ImportError as exc:
    raise missing_extra(exc) from exc

__all__ = ["LoopbackDNS"]

_LOCALHOST = "127.0.0.1"
_DEFAULT_TTL = 300
_MAX_CHAIN = 8
_BIND_ATTEMPTS = 20
_UDP_LIMIT = 512
"""Octets of a UDP answer to a query without EDNS (RFC 1035 §4.2.1), and the least
payload size an EDNS query may offer (RFC 6891 §6.2.5: a smaller one counts as 512)."""
_TCP_LIMIT = 65535
"""Octets of the longest DNS message over TCP: its 2-octet length (RFC 1035 §4.2.2)."""
_TCP_IDLE_TIMEOUT = 5.0
"""Seconds a TCP client has, from connecting or from its last answer, to the last octet
of its next query; the connection is closed after that (RFC 7766 §6.2.3)."""
_TCP_MAX_QUERIES = 100
"""Queries answered on one TCP connection before the server closes it."""
_ROOT_REFERRAL = RR(DNSLabel("."), QTYPE.NS, rdata=NS(DNSLabel("a.root-servers.net")), ttl=518400)
"""The authority record of :meth:`LoopbackDNS.referral`'s answers."""


def _key(name: str) -> str:
    """The zone key of ``name``: lower-case A-label without the final dot."""
    if name in (".", ""):
        return ""
    return dns.name.from_text(name, idna_codec=IDNA).to_text(omit_final_dot=True).lower()


def _wire_key(label: DNSLabel) -> str:
    """The zone key of a name as dnslib parsed it off the wire. Built from its octets,
    not from dnslib's text, which does not escape ``.`` or ``\\`` inside a label."""
    if not label.label:
        return ""
    return dns.name.Name(label.label).to_text(omit_final_dot=True).lower()


def _label(key: str) -> DNSLabel:
    """The name ``key`` as dnslib is to put it on the wire: every label's exact octets
    (dnslib's own parsing of text mangles ``\\.``, ``\\DDD`` above 127 and the like)."""
    return DNSLabel(
        [bytes(label) for label in dns.name.from_text(key, idna_codec=IDNA).labels if label]
    )


def _character_strings(record: str | bytes | tuple[str, ...]) -> list[bytes]:
    """One TXT record's character-strings, none longer than the 255 octets DNS allows."""
    if isinstance(record, tuple):
        return [s.encode() for s in record]
    data = record if isinstance(record, bytes) else record.encode()
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


@dataclass(slots=True)
class _Node:
    records: dict[str, list[RR]] = field(default_factory=dict)
    cname: str | None = None
    servfail: bool = False
    servfail_types: set[str] = field(default_factory=set)
    drop: bool = False
    drop_types: set[str] = field(default_factory=set)
    referral: bool = False
    nxdomain: bool = False
    authenticated: bool = False
    truncated: dict[str, int] = field(default_factory=dict)
    """Types answered with the TC bit and only this many of their records."""


class _ZoneResolver:
    """dnslib resolver answering from a dict; called from the server's request threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[str, _Node] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.wildcard_mx: list[MX] = []
        """The MX records' data every name the zone does not hold answers with."""
        self.wildcard_ttl = _DEFAULT_TTL
        self.authenticated: set[str] = set()
        self.all_authenticated = False

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        qname = _wire_key(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        reply = request.reply()
        with self.lock:
            self.counts[(qname, qtype)] += 1
            # The AD bit (RFC 4035 §3.2.3): the whole answer, chain included, validated.
            secure = self.all_authenticated or qname in self.authenticated
            name = qname
            for _ in range(_MAX_CHAIN):
                node = self.nodes.get(name)
                if node is None and self.wildcard_mx:
                    # As a zone-wide "*" owning only MX records would answer.
                    if qtype == "MX":
                        reply.add_answer(*self._wildcard_answer(name))
                    break
                if node is None or node.nxdomain:
                    reply.header.rcode = RCODE.NXDOMAIN
                    break
                if node.drop or qtype in node.drop_types:
                    # DNSHandler logs a DNSError and sends nothing: the client times out.
                    raise DNSError(f"dropping query for {name}")
                if node.servfail or qtype in node.servfail_types:
                    reply.header.rcode = RCODE.SERVFAIL
                    break
                if node.referral:
                    # As a server that does not recurse answers: "ask the root servers".
                    reply.header.aa = reply.header.ra = 0
                    reply.add_auth(_ROOT_REFERRAL)
                    break
                if node.cname is not None and qtype != "CNAME":
                    reply.add_answer(*node.records["CNAME"])
                    name = _key(node.cname)
                    secure = secure and (self.all_authenticated or name in self.authenticated)
                    continue
                answer = node.records.get(qtype, [])
                if qtype in node.truncated:
                    # As a broken server or middlebox cuts it, over TCP too.
                    answer = answer[: node.truncated[qtype]]
                    reply.header.tc = 1
                reply.add_answer(*answer)
                break
            if reply.header.rcode == RCODE.NXDOMAIN or (
                reply.header.rcode == RCODE.NOERROR
                and not reply.auth
                and not any(rr.rtype == request.q.qtype for rr in reply.rr)
            ):
                reply.add_auth(*self._soa(name))  # a negative answer (RFC 2308 §3)
            # dnslib's reply() copies the query's flags, AD included: set it ourselves.
            reply.header.ad = int(secure and reply.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN))
        return reply

    def _soa(self, name: str) -> list[RR]:
        """The SOA record of the closest zone set with :meth:`LoopbackDNS.soa` that holds
        ``name``, or none."""
        owner = dns.name.from_text(name or ".", idna_codec=IDNA)
        while True:
            node = self.nodes.get(_key(owner.to_text()))
            if node is not None and "SOA" in node.records:
                return node.records["SOA"]
            if owner == dns.name.root:
                return []
            owner = owner.parent()

    def _wildcard_answer(self, name: str) -> list[RR]:
        return [
            RR(_label(name), QTYPE.MX, rdata=rdata, ttl=self.wildcard_ttl)
            for rdata in self.wildcard_mx
        ]


class _QuietLogger:
    """dnslib logs every packet to stdout by default; tests want silence."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    # Non-daemon request threads are joined by server_close(), so none outlive stop().
    daemon_threads = False
    block_on_close = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Knows its open connections, so that :meth:`LoopbackDNS.stop` can end them: the
    request threads it joins would otherwise wait out what is left of each client's
    :data:`_TCP_IDLE_TIMEOUT` (a client that sends an octet now and then, a query that
    never ends, or a connection kept open for more queries)."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self.closing = False
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        # In the serving thread, before the request's thread starts: once shutdown()
        # returned, every connection accepted is in the set.
        with self._clients_lock:
            self._clients.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def close_clients(self) -> None:
        """End every open connection: a read blocked on one returns at once."""
        self.closing = True
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


def _udp_limit(request: DNSRecord) -> int:
    """The longest UDP answer ``request`` takes: the payload size of its EDNS OPT record
    (at least 512), or 512 without one."""
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(_UDP_LIMIT, int(rr.rclass))
    return _UDP_LIMIT


class _Handler(DNSHandler):  # type: ignore[misc]  # dnslib has no type hints
    def get_reply(self, data: bytes) -> bytes:
        """The answer to the query ``data``; over UDP, truncated as a real server does
        when it is longer than the query takes (:func:`_udp_limit`): no records, the TC
        bit set and the question kept (RFC 2181 §9), so that the client asks again over
        TCP. dnslib's own truncation, off by default, drops the question too, and a
        client that checks an answer against its query ignores such a message. Over TCP,
        truncated alike when longer than a TCP message holds (its length did not fit
        the 2-octet prefix, and the connection closed unanswered)."""
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        wire: bytes = reply.pack()
        limit = _udp_limit(request) if self.protocol == "udp" else _TCP_LIMIT
        if len(wire) > limit:
            header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1)
            wire = DNSRecord(header, questions=reply.questions).pack()
        return wire

    def handle(self) -> None:
        try:
            if self.server.socket_type == socket.SOCK_STREAM:
                self._handle_tcp()
            else:
                super().handle()
        except OSError:
            # The answer to a connection stop() ended cannot be sent: nothing to report.
            if not getattr(self.server, "closing", False):
                raise

    def _handle_tcp(self) -> None:
        """Answer the queries of one TCP connection in turn, sent one after another or
        pipelined, as RFC 7766 §6.2.1 asks of a server (one answered per connection, a
        client that reused it got no second answer). Each query is its 2-octet length
        (RFC 1035 §4.2.2, so at most 65535 octets), then exactly that many octets,
        however the client's writes split them (dnslib read both from one recv(): a
        length whose first octet came alone was taken for a truncated request).

        Bounded: a client has :data:`_TCP_IDLE_TIMEOUT` seconds, from connecting or from
        its last answer, for the whole of its next query (a client that says nothing must
        not hold a thread, nor stall ``server_close()``), and the connection closes after
        :data:`_TCP_MAX_QUERIES` answers. A query that is late, or cut short by the client
        closing, gets no answer; nor does one dnslib cannot parse, or for a dropped name,
        which ends the connection, as it always did."""
        self.protocol = "tcp"
        for _ in range(_TCP_MAX_QUERIES):
            deadline = time.monotonic() + _TCP_IDLE_TIMEOUT
            prefix = self._read_exactly(2, deadline)
            if prefix is None:
                return
            (length,) = struct.unpack("!H", prefix)
            data = self._read_exactly(length, deadline)
            if data is None:
                return
            try:
                wire = self.get_reply(data)
            except DNSError:
                return
            self.request.settimeout(_TCP_IDLE_TIMEOUT)  # not what was left of the query's
            self.request.sendall(struct.pack("!H", len(wire)) + wire)

    def _read_exactly(self, size: int, deadline: float) -> bytes | None:
        """``size`` octets from the connection, or None when it ends or the deadline
        passes first."""
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.request.settimeout(remaining)
            try:
                chunk = self.request.recv(size - len(data))
            except TimeoutError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)


class LoopbackDNS:
    """A DNS server on 127.0.0.1 (UDP + TCP, one ephemeral port) with an editable zone."""

    address = _LOCALHOST

    def __init__(self) -> None:
        self._zone = _ZoneResolver()
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> LoopbackDNS:
        """Bind UDP and TCP on the same free port and serve in background threads;
        returns self. Started already (``with LoopbackDNS().start() as dns``), it just
        returns self: servers started twice left the first ones running, and ``stop()``
        waiting for their threads for ever."""
        if self._servers:
            return self
        udp, tcp = self._bind()
        self._servers = [udp, tcp]
        self.port = udp.server.server_address[1]
        for server in self._servers:
            thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"loopback-dns-{self.port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _bind(self) -> tuple[DNSServer, DNSServer]:
        # UDP picks the port; TCP must get the same one, which another process may hold.
        for _ in range(_BIND_ATTEMPTS):
            udp = self._server(0, tcp=False)
            port = udp.server.server_address[1]
            try:
                tcp = self._server(port, tcp=True)
            except OSError as exc:
                udp.server.server_close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    def _server(self, port: int, *, tcp: bool) -> DNSServer:
        return DNSServer(
            self._zone,
            address=_LOCALHOST,
            port=port,
            tcp=tcp,
            logger=_QuietLogger(),
            handler=_Handler,
            server=_TCPServer if tcp else _UDPServer,
        )

    def stop(self) -> None:
        """Stop serving, end the TCP connections still open (a client in the middle of a
        query, or one that says nothing), join every thread and close every socket.
        Idempotent."""
        for server in self._servers:
            server.server.shutdown()
        for server in self._servers:
            if isinstance(server.server, _TCPServer):
                server.server.close_clients()  # else server_close() waits for each
        for thread in self._threads:
            thread.join()
        for server in self._servers:
            server.server.server_close()
        self._servers = []
        self._threads = []

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def dns_config(self) -> DNSConfig:
        """Where to point mailstrom's resolver: this server, 2 s per resolution."""
        return DNSConfig(nameservers=(_LOCALHOST,), port=self.port, timeout=2.0)

    # --- zone editing --------------------------------------------------------------------

    def _set(self, name: str, rtype: str, rdatas: Iterable[Any], ttl: int) -> None:
        key = _key(name)
        rrs = [RR(_label(key), getattr(QTYPE, rtype), rdata=r, ttl=ttl) for r in rdatas]
        with self._zone.lock:
            node = self._zone.nodes.setdefault(key, _Node())
            node.records[rtype] = rrs
            # Records given are records to serve: a name made to fail (servfail, drop,
            # nxdomain) answers again, as a zone fixed by its owner does. A SERVFAIL for
            # one type (servfail(name, rtype)) is that type's alone and stays. An alias
            # has no other records (RFC 1034 §3.6.2), so they end it, as cname() ends
            # them: else the CNAME kept answering and these were never served.
            node.servfail = node.drop = node.referral = node.nxdomain = False
            node.cname = None
            node.records.pop("CNAME", None)

    def mx(self, domain: str, hosts: Iterable[tuple[int, str]], *, ttl: int = _DEFAULT_TTL) -> None:
        """Set ``domain``'s MX records: ``[(preference, host), ...]``."""
        self._set(domain, "MX", [MX(_label(_key(h)), pref) for pref, h in hosts], ttl)

    def null_mx(self, domain: str, *, ttl: int = _DEFAULT_TTL) -> None:
        """Declare that ``domain`` accepts no mail (RFC 7505 ``MX 0 .``)."""
        self._set(domain, "MX", [MX(".", 0)], ttl)

    def soa(self, zone: str, *, minimum: int = _DEFAULT_TTL, ttl: int = _DEFAULT_TTL) -> None:
        """Give ``zone`` an SOA record: negative answers (NXDOMAIN, NODATA) for names at
        or under it carry it in their authority section, as an authoritative server's do
        (RFC 2308 §3), so that they may be believed for the smaller of ``ttl`` and
        ``minimum`` seconds (§5). It is one of ``zone``'s records, as :meth:`a` sets one."""
        key = _key(zone)
        times = (1, 3600, 600, 86400, minimum)
        rdata = SOA(_label(f"ns.{key}"), _label(f"hostmaster.{key}"), times)
        self._set(zone, "SOA", [rdata], ttl)

    def wildcard_mx(self, hosts: Iterable[tuple[int, str]], *, ttl: int = _DEFAULT_TTL) -> None:
        """Answer MX with ``[(preference, host), ...]`` for every name the zone does not
        hold (other types: an empty answer), so that mail to any domain goes to ``hosts``.
        An empty list turns this off again."""
        # Built (and so checked) now, as the other record methods build theirs: built
        # per query, a preference or TTL DNS cannot carry failed every MX query it
        # answered, on the server's thread, and the client timed out.
        rdatas = [MX(_label(_key(h)), pref) for pref, h in hosts]
        RR(_label("wildcard.test"), QTYPE.MX, rdata=MX(_label("wildcard.test")), ttl=ttl)
        with self._zone.lock:
            self._zone.wildcard_mx = rdatas
            self._zone.wildcard_ttl = ttl

    def a(self, name: str, *ips: str, ttl: int = _DEFAULT_TTL) -> None:
        """Set ``name``'s A records."""
        self._set(name, "A", [A(ip) for ip in ips], ttl)

    def aaaa(self, name: str, *ips: str, ttl: int = _DEFAULT_TTL) -> None:
        """Set ``name``'s AAAA records (any IPv6 spelling, ``::ffff:127.0.0.1`` too)."""
        # dnslib parses hex groups only; the 16 octets take every spelling.
        octets = [list(ipaddress.IPv6Address(ip).packed) for ip in ips]
        self._set(name, "AAAA", [AAAA(o) for o in octets], ttl)

    def txt(
        self, name: str, *records: str | bytes | tuple[str, ...], ttl: int = _DEFAULT_TTL
    ) -> None:
        """Set ``name``'s TXT records: one record per argument. A string longer than 255
        octets becomes several character-strings of its record; a tuple gives them.
        A record given as bytes is served as those octets, UTF-8 or not (DNS does not
        care), to see what a reader makes of them."""
        self._set(name, "TXT", [TXT(_character_strings(r)) for r in records], ttl)

    def tlsa(
        self,
        name: str,
        *records: tuple[int, int, int, bytes | str],
        ttl: int = _DEFAULT_TTL,
    ) -> None:
        """Set ``name``'s TLSA records: ``(usage, selector, matching, data)`` each, the
        data as bytes or hex (``name`` is the full owner, ``_25._tcp.<host>``)."""
        rdatas = [
            TLSA(u, s, m, bytes.fromhex(d) if isinstance(d, str) else bytes(d))
            for u, s, m, d in records
        ]
        self._set(name, "TLSA", rdatas, ttl)

    def authenticated(self, *names: str, everything: bool = False) -> None:
        """Set the AD bit on answers about ``names`` (or, with ``everything``, on every
        answer), as a validating resolver does for signed, validated data."""
        with self._zone.lock:
            self._zone.authenticated.update(_key(n) for n in names)
            if everything:
                self._zone.all_authenticated = True

    def unauthenticated(self, *names: str) -> None:
        """No AD bit on answers about ``names`` (none at all when no name is given)."""
        with self._zone.lock:
            if names:
                self._zone.authenticated.difference_update(_key(n) for n in names)
            else:
                self._zone.authenticated.clear()
                self._zone.all_authenticated = False

    def ptr(self, ip: str, *names: str, ttl: int = _DEFAULT_TTL) -> None:
        """Set the PTR records of address ``ip`` (its in-addr.arpa or ip6.arpa name)."""
        reverse = dns.reversename.from_address(ip).to_text()
        self._set(reverse, "PTR", [PTR(_label(_key(n))) for n in names], ttl)

    def cname(self, name: str, target: str, *, ttl: int = _DEFAULT_TTL) -> None:
        """Make ``name`` an alias of ``target`` (answers follow it within the zone). As
        other records do, it ends a :meth:`servfail` (for every type), :meth:`drop` or
        :meth:`nxdomain` of ``name``: kept, they answered in its place."""
        key = _key(name)
        with self._zone.lock:
            node = self._zone.nodes.setdefault(key, _Node())
            node.servfail = node.drop = node.referral = node.nxdomain = False
            node.cname = _key(target)
            rdata = CNAME(_label(node.cname))
            node.records = {"CNAME": [RR(_label(key), QTYPE.CNAME, rdata=rdata, ttl=ttl)]}

    def truncate(self, name: str, rtype: str, *, keep: int = 1) -> None:
        """Answer queries for ``name``'s ``rtype`` records with the TC bit set and only
        the first ``keep`` of them, over UDP and TCP alike: a broken server or middlebox
        that cuts an answer short over TCP too (the server itself truncates only an
        answer longer than the transport holds, without records). Records set for
        ``name`` afterwards leave it so."""
        with self._zone.lock:
            node = self._zone.nodes.setdefault(_key(name), _Node())
            node.truncated[rtype.upper()] = keep

    def servfail(self, name: str, rtype: str | None = None) -> None:
        """Answer every query for ``name`` with SERVFAIL, or only those for ``rtype``
        (e.g. ``"CNAME"``: an alias whose own record cannot be fetched while queries
        for its addresses, which follow it, still work). Records set for ``name``
        afterwards end a SERVFAIL for every type (as they end :meth:`drop` and
        :meth:`nxdomain`), not one for ``rtype``."""
        with self._zone.lock:
            node = self._zone.nodes.setdefault(_key(name), _Node())
            if rtype is None:
                node.servfail = True
            else:
                node.servfail_types.add(rtype.upper())

    def drop(self, name: str, rtype: str | None = None) -> None:
        """Never answer queries for ``name`` (the client times out), or only those for
        ``rtype`` (e.g. ``"AAAA"``, while the A queries are answered). Records set for
        ``name`` afterwards end the first (as they end :meth:`servfail`), not the second;
        :meth:`delete` ends both."""
        with self._zone.lock:
            node = self._zone.nodes.setdefault(_key(name), _Node())
            if rtype is None:
                node.drop = True
            else:
                node.drop_types.add(rtype.upper())

    def referral(self, name: str) -> None:
        """Answer queries for ``name`` with a referral to the root servers, as a server
        that does not resolve recursively does (Windows DNS with recursion off, an
        authoritative-only server): NOERROR, no answer, NS records in the authority
        section, neither AA nor RA. Records set for ``name`` afterwards end it."""
        with self._zone.lock:
            self._zone.nodes.setdefault(_key(name), _Node()).referral = True

    def nxdomain(self, name: str) -> None:
        """Make ``name`` not exist (NXDOMAIN), even under :meth:`wildcard_mx`."""
        with self._zone.lock:
            self._zone.nodes[_key(name)] = _Node(nxdomain=True)

    def delete(self, name: str) -> None:
        """Remove ``name`` and everything about it; it becomes NXDOMAIN (or falls under
        :meth:`wildcard_mx`)."""
        with self._zone.lock:
            self._zone.nodes.pop(_key(name), None)

    # --- observation ---------------------------------------------------------------------

    def queries(self, name: str, rtype: str) -> int:
        """How many queries arrived for (``name``, ``rtype``), e.g. ("example.org", "MX")."""
        with self._zone.lock:
            return self._zone.counts[(_key(name), rtype.upper())]

    def reset_counts(self) -> None:
        """Forget all query counts."""
        with self._zone.lock:
            self._zone.counts.clear()

    def query_counts(self) -> dict[tuple[str, str], int]:
        """Every (name, type) queried since the last reset, with how many queries came."""
        with self._zone.lock:
            return dict(self._zone.counts)

    def reset(self) -> None:
        """Forget the whole zone, ``wildcard_mx``, the AD settings and the query counts:
        the empty server :meth:`start` gave (one server can then serve many examples)."""
        with self._zone.lock:
            self._zone.nodes.clear()
            self._zone.counts.clear()
            self._zone.wildcard_mx = []
            self._zone.authenticated.clear()
            self._zone.all_authenticated = False
