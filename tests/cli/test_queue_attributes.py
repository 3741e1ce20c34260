"""Queue attributes through the command: send --tag/--meta/--priority/--at/--expires/
--idempotency-key, shown by status, filtered by queue --tag."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailstrom.cli.send import expiry_arg, time_arg
from tests.cli.conftest import CLI


def send(cli: CLI, *extra: str) -> str:
    args = ("send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x")
    return cli.ok(*args, *extra).out.strip()


def test_tags_and_metadata_are_shown_and_filtered(cli: CLI) -> None:
    tagged = send(cli, "--tag", "receipt", "--tag", "shop:eu", "--meta", "order=42")
    send(cli, "--tag", "news", "--meta", "formula=a=b")
    plain = send(cli)

    data = cli.ok("status", "--json", tagged).json()
    assert data["tags"] == ["receipt", "shop:eu"]
    assert data["metadata"] == {"order": "42"}
    assert data["priority"] == "transactional"
    human = cli.ok("status", tagged).out
    assert "Tags:" in human and "receipt, shop:eu" in human
    assert "Meta order:" in human
    assert "Tags:" not in cli.ok("status", plain).out

    listed = cli.ok("queue", "--json", "--tag", "receipt").json()
    assert [m["id"] for m in listed] == [tagged]
    assert listed[0]["metadata"] == {"order": "42"}
    assert cli.ok("queue", "--json", "--tag", "nothing").json() == []
    assert len(cli.queue_ids()) == 3

    # The bulk commands take the same filter: only the tagged message is held.
    held = cli.ok("hold", "--tag", "news")
    assert "1" in held.out, held.out
    assert [m["id"] for m in cli.ok("queue", "--json", "--held").json()] != [tagged]
    assert len(cli.ok("queue", "--json", "--held").json()) == 1


def test_bad_attributes_are_refused_before_anything_is_queued(cli: CLI) -> None:
    base = ("send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x")
    bad_tag = cli(*base, "--tag", "has space")
    assert bad_tag.code == 65, bad_tag.err
    assert "tag" in bad_tag.err
    assert cli(*base, "--meta", "no-equals-sign").code == 64
    assert cli(*base, "--meta", "k=" + "v" * 2000).code == 65
    assert cli(*base, "--priority", "urgent").code == 65
    assert cli(*base, "--at", "next tuesday").code == 64
    assert cli(*base, "--expires", "soon").code == 64
    assert cli(*base, "--idempotency-key", "has space").code == 65
    # Dates beyond what UTC or the queue can hold: refused like any bad attribute, not
    # an internal error (70) from an OverflowError.
    for extreme in (
        ["--at", "9999-12-31T23:59:59-05:00"],
        ["--at", "9999-12-31T20:00Z", "--expires", "400d"],
        ["--expires", "9999-12-31T23:59:59-05:00"],
        ["--at", "0001-01-01T00:00+05:00"],
    ):
        result = cli(*base, *extreme)
        assert result.code == 65, (extreme, result.err)
        assert "Traceback" not in result.err
        assert "out of range" in result.err or "100 years" in result.err
    # Before 1900: no store reads such a time back (the message was queued, then left out
    # of `queue` as unreadable while the worker still attempted it).
    for early in (["--at", "0001-01-02T00:00Z"], ["--expires", "0001-01-01T00:00Z"]):
        result = cli(*base, *early)
        assert result.code == 65, (early, result.err)
        assert "before 1900" in result.err, result.err
    assert cli.ok("queue", "--json").json() == []


def test_schedule_priority_and_idempotency_key(cli: CLI) -> None:
    first = send(
        cli,
        "--priority",
        "bulk",
        "--at",
        "2099-12-01T09:00Z",
        "--expires",
        "2h",
        "--idempotency-key",
        "order-42-receipt",
    )
    again = send(cli, "--idempotency-key", "order-42-receipt", "--tag", "ignored")
    assert again == first
    assert len(cli.queue_ids()) == 1
    data = cli.ok("status", "--json", first).json()
    at = datetime(2099, 12, 1, 9, 0, tzinfo=UTC)
    assert data["priority"] == "bulk"
    assert datetime.fromisoformat(data["send_at"]) == at
    assert datetime.fromisoformat(data["expires_at"]) == at + timedelta(hours=2)
    assert data["idempotency_key"] == "order-42-receipt"
    assert datetime.fromisoformat(data["recipients"][0]["next_attempt_at"]) == at
    human = cli.ok("status", first).out
    assert "Send at:" in human and "2099-12-01 09:00:00" in human
    other = send(cli, "--expires", "2099-12-02T00:00:00+01:00")
    expires = cli.ok("status", "--json", other).json()["expires_at"]
    assert datetime.fromisoformat(expires) == datetime(2099, 12, 1, 23, 0, tzinfo=UTC)


def test_send_json_of_an_idempotent_repeat_describes_the_first_message(cli: CLI) -> None:
    # The repeat queues nothing and prints the first message's id: its recipients are
    # the first message's, not the ones the repeat named (never queued).
    first = cli.ok(*_send_to("bob@example.test"), "--idempotency-key", "k-1", "--json").json()
    again = cli.ok(
        *_send_to("carol@example.test", "dave@example.test"), "--idempotency-key", "k-1", "--json"
    ).json()
    assert again["id"] == first["id"]
    assert again["recipients"] == first["recipients"] == ["bob@example.test"]
    assert again["dkim"] == first["dkim"] == []


def _send_to(*recipients: str) -> list[str]:
    args = ["send", "--from", "app@client.test", "--text", "x"]
    for address in recipients:
        args += ["--to", address]
    return args


@pytest.mark.parametrize(
    "text", ["2026-12-01T09:00z", "2026-12-01t09:00z", "2026-12-01T10:00+01:00"]
)
def test_at_and_expires_take_an_rfc3339_time_in_either_case(text: str) -> None:
    # RFC 3339 §5.6: "T" and "Z" may be written in lower case; "z" was refused (exit 64).
    when = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert time_arg(text) == when
    assert expiry_arg(text) == when
