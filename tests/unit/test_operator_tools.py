"""Pure pieces of the operator's tools: id prefixes, age buckets, the wait's stopping
rule, and the sendmail personality's local names and aliases."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailstrom import AsyncMailstrom, Config, Email, Mailstrom
from mailstrom.cli.exits import EX_DATAERR, CLIError
from mailstrom.cli.localnames import (
    MAX_ALIASES_SIZE,
    expand,
    is_bare,
    qualify_headers,
    read_aliases,
)
from mailstrom.cli.selection import MAX_ID_LINE, read_ids
from mailstrom.client.operations import settled
from mailstrom.errors import AmbiguousMessageId, ConfigError, UnknownMessage
from mailstrom.status import MessageStatus, RecipientState, RecipientStatus
from mailstrom.stores import MemoryStore
from mailstrom.stores.operator import (
    AGE_EDGES,
    bucket_of,
    normalize_domain,
    normalize_prefix,
    pick_one,
    shape_rows,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


# --- ids and buckets -----------------------------------------------------------------------


def test_prefixes_are_hex_and_case_insensitive() -> None:
    assert normalize_prefix(" 01A22D ") == "01a22d"
    for bad in ("", "xyz", "0" * 33, "01a2-"):
        with pytest.raises(UnknownMessage):
            normalize_prefix(bad)


def test_pick_one() -> None:
    assert pick_one("ab", ["abc"]) == "abc"
    with pytest.raises(UnknownMessage):
        pick_one("ab", [])
    with pytest.raises(AmbiguousMessageId) as raised:
        pick_one("ab", ["abd", "abc"] + [f"ab{i}" for i in range(10)])
    assert raised.value.candidates[:2] == ["ab0", "ab1"] and raised.value.more
    assert str(raised.value).startswith("ambiguous message id 'ab': it starts ab0, ab1")


def _facade() -> tuple[Mailstrom, str]:
    ms = Mailstrom(Config(helo_name="mail.example.com"), store=MemoryStore(), worker=None)
    mid = ms.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
    return ms, mid


def test_a_full_id_is_taken_in_any_case_by_every_method() -> None:
    """Ids are "1 to 32 hex digits, any case": a 31-digit upper-case prefix resolved while
    the full upper-case id was an UnknownMessage (it skipped the look-up as is)."""
    ms, mid = _facade()
    with ms:
        upper = mid.upper()
        assert ms.query_status(upper).id == mid
        assert ms.message_data(upper) == ms.message_data(mid)
        assert ms.hold(upper) == 1 and ms.release([upper]) == 1
        assert ms.retry(upper) == 1 and ms.retry_many(upper) == 1
        assert ms.wait(upper, timeout=0).id == mid
        assert ms.cancel(upper) == 1


async def test_the_async_facade_takes_a_full_upper_case_id() -> None:
    async with AsyncMailstrom(
        Config(helo_name="mail.example.com"), store=MemoryStore(), worker=None
    ) as ms:
        mid = await ms.send_email(Email(from_="a@example.com", to=["b@example.org"], text="x"))
        assert (await ms.query_status(mid.upper())).id == mid


@pytest.mark.parametrize("bad", [None, 5, b"0123", 1.5, ["0123"]])
def test_an_id_that_is_not_a_string_is_an_unknown_message(bad: object) -> None:
    """Not a raw TypeError from len() or the regex: the error every "no such message"
    path raises (a KeyError, exit 66 on the command line)."""
    ms, _ = _facade()
    with ms:
        for call in (ms.query_status, ms.retry, ms.cancel, ms.resolve_id, ms.message_data):
            with pytest.raises(UnknownMessage, match=type(bad).__name__):
                call(bad)  # type: ignore[arg-type]
        with pytest.raises(UnknownMessage):
            ms.hold(bad)  # type: ignore[arg-type]


def test_unknown_ids_are_quoted_briefly() -> None:
    text = str(UnknownMessage("x" * 10_000))
    assert len(text) < 100 and text.endswith("...'")


@pytest.mark.parametrize(
    ("minutes", "bucket"),
    [(0, 0), (4.9, 0), (5, 1), (9, 1), (10, 2), (39, 3), (40, 4), (159, 5), (160, 6), (1e6, 6)],
)
def test_age_buckets_double(minutes: float, bucket: int) -> None:
    assert bucket_of(timedelta(minutes=minutes), AGE_EDGES) == bucket


def test_shape_rows_put_the_largest_domain_first() -> None:
    rows = shape_rows({("b.test", 0): 1, ("a.test", 6): 2, ("c.test", 1): 3, ("b.test", 2): 2}, 7)
    # Ties (3 and 3) by domain name.
    assert [(r.domain, r.total) for r in rows] == [("b.test", 3), ("c.test", 3), ("a.test", 2)]
    assert rows[0].counts == (1, 0, 2, 0, 0, 0, 0)
    assert rows[2].counts == (0, 0, 0, 0, 0, 0, 2)


def test_domains_are_normalized_and_checked() -> None:
    assert normalize_domain(" Example.ORG. ") == "example.org"
    for bad in ("", "a b", "bob@example.org", "x" * 300, "a/b"):
        with pytest.raises(ValueError, match="not a domain"):
            normalize_domain(bad)


def test_a_domain_label_is_1_to_63_octets() -> None:
    """A label of 64 octets (RFC 1035 §2.3.4 allows 63) or an empty one was taken: a
    suspension no recipient's domain can ever match."""
    assert normalize_domain("x" * 63 + ".example") == "x" * 63 + ".example"
    for bad in ("x" * 64 + ".example", "a..example", ".example"):
        with pytest.raises(ValueError, match="not a domain"):
            normalize_domain(bad)


