"""Where the queue is when nobody names one: a fixed path per user, private directories."""

from __future__ import annotations

import functools
import os
import pwd
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.open_files import open_files_under

from mailstrom import AsyncMailstrom, Config, Mailstrom
from mailstrom.errors import ConfigError
from mailstrom.routing import Router
from mailstrom.settings import load_settings
from mailstrom.stores import SQLiteStore
from mailstrom.stores.url import (
    SYSTEM_STORE_PATH,
    default_store_path,
    default_store_url,
    make_private_parents,
)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_root_uses_the_system_spool_whatever_the_environment() -> None:
    """Hardening #3: root's default queue is /var/spool/mailstrom/queue.db."""
    for env in ({}, {"XDG_STATE_HOME": "/tmp/x", "HOME": "/tmp/y"}):
        assert default_store_path(env, euid=0) == Path("/var/spool/mailstrom/queue.db")
    assert Path("/var/spool/mailstrom/queue.db") == SYSTEM_STORE_PATH


def test_a_user_gets_the_xdg_state_directory() -> None:
    """Hardening #3: a user's default queue is $XDG_STATE_HOME/mailstrom/queue.db, by
    default ~/.local/state/mailstrom/queue.db; never relative to the working directory."""
    assert default_store_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}, euid=1000) == Path(
        "/s/mailstrom/queue.db"
    )
    assert default_store_path({"HOME": "/home/ann"}, euid=1000) == Path(
        "/home/ann/.local/state/mailstrom/queue.db"
    )
    # A relative XDG_STATE_HOME or HOME is ignored (XDG: relative paths are invalid).
    assert default_store_path({"XDG_STATE_HOME": "state", "HOME": "/home/ann"}, euid=1000) == Path(
        "/home/ann/.local/state/mailstrom/queue.db"
    )
    # ...and then the home directory comes from the password database.
    nobody = pwd.getpwnam("nobody")
    assert default_store_path({"HOME": "."}, euid=nobody.pw_uid) == (
        Path(nobody.pw_dir) / ".local" / "state" / "mailstrom" / "queue.db"
    )
    assert default_store_url({"HOME": "/home/ann"}, euid=1000) == (
        "sqlite:////home/ann/.local/state/mailstrom/queue.db"
    )


def test_no_home_at_all_is_a_config_error() -> None:
    """Hardening #3: without any home directory there is no default (not ./mailstrom.db)."""
    with pytest.raises(ConfigError, match="set store"):
        default_store_path({}, euid=2**31 - 7)  # no passwd entry


def test_the_command_lines_default_is_the_same_path() -> None:
    """Hardening #3: settings without a store use default_store_url, not sqlite:///x.db."""
    s = load_settings(env={"HOME": "/home/ann"}, search=False)
    assert s.store_url == default_store_url({"HOME": "/home/ann"})
    assert s.store_url.startswith("sqlite:////")


def test_missing_directories_are_created_private(tmp_path: Path) -> None:
    """Hardening #3: the directories mailstrom creates for the default store are 0700."""
    old = os.umask(0o022)
    try:
        (tmp_path / "home").mkdir(mode=0o755)
        target = tmp_path / "home" / ".local" / "state" / "mailstrom" / "queue.db"
        make_private_parents(target)
    finally:
        os.umask(old)
    for directory in (target.parent, target.parent.parent, target.parent.parent.parent):
        assert mode(directory) == 0o700, directory
    assert mode(tmp_path / "home") == 0o755  # what existed is left alone


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A non-root user whose state directory does not exist yet, working in ``cwd``."""
    state = tmp_path / "state"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    monkeypatch.chdir(cwd)
    old = os.umask(0o022)
    try:
        yield state
    finally:
        os.umask(old)
    assert list(cwd.iterdir()) == []  # nothing was created where the program runs


def test_facade_without_a_store_uses_the_default_path(user_home: Path) -> None:
    """Hardening #3: Mailstrom() without a store opens the per-user default queue (0700
    directory, 0600 file), not ./mailstrom.db."""
    ms = Mailstrom(Config(helo_name="client.test"))
    try:
        assert isinstance(ms.store, SQLiteStore)
        assert Path(ms.store.path) == user_home / "mailstrom" / "queue.db"
        assert mode(user_home / "mailstrom") == 0o700
        assert mode(user_home) == 0o700
        assert mode(Path(ms.store.path)) == 0o600
    finally:
        ms.stop()


async def test_async_facade_without_a_store_uses_the_default_path(user_home: Path) -> None:
    """Hardening #3: AsyncMailstrom() uses the same default queue."""
    ms = AsyncMailstrom(Config(helo_name="client.test"))
    try:
        assert isinstance(ms.store, SQLiteStore)
        assert Path(ms.store.path) == user_home / "mailstrom" / "queue.db"
    finally:
        await ms.stop()


