"""The facades' queue calls refuse bad arguments where they enter, with
:class:`~mailstrom.errors.InvalidArgument` (or the typed error of their kind), the same
way on every store, and change nothing then. One test per bug that
``test_api_fuzz.py`` found."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailstrom import AsyncMailstrom, Attachment, Config, Email, Mailstrom, prepare
from mailstrom.errors import (
    ConfigError,
    InvalidArgument,
    InvalidMessage,
    InvalidMessageType,
    InvalidQueueAttribute,
    InvalidSuppression,
    MailstromError,
)
from mailstrom.status import RecipientState
from mailstrom.stores import MemoryStore, SQLiteStore
from mailstrom.stores.base import QueueFilter, Store


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "q.db")
    yield made
    made.close()


@pytest.fixture
def ms(store: Store) -> Mailstrom:
    facade = Mailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    for n in range(3):
        facade.send_email(Email(from_="a@example.com", to=[f"b{n}@example.org"], text="x"))
    return facade


def test_a_negative_filter_limit_is_refused_not_read_as_no_limit(ms: Mailstrom) -> None:
    """SQLite read LIMIT -1 as no limit: ``hold(QueueFilter(limit=-1))`` held every
    message there and none in the memory store."""
    with pytest.raises(InvalidArgument) as raised:
        ms.hold(QueueFilter(limit=-1))
    assert raised.value.argument == "limit"
    assert ms.stats().held == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("limit", None),
        ("limit", 2**80),
        ("limit", 1.5),
        ("limit", True),
        ("older_than", 5),
        ("older_than", -timedelta(seconds=1)),
        ("older_than", timedelta(days=999_999_999)),
        ("held", "no"),
        ("domain", b"example.org"),
        ("domain", "\ud800.example"),
        ("domain", "a\x00b"),
        ("domain", "a" * 256),
        ("tag", 5),
        ("tag", "\udfff"),
        ("state", "bogus"),
        ("states", "queued"),
        ("states", 5),
    ],
)
def test_a_filter_field_of_the_wrong_kind_is_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        QueueFilter(**{field: value})  # type: ignore[arg-type]
    assert raised.value.argument == field


@pytest.mark.parametrize("field", ["domain", "tag"])
def test_a_filter_with_a_lone_surrogate_is_refused_not_sent_to_the_store(
    ms: Mailstrom, field: str
) -> None:
    """SQLite refused it with StoreRefusedData (as if the store were at fault); memory
    matched nothing."""
    with pytest.raises(InvalidArgument):
        ms.query(QueueFilter(**{field: "\ud800"}))  # type: ignore[arg-type]


def test_states_given_by_value_match_the_same_messages_in_every_store(ms: Mailstrom) -> None:
    """``state="queued"`` matched every message in SQLite and none in the memory store
    (which compared the string with ``is``)."""
    assert len(ms.query(QueueFilter(state="queued"))) == 3  # type: ignore[arg-type]
    assert len(ms.query(QueueFilter(states=frozenset({"queued"})))) == 3  # type: ignore[arg-type]
    assert QueueFilter(state="failed").state is RecipientState.FAILED  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [-1, None, 2**63, 1.5])
def test_query_recent_takes_a_limit_every_store_reads_alike(ms: Mailstrom, limit: object) -> None:
    """``query_recent(-1)`` returned every message from SQLite (LIMIT -1) and all but the
    last from memory; None, a float or a limit past a bigint were a TypeError in memory
    and StoreRefusedData in SQLite."""
    with pytest.raises(InvalidArgument) as raised:
        ms.query_recent(limit)  # type: ignore[arg-type]
    assert raised.value.argument == "limit"


@pytest.mark.parametrize("cap", [-1, None, 2**63, 1.5])
def test_count_takes_a_cap_every_store_reads_alike(ms: Mailstrom, cap: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        ms.count(cap=cap)  # type: ignore[arg-type]
    assert raised.value.argument == "cap"


@pytest.mark.parametrize("where", [5, "example.org", b"x", {"state": "queued"}])
def test_query_and_count_take_a_filter_or_none(ms: Mailstrom, where: object) -> None:
    for call in (ms.query, ms.count):
        with pytest.raises(InvalidArgument) as raised:
            call(where)  # type: ignore[operator]
        assert raised.value.argument == "where"


@pytest.mark.parametrize(
    ("after", "limit", "argument"),
    [
        ("", -1, "limit"),
        ("", None, "limit"),
        ("", 2**63, "limit"),
        (None, 10, "after"),
        (5, 10, "after"),
        (b"a", 10, "after"),
        ("\ud800", 10, "after"),
        ("a\x00", 10, "after"),
        ("x" * 321, 10, "after"),
    ],
)
def test_suppressions_pages_only_by_a_target_and_a_count(
    ms: Mailstrom, after: object, limit: object, argument: str
) -> None:
    """A lone surrogate was StoreRefusedData in SQLite and a match in memory; None, an
    int or bytes a TypeError in memory and a quiet comparison in SQLite."""
    ms.suppress("x@y.example")
    with pytest.raises(InvalidArgument) as raised:
        ms.suppressions(after=after, limit=limit)  # type: ignore[arg-type]
    assert raised.value.argument == argument
    assert [e.target for e in ms.suppressions(after="\u00e9" * 100, limit=0)] == []


async def test_suppressions_start_after_a_target_written_as_suppress_takes_it(
    store: Store,
) -> None:
    """``after`` was compared as given: "Bob@Example.org" sorts before every lower-case
    target, so the page started at the first entry, and "Bücher.example" after every
    ASCII target, so its own entry came back. Taken as ``suppress`` and ``mailstrom
    suppress list --after`` take a target, the page starts after that entry."""
    ms = Mailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    for target in ("ann@example.org", "bob@example.org", "carol@example.org"):
        ms.suppress(target)
    ms.suppress("bücher.example")
    ms.suppress("zed.example")
    assert [e.target for e in ms.suppressions(after="Bob@Example.org")] == [
        "carol@example.org",
        "xn--bcher-kva.example",
        "zed.example",
    ]
    assert [e.target for e in ms.suppressions(after=" Bücher.example ")] == ["zed.example"]
    assert [e.target for e in await ams.suppressions(after="<BOB@example.org>")] == [
        "carol@example.org",
        "xn--bcher-kva.example",
        "zed.example",
    ]
    # Text that is no target is a prefix, compared as the lower-case targets are.
    assert [e.target for e in ms.suppressions(after="C")] == [
        "carol@example.org",
        "xn--bcher-kva.example",
        "zed.example",
    ]


async def test_the_async_facade_checks_the_same_limits(store: Store) -> None:

    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    with pytest.raises(InvalidArgument):
        await ams.query_recent(-1)
    with pytest.raises(InvalidArgument):
        await ams.count(cap=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await ams.query(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await ams.suppressions(after="\ud800")


def test_a_naive_suspension_end_is_refused_before_a_store_keeps_it(ms: Mailstrom) -> None:
    """The memory store kept a naive ``until``; every look at the suspensions (each
    lease, next_due, suspensions()) then failed comparing it with an aware time."""
    with pytest.raises(InvalidArgument) as raised:
        ms.suspend("example.org", until=datetime(2099, 1, 1))
    assert raised.value.argument == "until"
    assert ms.suspensions() == []
    assert ms.store.next_due(now=datetime.now(UTC)) is not None


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"until": 5}, "until"),
        ({"until": "2099-01-01"}, "until"),
        ({"for_": 5}, "for_"),
        ({"for_": timedelta(days=999_999_999)}, "for_"),
        ({"for_": timedelta(seconds=-1)}, "for_"),
        ({"for_": timedelta(hours=1), "until": datetime(2099, 1, 1, tzinfo=UTC)}, "for_"),
    ],
)
def test_a_suspension_takes_a_duration_or_an_aware_end(
    ms: Mailstrom, kwargs: dict[str, object], argument: str
) -> None:
    """A huge ``for_`` was an OverflowError, an int a TypeError, and with both given
    ``until`` was silently ignored."""
    with pytest.raises(InvalidArgument) as raised:
        ms.suspend("example.org", **kwargs)  # type: ignore[arg-type]
    assert raised.value.argument == argument
    assert ms.suspensions() == []


@pytest.mark.parametrize("domain", [None, 5, b"example.org", ["example.org"], "", "a b", "x" * 300])
def test_suspend_and_resume_take_a_domain(ms: Mailstrom, domain: object) -> None:
    """Anything but a string was an AttributeError or TypeError; a bad string a plain
    ValueError quoting all of it."""
    for call in (ms.suspend, ms.resume):
        with pytest.raises(InvalidArgument) as raised:
            call(domain)  # type: ignore[operator]
        assert raised.value.argument == "domain"
        assert len(str(raised.value)) < 80


def _with_a_failed_message(store: Store) -> Mailstrom:
    """A facade whose clock stands still, holding one failed (cancelled) message."""
    now = datetime(2030, 1, 2, tzinfo=UTC)
    facade = Mailstrom(
        Config(helo_name="mail.example.com"), store=store, worker=None, clock=lambda: now
    )
    facade.cancel(facade.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x")))
    return facade


@pytest.mark.parametrize(
    "state", ["delivered", RecipientState.QUEUED, RecipientState.DEFERRED, "bogus", 5]
)
def test_purge_by_state_never_reads_another_state_as_failed(store: Store, state: object) -> None:
    """SQLite read every state but DELIVERED as FAILED: ``purge(state="delivered")`` (a
    string) or ``state=QUEUED`` deleted the failed messages; the memory store deleted
    none."""
    ms = _with_a_failed_message(store)
    if state == "delivered":
        assert ms.purge(timedelta(0), state=state) == 0  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidArgument) as raised:
            ms.purge(timedelta(0), state=state)  # type: ignore[arg-type]
        assert raised.value.argument == "state"
    assert ms.stats().messages == 1


@pytest.mark.parametrize(
    "older_than", [None, 5, timedelta(days=-999_999_999), timedelta(days=999_999_999), "1d"]
)
def test_purge_takes_an_age_of_at_most_100_years(store: Store, older_than: object) -> None:
    """A huge age was an OverflowError, anything but a timedelta a TypeError."""
    ms = _with_a_failed_message(store)
    with pytest.raises(InvalidArgument) as raised:
        ms.purge(older_than)  # type: ignore[arg-type]
    assert raised.value.argument == "older_than"
    assert ms.stats().messages == 1


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, 2**80, None, "1", True])
def test_wait_takes_a_finite_timeout(ms: Mailstrom, timeout: object) -> None:
    """NaN was a ValueError, infinity or 2**80 an OverflowError and None a TypeError,
    each from deep in the date arithmetic."""
    mid = ms.query_recent(1)[0].id
    with pytest.raises(InvalidArgument) as raised:
        ms.wait(mid, timeout)  # type: ignore[arg-type]
    assert raised.value.argument == "timeout"
    assert ms.wait(mid, -5).id == mid  # a negative timeout looks once, as before


async def test_the_async_wait_takes_a_finite_timeout(store: Store) -> None:
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    mid = await ams.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
    with pytest.raises(InvalidArgument):
        await ams.wait(mid, math.nan)
    assert (await ams.wait(mid, 0)).id == mid


@pytest.mark.parametrize("target", [None, 5, b"bob@example.org", ["bob@example.org"]])
def test_suppression_calls_take_a_string_target(ms: Mailstrom, target: object) -> None:
    """Anything but a string was an AttributeError (``.strip``) or, for bytes, a
    TypeError from ``startswith``."""
    for call in (ms.suppress, ms.unsuppress, ms.suppressed):
        with pytest.raises(InvalidSuppression):
            call(target)  # type: ignore[operator]
    assert ms.suppressions() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reply": None},
        {"reply": b"550 no"},
        {"reply": ["550"]},
        {"source": "bogus"},
        {"source": None},
        {"source": 5},
        {"expires_at": 5},
        {"expires_at": "2099-01-01"},
    ],
)
def test_suppress_takes_a_string_reply_a_known_source_and_a_datetime(
    ms: Mailstrom, kwargs: dict[str, object]
) -> None:
    """A reply that is no string was a TypeError or AttributeError, an unknown source
    the enum's plain ValueError, an expiry that is no datetime an AttributeError."""
    with pytest.raises(InvalidSuppression):
        ms.suppress("bob@example.org", **kwargs)  # type: ignore[arg-type]
    assert ms.suppressions() == []
    assert ms.suppress("bob@example.org", source="hard_bounce").source == "hard_bounce"  # type: ignore[arg-type]


