"""The PostgreSQL store's named queries: shared parts are spliced in, not served alone."""

from __future__ import annotations

from mailstrom.stores.postgres.sql import queries


def test_shared_parts_are_spliced_into_the_queries_that_include_them() -> None:
    found = queries()
    assert not [name for name in found if name.startswith("_")]
    assert not [name for name, text in found.items() if "-- include:" in text]
    for name in (
        "lease",
        "lease_lanes",
        "lease_other_lanes",
        "fair_lease_lanes",
        "fair_lease_other_lanes",
    ):
        text = found[name]
        assert text.count("leased AS (") == 1, name
        assert text.rstrip().endswith("ORDER BY d.rank, d.due_at, l.seq, l.position;"), name
