"""The ``store_backend`` fixture: every contract test runs once per store.

A backend opens the *same* underlying storage on every ``open()`` call, so tests can
reopen after close, run two store objects side by side, or hand ``url`` to another
process. Memory is not durable: tests that need durability or a second process skip it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailstrom.stores import MemoryStore, Store, open_store


@dataclass(kw_only=True)
class Backend:
    """One store implementation under test."""

    name: str
    url: str
    durable: bool
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        """A store object on this backend's storage (the same one for memory)."""
        if not self.durable:
            # One process-local object stands for "the same storage" of a memory store.
            if not self.opened:
                self.opened.append(MemoryStore())
            return self.opened[0]
        store = open_store(self.url)
        self.opened.append(store)
        return store

    def require_durable(self) -> None:
        if not self.durable:
            pytest.skip(f"{self.name} store is not durable and not shared between processes")

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store in turn: memory, SQLite on a temp file, PostgreSQL on a fresh database."""
    name = request.param
    if name == "memory":
        backend = Backend(name=name, url="memory:", durable=False)
    elif name == "sqlite":
        # Four slashes: an absolute path (sqlite:// + empty host + /abs/path).
        backend = Backend(name=name, url=f"sqlite:///{tmp_path / 'queue.db'}", durable=True)
    else:
        backend = Backend(name=name, url=request.getfixturevalue("postgres_url"), durable=True)
    try:
        yield backend
    finally:
        backend.close_all()


@pytest.fixture
def store(store_backend: Backend) -> Store:
    """A store object opened on the backend under test."""
    return store_backend.open()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts (children.lease_in_child), killed after it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