def _email(to: str = "b@example.org") -> Email:
    return Email(from_="a@example.com", to=[to], text="x")


@pytest.mark.parametrize("message", [None, 5, "From: a@example.com\r\n\r\nx", ["x"]])
def test_send_email_refuses_what_is_no_message_with_a_typed_error(
    ms: Mailstrom, message: object
) -> None:
    """A plain TypeError (no MailstromError) before; still a TypeError."""
    with pytest.raises(InvalidMessageType) as raised:
        ms.send_email(message)  # type: ignore[arg-type]
    assert isinstance(raised.value, TypeError)
    assert ms.stats().messages == 3


@pytest.mark.parametrize(
    "batch", [None, 5, b"From: a@example.com\r\n\r\nx", "abc", _email(), [_email(), None]]
)
def test_send_emails_refuses_a_batch_that_is_no_list_of_messages(
    ms: Mailstrom, batch: object
) -> None:
    """``send_emails(email)`` or ``send_emails(raw_bytes)`` was a TypeError saying "not
    iterable" or "not int" (bytes read as a sequence of ints); nothing is queued."""
    with pytest.raises(InvalidMessageType):
        ms.send_emails(batch)  # type: ignore[arg-type]
    assert ms.stats().messages == 3


async def test_the_async_send_emails_refuses_one_message_alone(store: Store) -> None:
    ams = AsyncMailstrom(Config(helo_name="mail.example.com"), store=store, worker=None)
    with pytest.raises(InvalidMessageType):
        await ams.send_emails(_email())  # type: ignore[arg-type]
    assert await ams.send_emails(m for m in [_email(), _email("c@example.org")])


