"""``mailstrom suppress`` through the real command in a subprocess."""

from __future__ import annotations

import resource
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom.stores.url import open_store
from mailstrom.suppression import Suppression, SuppressionSource
from tests.cli.conftest import CLI, MailEnv
from tests.support.refusing import REASON as REFUSED
from tests.support.refusing import refuse_suppression, stop_refusing


def test_add_list_remove(cli: CLI) -> None:
    out = cli.ok("suppress", "add", "Bob@Example.test", "other.test", "--reason", "by hand").out
    assert out.splitlines() == ["bob@example.test: suppressed", "other.test: suppressed"]
    rows = cli.ok("suppress", "list", "--json").json()
    assert [(r["target"], r["source"], r["reply"]) for r in rows] == [
        ("bob@example.test", "manual", "by hand"),
        ("other.test", "manual", "by hand"),
    ]
    plain = cli.ok("suppress", "list").out.splitlines()
    assert plain[0].split() == ["TARGET", "SOURCE", "SINCE", "EXPIRES", "REPLY"]
    assert plain[1].split()[:2] == ["bob@example.test", "manual"]
    assert [
        r["target"]
        for r in cli.ok(
            "suppress", "list", "--json", "--limit", "1", "--after", "bob@example.test"
        ).json()
    ] == ["other.test"]

    assert cli.ok("suppress", "remove", "--json", "bob@example.test", "x@y.test").json() == {
        "removed": 1
    }
    assert [r["target"] for r in cli.ok("suppress", "list", "--json").json()] == ["other.test"]


def test_a_quoted_local_part_is_added_exported_imported_and_removed(
    cli: CLI, workdir: Path
) -> None:
    """Was refused as "not an address or a domain"; kept as prepare() stores it."""
    out = cli.ok("suppress", "add", '"John Doe"@Example.test', '"john"@example.test').out
    assert out.splitlines() == [
        '"john doe"@example.test: suppressed',
        "john@example.test: suppressed",
    ]
    (workdir / "list.csv").write_text(cli.ok("suppress", "export").out)
    other = CLI(cwd=workdir, env=cli.env | {"MAILSTROM_STORE": "sqlite:///other.db"})
    assert other.ok("suppress", "import", "--json", "list.csv").json()["imported"] == 2
    listed = [r["target"] for r in other.ok("suppress", "list", "--json").json()]
    assert listed == ['"john doe"@example.test', "john@example.test"]
    removed = other.ok(
        "suppress", "remove", "--json", '"JOHN DOE"@example.test', '"john"@example.test'
    )
    assert removed.json() == {"removed": 2}


def test_expiring_entries(cli: CLI) -> None:
    row = cli.ok("suppress", "add", "--json", "bob@example.test", "--expires", "2d").json()
    assert row["added"][0]["expires_at"] is not None
    assert len(cli.ok("suppress", "list", "--json").json()) == 1


def test_export_import_round_trip(cli: CLI, workdir: Path, tmp_path: Path) -> None:
    cli.ok(
        "suppress",
        "add",
        "bob@example.test",
        "--source",
        "complaint",
        "--reason",
        'a "quoted", reply',
    )
    cli.ok("suppress", "add", "example.org", "#team@example.org")  # "#" is atext
    exported = cli.ok("suppress", "export").out
    assert exported.splitlines()[0] == "target,source,reply,created_at,expires_at,message_id"
    (workdir / "list.csv").write_text(exported)

    other = CLI(cwd=workdir, env=cli.env | {"MAILSTROM_STORE": "sqlite:///other.db"})
    assert other.ok("suppress", "import", "--json", "list.csv").json() == {
        "imported": 3,
        "expired": 0,
    }
    assert other.ok("suppress", "export").out == exported
    # From stdin, a bare list of addresses.
    out = other.ok("suppress", "import", "--source", "async_bounce", stdin=b"ann@example.test\n")
    assert out.out.strip() == "1 entries imported"
    sources = {r["target"]: r["source"] for r in other.ok("suppress", "list", "--json").json()}
    assert sources == {
        "#team@example.org": "manual",
        "ann@example.test": "async_bounce",
        "bob@example.test": "complaint",
        "example.org": "manual",
    }


