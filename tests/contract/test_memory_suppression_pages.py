"""The memory store pages its suppression list from a sorted order of the targets, kept
until a target comes or goes: ``list_suppressions`` sorted every entry after ``after``
under the store's lock for each page, so paging through the list (``suppress export``,
``suppressions(after=...)``) cost a sort per page: 10 s for 200,000 entries, the store
locked for 75 ms a page meanwhile.

Counted, not timed: how many target comparisons paging through the list makes. The
answers are checked against a plain sort of the entries."""

from __future__ import annotations

import random
from datetime import timedelta

from mailstrom.stores import MemoryStore
from mailstrom.suppression import Suppression, SuppressionSource

from .support import NOW

COUNT = 4000
PAGE = 100


class _Counted(str):
    """A target that counts the comparisons made with it."""

    __slots__ = ()
    made = 0

    def __lt__(self, other: object) -> bool:
        _Counted.made += 1
        return str.__lt__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        _Counted.made += 1
        return str.__gt__(self, other)  # type: ignore[operator]

    def __le__(self, other: object) -> bool:
        _Counted.made += 1
        return str.__le__(self, other)  # type: ignore[operator]

    def __ge__(self, other: object) -> bool:
        _Counted.made += 1
        return str.__ge__(self, other)  # type: ignore[operator]

    __hash__ = str.__hash__


def entry(target: str, *, expired: bool = False) -> Suppression:
    return Suppression(
        target=target,
        source=SuppressionSource.MANUAL,
        reply="",
        created_at=NOW - timedelta(days=2),
        expires_at=NOW - timedelta(days=1) if expired else None,
    )


def pages(store: MemoryStore, *, active: bool) -> list[str]:
    seen: list[str] = []
    after = ""
    while page := store.list_suppressions(now=NOW if active else None, after=after, limit=PAGE):
        seen += [e.target for e in page]
        after = page[-1].target
    return seen


def test_paging_through_the_list_sorts_it_once() -> None:
    store = MemoryStore()
    targets = [f"u{i:05d}@example.org" for i in range(COUNT)]
    random.Random(5).shuffle(targets)
    store.suppress([entry(_Counted(t)) for t in targets])
    _Counted.made = 0
    assert pages(store, active=True) == sorted(targets)
    # One sort (about COUNT * log2(COUNT) = 48,000) and a search per page; sorted for
    # each of the 40 pages, 870,000.
    assert _Counted.made < 3 * COUNT * COUNT.bit_length()


def test_pages_follow_every_change_of_the_list() -> None:
    store = MemoryStore()
    rng = random.Random(7)
    kept: dict[str, bool] = {}
    for _ in range(60):
        added = [f"{rng.randrange(300)}@example.org" for _ in range(rng.randrange(1, 20))]
        expired = rng.random() < 0.3
        store.suppress([entry(t, expired=expired) for t in added])
        kept |= dict.fromkeys(added, expired)
        gone = [f"{rng.randrange(300)}@example.org" for _ in range(rng.randrange(5))]
        store.unsuppress(gone)
        for t in gone:
            kept.pop(t, None)
        if rng.random() < 0.2:
            store.prune_suppressions(expired_before=NOW, limit=rng.randrange(1, 10))
            kept = {t: e for t, e in kept.items() if not e} | {
                e.target: True for e in store.list_suppressions(limit=1000) if e.expires_at
            }
        assert pages(store, active=False) == sorted(kept)
        assert pages(store, active=True) == sorted(t for t, e in kept.items() if not e)