@pytest.mark.parametrize("priority", ["a" * 100_000, "\ud800" * 253])
def test_a_bad_priority_is_quoted_briefly(ms: Mailstrom, priority: str) -> None:
    """The lane name was quoted whole: 100,000 characters came back in the error."""
    with pytest.raises(InvalidQueueAttribute) as raised:
        ms.send_email(_email(), priority=priority)
    assert len(str(raised.value)) < 400


class _Unprintable:
    """An argument whose repr raises: the error about it must still be the typed one."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    "call",
    [
        lambda ms: ms.send_email(Email(from_="a@example.com", to=[_Unprintable()], text="x")),  # type: ignore[list-item]
        lambda ms: ms.send_email(Email(from_="a@example.com", to=_Unprintable(), text="x")),  # type: ignore[arg-type]
        lambda ms: ms.send_email(
            Email(from_="a@example.com", to="b@example.org", text="x"),
            envelope_to=_Unprintable(),
        ),
        lambda ms: ms.send_email(
            Email(from_="a@example.com", to="b@example.org", text="x"),
            envelope_to=[_Unprintable()],
        ),
        lambda ms: ms.send_email(
            Email(from_="a@example.com", to="b@example.org", text="x"),
            envelope_from=_Unprintable(),
        ),
        lambda ms: ms.send_email(
            Email(from_="a@example.com", to="b@example.org", text="x"), max_age=_Unprintable()
        ),
        lambda ms: ms.query_status(_Unprintable()),
    ],
)
def test_an_argument_whose_repr_raises_gets_the_typed_error(
    ms: Mailstrom, call: Callable[[Mailstrom], object]
) -> None:
    before = ms.stats()
    with pytest.raises(MailstromError):
        call(ms)
    assert ms.stats() == before


BAD_CLOCKS = [
    pytest.param(lambda: 5, id="int"),
    pytest.param(lambda: "now", id="str"),
    pytest.param(lambda: None, id="None"),
    pytest.param(lambda: datetime(2030, 1, 2), id="naive"),
]


@pytest.mark.parametrize("clock", BAD_CLOCKS)
def test_a_clock_that_reads_no_aware_datetime_is_a_config_error(
    store: Store, clock: Callable[[], object]
) -> None:
    """A ``clock`` returning no datetime raised AttributeError ("'int' object has no
    attribute 'tzinfo'") at the first send, and one returning None had the memory store
    queue the message without a time; a naive one was an InvalidArgument naming ``now``,
    an argument the caller never gave. Each is a ConfigError naming the clock, and
    nothing is queued."""
    ms = Mailstrom(
        Config(helo_name="mail.example.com"),
        store=store,
        worker=None,
        clock=clock,  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError, match=r"clock returned .*timezone-aware datetime"):
        ms.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
    with pytest.raises(ConfigError, match="clock returned"):
        ms.query()
    assert store.stats().messages == 0


@pytest.mark.parametrize("clock", BAD_CLOCKS)
async def test_the_async_facade_refuses_such_a_clock_too(
    store: Store, clock: Callable[[], object]
) -> None:
    ams = AsyncMailstrom(
        Config(helo_name="mail.example.com"),
        store=store,
        worker=None,
        clock=clock,  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError, match="clock returned"):
        await ams.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
    assert store.stats().messages == 0


@pytest.mark.parametrize("facade", [Mailstrom, AsyncMailstrom])
def test_a_facades_worker_hint_names_the_modes_it_takes_and_no_other(
    facade: type[Mailstrom] | type[AsyncMailstrom], tmp_path: Path
) -> None:
    """Both facades' ``worker`` was typed with every mode of either ("thread" and "task"),
    so a type checker passed ``AsyncMailstrom(worker="thread")`` and ``Mailstrom(worker=
    "task")``, which raise ConfigError when run. The hint names each facade's own."""
    import typing

    hint = typing.get_type_hints(facade.__init__)["worker"]
    hinted = {
        value
        for arg in typing.get_args(hint)
        for value in (typing.get_args(arg) if typing.get_origin(arg) is typing.Literal else [arg])
    }
    config = Config(helo_name="mail.example.com")
    store = SQLiteStore(tmp_path / "queue.db")  # one a worker process can open too
    for mode in ("auto", "thread", "task", "process", None):
        try:
            facade(config, store=store, worker=mode)  # type: ignore[arg-type]
        except ConfigError:
            assert mode not in hinted, mode
        else:
            assert (type(None) if mode is None else mode) in hinted, mode
    store.close()


def _raised(call: Callable[[], object]) -> MailstromError:
    with pytest.raises(MailstromError) as raised:
        call()
    return raised.value


def test_a_typed_error_survives_pickling_as_a_process_pool_sends_it_back(tmp_path: Path) -> None:
    """An error raised in a worker of ``multiprocessing`` or ``concurrent.futures`` comes
    back pickled. Errors with keyword-only fields (``InvalidAddress(reason, address=)``)
    pickled as their ``args`` alone and failed to unpickle ("missing 1 required
    keyword-only argument: 'address'"): a ProcessPoolExecutor broke with
    BrokenProcessPool and a multiprocessing.Pool's result never came, instead of the
    caller catching InvalidAddress. ``copy.copy`` failed alike."""
    import copy
    import pickle

    from mailstrom import Attachment, DestinationRule, ShapingConfig

    config = Config(helo_name="mail.example.com", max_message_size=2000, max_recipients=2)
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config, store=store, worker=None)
    first = ms.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
    second = ms.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
    # Their common start: AmbiguousMessageId.
    prefix = next(first[:n] for n in range(len(first)) if first[n] != second[n])

    def email(**fields: object) -> Email:
        return Email(**{"from_": "a@example.com", "to": ["b@example.org"], "text": "x", **fields})  # type: ignore[arg-type]

    calls: list[Callable[[], object]] = [
        lambda: ms.send_email(email(to=["not an address"])),
        lambda: ms.send_email(email(subject="a\nb")),
        lambda: ms.send_email(email(text="x" * 5000)),
        lambda: ms.send_email(email(to=[f"r{n}@example.org" for n in range(3)])),
        lambda: ms.send_email(email(headers={"X-A": "a " * 40_000})),
        lambda: ms.send_email(email(subject="a\x00b")),
        lambda: ms.send_email(email(attachments=[Attachment(filename=" ", content=b"x")])),
        lambda: ms.send_email(email(html='<img src="cid:logo">')),
        lambda: ms.send_email(email(unsubscribe_url="http://example.com/u")),
        lambda: ms.send_email(email(tags=["-bad"])),
        lambda: ms.send_email(email(), priority="nope"),
        lambda: ms.count(cap=-1),
        lambda: ms.query_status("ffff"),
        lambda: ms.query_status(prefix),
        lambda: Config(
            shaping=ShapingConfig(rules=(DestinationRule(match="", max_connections=1),))
        ),
    ]
    try:
        for call in calls:
            error = _raised(call)
            for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
                assert type(again) is type(error)
                assert str(again) == str(error) and again.args == error.args
                assert vars(again) == vars(error), type(error).__name__
    finally:
        ms.stop()
        store.close()