def test_an_export_that_fails_midway_leaves_the_file_as_it_was(cli: CLI, workdir: Path) -> None:
    """The file was truncated as the export began and written page by page: a write or
    a store read failing midway (a full disk, a restarted server) left it cut short, the
    earlier export in it gone, and a CSV that imports without a word. The export is
    written beside it and takes its place once whole."""
    rows = [f"u{i:04d}@example.test" for i in range(3000)]
    cli.ok("suppress", "import", stdin="\n".join(rows).encode())
    cli.ok("suppress", "export", "list.csv")
    before = (workdir / "list.csv").read_bytes()
    assert len(before) > 100_000
    cli.ok("suppress", "add", "late@example.test")

    def small_files() -> None:  # as a full disk: writes past 64 KiB fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    proc = subprocess.run(
        [sys.executable, "-m", "mailstrom", "suppress", "export", "list.csv"],
        cwd=workdir,
        env=cli.env,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        check=False,
    )
    assert proc.returncode == 73, proc.stderr
    assert "cannot write list.csv" in proc.stderr
    assert (workdir / "list.csv").read_bytes() == before
    assert sorted(p.name for p in workdir.iterdir() if "list" in p.name) == ["list.csv"]
    cli.ok("suppress", "export", "list.csv")
    assert (workdir / "list.csv").read_text().count("@example.test") == 3001


def test_an_export_to_stdout_is_utf_8_whatever_the_locale(cli: CLI, workdir: Path) -> None:
    """Import reads UTF-8 only; an export to standard output under a Latin-1 locale was
    written in Latin-1 (jörg@ would not import again) and stopped with an internal error
    (exit 70, half the list written) at a target Latin-1 has no letters for."""
    cli.ok("suppress", "add", "jörg@example.test", "用户@example.test", "ann@example.test")
    latin1 = CLI(cwd=workdir, env=cli.env | {"PYTHONIOENCODING": "latin-1"})
    result = latin1("suppress", "export")
    assert result.code == 0, result.err
    assert result.out == cli.ok("suppress", "export").out
    (workdir / "list.csv").write_text(result.out, encoding="utf-8")
    other = CLI(cwd=workdir, env=cli.env | {"MAILSTROM_STORE": "sqlite:///other.db"})
    assert other.ok("suppress", "import", "--json", "list.csv").json() == {
        "imported": 3,
        "expired": 0,
    }
    assert [r["target"] for r in other.ok("suppress", "list", "--json").json()] == [
        "ann@example.test",
        "jörg@example.test",
        "用户@example.test",
    ]


def test_errors_are_typed_and_nothing_is_half_imported(cli: CLI, workdir: Path) -> None:
    bad = cli("suppress", "add", "not an address")
    assert bad.code == 65
    assert bad.err_lines == ["mailstrom: not an address or a domain: 'not an address'"]

    result = cli("suppress", "import", stdin=b"good@example.test\nbad address\n")
    assert result.code == 65
    assert result.err_lines == ["mailstrom: line 2: not an address or a domain: 'bad address'"]
    assert cli.ok("suppress", "list", "--json").json() == []

    assert cli("suppress", "import", stdin=b"x@\xff.test\n").code == 65
    missing = cli("suppress", "import", "nowhere.csv")
    assert missing.code == 66 and "cannot read nowhere.csv" in missing.err
    assert cli("suppress", "add", "bob@example.test", "--expires", "soon").code == 64
    escape = cli("suppress", "add", "bob@example.test", "--reason", "gone\x1b[2J")
    assert escape.code == 65 and "--reason holds control characters" in escape.err
    assert cli("suppress").code == 64


def test_an_entry_that_expires_at_once_is_refused(cli: CLI) -> None:
    """``--expires 0s`` said "suppressed until <now>", wrote an entry that never applied
    and, in its place, dropped the entry the address had: the library refuses an expiry
    that is not in the future, and so does the command."""
    cli.ok("suppress", "add", "bob@example.test", "--reason", "asked to stop")
    result = cli("suppress", "add", "bob@example.test", "--expires", "0s")
    assert result.code == 64, result.out
    assert "--expires" in result.err
    [row] = cli.ok("suppress", "list", "--json").json()
    assert (row["target"], row["reply"], row["expires_at"]) == (
        "bob@example.test",
        "asked to stop",
        None,
    )


def test_a_list_after_what_no_store_can_compare_is_a_usage_error(cli: CLI) -> None:
    """An --after of octets that are no UTF-8 (a lone surrogate, as Python reads such an
    argv) reached SQLite, which refused it: exit 75, "try again later", for a command
    line that will never work."""
    cli.ok("suppress", "add", "bob@example.test")
    result = cli("suppress", "list", "--after", "ex\udcffample.org")
    assert result.code == 64, result.err
    assert result.err_lines[-1].startswith("mailstrom: argument --after: expected a target")


