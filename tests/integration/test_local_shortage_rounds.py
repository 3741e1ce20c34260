"""A round of delivery in which the destination answered, and then this host ran out of
sockets (EMFILE) before it was done: a recipient whose destination was tried spends an
attempt, deferred with what the destination did (runtime/dispatch.py's ``_Work.met``);
only one never tried spends none (:class:`~mailstrom.errors.LocalResourceShortage`)."""

from __future__ import annotations

import asyncio.base_events
import errno
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailstrom import Config, Email, Mailstrom, ReasonClass, RecipientState, Timeouts
from mailstrom.config import EventLoop
from mailstrom.stores import MemoryStore
from tests.fixtures.dns_server import LoopbackDNS
from tests.support.delivery import Results

DEFERRED = RecipientState.DEFERRED
DELIVERED = RecipientState.DELIVERED
FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)


def hello(to: str) -> Email:
    return Email(from_="App <app@sender.test>", to=[to], subject="Hi", text="Hello")


@pytest.fixture
def no_socket_for(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[str], bool]], None]:
    """Make connecting to an address ``refuse(ip)`` picks fail as a host out of file
    descriptors does (EMFILE), for the asyncio loop the worker runs on."""

    def install(refuse: Callable[[str], bool]) -> None:
        real = asyncio.base_events.BaseEventLoop.create_connection

        async def create_connection(
            self: Any, factory: Any, host: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            if isinstance(host, str) and refuse(host):
                raise OSError(errno.EMFILE, "Too many open files")
            return await real(self, factory, host, *args, **kwargs)

        monkeypatch.setattr(
            asyncio.base_events.BaseEventLoop, "create_connection", create_connection
        )

    return install


@pytest.fixture
def start(dns_server: LoopbackDNS) -> Iterator[Callable[..., tuple[Mailstrom, Results]]]:
    started: list[Mailstrom] = []

    def make(port: int, **overrides: Any) -> tuple[Mailstrom, Results]:
        results = Results()
        options: dict[str, Any] = {
            "helo_name": "client.test",
            "smtp_port": port,
            "dns": dns_server.dns_config,
            "allow_loopback": True,
            "timeouts": FAST,
            "event_loop": EventLoop.ASYNCIO,  # whose create_connection no_socket_for wraps
        }
        options.update(overrides)
        ms = Mailstrom(Config(**options), store=MemoryStore(), on_result=results)
        ms.start()
        started.append(ms)
        return ms, results

    yield make
    for ms in started:
        ms.stop(timeout=5)


@pytest.mark.parametrize("greeting", ["554 5.3.2 Not accepting mail here", None])
def test_a_first_mx_that_refused_counts_an_attempt_when_the_second_had_no_socket(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    start: Callable[..., tuple[Mailstrom, Results]],
    no_socket_for: Callable[[Callable[[str], bool]], None],
    greeting: str | None,
) -> None:
    # mx1 refuses the connection (by its greeting, or nothing listens there); connecting
    # to mx2 then fails on this host (EMFILE). The recipient was deferred with "local
    # resource shortage" and no attempt counted, as though no server had been asked: a
    # destination that refuses every connection was tried for ever at the short retry,
    # its recipients' max_attempts never reached.
    other = smtp_server(host="127.0.0.3")
    if greeting is not None:
        refusing = smtp_server(host="127.0.0.2", port=other.port, greeting=greeting)
    dns_server.mx("two.test", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", "127.0.0.2")
    dns_server.a("mx2.test", other.host)
    no_socket_for(lambda ip: ip == other.host)
    ms, results = start(other.port)
    mid = ms.send_email(hello("bob@two.test"))
    results.wait_final({"bob@two.test"})
    bob = ms.query_status(mid).recipient("bob@two.test")
    assert (bob.state, bob.attempts) == (DEFERRED, 1), bob.error
    assert bob.mx_host == "mx1.test"
    assert bob.reason_class is not ReasonClass.LOCAL
    if greeting is not None:
        assert bob.reply is not None and bob.reply.code == 554
        assert refusing.connections == 1
    else:
        assert bob.error is not None and "cannot connect to 127.0.0.2" in bob.error
    assert other.connections == 0


def test_a_transaction_the_first_mx_broke_counts_an_attempt_when_the_second_had_no_socket(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    start: Callable[..., tuple[Mailstrom, Results]],
    no_socket_for: Callable[[Callable[[str], bool]], None],
) -> None:
    # mx1 accepts the envelope and hangs up at DATA; the next address, mx2, cannot be
    # connected to for want of a descriptor here.
    breaking = smtp_server(host="127.0.0.2", drop_on="data")
    other = smtp_server(host="127.0.0.3", port=breaking.port)
    dns_server.mx("two.test", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", breaking.host)
    dns_server.a("mx2.test", other.host)
    no_socket_for(lambda ip: ip == other.host)
    ms, results = start(breaking.port)
    mid = ms.send_email(hello("bob@two.test"))
    results.wait_final({"bob@two.test"})
    bob = ms.query_status(mid).recipient("bob@two.test")
    assert (bob.state, bob.attempts) == (DEFERRED, 1)
    assert bob.mx_host == "mx1.test"
    assert bob.error is not None and "closed the connection" in bob.error, bob.error
    assert bob.reason_class is not ReasonClass.LOCAL


def test_work_never_tried_in_the_round_still_counts_none(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    start: Callable[..., tuple[Mailstrom, Results]],
    no_socket_for: Callable[[Callable[[str], bool]], None],
) -> None:
    # One connection takes the first message and refuses the next (its limit per
    # connection); the new connection for that one fails here: it was not tried, and
    # spends no attempt.
    mx = smtp_server(host="127.0.0.2")
    mx.messages_per_connection = 1
    dns_server.mx("one.test", [(10, "mx1.test")])
    dns_server.a("mx1.test", mx.host)
    made: list[str] = []

    def second_and_later(ip: str) -> bool:
        made.append(ip)
        return len(made) > 1

    no_socket_for(second_and_later)
    ms, results = start(mx.port, max_per_destination=1)
    first = ms.send_email(hello("a@one.test"))
    second = ms.send_email(hello("b@one.test"))
    results.wait_final({"a@one.test", "b@one.test"})
    a = ms.query_status(first).recipient("a@one.test")
    b = ms.query_status(second).recipient("b@one.test")
    assert (a.state, a.attempts) == (DELIVERED, 1)
    assert (b.state, b.attempts, b.reason_class) == (DEFERRED, 0, ReasonClass.LOCAL), b.error


def test_a_first_mx_that_refused_counts_an_attempt_when_the_second_could_not_be_sent_to(
    smtp_server: Any,
    dns_server: LoopbackDNS,
    start: Callable[..., tuple[Mailstrom, Results]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # mx1 refuses the connection by its greeting; mx2 has no 8BITMIME, and the encoders
    # that make the message 7-bit cannot load for want of a descriptor (EMFILE). _submit
    # deferred the recipient with "local resource shortage", no attempt: what mx1 said
    # was lost, against the rule of _fail_queue (a recipient the destination failed
    # first gets that failure, an attempt counted).
    refusing = smtp_server(host="127.0.0.2", greeting="554 5.3.2 Not accepting mail here")
    old = smtp_server(host="127.0.0.3", port=refusing.port, eightbitmime=False)
    dns_server.mx("two.test", [(10, "mx1.test"), (20, "mx2.test")])
    dns_server.a("mx1.test", refusing.host)
    dns_server.a("mx2.test", old.host)
    real = importlib.import_module("mailstrom.message.encoding")
    unloadable = types.ModuleType(real.__name__)

    def attribute(name: str) -> Any:
        if name == "downgrade_to_7bit":
            raise OSError(errno.EMFILE, "Too many open files")
        return getattr(real, name)

    unloadable.__getattr__ = attribute  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, real.__name__, unloadable)
    ms, results = start(refusing.port)
    mid = ms.send_email(
        "From: app@sender.test\r\nTo: bob@two.test\r\nSubject: 8bit\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße\r\n".encode()
    )
    results.wait_final({"bob@two.test"})
    bob = ms.query_status(mid).recipient("bob@two.test")
    assert (bob.state, bob.attempts) == (DEFERRED, 1), bob.error
    assert bob.mx_host == "mx1.test"
    assert bob.reply is not None and bob.reply.code == 554
    assert bob.reason_class is not ReasonClass.LOCAL
    assert old.connections == 1 and old.messages == []