# --- when a wait is over -------------------------------------------------------------------


def status(
    *recipients: tuple[RecipientState, datetime | None], held: bool = False
) -> MessageStatus:
    return MessageStatus(
        id="0" * 32,
        state=RecipientState.QUEUED,
        envelope_from="a@example.org",
        created_at=NOW,
        size=1,
        recipients=tuple(
            RecipientStatus(address=f"r{i}@example.org", state=s, attempts=1, next_attempt_at=at)
            for i, (s, at) in enumerate(recipients)
        ),
        held=held,
    )


def test_a_wait_is_over_when_nothing_can_change_before_its_end() -> None:
    end = NOW + MINUTE
    final = (RecipientState.DELIVERED, None)
    assert settled(status(final, (RecipientState.FAILED, None)), end)
    assert not settled(status(final, (RecipientState.QUEUED, NOW)), end)
    assert not settled(status((RecipientState.DEFERRED, NOW + MINUTE / 2)), end)
    assert settled(status((RecipientState.DEFERRED, NOW + 2 * MINUTE), final), end)
    assert settled(status((RecipientState.QUEUED, NOW), held=True), end)
    # A message scheduled (send_at) after the end: no worker tries it before then.
    assert settled(status((RecipientState.QUEUED, NOW + 2 * MINUTE), final), end)
    assert not settled(status((RecipientState.QUEUED, NOW + MINUTE / 2)), end)


# --- local names and aliases ---------------------------------------------------------------


def test_bare_names() -> None:
    assert is_bare("root") and is_bare("www-data")
    assert not is_bare("root@host") and not is_bare("|/bin/cmd") and not is_bare("")


def test_headers_get_the_origin_and_nothing_else_changes() -> None:
    data = (
        b"From: root (Cron Daemon)\r\nTo: root,\r\n ops@example.org\r\n"
        b"Subject: Cron <root@host> job\r\nX-Other: root\r\n\r\nFrom: root\r\n"
    )
    out = qualify_headers(data, "host.example.org")
    assert out == (
        b"From: Cron Daemon <root@host.example.org>\r\n"
        b"To: root@host.example.org, ops@example.org\r\n"
        b"Subject: Cron <root@host> job\r\nX-Other: root\r\n\r\nFrom: root\r\n"
    )
    untouched = b"From: a@example.org\nTo: b@example.org\n\nroot\n"
    assert qualify_headers(untouched, "host.example.org") is untouched


def test_a_group_keeps_its_name_when_a_bare_member_gets_the_origin() -> None:
    """``To: Friends: root, bob@example.org;`` was rewritten as ``To: root@..., bob@...``:
    the group's name, and an empty group beside it (``undisclosed-recipients:;``), were
    dropped from the message, which its recipients then read differently."""
    data = (
        b"To: Friends: root, Bob <bob@example.org>;, undisclosed-recipients:;, kim\n"
        b'Cc: "Ops, night": root;\n\nbody\n'
    )
    assert qualify_headers(data, "o.test") == (
        b"To: Friends: root@o.test, Bob <bob@example.org>;, undisclosed-recipients:;,\n"
        b" kim@o.test\n"
        b'Cc: "Ops, night": root@o.test;\n\nbody\n'
    )


def test_aliases_expand_recursively_with_loops_and_programs_stopped() -> None:
    aliases = {"root": ["admin", "ops@example.org"], "admin": ["root", "|/bin/x", "kim"]}
    assert expand("root", aliases, "o.test") == ["root@o.test", "kim@o.test", "ops@example.org"]
    assert expand("Nobody", aliases, "o.test") == ["Nobody@o.test"]
    assert expand("bob@example.org", aliases, "o.test") == ["bob@example.org"]