def test_a_list_after_a_u_label_domain_starts_where_its_entry_is(cli: CLI) -> None:
    """Entries are kept with A-label domains (bücher.example as xn--bcher-kva.example), but
    --after was only lower-cased: "bücher.example" sorts after every ASCII target, so
    `suppress list --after bücher.example` listed nothing, though entries followed it.
    A whole target is taken as add takes it now; other text is still compared as typed."""
    cli.ok("suppress", "add", "a.example", "Bücher.example", "jörg@Bücher.example", "z.example")
    targets = [r["target"] for r in cli.ok("suppress", "list", "--json").json()]
    assert targets == [
        "a.example",
        "jörg@xn--bcher-kva.example",
        "xn--bcher-kva.example",
        "z.example",
    ]
    for after, rest in [
        ("bücher.example", ["z.example"]),
        ("Jörg@BÜCHER.example", ["xn--bcher-kva.example", "z.example"]),
        ("xn--bcher-kva.example", ["z.example"]),
        ("b", targets[1:]),  # not a target: as typed
    ]:
        listed = cli.ok("suppress", "list", "--json", "--after", after).json()
        assert [r["target"] for r in listed] == rest, after


def test_a_list_cut_at_its_limit_names_the_next_page(cli: CLI) -> None:
    """`suppress list` stopped at --limit (100) entries without a word, in text or JSON:
    `suppress list --json | jq length` gave 100 of 150 and nothing said more followed.
    A cut listing now says so, with the --after that lists the next page (shell-quoted:
    a bare "#" would start a comment): on stderr with --json, stdout keeping its list, and
    in a footer of the table."""
    targets = [f"r{i:03}@example.test" for i in range(150)]
    cli.ok("suppress", "add", *targets)
    more = "showing 100 entries; more follow (--after r099@example.test for the next page)"

    cut = cli.ok("suppress", "list", "--json")
    assert [r["target"] for r in cut.json()] == targets[:100]
    assert cut.err == f"mailstrom: note: {more}\n"
    rest = cli.ok("suppress", "list", "--json", "--after", "r099@example.test")
    assert ([r["target"] for r in rest.json()], rest.err) == (targets[100:], "")
    exact = cli.ok("suppress", "list", "--json", "--after", "r099@example.test", "--limit", "50")
    assert (len(exact.json()), exact.err) == (50, "")
    whole = cli.ok("suppress", "list", "--json", "--limit", "150")
    assert (len(whole.json()), whole.err) == (150, "")

    table = cli.ok("suppress", "list")
    lines = table.out.splitlines()
    assert len(lines) == 1 + 100 + 2 and lines[-2:] == ["", more] and table.err == ""
    assert lines[100].split()[0] == "r099@example.test"
    assert cli.ok("suppress", "list", "--limit", "150").out.splitlines()[-1].startswith("r149@")

    cli.ok("suppress", "add", "#team@example.test")
    first = cli.ok("suppress", "list", "--json", "--limit", "1")
    assert first.err == (
        "mailstrom: note: showing 1 entry; more follow "
        "(--after '#team@example.test' for the next page)\n"
    )


def test_remove_counts_targets_not_the_rows_of_each(cli: CLI, workdir: Path) -> None:
    """Removing bob@Bücher.example also deletes the form an earlier build stored it under
    (bob@bücher.example, which never applied); with both stored, the command said "2 of 1
    removed", the rows deleted against the targets asked for. It counts the targets that
    had an entry now; the same target given twice is still one."""
    cli.ok("suppress", "add", "bob@Bücher.example", "ann@example.test")
    store = open_store(f"sqlite:///{workdir / 'queue.db'}")
    try:
        legacy = Suppression(
            target="bob@bücher.example",
            source=SuppressionSource.MANUAL,
            reply="",
            created_at=datetime.now(UTC),
        )
        store.suppress([legacy])
    finally:
        store.close()
    asked = ("bob@BÜCHER.example", "bob@xn--bcher-kva.example", "ann@example.test", "x@y.test")
    assert cli.ok("suppress", "remove", *asked).out == "2 of 3 removed\n"
    assert cli.ok("suppress", "list", "--json").json() == []
    cli.ok("suppress", "add", "bob@Bücher.example")
    assert cli.ok("suppress", "remove", "--json", *asked).json() == {"removed": 1}


def test_remove_says_what_it_removed_before_the_store_failed(cli: CLI, workdir: Path) -> None:
    """A target stored in two forms is removed in a call of its own, after the others: a
    store failing then (a lock timeout, a full disk) left those others removed under an
    error that read as if nothing had been. The error says how many were removed."""
    cli.ok("suppress", "add", "bob@Bücher.example", "ann@example.test")
    store = open_store(f"sqlite:///{workdir / 'queue.db'}")
    try:
        legacy = Suppression(
            target="bob@bücher.example",
            source=SuppressionSource.MANUAL,
            reply="",
            created_at=datetime.now(UTC),
        )
        store.suppress([legacy])
    finally:
        store.close()
    with closing(sqlite3.connect(workdir / "queue.db")) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON suppressions"
            " WHEN OLD.target = 'bob@bücher.example' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
    failed = cli("suppress", "remove", "bob@Bücher.example", "ann@example.test")
    assert failed.code == 75
    [line] = failed.err_lines
    assert line.startswith("mailstrom: 1 of 2 removed before the store failed: ")
    assert "refused" in line
    assert failed.out == ""
    listed = [e["target"] for e in cli.ok("suppress", "list", "--json").json()]
    assert listed == ["bob@bücher.example", "bob@xn--bcher-kva.example"]


