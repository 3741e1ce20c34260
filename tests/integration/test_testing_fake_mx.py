"""mailstrom.testing.FakeMX (the ``fake_mx`` fixture): real deliveries to a scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import smtplib
import socket
import ssl
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.name
import dns.resolver
import pytest

from mailstrom import (
    AsyncMailstrom,
    Email,
    InvalidAddress,
    Mailstrom,
    RecipientState,
    RelayConfig,
    TLSPolicy,
)
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.testing import FakeMX, capture
from mailstrom.testing import smtp as smtp_kit
from mailstrom.testing.fakemx import MX_HOST
from mailstrom.testing.smtp import _SMTP, start_receiving_server, tls_contexts
from tests.support.delivery import Results

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED


def mail(*to: str, subject: str = "Hi") -> Email:
    return Email(from_="App <app@shop.test>", to=list(to), subject=subject, text="Hello")


def test_the_sketch_from_the_issue(fake_mx: FakeMX) -> None:
    fake_mx.reject("nobody@example.org", "550 5.1.1 no such user")
    store = MemoryStore()
    with Mailstrom(fake_mx.config, store=store) as ms:
        mid = ms.send_email(mail("bob@example.org", "nobody@example.org"))
        fake_mx.wait_for(1)
    [got] = fake_mx.received
    assert got.envelope_to == ["bob@example.org"]
    assert got.envelope_from == "app@shop.test"
    assert got.accepted and got.tls
    assert got.message["Subject"] == "Hi"
    # Leaving the block drained what was in flight: both results are recorded.
    status = store.status(mid)
    assert status.recipient("bob@example.org").state is DELIVERED
    nobody = status.recipient("nobody@example.org")
    assert nobody.state is FAILED
    assert nobody.reply is not None
    assert (nobody.reply.code, nobody.reply.enhanced) == (550, "5.1.1")
    assert nobody.mx_host == MX_HOST


def test_a_script_names_an_address_as_it_was_sent_to(fake_mx: FakeMX) -> None:
    # The RCPT carries the envelope form (bob@xn--bcher-kva.example, a role name in lower
    # case, a UTF-8 local part in NFC): a script for the address as the test wrote it
    # never applied, and the recipient was delivered.
    sent = ["bob@Bücher.example", "Postmaster@c.test", "Jo\u0308rg@d.test"]
    for address in sent:
        fake_mx.reject(address)
    stored = {"bob@xn--bcher-kva.example", "postmaster@c.test", "J\u00f6rg@d.test"}
    results = Results()
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        for address in sent:
            ms.send_email(mail(address))
        results.wait_final(stored)
    assert results.states() == dict.fromkeys(stored, FAILED)


def test_a_script_takes_an_address_as_send_email_does(fake_mx: FakeMX) -> None:
    # A script keyed the text as given: "Bob <bob@example.org>" (a To entry, as send_email
    # takes it) scripted nobody and the recipient was delivered, and text that is no
    # address at all ("bob") was taken without a word: the test then checked nothing.
    fake_mx.reject("Bob <Bob@Example.org>")
    fake_mx.defer(" ann@example.org ", times=1)
    for wrong in ["bob", "", "a@b@example.org", "Ann <ann@example.org>, b@example.org"]:
        with pytest.raises(InvalidAddress):
            fake_mx.reject(wrong)
    results = Results()
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        ms.send_email(mail("Bob <bob@example.org>", "ann@example.org"))
        results.wait_final({"bob@example.org", "ann@example.org"})
    assert results.states() == {"bob@example.org": FAILED, "ann@example.org": DEFERRED}


def test_every_script_per_address(fake_mx: FakeMX) -> None:
    fake_mx.defer("busy@a.test", "451 4.2.1 Mailbox busy")
    fake_mx.reject("gone@b.test")
    fake_mx.drop_after_dot("flaky@c.test")
    fake_mx.stall("slow@d.test")
    fake_mx.reject("ok@e.test")
    fake_mx.accept("OK@e.test")  # scripts are per address, case-insensitive; accept undoes
    results = Results()
    addresses = {"busy@a.test", "gone@b.test", "flaky@c.test", "slow@d.test", "ok@e.test"}
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        for address in sorted(addresses):
            ms.send_email(mail(address))
        results.wait_final(addresses)
        status = {r.address: ms.query_status(r.message_id).recipients[0] for r in results.all}
    assert {a: s.state for a, s in status.items()} == {
        "busy@a.test": DEFERRED,
        "gone@b.test": FAILED,
        "flaky@c.test": DEFERRED,
        "slow@d.test": DEFERRED,
        "ok@e.test": DELIVERED,
    }
    assert str(status["busy@a.test"].reply) == "451 4.2.1 Mailbox busy"
    assert status["flaky@c.test"].uncertain
    assert "did not reply to RCPT" in status["slow@d.test"].reason
    # The server saw the content of the dropped transaction, unanswered, and of ok@.
    received = {tuple(m.envelope_to): m for m in fake_mx.received}
    assert set(received) == {("flaky@c.test",), ("ok@e.test",)}
    assert received[("flaky@c.test",)].reply is None
    assert not received[("flaky@c.test",)].accepted


def test_defer_a_number_of_times_then_accept(fake_mx: FakeMX) -> None:
    fake_mx.defer("grey@example.org", "450 4.7.1 Greylisted", times=1)
    results = Results()
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(mail("grey@example.org"))
        [first] = results.wait_count(1)
        assert first.state is DEFERRED
        ms.retry(mid)
        fake_mx.wait_for(1)
        results.wait_count(2)
        assert ms.query_status(mid).state is DELIVERED


def test_defer_a_great_number_of_times_holds_a_count_not_a_list(fake_mx: FakeMX) -> None:
    """defer(times=n) built a list of n + 1 replies: 8 MB for a million, MemoryError (or
    the machine's memory) for "as good as always", OverflowError for more."""
    tracemalloc.start()
    try:
        fake_mx.defer("many@example.org", "451 4.7.1 Later", times=10**6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    fake_mx.defer("always@example.org", "451 4.7.1 Later", times=2**70)
    server = fake_mx.server
    assert [server.rcpt_rule("always@example.org") for _ in range(3)] == ["451 4.7.1 Later"] * 3
    fake_mx.defer("twice@example.org", "450 4.7.1 Greylisted", times=2)
    replies = [server.rcpt_rule("twice@example.org") for _ in range(4)]
    assert replies == ["450 4.7.1 Greylisted"] * 2 + ["250 2.1.5 OK"] * 2


@pytest.mark.parametrize("times", [-1, 0, 1.5, True, "2"])
def test_defer_takes_a_count_of_at_least_one(fake_mx: FakeMX, times: object) -> None:
    """times=-1 made the list of replies [accept] (the address was accepted at once) and
    times=0 deferred nothing, both silently: a greylisting test then passed or failed
    for another reason than the one it was written for."""
    with pytest.raises(ValueError, match="at least 1"):
        fake_mx.defer("a@example.org", times=times)  # type: ignore[arg-type]


@pytest.mark.parametrize("times", [-1, 1.5, True, "2"])
def test_repeated_says_what_is_wrong_with_its_count(fake_mx: FakeMX, times: object) -> None:
    """Repeated(reply, times=-1, then=...) was refused, as it was set, as "an empty list
    of replies": a list the test never wrote, while its count was what was wrong."""
    server = fake_mx.server
    with pytest.raises(ValueError, match=r"Repeated\(times=\.\.\.\) must be a whole number"):
        server.rcpt_replies["a@example.org"] = smtp_kit.Repeated(
            "451 4.7.1 Later",
            times,  # type: ignore[arg-type]
            "250 2.1.5 OK",
        )
    assert server.rcpt_replies == {}
    # None deferred is a count too: the rule [then].
    server.rcpt_replies["a@example.org"] = smtp_kit.Repeated("451 4.7.1 Later", 0, "250 2.1.5 OK")
    assert [server.rcpt_rule("a@example.org") for _ in range(2)] == ["250 2.1.5 OK"] * 2


def test_scripts_need_the_right_kind_of_reply(fake_mx: FakeMX) -> None:
    with pytest.raises(ValueError, match="4xx"):
        fake_mx.defer("a@example.org", "550 5.1.1 nope")
    with pytest.raises(ValueError, match="5xx"):
        fake_mx.reject("a@example.org", "451 later")
    with pytest.raises(ValueError, match="5xx"):
        fake_mx.reject("a@example.org", "5501 too long a code")


@pytest.mark.parametrize(
    "reply", ["550 5.1.1 No such user\n", "550 5.1.1 No\r\n550 such user", "550 5.1.1 No\x00"]
)
def test_a_script_reply_is_one_line(fake_mx: FakeMX, reply: str) -> None:
    # A reply with a line break (a triple-quoted string's last one, say) was sent as is:
    # the client read the rest as the reply to its next command, and another recipient
    # of the transaction was deferred for a "malformed reply line".
    with pytest.raises(ValueError, match="one reply line"):
        fake_mx.reject("a@example.org", reply)
    with pytest.raises(ValueError, match="one reply line"):
        fake_mx.defer("a@example.org", "4" + reply[1:])
    assert "a@example.org" not in fake_mx.server.rcpt_replies


def test_any_domain_goes_to_the_fake_unless_its_records_are_set(fake_mx: FakeMX) -> None:
    fake_mx.dns.null_mx("no-mail.test")
    fake_mx.dns.nxdomain("typo.test")
    results = Results()
    to = {"x@anything.example", "y@no-mail.test", "z@typo.test"}
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        ms.send_email(mail(*sorted(to)))
        results.wait_final(to)
    assert results.states() == {
        "x@anything.example": DELIVERED,
        "y@no-mail.test": FAILED,
        "z@typo.test": FAILED,
    }


def test_resetting_the_zone_keeps_the_fakes_routing(fake_mx: FakeMX) -> None:
    """reset() (one fake for many hypothesis examples) forgot the records of the
    example before, and the fake's own too: every domain was NXDOMAIN after it, and
    every recipient failed as though the address did not exist."""
    fake_mx.dns.null_mx("no-mail.test")
    fake_mx.dns.reset()
    results = Results()
    to = {"x@anything.example", "y@no-mail.test"}
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        ms.send_email(mail(*sorted(to)))
        results.wait_final(to)
    assert results.states() == {"x@anything.example": DELIVERED, "y@no-mail.test": DELIVERED}
    assert fake_mx.dns.query_counts()  # the counts were reset, and count again


def test_the_config_verifies_the_fakes_certificate(fake_mx: FakeMX) -> None:
    config = replace(fake_mx.config, tls=TLSPolicy.VERIFY)
    with Mailstrom(config, store=MemoryStore()) as ms:
        ms.send_email(mail("bob@example.org"))
        [got] = fake_mx.wait_for(1)
    assert got.tls


def test_a_tls_context_changed_by_one_test_is_not_the_next_fakes() -> None:
    """Every FakeMX of a process handed out the same client context: a test that made
    its fake's context stricter (or trust nothing) changed it for every later test."""
    with FakeMX() as first:
        changed = first.config.tls_context
        assert changed is not None
        changed.maximum_version = ssl.TLSVersion.TLSv1_2
        changed.verify_flags |= ssl.VERIFY_X509_STRICT
    with FakeMX() as second:
        context = second.config.tls_context
        assert context is not None and context is not changed
        assert context.maximum_version is not ssl.TLSVersion.TLSv1_2
        with Mailstrom(replace(second.config, tls=TLSPolicy.VERIFY), store=MemoryStore()) as ms:
            ms.send_email(mail("bob@example.org"))
            [got] = second.wait_for(1)
    assert got.tls and got.tls_version == "TLSv1.3"


def test_a_worker_process_on_sqlite(fake_mx: FakeMX, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    try:
        with Mailstrom(fake_mx.config, store=store) as ms:
            assert ms.worker_mode == "process"
            ms.send_email(mail("bob@example.org"))
            [got] = fake_mx.wait_for(1)
        assert got.envelope_to == ["bob@example.org"]
    finally:
        store.close()


async def test_async_facade_and_wait_for_async(fake_mx: FakeMX) -> None:
    async with AsyncMailstrom(fake_mx.config, store=MemoryStore()) as ms:
        await ms.send_email(mail("bob@example.org"))
        [got] = await fake_mx.wait_for_async(1)
    assert got.envelope_to == ["bob@example.org"]
    with pytest.raises(AssertionError, match=r"received 1 messages, expected 2 within 0\.05s"):
        await fake_mx.wait_for_async(2, timeout=0.05)
    with capture(), pytest.raises(AssertionError, match="capture"):
        await fake_mx.wait_for_async(2, timeout=0.05)


def test_captured_mail_never_reaches_the_fake_until_released(fake_mx: FakeMX) -> None:
    store = MemoryStore()
    with Mailstrom(fake_mx.config, store=store) as ms:
        with capture() as outbox:
            mid = ms.send_email(mail("bob@example.org"))
            with pytest.raises(AssertionError, match="capture"):
                fake_mx.wait_for(1, timeout=0.5)
        assert [m.message_id for m in outbox] == [mid]
        store.set_held(mid, False)  # what only a deliberate release does
        ms.wake()
        [got] = fake_mx.wait_for(1)
    assert got.envelope_to == ["bob@example.org"]


def test_not_started() -> None:
    mx = FakeMX()
    with pytest.raises(RuntimeError, match="not started"):
        _ = mx.config
    mx.stop()  # harmless


def test_starting_twice_is_starting_once() -> None:
    # Started again by ``with``, the servers ran twice: the first pair was left running,
    # and stop() waited for ever for the threads of the DNS server nobody stopped.
    with FakeMX().start() as mx:
        port = mx.dns.port
        assert mx.start() is mx and mx.dns.start() is mx.dns and mx.dns.port == port
    assert mx.dns.port == port  # stopped: nothing left to wait for


def test_a_restarted_fake_keeps_its_scripts() -> None:
    # The scripts lived on the server a start made: after stop(); start() the new server
    # had none, and an address scripted to be refused was delivered.
    mx = FakeMX()
    mx.reject("early@example.org")  # scripts may come before the start, too
    with mx:
        mx.defer("busy@example.org", "451 4.2.1 Mailbox busy")
        mx.drop_after_dot("flaky@example.org")
    with mx:  # started again
        assert mx.server.drop_after_dot_rcpts == {"flaky@example.org"}
        with smtplib.SMTP("127.0.0.1", mx.server.port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("app@shop.test")
            assert client.rcpt("busy@example.org") == (451, b"4.2.1 Mailbox busy")
            assert client.rcpt("early@example.org")[0] == 550
            assert client.rcpt("bob@example.org")[0] == 250
        mx.accept("busy@example.org")
        with Mailstrom(mx.config, store=MemoryStore()) as ms:
            ms.send_email(mail("busy@example.org"))
            [got] = mx.wait_for(1)
    assert got.envelope_to == ["busy@example.org"]


def test_scripts_set_on_the_server_stay_the_fakes() -> None:
    # ``mx.server.rcpt_replies = {...}`` replaced the dict the server reads, and the
    # fake's methods went on editing the old one: a reject() after it was never applied,
    # and the next start() handed the new server the old scripts.
    mx = FakeMX()
    with mx:
        mx.server.rcpt_replies = {"set@example.org": "550 5.1.1 Set on the server"}
        mx.reject("later@example.org", "550 5.1.1 Rejected later")
        mx.server.stall_rcpts = set()
        mx.drop_after_dot("flaky@example.org")
        assert mx.server.drop_after_dot_rcpts == {"flaky@example.org"}
        with smtplib.SMTP("127.0.0.1", mx.server.port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("app@shop.test")
            assert client.rcpt("set@example.org") == (550, b"5.1.1 Set on the server")
            assert client.rcpt("later@example.org") == (550, b"5.1.1 Rejected later")
    with mx:  # started again: the same scripts
        with smtplib.SMTP("127.0.0.1", mx.server.port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("app@shop.test")
            assert client.rcpt("set@example.org")[0] == 550
            assert client.rcpt("later@example.org")[0] == 550
        assert mx.server.drop_after_dot_rcpts == {"flaky@example.org"}


def test_a_null_sender_is_an_empty_envelope_from(fake_mx: FakeMX) -> None:
    with Mailstrom(fake_mx.config, store=MemoryStore()) as ms:
        ms.send_email(mail("bob@example.org"), envelope_from="")
        [got] = fake_mx.wait_for(1)
    assert got.envelope_from == ""  # as its docstring says, not aiosmtpd's "<>"


def test_a_wait_on_a_stopped_server_ends_at_once() -> None:
    # A cancelled wait_for_async left its thread waiting out its timeout after the test
    # (and the loop's shutdown with it); nothing can arrive at a stopped server.
    outcome: list[str] = []

    def wait(mx: FakeMX) -> None:
        try:
            mx.wait_for(1, timeout=600)
        except AssertionError as exc:
            outcome.append(str(exc))

    with FakeMX() as mx:
        waiter = threading.Thread(target=wait, args=(mx,))
        waiter.start()
    waiter.join(30)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and "before it was stopped" in outcome[0]


def nothing_listens(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1 ``port`` (TCP): a connection is refused, or
    made to itself. A connection to a free port of the ephemeral range may get that very
    port as its source port (Linux picks even ones for connect()) and, by TCP's
    simultaneous open, connect to itself: not refused though nothing listens. That is
    one connection in some 14,000 to a free even port, and the DNS server's port is
    UDP's pick, even half the time: ``pytest.raises(ConnectionRefusedError)`` failed now
    and then. The next try gets another source port."""
    for _ in range(3):
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            return True
        with client:
            if client.getsockname() != client.getpeername():
                return False  # a server answered
    return False


def threads_started_from_here(monkeypatch: pytest.MonkeyPatch) -> set[threading.Thread]:
    """From now on, the threads this test's thread starts, and those they start in turn:
    not every thread of the process, where an earlier test's leftovers (a worker still
    ending, its executor, a hook post) may start threads meanwhile."""
    ours: set[threading.Thread] = set()
    here = threading.current_thread()
    start = threading.Thread.start

    def recorded(thread: threading.Thread) -> None:
        if threading.current_thread() is here or threading.current_thread() in ours:
            ours.add(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recorded)
    return ours


def test_a_server_that_cannot_start_leaves_no_loop_thread_or_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiosmtpd left the event loop of a start that failed (here: the port is taken) open,
    # with its self-pipe sockets: "unclosed event loop" surfaced later, under warnings as
    # errors, in whichever test the garbage collector happened to run.
    server_context, _ = tls_contexts("mx.test")
    unraisable: list[object] = []
    threads = threads_started_from_here(monkeypatch)
    with socket.socket() as taken, warnings.catch_warnings():
        warnings.simplefilter("error")  # a ResourceWarning in __del__ becomes unraisable
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
        with pytest.raises(OSError, match="address already in use"):
            start_receiving_server(server_context, port=taken.getsockname()[1])
        gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []  # type: ignore[attr-defined]
    assert threads and not [t for t in threads if t.is_alive()]


def test_what_arrived_can_be_read_after_the_with_block() -> None:
    # Leaving ``with FakeMX()`` threw the server away: reading what had arrived, the
    # natural next line of a test, raised RuntimeError("FakeMX is not started").
    with FakeMX() as mx, Mailstrom(mx.config, store=MemoryStore()) as ms:
        ms.send_email(mail("bob@example.org"))
        mx.wait_for(1)
    [got] = mx.received
    assert got.envelope_to == ["bob@example.org"]
    assert mx.server.messages == [got]
    with pytest.raises(AssertionError, match="before it was stopped"):
        mx.wait_for(2)  # nothing more can arrive: at once, not after the timeout


def test_a_receiving_server_bounds_the_size_of_a_message_by_default() -> None:
    """Without ``size_limit`` a server took messages of any size, holding each in memory:
    one test could make it hold gigabytes. It now advertises SIZE and refuses with 552
    above a default well above what mailstrom sends; ``size_limit`` sets another, and
    ``None`` none."""
    server_context, _ = tls_contexts("mx.test")
    limit = 35 * 1024 * 1024  # Config.max_message_size's default: must still pass
    with start_receiving_server(server_context) as mx, smtplib.SMTP(mx.host, mx.port) as client:
        client.ehlo("client.test")
        assert int(client.esmtp_features["size"]) == smtp_kit.DEFAULT_SIZE_LIMIT > limit
        code, _ = client.docmd(f"MAIL FROM:<a@shop.test> SIZE={smtp_kit.DEFAULT_SIZE_LIMIT + 1}")
        assert code == 552
        code, _ = client.docmd(f"MAIL FROM:<a@shop.test> SIZE={limit}")
        assert code == 250
    with (
        start_receiving_server(server_context, size_limit=1000) as mx,
        smtplib.SMTP(mx.host, mx.port) as client,
    ):
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "1000"
        client.mail("a@shop.test")  # no SIZE given: the content itself is too big
        client.rcpt("b@example.org")
        code, _ = client.data(b"Subject: x\r\n\r\n" + (b"x" * 50 + b"\r\n") * 40)
        assert code == 552
        assert mx.messages == []
    with (
        start_receiving_server(server_context, size_limit=None) as mx,
        smtplib.SMTP(mx.host, mx.port) as client,
    ):
        client.ehlo("client.test")
        assert "size" not in client.esmtp_features


def test_a_receiving_server_stops_when_its_with_block_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A ReceivingServer was no context manager, unlike FakeMX and LoopbackDNS: a test
    # that failed before its own stop() left the thread, loop and listening socket.
    server_context, _ = tls_contexts("mx.test")
    threads = threads_started_from_here(monkeypatch)
    ports: list[int] = []

    def failing_test() -> None:
        with start_receiving_server(server_context) as mx:
            ports.append(mx.port)
            raise LookupError("the test failed here")

    with pytest.raises(LookupError, match="failed here"):
        failing_test()
    [port] = ports
    assert threads and not [t for t in threads if t.is_alive()]
    assert nothing_listens(port)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("waiting", ["wait_for_async", "await_messages"])
def test_a_cancelled_async_wait_leaves_nothing_waiting(loop: str, waiting: str) -> None:
    # The async waits blocked a thread of the loop's default executor: cancelled (an
    # asyncio.timeout, a TaskGroup whose other task failed), that thread waited out the
    # wait's whole timeout, and closing the event loop waited for it, before a fixture's
    # teardown could stop the server (pytest-asyncio: 10 s per such test, by default).
    uvloop = pytest.importorskip("uvloop") if loop == "uvloop" else None

    def wait(mx: FakeMX) -> Callable[[], Awaitable[object]]:
        if waiting == "wait_for_async":
            return lambda: mx.wait_for_async(1, timeout=600)
        return lambda: mx.server.await_messages(1, within=600)

    async def cancelled(mx: FakeMX) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await wait(mx)()

    def run(mx: FakeMX) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as r:
            r.run(cancelled(mx))

    with FakeMX() as mx:
        runner = threading.Thread(target=run, args=(mx,))
        runner.start()
        runner.join(60)  # the loop closes at once; before, only after the 600 s
        closed_while_running = not runner.is_alive()
    runner.join()
    assert closed_while_running


def test_a_server_with_implicit_tls_treats_its_connections_as_tls() -> None:
    # Over TLS from the first byte (port 465), the server offered STARTTLS again (RFC 3207
    # §4.2: never after TLS), demanded it with require_starttls (530 to MAIL), and with
    # requiretls offered no REQUIRETLS and refused it on MAIL (555): it counted only a
    # connection that had given STARTTLS as one over TLS.
    import smtplib

    server_context, client_context = tls_contexts("mx.test", "127.0.0.1")
    with start_receiving_server(
        server_context, implicit_tls=True, require_starttls=True, requiretls=True
    ) as mx:
        client = smtplib.SMTP_SSL("127.0.0.1", mx.port, context=client_context, timeout=10)
        try:
            client.ehlo("client.test")
            assert not client.has_extn("starttls")
            assert client.has_extn("requiretls")
            assert client.docmd("MAIL FROM:<app@shop.test> REQUIRETLS")[0] == 250
            assert client.docmd("RCPT TO:<bob@example.org>")[0] == 250
            client.data(b"Subject: Hi\r\n\r\nHello\r\n")
        finally:
            client.quit()
        [got] = mx.wait_for_messages(1)
    assert got.tls and got.mail_options == ("REQUIRETLS",)


def test_a_server_without_auth_offers_no_auth(fake_mx: FakeMX) -> None:
    """Without ``auth`` a server offered AUTH LOGIN PLAIN once over TLS (aiosmtpd's
    default), and refused every login with 535: a client with credentials, sent to a
    relay that has no AUTH, saw "credentials invalid" where it meets no AUTH at all."""
    import smtplib

    client = smtplib.SMTP("127.0.0.1", fake_mx.server.port, timeout=10)
    try:
        client.starttls(context=fake_mx.config.tls_context)
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH PLAIN AGFwcABwdw==")[0] == 502
    finally:
        client.quit()
    relay = RelayConfig(host="127.0.0.1", port=fake_mx.server.port, username="app", password="pw")
    results = Results()
    config = replace(fake_mx.config, relay=relay)
    with Mailstrom(config, store=MemoryStore(), on_result=results) as ms:
        mid = ms.send_email(mail("bob@example.org"))
        results.wait_count(1)
        [bob] = ms.query_status(mid).recipients
    assert "offers no AUTH mechanism" in (bob.reason or ""), bob


def test_a_stall_or_drop_point_set_on_the_server_is_checked(fake_mx: FakeMX) -> None:
    # start_receiving_server(stall_on=...) refused an unknown point, but the attribute the
    # docs set (``fake_mx.server.stall_on = "data"``) took anything: "DATA", as SMTP spells
    # it, or a typo never matched a command, so the server answered as if nothing was set.
    server = fake_mx.server
    for attribute in ("stall_on", "drop_on"):
        with pytest.raises(ValueError, match="unknown stall/drop point 'rcpt to'"):
            setattr(server, attribute, "rcpt to")
        assert getattr(server, attribute) is None
        setattr(server, attribute, "DATA")
        assert getattr(server, attribute) == "data"
        setattr(server, attribute, None)
    server_context, _ = tls_contexts("mx.test")
    with start_receiving_server(server_context, stall_on="RCPT", drop_on="Dot") as mx:
        assert (mx.stall_on, mx.drop_on) == ("rcpt", "dot")


def test_records_set_on_an_alias_end_the_alias(fake_mx: FakeMX) -> None:
    # cname() replaced a name's other records, but records set on an alias afterwards
    # were never served: the CNAME kept answering, so a test that made an alias a host of
    # its own (here, its MX host) still reached the old target's address.
    zone = fake_mx.dns
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [zone.address], zone.port
    zone.cname("mx.example.org", "old.example.net")
    zone.a("old.example.net", "127.0.0.2")
    zone.a("mx.example.org", "127.0.0.3")
    answer = resolver.resolve("mx.example.org", "A")
    assert answer.canonical_name == dns.name.from_text("mx.example.org")
    assert [r.to_text() for r in answer] == ["127.0.0.3"]
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mx.example.org", "CNAME")


@pytest.mark.parametrize("failure", ["nxdomain", "servfail", "drop"])
def test_an_alias_set_on_a_failing_name_ends_the_failure(fake_mx: FakeMX, failure: str) -> None:
    # Records set on a name made to fail end the failure, as a zone fixed by its owner
    # does; cname() kept it: the name fixed by making it an alias still answered NXDOMAIN,
    # SERVFAIL or nothing at all, and the test saw an outage it had ended.
    zone = fake_mx.dns
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = [zone.address], zone.port, 2.0
    zone.a("host.example.net", "127.0.0.2")
    getattr(zone, failure)("www.example.org")
    zone.cname("www.example.org", "host.example.net")
    answer = resolver.resolve("www.example.org", "A")
    assert answer.canonical_name == dns.name.from_text("host.example.net")
    assert [r.to_text() for r in answer] == ["127.0.0.2"]


def test_a_reply_list_given_to_several_rules_is_taken_by_each(fake_mx: FakeMX) -> None:
    # A list rule was used up in place: one greylisting list given to two addresses (or
    # a test module's constant, to two servers) deferred the first address only, and
    # accepted the second at once, as though it had been greylisted already.
    greylist = ["451 4.7.1 Greylisted", "250 2.1.5 OK"]
    server = fake_mx.server
    server.rcpt_replies["a@example.org"] = greylist
    server.rcpt_replies["b@example.org"] = greylist
    server.mail_reply = server.data_reply = greylist[1:]
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        for expected in (451, 250):
            assert client.mail("app@shop.test")[0] == 250
            assert client.rcpt("a@example.org")[0] == expected
            assert client.rcpt("b@example.org")[0] == expected
            client.rset()
    assert greylist == ["451 4.7.1 Greylisted", "250 2.1.5 OK"]  # the test's own list


def test_a_reply_list_set_again_starts_over(fake_mx: FakeMX) -> None:
    # A rule's turn was kept per list object: the same greylisting list (a test module's
    # constant, a tuple literal) set again for an address (or in a new rcpt_replies), or
    # as mail_reply, went on from where it was and accepted at once, where the test had
    # just greylisted it anew.
    greylist = ("451 4.7.1 Greylisted", "250 2.1.5 OK")
    server = fake_mx.server
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        for setting in ("item", "item", "whole"):
            if setting == "item":
                server.rcpt_replies["a@example.org"] = greylist
            else:
                server.rcpt_replies = {"a@example.org": greylist}
            server.mail_reply = greylist
            assert client.mail("app@shop.test")[0] == 451
            assert client.mail("app@shop.test")[0] == 250
            assert [client.rcpt("a@example.org")[0] for _ in range(3)] == [451, 250, 250]
            client.rset()


def test_a_rules_mapping_shared_by_two_servers_starts_over_on_both() -> None:
    # Two MX hosts given one rcpt_replies (mx2.rcpt_replies = mx1.rcpt_replies): a rule
    # set again through it started over on the first server only, which that mapping
    # told; the second went on where it was and accepted an address greylisted anew.
    greylist = ("451 4.7.1 Greylisted", "250 2.1.5 OK")
    server_context, _ = tls_contexts("mx.test")
    with (
        start_receiving_server(server_context) as one,
        start_receiving_server(server_context) as two,
    ):
        two.rcpt_replies = one.rcpt_replies
        clients = [smtplib.SMTP("127.0.0.1", s.port, timeout=10) for s in (one, two)]
        try:
            for client in clients:
                client.ehlo("client.test")
            for _ in range(2):
                two.rcpt_replies["a@example.org"] = greylist  # through either server
                for client in clients:
                    assert client.mail("app@shop.test")[0] == 250
                    assert [client.rcpt("a@example.org")[0] for _ in range(3)] == [451, 250, 250]
                    client.rset()
        finally:
            for client in clients:
                client.close()


def test_a_closed_connection_is_not_kept_by_its_server() -> None:
    # The controller kept every connection's protocol object until the server stopped,
    # with its TLS state (a few hundred kB each): a server used across a long session
    # grew with every connection it had ever accepted.
    server_context, client_context = tls_contexts("mx.test", "127.0.0.1")
    with start_receiving_server(server_context) as mx:
        for _ in range(3):
            with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
                client.starttls(context=client_context)
                client.sendmail("app@shop.test", ["bob@example.org"], b"Subject: Hi\r\n\r\nHi\r\n")
        mx.wait_for_messages(3)
        deadline = time.monotonic() + 10
        while mx.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)  # the server's loop thread sees each close soon after
        assert mx.open_connections == 0
        gc.collect()
        # type(), not isinstance(): that asks every object its __class__, and a lazy object
        # of a library the suite loaded (Django's staticfiles storage) sets itself up then.
        kept = [o for o in gc.get_objects() if type(o) is _SMTP and o._fixture is mx]
        assert len(kept) <= 1  # aiosmtpd's controller holds the last it made (``smtpd``)


async def test_a_blocking_wait_in_async_code_says_to_await(fake_mx: FakeMX) -> None:
    # fake_mx.wait_for() in an async test blocks the event loop the worker delivers on,
    # so nothing arrives; it failed saying only "received 0 messages ... within 0.5s",
    # which reads as a delivery that went wrong, not as a wait that stopped it.
    async with AsyncMailstrom(fake_mx.config, store=MemoryStore()) as ms:
        await ms.send_email(mail("bob@example.org"))
        with pytest.raises(AssertionError, match=r"await fake_mx\.wait_for_async\(1\)"):
            fake_mx.wait_for(1, timeout=0.5)
        [got] = await fake_mx.wait_for_async(1)
    assert got.envelope_to == ["bob@example.org"]


def test_a_failed_wait_says_what_the_server_saw(fake_mx: FakeMX) -> None:
    # A wait that timed out said only "received 0 messages, expected 1 within 10s": not
    # that the client came and had its recipient deferred at RCPT, nor which messages
    # did arrive, the first thing a test's author then has to find out.
    fake_mx.defer("busy@example.org", "451 4.2.1 Mailbox busy")
    fake_mx.server.data_reply = "554 5.6.0 Content refused"
    results = Results()
    with Mailstrom(fake_mx.config, store=MemoryStore(), on_result=results) as ms:
        ms.send_email(mail("busy@example.org"))
        ms.send_email(mail("bob@example.org", subject="Refused"))
        results.wait_final({"busy@example.org", "bob@example.org"})
    with pytest.raises(AssertionError) as failed:
        fake_mx.server.wait_for_messages(1, timeout=0.05)
    said = str(failed.value)
    assert "accepted 0 messages, expected 1" in said
    assert "busy@example.org: '451 4.2.1 Mailbox busy'" in said  # the RCPT reply
    # What arrived, with the reply it got.
    assert "['bob@example.org']" in said and "'554 5.6.0 Content refused'" in said


def test_a_failed_wait_says_how_far_each_connection_got() -> None:
    # A wait that timed out listed the connections, RCPT replies and what arrived, and
    # nothing of a connection that failed before RCPT: a refused MAIL, a failed TLS
    # handshake, a refusing greeting, a client that left after EHLO all read "1
    # connection(s)", though the server had the commands and its replies.
    server_context, _ = tls_contexts("mx.test", "127.0.0.1")
    with start_receiving_server(server_context) as mx:
        mx.mail_reply = "550 5.7.1 Sender refused"
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
            client.ehlo("one.test")
            assert client.mail("app@shop.test")[0] == 550
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
            client.ehlo("two.test")
            with pytest.raises(ssl.SSLError):  # the default context trusts no throwaway CA
                client.starttls(context=ssl.create_default_context())
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
            client.ehlo("three.test")  # and leaves without a MAIL
        mx.greeting = "421 4.3.2 Go away"
        with pytest.raises(smtplib.SMTPConnectError, match="Go away"):
            smtplib.SMTP("127.0.0.1", mx.port, timeout=10)
        deadline = time.monotonic() + 10
        while mx.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)  # the server's loop thread sees each close soon after
        with pytest.raises(AssertionError) as failed:
            mx.wait_for_received(1, timeout=0.05)
    said = str(failed.value)
    first, second, third, fourth = said.split("; connection ")[1:]
    assert "MAIL FROM:<app@shop.test>" in first and "'550 5.7.1 Sender refused'" in first
    assert "STARTTLS" in second and "TLS handshake not completed" in second
    assert "EHLO three.test" in third and "closed" in third and "MAIL" not in third
    assert "'421 4.3.2 Go away'" in fourth and "closed" in fourth


def test_a_failed_wait_reads_a_multiline_reply_as_one() -> None:
    # Only a reply's first line was noted, so a multi-line one ("220-" then "220 ") left
    # the next reply read as its continuation, and out of what a failed wait says: the
    # EHLO after such a greeting, the RSET after such a refusal of MAIL.
    server_context, _ = tls_contexts("mx.test", "127.0.0.1")
    with start_receiving_server(server_context) as mx:
        mx.greeting = "220-mx.test ESMTP\n220 Welcome"
        client = smtplib.SMTP("127.0.0.1", mx.port, timeout=10)
        client.ehlo("one.test")
        client.close()  # no QUIT: the last three exchanges shown are these
        mx.greeting = None
        mx.mail_reply = "550-5.7.1 Sender refused\r\n550 5.7.1 See the policy"
        client = smtplib.SMTP("127.0.0.1", mx.port, timeout=10)
        client.ehlo("two.test")
        assert client.mail("app@shop.test")[0] == 550
        assert client.rset()[0] == 250
        client.close()
        with pytest.raises(AssertionError) as failed:
            mx.wait_for_received(1, timeout=0.05)
    first, second = str(failed.value).split("; connection ")[1:]
    assert "greeting '220-mx.test ESMTP', 'EHLO one.test' answered '250-mx.test'" in first
    assert "unanswered" not in first
    assert "'MAIL FROM:<app@shop.test>' answered '550-5.7.1 Sender refused'" in second
    assert "'RSET' answered '250 OK'" in second


def test_a_failed_wait_bounds_what_it_says_of_connections() -> None:
    server_context, _ = tls_contexts("mx.test", "127.0.0.1")
    with start_receiving_server(server_context) as mx:
        for n in range(8):
            with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
                client.ehlo(f"client{n}.test")
                for _ in range(30):
                    client.noop()
                client.mail("x" * 500 + "@shop.test")
        with pytest.raises(AssertionError) as failed:
            mx.wait_for_received(1, timeout=0.05)
    said = str(failed.value)
    assert "(3 earlier connection(s) not shown)" in said
    assert "connection 3 from" not in said and "connection 8 from" in said
    assert "(21 earlier commands) NOOP" in said and "x" * 200 not in said
    assert len(said) < 3000  # a few lines per connection, each line cut short


def test_a_failed_wait_says_when_no_client_came() -> None:
    with FakeMX() as mx, pytest.raises(AssertionError, match="no client connected"):
        mx.wait_for(1, timeout=0.05)


async def test_a_wait_returns_the_first_count_messages_however_many_arrived(
    fake_mx: FakeMX,
) -> None:
    """``[got] = fake_mx.wait_for(1)``, as the docs write it, failed with "too many values
    to unpack" once a second message had arrived too: every wait returned all that had."""
    with Mailstrom(fake_mx.config, store=MemoryStore()) as ms:
        ms.send_email(mail("bob@example.org", subject="one"))
        fake_mx.wait_for(1)
        ms.send_email(mail("carol@example.org", subject="two"))
        both = fake_mx.wait_for(2)
    first, second = fake_mx.received
    assert both == [first, second]
    [got] = fake_mx.wait_for(1)
    assert got is first
    assert await fake_mx.wait_for_async(1) == [first]
    assert fake_mx.server.wait_for_messages(1) == [first]
    assert await fake_mx.server.await_messages(1) == [first]
    assert fake_mx.wait_for(0) == []


def test_an_empty_reply_list_is_refused_when_set(fake_mx: FakeMX) -> None:
    # An empty list of replies gives no reply: the server took it, and the RCPT (or MAIL,
    # or DATA) it was for failed inside aiosmtpd with an IndexError, a 500 to the client.
    server = fake_mx.server
    with pytest.raises(ValueError, match=r"rcpt_replies\[.nobody@example\.org.\]"):
        server.rcpt_replies["nobody@example.org"] = []
    with pytest.raises(ValueError, match=r"rcpt_replies\[.nobody@example\.org.\]"):
        server.rcpt_replies.update({"nobody@example.org": ()})
    with pytest.raises(ValueError, match=r"rcpt_replies\[.nobody@example\.org.\]"):
        server.rcpt_replies.setdefault("nobody@example.org", [])
    with pytest.raises(ValueError, match=r"rcpt_replies\[.nobody@example\.org.\]"):
        server.rcpt_replies |= {"nobody@example.org": []}
    with pytest.raises(ValueError, match="mail_reply"):
        server.mail_reply = []
    with pytest.raises(ValueError, match="data_reply"):
        server.data_reply = []
    assert server.rcpt_replies == {}
    assert (server.mail_reply, server.data_reply) == (None, None)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("app@shop.test")[0] == 250
        assert client.rcpt("nobody@example.org")[0] == 250


def test_the_dns_server_stops_when_the_smtp_server_fails_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FakeMX.stop() stopped the SMTP server first: when that raised (its 10 s wait for the
    # connections to close timed out), the DNS server's threads and sockets stayed behind.
    threads = threads_started_from_here(monkeypatch)
    mx = FakeMX().start()
    port = mx.dns.port
    controller = mx.server._controller
    assert controller is not None

    def timing_out(no_assert: bool = False) -> None:
        raise TimeoutError("the connections did not close in time")

    monkeypatch.setattr(controller, "stop", timing_out)
    with pytest.raises(TimeoutError, match="did not close"):
        mx.stop()
    dns_threads = [t for t in threads if t.name == f"loopback-dns-{port}"]
    assert dns_threads and not [t for t in dns_threads if t.is_alive()]
    assert nothing_listens(port)
    # The SMTP server's stop failed: stop() tries it again, and then it is stopped.
    monkeypatch.delattr(controller, "stop")
    smtp_port = mx.server.port
    mx.stop()
    assert nothing_listens(smtp_port)
    mx.stop()  # nothing left to stop: harmless


class _BlockingRules(dict[str, str]):
    """``rcpt_replies`` whose lookup blocks the server's event loop until released: a
    handler that does not return to the loop."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.entered = entered
        self.release = release

    def get(self, key: str, default: Any = None) -> Any:
        self.entered.set()
        self.release.wait(30)
        return default


def test_a_stop_that_times_out_still_stops_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # The controller's stop waited (10 s) for the connections to close on the server's
    # loop, and when that timed out (a handler blocking the loop) it raised before it
    # called aiosmtpd's stop: the loop went on running in its thread for the process's
    # life, unless the test called stop() again. The stop still raises, and aiosmtpd's
    # stop follows once the loop is free: the thread ends and the port is freed.
    monkeypatch.setattr(smtp_kit, "_STOP_TIMEOUT", 0.5)
    server_context, _ = tls_contexts("mx.test")
    server = start_receiving_server(server_context)
    assert server._controller is not None
    thread = server._controller._thread
    assert thread is not None
    entered, release = threading.Event(), threading.Event()
    server.rcpt_replies = _BlockingRules(entered, release)
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)

    def rcpt() -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.rcpt("a@example.org")

    asking = threading.Thread(target=rcpt, daemon=True)
    try:
        client.ehlo("client.test")
        assert client.mail("app@shop.test")[0] == 250
        asking.start()
        assert entered.wait(10)
        with pytest.raises(TimeoutError, match="blocked"):
            server.stop()
    finally:
        release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert nothing_listens(server.port)
    server.stop()  # what is left of the stop is over: harmless
    asking.join(10)
    assert not asking.is_alive()
    client.close()


def test_a_wait_ends_when_the_server_stop_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # ReceivingServer.stop() marked itself stopped (and woke the waits) only after its
    # controller's stop returned: when that raised (the 10 s wait for the connections
    # timed out), a wait in another thread went on for its whole timeout.
    server_context, _ = tls_contexts("mx.test")
    outcome: list[str] = []
    server = start_receiving_server(server_context)
    controller = server._controller
    assert controller is not None

    def timing_out(no_assert: bool = False) -> None:
        raise TimeoutError("the connections did not close in time")

    def wait() -> None:
        try:
            server.wait_for_received(1, timeout=600)
        except AssertionError as exc:
            outcome.append(str(exc))

    monkeypatch.setattr(controller, "stop", timing_out)
    waiter = threading.Thread(target=wait, daemon=True)  # not left to hold up the run
    waiter.start()
    with pytest.raises(TimeoutError, match="did not close"):
        server.stop()
    waiter.join(30)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and "before it was stopped" in outcome[0]
    # The failed stop is tried again, and then the server is stopped.
    monkeypatch.delattr(controller, "stop")
    server.stop()
    assert nothing_listens(server.port)
    server.stop()  # nothing left to stop: harmless


def test_a_client_breaking_off_the_tls_handshake_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiosmtpd logged "SMTP session exception" at ERROR with a traceback whenever a
    # client broke off the handshake after STARTTLS, which tests of failing TLS do.
    server_context, _ = tls_contexts("mx.test")
    server = start_receiving_server(server_context, name="mx.test")

    def told() -> bool:
        return any("TLS handshake failed" in r.getMessage() for r in caplog.records)

    try:
        with (
            caplog.at_level("INFO", logger="mail.log"),
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
            sock.makefile("rb") as reader,
        ):
            assert reader.readline().startswith(b"220 ")
            sock.sendall(b"EHLO client.test\r\n")
            while reader.readline()[3:4] != b" ":
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert reader.readline().startswith(b"220 ")
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # no ClientHello
            assert reader.read() == b""  # the server hangs up
            # The line comes from the server's thread, maybe after the hang-up.
            deadline = time.monotonic() + 10
            while not told() and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        server.stop()
    assert [r for r in caplog.records if r.levelno >= 40] == []
    assert told()