def test_a_backslash_name_is_the_name_itself_not_aliased_again() -> None:
    """``root: \\root, ops@example.org`` (aliases(5) of Sendmail and Postfix: a name after
    a backslash is not aliased) keeps a copy for root: ``\\root@`` the origin was made of
    it, no address, and the whole message was refused (exit 65)."""
    aliases = {"root": ["\\root", "ops@example.org"], "kim": ["\\Kim"]}
    assert expand("root", aliases, "o.test") == ["root@o.test", "ops@example.org"]
    assert expand("kim", aliases, "o.test") == ["Kim@o.test"]
    assert expand("\\root", aliases, "o.test") == ["root@o.test"]


def test_reading_an_aliases_file(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text(
        '# comment\n\nPostmaster: root\nroot: ops@example.org,\n\t"backup"\nnot an alias\n'
    )
    assert read_aliases(str(path)) == {
        "postmaster": ["root"],
        "root": ["ops@example.org", "backup"],
    }
    # A comma inside quotes is part of its target, as newaliases reads it: it split
    # '"|/usr/bin/notify ops, dev"' into two targets, the second 'dev"' a local name.
    path.write_text('pager: "|/usr/bin/notify ops, dev", kim\nodd: "a, b"@example.org\n')
    assert read_aliases(str(path)) == {
        "pager": ["|/usr/bin/notify ops, dev", "kim"],
        "odd": ['"a, b"@example.org'],
    }
    path.write_bytes(b"a: b\n" * (MAX_ALIASES_SIZE // 5 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        read_aliases(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        read_aliases(str(tmp_path / "missing"))


def test_ids_on_standard_input_may_fill_lines_of_200_octets() -> None:
    """The documented bound is a line of at most 200 octets; the line's end was counted
    in it, so a 200-octet line (199 with CRLF) was refused as "too long for a message
    id", exit 65."""
    mid = "0190f3a2c4e1" + "0" * 20
    at_most = b"# " + b"x" * (MAX_ID_LINE - 2)
    assert len(at_most) == MAX_ID_LINE
    for end in (b"\n", b"\r\n"):
        given = at_most + end + mid.encode() + end
        assert read_ids(io.BytesIO(given)) == [mid]
    with pytest.raises(CLIError, match="line 1: too long") as raised:
        read_ids(io.BytesIO(at_most + b"x\n" + mid.encode() + b"\n"))
    assert raised.value.code == EX_DATAERR


def test_ids_on_standard_input_may_begin_with_a_byte_order_mark() -> None:
    """A list saved by an editor or PowerShell on Windows starts with a UTF-8 byte order
    mark; it was read as part of the first id ("\\ufffd\\ufffd\\ufffd0190..."), which no
    message has, so the whole command failed with "unknown message id"."""
    first, second = "0190f3a2c4e1" + "0" * 20, "0190f3a2c4e1" + "1" * 20
    given = b"\xef\xbb\xbf" + first.encode() + b"\r\n" + second.encode() + b"\r\n"
    assert read_ids(io.BytesIO(given)) == [first, second]
    # Only at the start of the input: further on it is no id's part either, but stays a
    # bad id (reported as unknown), not silently changed.
    assert read_ids(io.BytesIO(b"\xef\xbb\xbf# a comment\n" + first.encode())) == [first]
    # The mark does not count in the line's bound.
    at_most = b"# " + b"x" * (MAX_ID_LINE - 2)
    assert read_ids(io.BytesIO(b"\xef\xbb\xbf" + at_most + b"\r\n" + first.encode())) == [first]
    with pytest.raises(CLIError, match="line 1: too long"):
        read_ids(io.BytesIO(b"\xef\xbb\xbf" + at_most + b"x\n" + first.encode()))


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8:0::1]", "[ipv6:2001:db8::1]"),
        ("[ipv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
    ],
)
def test_an_address_literal_destination_can_be_suspended_and_resumed(
    typed: str, stored: str
) -> None:
    """Mail to bob@[192.0.2.1] goes to that address, its own destination (RFC 5321
    §4.1.3); suspend() refused it as "not a domain", so no operator could stop it."""
    ms = Mailstrom(Config(helo_name="mail.example.com"), store=MemoryStore(), worker=None)
    with ms:
        ms.send_email(
            Email(from_="a@example.com", to=["ann@example.org", f"bob@{stored}"], text="x")
        )
        ms.suspend(typed)
        assert [s.domain for s in ms.suspensions()] == [stored]
        lease = ms.store.lease(now=datetime.now(UTC), limit=10, lease_for=timedelta(minutes=5))
        assert lease is not None
        assert [r.address for item in lease.items for r in item.recipients] == ["ann@example.org"]
        assert ms.resume(typed) is True
        assert ms.suspensions() == []