def test_a_suppressed_recipient_fails_without_a_connection(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    cli.ok("suppress", "add", "bob@example.test", "--reason", "550 5.1.1 gone")
    out = cli.ok(
        "send",
        "--from",
        "app@client.test",
        "--to",
        "bob@example.test",
        "--to",
        "carol@example.test",
        "--text",
        "x",
    )
    message_id = out.out.strip()
    cli.ok("worker", "--once", "--no-live")
    status = cli.ok("status", "--json", message_id).json()
    by_address = {r["address"]: r for r in status["recipients"]}
    assert by_address["carol@example.test"]["state"] == "delivered"
    bob = by_address["bob@example.test"]
    assert bob["state"] == "failed"
    assert bob["error"].startswith("suppressed since ") and bob["error"].endswith(
        ": 550 5.1.1 gone"
    )
    [received] = mx.messages
    assert list(received.rcpt_tos) == ["carol@example.test"]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_import_the_store_fails_midway_writes_nothing_and_can_be_run_again(
    cli: CLI, workdir: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """The import used to commit 1,000 entries a transaction: a store failing at entry
    1,500 (a full disk, a restarted server) left the first 1,000 written and the operator
    unable to tell which. Now it is one transaction: nothing is written, the store error's
    exit code says try again, and running it again gives what one clean run gives."""
    url = request.getfixturevalue("postgres_url") if kind == "postgres" else ""
    url = url or f"sqlite:///{workdir / 'queue.db'}"
    cli.env["MAILSTROM_STORE"] = url
    cli.ok("suppress", "add", "u0000@example.test", "--reason", "before")
    before = cli.ok("suppress", "export").out
    rows = [f"u{i:04d}@example.test,manual,imported,2030-01-02T03:04:05+00:00" for i in range(2000)]
    (workdir / "list.csv").write_text("\n".join(rows) + "\n")
    refuse_suppression(url, "u1500@example.test")

    failed = cli("suppress", "import", "list.csv")
    assert failed.code == 75
    assert cli.ok("suppress", "export").out == before
    [line] = failed.err_lines
    assert line.startswith("mailstrom: nothing was imported: ") and REFUSED in line
    assert failed.out == ""

    stop_refusing(url)
    assert cli.ok("suppress", "import", "list.csv").out == "2000 entries imported\n"
    header = "target,source,reply,created_at,expires_at,message_id\n"
    assert cli.ok("suppress", "export").out == header + "".join(f"{r},,\n" for r in rows)


def test_an_import_leaves_out_entries_that_have_expired(cli: CLI, workdir: Path) -> None:
    """An import wrote a row that had expired as any other, in the place of the entry
    its target had: ``export --all`` of a backup or another store imported over a
    complaint's entry (no end) left the address unsuppressed, mail going to it again.
    ``add`` and the library refuse an expiry that is not in the future for that reason;
    an import leaves such rows out, says how many, and writes the rest."""
    cli.ok("suppress", "add", "bob@example.test", "--source", "complaint", "--reason", "spam")
    csv_text = (
        "target,source,reply,created_at,expires_at,message_id\n"
        "bob@example.test,hard_bounce,550 5.1.1 gone,"
        "2025-01-01T00:00:00+00:00,2025-07-01T00:00:00+00:00,\n"
        "old@example.test,hard_bounce,550 5.1.1 gone,"
        "2025-01-01T00:00:00+00:00,2025-07-01T00:00:00+00:00,\n"
        "new@example.test,manual,,,,\n"
    )
    result = cli.ok("suppress", "import", "--json", stdin=csv_text.encode()).json()
    assert result == {"imported": 1, "expired": 2}
    rows = cli.ok("suppress", "list", "--all", "--json").json()
    assert [(r["target"], r["source"], r["reply"], r["expires_at"]) for r in rows] == [
        ("bob@example.test", "complaint", "spam", None),
        ("new@example.test", "manual", "", None),
    ]
    text = cli.ok("suppress", "import", stdin=csv_text.encode()).out
    assert text == "1 entries imported; 2 that had expired left out\n"
