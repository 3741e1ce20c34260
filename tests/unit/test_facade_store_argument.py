"""The facades' ``store=``: a store URL or a path is opened, and closed, by the facade.

``Mailstrom(config, store=SQLiteStore("mail.db"))``, the README's example, left the SQLite
connection open for ever: the facade only closed a store it had opened itself. A URL
(``store="mail.db"``) or a path object is now opened and owned by the facade; a
:class:`Store` passed in stays its caller's.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from tests.support.open_files import open_files_under

from mailstrom import AsyncMailstrom, Config, Email, Mailstrom, RecipientState
from mailstrom.errors import ConfigError, InvalidStoreURL, StoreError
from mailstrom.stores import MemoryStore, SQLiteStore

CONFIG = Config(helo_name="client.test")


def hello() -> Email:
    return Email(from_="app@example.com", to=["bob@example.org"], subject="Hi", text="Hello")


def assert_closed(store: object, directory: Path) -> None:
    assert isinstance(store, SQLiteStore)
    with pytest.raises(StoreError, match="closed"):
        store.recent()
    assert open_files_under(directory) == []


# Each form of a SQLite store a user may write, relative ones resolved in tmp_path.
SQLITE_FORMS: dict[str, Callable[[Path], str | Path]] = {
    "absolute URL": lambda d: f"sqlite:///{d / 'q.db'}",
    "relative URL": lambda d: "sqlite:///q.db",
    "bare absolute path": lambda d: str(d / "q.db"),
    "bare relative path": lambda d: "q.db",
    "Path": lambda d: d / "q.db",
    "relative Path": lambda d: Path("q.db"),
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("form", SQLITE_FORMS.values(), ids=SQLITE_FORMS.keys())
def test_a_store_url_or_path_is_opened_and_closed_by_the_facade(
    workdir: Path, form: Callable[[Path], str | Path]
) -> None:
    with Mailstrom(CONFIG, store=form(workdir), worker=None) as ms:
        assert isinstance(ms.store, SQLiteStore)
        assert Path(ms.store.path).resolve() == workdir / "q.db"
        mid = ms.send_email(hello())
        assert ms.query_status(mid).state is RecipientState.QUEUED
    assert_closed(ms.store, workdir)
    with closing(SQLiteStore(workdir / "q.db")) as reopened:  # the message was in that file
        assert [m.id for m in reopened.recent()] == [mid]


async def test_the_async_facade_opens_and_closes_a_url_too(workdir: Path) -> None:
    async with AsyncMailstrom(CONFIG, store="sqlite:///q.db", worker=None) as ms:
        mid = await ms.send_email(hello())
        assert (await ms.query_status(mid)).state is RecipientState.QUEUED
    assert_closed(ms.store, workdir)


async def test_the_async_facade_opens_and_closes_a_path(workdir: Path) -> None:
    async with AsyncMailstrom(CONFIG, store=workdir / "q.db", worker=None) as ms:
        await ms.send_email(hello())
    assert_closed(ms.store, workdir)


def test_a_path_object_is_a_sqlite_file_whatever_its_suffix(workdir: Path) -> None:
    """A path object cannot be a URL: ``Path("queue")`` is the SQLite file ``queue``, where
    the string ``"queue"`` is an unknown store URL."""
    with Mailstrom(CONFIG, store=Path("queue"), worker=None) as ms:
        ms.send_email(hello())
    assert (workdir / "queue").is_file()
    assert_closed(ms.store, workdir)
    with pytest.raises(InvalidStoreURL, match="unknown store URL"):
        Mailstrom(CONFIG, store="queue", worker=None)


def test_the_memory_url_gives_a_store_in_this_process(workdir: Path) -> None:
    with Mailstrom(CONFIG, store="memory:", worker=None) as ms:
        assert isinstance(ms.store, MemoryStore)
        mid = ms.send_email(hello())
        assert ms.query_status(mid).state is RecipientState.QUEUED
    auto = Mailstrom(CONFIG, store="memory:")
    assert auto.worker_mode == "thread"  # no other process could open it
    auto.stop()


def test_a_store_passed_in_stays_open_for_its_caller(workdir: Path) -> None:
    with closing(SQLiteStore(workdir / "q.db")) as store:
        with Mailstrom(CONFIG, store=store, worker=None) as ms:
            mid = ms.send_email(hello())
        assert store.status(mid).id == mid  # still open after the facade stopped


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/q.db",  # SQLite URLs have no host
        "mail.txt",  # no SQLite suffix, no scheme
        "postgresq://db/mail",  # a misspelt scheme
        "",
        "q.db\0",
    ],
)
def test_an_invalid_url_is_a_typed_error_and_opens_nothing(workdir: Path, url: str) -> None:
    for facade in (Mailstrom, AsyncMailstrom):
        with pytest.raises(InvalidStoreURL):
            facade(CONFIG, store=url, worker=None)
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("name", [" q.db", "q.db ", "q.db\n"])
def test_a_path_a_url_would_change_is_refused(workdir: Path, name: str) -> None:
    """A store URL's surrounding whitespace is stripped: ``Path("q.db ")`` would have
    opened ``q.db``, another file."""
    with pytest.raises(InvalidStoreURL, match="whitespace"):
        Mailstrom(CONFIG, store=Path(name), worker=None)
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("name", ["a?b.db", "q#1.db", "file:q.db", "queue?mode=ro"])
def test_a_path_object_is_the_file_it_names_whatever_it_holds(workdir: Path, name: str) -> None:
    """A path object is no URL: the facade made one of it, and ``Path("a?b.db")`` was
    refused as a URL with parameters ("a file whose name holds '?' is a plain path"), and
    ``Path("file:q.db")`` as a SQLite URI, though the string ``"a?b.db"`` opened that
    file."""
    with Mailstrom(CONFIG, store=Path(name), worker=None) as ms:
        mid = ms.send_email(hello())
    assert (workdir / name).is_file()
    assert_closed(ms.store, workdir)
    with closing(SQLiteStore(workdir / name)) as reopened:
        assert [m.id for m in reopened.recent()] == [mid]


def test_a_path_object_with_a_nul_is_refused(workdir: Path) -> None:
    with pytest.raises(InvalidStoreURL, match="NUL"):
        Mailstrom(CONFIG, store=Path("q.db\0"), worker=None)
    assert list(workdir.iterdir()) == []


def test_a_store_the_facade_opened_is_closed_when_construction_fails(workdir: Path) -> None:
    """A bad ``worker`` is found after the store is open: nobody could stop this facade."""
    for facade in (Mailstrom, AsyncMailstrom):
        with pytest.raises(ValueError, match="worker must be") as raised:
            facade(CONFIG, store="q.db", worker="lorry")  # type: ignore[arg-type]
        assert open_files_under(workdir) == []
        del raised  # its traceback held the half-built facade


def test_a_store_passed_in_is_not_closed_when_construction_fails(workdir: Path) -> None:
    with closing(SQLiteStore(workdir / "q.db")) as store:
        with pytest.raises(ValueError, match="worker must be"):
            Mailstrom(CONFIG, store=store, worker="lorry")  # type: ignore[arg-type]
        assert store.recent() == []


def test_a_worker_process_opens_the_store_the_url_named(workdir: Path) -> None:
    """A worker process gets the facade's store pickled (it reopens it by its absolute
    path), so a relative URL names the same file in the child."""
    ms = Mailstrom(CONFIG, store="sqlite:///q.db")
    try:
        assert ms.worker_mode == "process"
        assert isinstance(ms.store, SQLiteStore)
        assert ms.store.url == f"sqlite:///{workdir / 'q.db'}"
        child_store = pickle.loads(pickle.dumps(ms.store))
        try:
            assert child_store.path == str(workdir / "q.db")
        finally:
            child_store.close()
    finally:
        ms.stop()  # never started: closes the store
    assert_closed(ms.store, workdir)


def test_mail_sent_after_stop_to_a_queue_in_memory_it_closed_is_refused(workdir: Path) -> None:
    """stop() closes a ``memory:`` store the facade opened, and no worker of it starts
    again: a message queued after it was given an id and never delivered (SQLite's closed
    store refuses it). It is refused now; what was queued before can still be read."""
    ms = Mailstrom(CONFIG, store="memory:", worker=None)
    mid = ms.send_email(hello())
    ms.stop()
    with pytest.raises(StoreError, match="closed"):
        ms.send_email(hello())
    with pytest.raises(StoreError, match="closed"):
        ms.send_emails([hello()])
    assert ms.query_status(mid).state is RecipientState.QUEUED


async def test_an_async_facade_refuses_mail_after_stop_closed_its_queue_in_memory(
    workdir: Path,
) -> None:
    ms = AsyncMailstrom(CONFIG, store="memory:", worker=None)
    await ms.send_email(hello())
    await ms.stop()
    with pytest.raises(StoreError, match="closed"):
        await ms.send_email(hello())


@pytest.mark.parametrize("store", [b"q.db", bytearray(b"q.db"), 123, object()])
@pytest.mark.parametrize("facade", [Mailstrom, AsyncMailstrom])
def test_a_store_of_no_known_kind_is_refused_at_construction(
    workdir: Path, store: object, facade: type[Mailstrom] | type[AsyncMailstrom]
) -> None:
    # Anything but a URL, a path object or None was taken for a Store: the facade was
    # made (its worker a thread, for no URL), and every call failed with an
    # AttributeError ("'bytes' object has no attribute 'enqueue'").
    with pytest.raises(ConfigError, match=f"store must be .*not {type(store).__name__}"):
        facade(CONFIG, store=store)  # type: ignore[arg-type]
    assert list(workdir.iterdir()) == []