def test_the_default_store_is_closed_when_construction_fails(user_home: Path) -> None:
    """The facade opened the default queue, then refused a bad ``worker``: its connection
    stayed open, with no facade left to stop."""
    with pytest.raises(ValueError, match="worker must be") as raised:
        Mailstrom(Config(helo_name="client.test"), worker="lorry")  # type: ignore[arg-type]
    assert (user_home / "mailstrom" / "queue.db").is_file()  # it was opened...
    assert open_files_under(user_home) == []  # ...and closed
    del raised  # its traceback held the half-built facade


@pytest.mark.parametrize("facade", [Mailstrom, AsyncMailstrom])
@pytest.mark.parametrize("config", ["q.db", Path("q.db"), {"helo_name": "client.test"}, 0])
def test_a_config_that_is_no_config_is_refused_before_any_store_is_opened(
    user_home: Path, facade: type[Mailstrom] | type[AsyncMailstrom], config: object
) -> None:
    """``Mailstrom("q.db")`` (the store URL given first) opened the default queue, then
    failed in start() with a TypeError (in send_email with an AttributeError)."""
    with pytest.raises(ConfigError, match=r"config must be a mailstrom\.Config"):
        facade(config)  # type: ignore[arg-type]
    assert not user_home.exists()  # the default queue was not opened


@pytest.mark.parametrize("argument", [{"clock": 1700000000}, {"clock": None}, {"on_result": "log"}])
def test_a_clock_or_callback_that_cannot_be_called_is_refused(
    user_home: Path, argument: dict[str, object]
) -> None:
    """Kept, such a clock failed every send_email with a TypeError, and such a callback
    every result (logged only)."""
    for facade in (Mailstrom, AsyncMailstrom):
        with pytest.raises(ConfigError, match="must be callable"):
            facade(Config(helo_name="client.test"), worker=None, **argument)  # type: ignore[arg-type]
    assert not user_home.exists()


async def _async_callback(result: object) -> None:
    """An ``async def`` callback: calling it only makes a coroutine."""


class _AsyncCallable:
    async def __call__(self, result: object) -> None:
        """Nothing: calling the object only makes a coroutine."""


@pytest.mark.parametrize(
    "on_result",
    [_async_callback, functools.partial(_async_callback), _AsyncCallable()],
    ids=["async def", "partial", "async __call__"],
)
@pytest.mark.parametrize("facade", [Mailstrom, AsyncMailstrom])
def test_an_async_on_result_is_refused(
    user_home: Path, facade: type[Mailstrom] | type[AsyncMailstrom], on_result: object
) -> None:
    """``on_result`` is called, not awaited (on the worker's loop, or a worker process's
    reader thread): an ``async def`` callback, natural beside an AsyncMailstrom, was
    taken, and each result made a coroutine nobody ran. The application heard of no
    result, with at most a RuntimeWarning per result ("never awaited")."""
    with pytest.raises(ConfigError, match="on_result must not be a coroutine function"):
        facade(Config(helo_name="client.test"), worker=None, on_result=on_result)  # type: ignore[arg-type]
    assert not user_home.exists()


@pytest.mark.parametrize(
    "argument",
    [{"router": 5}, {"router": Router}, {"rng": 5}, {"rng": random}, {"rng": random.random}],
    ids=["router int", "router class", "rng int", "rng module", "rng function"],
)
@pytest.mark.parametrize("facade", [Mailstrom, AsyncMailstrom])
def test_a_router_or_rng_of_the_wrong_kind_is_refused(
    user_home: Path, facade: type[Mailstrom] | type[AsyncMailstrom], argument: dict[str, object]
) -> None:
    """Kept, such a router deferred every recipient with "internal error: AttributeError"
    until the retry policy's max_age failed it, while worker_status said running with no
    error; such an rng failed the first retry computed with it."""
    with pytest.raises(ConfigError, match=f"{next(iter(argument))} must be a"):
        facade(Config(helo_name="client.test"), worker="auto", **argument)  # type: ignore[arg-type]
    assert not user_home.exists()


def test_db_migrate_creates_the_default_store_as_every_command_does(
    user_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mailstrom db migrate`` with no store named, run before anything had created the
    default queue (an install script's first step), exited 75 "cannot create
    .../mailstrom/queue.db: No such file or directory", where ``send`` and ``worker``
    make its private directories."""
    from mailstrom.cli.main import main

    assert main(["db", "migrate"]) == 0
    path = user_home / "mailstrom" / "queue.db"
    assert capsys.readouterr().out.startswith(f"sqlite:///{path}: schema version ")
    assert mode(user_home / "mailstrom") == 0o700
    assert mode(user_home) == 0o700
    assert mode(path) == 0o600