def test_a_batch_error_says_which_message_of_the_batch_it_is_about(tmp_path: Path) -> None:
    """``send_emails`` of many messages raised the error of the one at fault in its own
    words ("the encoded message is at least 5000 octets"), which do not say which one of
    the batch it was: a caller of a thousand had to check them again one by one. The
    error now carries a note naming its place in the batch, on both facades."""
    import asyncio

    config = Config(helo_name="mail.example.com", max_message_size=2000)
    good = Email(from_="a@example.com", to=["b@example.org"], text="x")
    large = Email(from_="a@example.com", to=["b@example.org"], text="x" * 5000)
    store = SQLiteStore(tmp_path / "q.db")
    ms = Mailstrom(config, store=store, worker=None)
    with pytest.raises(MailstromError) as raised:
        ms.send_emails([good, good, large, good])
    assert "message 2 of 4" in "\n".join(getattr(raised.value, "__notes__", []))

    async def batch() -> None:
        async with AsyncMailstrom(config, store=store, worker=None) as ams:
            await ams.send_emails([large, good])

    with pytest.raises(MailstromError) as raised:
        asyncio.run(batch())
    assert "message 0 of 2" in "\n".join(getattr(raised.value, "__notes__", []))
    assert ms.count() == 0  # all or nothing, as before
    ms.stop()
    store.close()


