"""A worker process that runs out of file descriptors (``RLIMIT_NOFILE`` lowered under it
with ``prlimit``, as a busy host or a low ``ulimit -n`` does): it degrades, deferring what
it cannot reach, and stops cleanly, never crashing; once descriptors return it delivers.

The limit is set on the worker's child process only: pytest and its servers keep theirs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailstrom import Mailstrom, ReasonClass, RecipientState
from mailstrom.client.process import WorkerProcess
from mailstrom.stores import SQLiteStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.fixtures.smtp_server import start_receiving_server
from tests.integration.test_worker_modes import config, hello, mx
from tests.support.certs import hashed_ca_directory
from tests.support.delivery import Results
from tests.support.open_files import open_sockets

__all__ = ["mx"]  # the fixture, found by pytest under this name

DOMAINS = ["a.example", "b.example", "c.example"]
ROOT = Path(__file__).parents[2]


def _child(ms: Mailstrom) -> int:
    assert isinstance(ms.worker, WorkerProcess)
    pid = ms.worker.pid
    assert pid is not None
    return pid


def _no_descriptor_left(pid: int, spare: int = 0) -> None:
    """Let process ``pid`` open ``spare`` more files or sockets and then none until one of
    those it holds now is closed: a new descriptor takes the lowest free number, and Linux
    refuses it (EMFILE) when that number is at the limit. Set again until the process held
    the same descriptors before and after: one it closed meanwhile (a file read while it
    starts) left a number under the limit free, a descriptor more than asked for."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    deadline = time.monotonic() + 10
    while True:
        held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        free = sorted(set(range(len(held) + spare + 1)) - held)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[spare], hard))
        time.sleep(0.05)
        if {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")} == held:
            return
        assert time.monotonic() < deadline, "the process never held still"


def _descriptors_back(pid: int) -> None:
    """Process ``pid`` may open files again, up to its hard limit."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))


def test_a_worker_out_of_descriptors_stops_cleanly_and_records_what_it_delivered(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Stopping the listener for other processes' wake-ups made a socket to wake its
    thread: out of descriptors that raised EMFILE, and the worker's stop ended there
    ("OSError: [Errno 24] Too many open files", the child exiting 1), before it closed
    its connections and wrote the results it still held."""
    for domain in DOMAINS:
        dns_server.mx(domain, [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, connection_idle=60)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        # Three connections (each delivery waits for its reply: none is reused), idle
        # then, and the routes known; the worker may open nothing more from there on.
        mx.data_delay = 0.2
        ids = [ms.send_email(hello(f"first@{domain}")) for domain in DOMAINS]
        results.wait_count(len(DOMAINS))
        _no_descriptor_left(_child(ms))
        ids += [ms.send_email(hello(f"u{i}@{DOMAINS[i % 3]}", i)) for i in range(6)]
        results.wait_count(len(DOMAINS) + 1)  # stopped with deliveries in flight
    finally:
        ms.stop()
    status = ms.worker_status
    assert status.error is None
    assert not status.running
    assert status.unrecorded == 0
    assert [ms.query_status(i).state for i in ids] == [RecipientState.DELIVERED] * len(ids)
    assert len(mx.messages) == len(ids)
    store.close()


def test_a_worker_out_of_descriptors_defers_once_and_delivers_when_they_return(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Many destinations and no descriptor to open a socket with (DNS queries, SMTP
    connections): each recipient is deferred once, with the reason, and the worker goes
    on (no crash, no retry loop); once descriptors return, everything is delivered, once.
    No server was asked: the deferral spends no attempt (it was counted as one, so a host
    short of descriptors for a while used up its recipients' ``max_attempts``)."""
    domains = [f"d{i}.example" for i in range(20)]
    for domain in domains:
        dns_server.mx(domain, [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker="process")
    ms.start()
    try:
        pid = _child(ms)
        _no_descriptor_left(pid)
        ids = [ms.send_email(hello(f"u@{domain}")) for domain in domains]
        results.wait_count(len(ids))
        status = ms.worker_status
        assert status.running and status.error is None
        recipients = [ms.query_status(i).recipients[0] for i in ids]
        assert {(r.state, r.attempts) for r in recipients} == {(RecipientState.DEFERRED, 0)}
        # This host's shortage, not a DNS server's answer ("Server ... answered [Errno 24]").
        for r in recipients:
            assert r.error is not None and r.error.startswith("local resource shortage: DNS")
            assert "Too many open files" in r.error and "answered" not in r.error
            assert r.reason_class is ReasonClass.LOCAL and r.history == ()
        assert mx.messages == []
        _descriptors_back(pid)
        for message_id in ids:
            ms.retry(message_id)
        results.wait_count(2 * len(ids))
    finally:
        ms.stop()
    assert ms.worker_status.error is None
    assert {ms.query_status(i).state for i in ids} == {RecipientState.DELIVERED}
    assert sorted(m.rcpt_tos[0] for m in mx.messages) == sorted(f"u@{d}" for d in domains)
    store.close()


def test_a_worker_with_one_descriptor_left_reads_the_dns_answer_it_asked_for(
    mx: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """One descriptor left, and the worker's first lookup: its query's socket takes it,
    and the answer is read (its record types were imported while files could be opened).
    dnspython imported the MX class on the first MX answer; the import failed (EMFILE), the
    unparsable reply was skipped, and the lookup waited out its budget: a DNS server's
    timeout, an attempt spent, for a server that had answered."""
    dns_server.mx("a.example", [(10, "mx.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    ms = Mailstrom(config(dns_server, mx.port), store=store, on_result=results, worker="process")
    ms.start()
    try:
        pid = _child(ms)
        _no_descriptor_left(pid, spare=1)
        sent = ms.send_email(hello("u@a.example"))
        results.wait_count(1)
        r = ms.query_status(sent).recipients[0]
        if r.state is not RecipientState.DELIVERED:
            # A later step short of its descriptor (the connection's, which another took
            # meanwhile) is this host's shortage, no attempt: never a server's timeout.
            assert r.state is RecipientState.DEFERRED and r.attempts == 0
            assert r.error is not None and r.error.startswith("local resource shortage: ")
            _descriptors_back(pid)
            ms.retry(sent)
            results.wait_count(2)
    finally:
        ms.stop()
    assert ms.query_status(sent).state is RecipientState.DELIVERED
    assert [m.rcpt_tos for m in mx.messages] == [("u@a.example",)]
    store.close()


def test_a_worker_out_of_descriptors_holds_no_mx_address_unreachable(
    mx: Any, smtp_server: Any, dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    """Its route known, no descriptor to open a connection with: that is this host's
    shortage, told as such (4.3.0), not a server that cannot be reached. Taken for one,
    the MX address was remembered as unreachable (5 minutes), and once descriptors
    returned the mail of a domain with a backup MX host went to the backup instead."""
    backup = smtp_server(host="127.0.0.2", port=mx.port, name="backup.test")
    dns_server.a("backup.test", backup.host)
    dns_server.mx("a.example", [(10, "mx.test")])
    dns_server.mx("b.example", [(10, "mx.test"), (20, "backup.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, connection_idle=0)  # no connection kept to reuse
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        pid = _child(ms)
        idle = open_sockets(pid)
        first = ms.send_email(hello("first@a.example"))
        results.wait_count(1)  # the route is known from here on
        deadline = time.monotonic() + 10
        while open_sockets(pid) > idle and time.monotonic() < deadline:
            time.sleep(0.01)  # the connection's QUIT and close
        _no_descriptor_left(pid)
        short = ms.send_email(hello("u@a.example", 1))
        results.wait_count(2)
        r = ms.query_status(short).recipients[0]
        assert r.state is RecipientState.DEFERRED
        assert r.error is not None
        assert r.error.startswith("local resource shortage: connecting to 127.0.0.1")
        _descriptors_back(pid)
        other = ms.send_email(hello("v@b.example", 2))
        results.wait_count(3)
        ms.retry(short)
        results.wait_count(4)
    finally:
        ms.stop()
    ids = [first, short, other]
    assert {ms.query_status(i).state for i in ids} == {RecipientState.DELIVERED}
    assert len(mx.messages) == len(ids)  # the primary, trusted as before
    assert backup.messages == []
    store.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_a_worker_out_of_descriptors_verifies_with_a_ca_of_the_system_directory(
    mx: Any,
    dns_server: LoopbackDNS,
    tls_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The system's CAs in a directory (``SSL_CERT_DIR``), and a verified delivery to a
    server whose CA no handshake has needed yet, the connection's socket taking the last
    descriptor: delivered. OpenSSL opened the CA's file only during the handshake, and out
    of descriptors failed it as "unable to get local issuer certificate": the server's
    certificate refused, an attempt counted, for this host's shortage."""
    other = trustme.CA()
    directory = hashed_ca_directory(tmp_path / "cas", tls_ca, other)
    monkeypatch.setenv(ssl.get_default_verify_paths().openssl_capath_env, str(directory))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.issue_cert("other.test").configure_cert(context)
    second = start_receiving_server(context, host="127.0.0.2", port=mx.port, name="other.test")
    dns_server.a("other.test", second.host)
    dns_server.mx("a.example", [(10, "mx.test")])
    dns_server.mx("b.example", [(10, "other.test")])
    store = SQLiteStore(tmp_path / "q.db")
    results = Results()
    cfg = config(dns_server, mx.port, tls="verify", connection_idle=0)
    ms = Mailstrom(cfg, store=store, on_result=results, worker="process")
    ms.start()
    try:
        pid = _child(ms)
        idle = open_sockets(pid)
        first = ms.send_email(hello("first@a.example"))  # the verifying context made
        results.wait_count(1)
        deadline = time.monotonic() + 10
        while open_sockets(pid) > idle and time.monotonic() < deadline:
            time.sleep(0.01)  # the connection's QUIT and close
        _no_descriptor_left(pid, spare=1)  # DNS's sockets, then the connection's
        short = ms.send_email(hello("u@b.example", 1))
        results.wait_count(2)
        r = ms.query_status(short).recipients[0]
        if r.state is not RecipientState.DELIVERED:
            # Short of a descriptor for a lookup or the connection: this host's, no attempt.
            assert r.state is RecipientState.DEFERRED and r.attempts == 0, r.error
            assert r.error is not None and r.error.startswith("local resource shortage: ")
            _descriptors_back(pid)
            ms.retry(short)
            results.wait_count(3)
    finally:
        ms.stop()
        second.stop()
    assert {ms.query_status(i).state for i in (first, short)} == {RecipientState.DELIVERED}
    assert [m.tls for m in second.messages] == [True]
    store.close()


WAIT_FOR_THE_FLOCK_WITHOUT_DESCRIPTORS = textwrap.dedent(
    """
    import fcntl, json, os, resource, sys, threading
    from datetime import UTC, datetime
    from mailstrom.stores import SQLiteStore
    from tests.contract.support import message

    path = sys.argv[1]
    store = SQLiteStore(path)
    store.enqueue(message("a@example.org"), now=datetime.now(UTC))
    # Another open file: its flock conflicts with the store's own, in this process too.
    other = os.open(path + "-lock", os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    threading.Timer(0.05, fcntl.flock, (other, fcntl.LOCK_UN)).start()
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    store.enqueue(message("b@example.org"), now=datetime.now(UTC))  # waits for the flock
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    lock = store._process_lock
    print(json.dumps({"refused": lock._refused, "messages": store.stats().messages}))
    store.close()
    """
)


def test_a_wait_for_the_write_lock_out_of_descriptors_keeps_the_flock(tmp_path: Path) -> None:
    """The first wait for another writer's ``flock`` imports ctypes (for precise
    sleeps), which opens files: out of descriptors that raised EMFILE, taken for a file
    system that refuses ``flock``, and the store never asked for it again: its writes
    waited in SQLite's busy handler (sleeps of milliseconds) until it was closed."""
    proc = subprocess.run(
        [sys.executable, "-c", WAIT_FOR_THE_FLOCK_WITHOUT_DESCRIPTORS, str(tmp_path / "q.db")],
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == {"refused": False, "messages": 2}
    assert b"cannot flock" not in proc.stderr
