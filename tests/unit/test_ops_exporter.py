"""The exporter's gauge of the busiest destination domains: which it names, what the rest
add up to, and what finding them costs a scrape when the queue holds many domains."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailstrom.ops.exporter import MailstromCollector
from mailstrom.runtime.metrics import OTHER
from mailstrom.status import MetricsSnapshot, QueueStats, WorkerStatus

PENDING = "mailstrom_queue_pending_recipients"


def _pending_samples(pending: dict[str, int], top: int) -> list[tuple[str, float]]:
    snap = MetricsSnapshot(
        worker=WorkerStatus(running=True), queue=QueueStats(pending_by_domain=pending)
    )
    (family,) = [
        f for f in MailstromCollector(lambda: snap, top_domains=top).collect() if f.name == PENDING
    ]
    return [(s.labels["domain"], s.value) for s in family.samples]


@given(
    pending=st.dictionaries(
        st.sampled_from(["a.test", "b.test", "c.test", "d.test", "e.test", OTHER, "z.test"]),
        st.integers(0, 4),
    ),
    top=st.integers(0, 8),
)
def test_the_busiest_domains_are_named_most_first_and_the_rest_add_up_as_other(
    pending: dict[str, int], top: int
) -> None:
    ranked = sorted(
        ((d, n) for d, n in pending.items() if d != OTHER), key=lambda kv: (-kv[1], kv[0])
    )
    expected = [(d, float(n)) for d, n in ranked[:top]]
    rest = sum(n for _, n in ranked[top:]) + pending.get(OTHER, 0)
    if rest:
        expected.append((OTHER, float(rest)))
    assert _pending_samples(pending, top) == expected


class _Name(str):
    """A domain name that counts how often it is ordered against another."""

    compared = 0

    def __lt__(self, other: str) -> bool:
        _Name.compared += 1
        return str.__lt__(self, other)


def test_finding_the_busiest_domains_does_not_sort_every_domain() -> None:
    """Each scrape sorted every pending domain to name ten: a queue of 1,000,000
    domains (one recipient each: at a wildcard domain whose MX never answers, say) took
    2.4 s of CPU per scrape, in the worker's process, holding the GIL, so the worker's
    loop stood still for up to 1.5 s at a time. Ten are picked in one pass now."""
    n = 50_000
    # One recipient each, so that every comparison of two domains is by name, in an
    # order that is neither sorted nor reversed.
    pending = {_Name(f"d{(i * 7919) % n:05}.test"): 1 for i in range(n)}
    _Name.compared = 0
    samples = _pending_samples(pending, 10)
    assert [d for d, _ in samples] == [f"d{i:05}.test" for i in range(10)] + [OTHER]
    assert samples[-1] == (OTHER, n - 10)
    # A full sort orders each name about log2(n), 16, times; one pass about once.
    assert _Name.compared < 2 * n, _Name.compared