@pytest.mark.parametrize("value", ["false", "no", 0.0, 1, None])
def test_an_email_require_tls_that_is_no_bool_is_refused_not_read_as_true(
    ms: Mailstrom, value: object
) -> None:
    """``Email(require_tls="false")`` (a setting read from the environment as text) was
    read by its truth: the message was queued for REQUIRETLS, and every recipient whose
    server does not offer it failed with 5.7.30. ``1`` asked for it as ``True`` does,
    ``None`` for nothing. Only a bool says which, as ``DSN(orcpt=)`` is checked."""
    before = ms.count()
    email = Email(from_="a@example.com", to=["b@example.org"], text="x", require_tls=value)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage) as raised:
        ms.send_email(email)
    assert "require_tls" in str(raised.value)
    assert ms.count() == before


def test_a_prepare_require_tls_that_is_no_bool_is_refused() -> None:
    """``prepare(..., require_tls="false")`` marked the message for REQUIRETLS too."""
    email = Email(from_="a@example.com", to=["b@example.org"], text="x")
    with pytest.raises(InvalidMessage, match="require_tls"):
        prepare(email, require_tls="false")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["false", "no", 0.0, 1, None])
def test_an_attachment_inline_that_is_no_bool_is_refused_not_read_as_true(
    ms: Mailstrom, value: object
) -> None:
    """``Attachment(inline="false")`` was read by its truth: the file went as
    ``Content-Disposition: inline``, a PDF shown in the body by readers that render one
    so. Only a bool says which, as ``Email(require_tls=)`` is checked."""
    before = ms.count()
    part = Attachment(filename="r.pdf", content=b"%PDF", inline=value)  # type: ignore[arg-type]
    email = Email(from_="a@example.com", to=["b@example.org"], text="x", attachments=[part])
    with pytest.raises(InvalidMessage, match="inline"):
        ms.send_email(email)
    assert ms.count() == before
