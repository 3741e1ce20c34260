"""``mailstrom suppress list|add|remove|import|export``: the store's suppression list."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import stat
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta

from mailstrom.arguments import check_key
from mailstrom.cli.context import settings_from, store_from, utc_now
from mailstrom.cli.exits import EX_CANTCREAT, EX_NOINPUT, EX_OK, CLIError, exit_code_for
from mailstrom.cli.output import cell, echo, is_tty, print_json, print_table
from mailstrom.cli.parsing import ArgumentParser, Subparsers, count_arg, duration_arg, path_arg
from mailstrom.cli.reading import stdin_buffer
from mailstrom.errors import InvalidArgument, StoreError
from mailstrom.message.chars import shorten
from mailstrom.settings import MAX_INTEGER
from mailstrom.stores.base import Store
from mailstrom.suppression import (
    MAX_TARGET,
    Suppression,
    SuppressionSource,
    check_reply,
    normalize_target,
    page_after,
    stored_forms,
)

_PAGE = 1000

DESCRIPTION = """\
The suppression list holds addresses and whole domains that mail is not sent to: a
recipient there fails at once with "suppressed since <date>: <reply>" and no connection is
made. Workers add the addresses that hard-bounce (see suppress_on in docs/cli.md) and
`mailstrom bounce` those of bounces and complaints that arrive later; these commands let
an operator look, add and remove. Every worker of the store shares the list.
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "suppress",
        parents=parents,
        help="list, add, remove, import or export suppressed addresses and domains",
        description=DESCRIPTION,
        epilog="examples:\n"
        "  mailstrom suppress list\n"
        "  mailstrom suppress add bob@example.org --reason 'asked to stop' --expires 90d\n"
        "  mailstrom suppress add example.net          # every address there\n"
        "  mailstrom suppress remove bob@example.org\n"
        "  mailstrom suppress export > suppressed.csv\n"
        "  mailstrom suppress import suppressed.csv\n",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = _action(
        actions,
        parents,
        "list",
        "show the entries in force, in target order, and the --after of the next page when "
        "more follow (with --json, on stderr)",
    )
    ls.add_argument("--all", action="store_true", help="include expired entries")
    ls.add_argument(
        "--after", default="", type=_after_arg, metavar="TARGET", help="start after this target"
    )
    ls.add_argument("--limit", type=count_arg, default=100, help="at most N entries (100)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=list_command)

    add = _action(actions, parents, "add", "suppress addresses or domains")
    add.add_argument("targets", nargs="+", metavar="TARGET", help="an address or a domain")
    add.add_argument("--reason", default="", help="a note shown as the reply (optional)")
    add.add_argument(
        "--expires", type=_expiry_arg, metavar="AGE", help="remove it after AGE (e.g. 90d)"
    )
    add.add_argument(
        "--source",
        choices=[s.value for s in SuppressionSource],
        default=SuppressionSource.MANUAL.value,
        help="why it is suppressed (default: manual)",
    )
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(handler=add_command)

    rm = _action(actions, parents, "remove", "take addresses or domains off the list")
    rm.add_argument("targets", nargs="+", metavar="TARGET", help="an address or a domain")
    rm.add_argument("--json", action="store_true", help="print JSON")
    rm.set_defaults(handler=remove_command)

    imp = _action(
        actions,
        parents,
        "import",
        "add the entries of a CSV file (all or none: checked first, written in one transaction)",
    )
    imp.add_argument(
        "file", nargs="?", default="-", type=path_arg, help="CSV file, or - for stdin (default)"
    )
    imp.add_argument(
        "--source",
        choices=[s.value for s in SuppressionSource],
        default=SuppressionSource.MANUAL.value,
        help="source of rows without one (default: manual)",
    )
    imp.add_argument("--json", action="store_true", help="print JSON")
    imp.set_defaults(handler=import_command)

    exp = _action(actions, parents, "export", "write the list as CSV")
    exp.add_argument(
        "file", nargs="?", default="-", type=path_arg, help="CSV file, or - for stdout (default)"
    )
    exp.add_argument("--all", action="store_true", help="include expired entries")
    exp.set_defaults(handler=export_command)


def _expiry_arg(text: str) -> timedelta:
    """``--expires``: a duration longer than 0. An entry that expires as it is written
    never applies, and it would take the place of the entry the address had (the library
    refuses an ``expires_at`` that is not in the future the same way)."""
    age = duration_arg(text)
    if age <= timedelta(0):
        raise argparse.ArgumentTypeError(f"an entry must last longer than 0: {text!r}")
    return age


def _after_arg(text: str) -> str:
    """``--after``: where a listing starts, as targets are kept: a whole target as ``add``
    takes it (a U-label domain as A-labels: "bücher.example" sorted after every ASCII
    target and started the listing there), other text (a prefix) lower-cased. Text that no
    store can compare with its targets (a lone surrogate, as Python reads an argv that is
    no UTF-8; a NUL) is a usage error: SQLite refused it, and the command exited 75, as
    if trying again later could help."""
    try:
        return check_key(page_after(text), "--after", limit=MAX_TARGET)
    except InvalidArgument:
        raise argparse.ArgumentTypeError(
            f"expected a target of at most {MAX_TARGET} octets of text, got {shorten(text)}"
        ) from None


def _action(
    actions: Subparsers, parents: list[argparse.ArgumentParser], name: str, text: str
) -> ArgumentParser:
    parser: ArgumentParser = actions.add_parser(
        name, parents=parents, help=text, description=text[0].upper() + text[1:] + "."
    )
    return parser


def _row(e: Suppression) -> dict[str, object]:
    return {
        "target": e.target,
        "source": e.source.value if e.source is not None else None,
        "reply": e.reply,
        "created_at": e.created_at,
        "expires_at": e.expires_at,
        "message_id": e.message_id,
    }


def list_command(args: argparse.Namespace) -> int:
    now = utc_now()
    with store_from(settings_from(args), read_only=True) as store:
        # One entry past the limit tells whether the listing is cut (a bigint at most).
        entries = store.list_suppressions(
            now=None if args.all else now,
            after=args.after,
            limit=min(args.limit + 1, MAX_INTEGER),
        )
    more = _more(entries[: args.limit]) if len(entries) > args.limit else None
    entries = entries[: args.limit]
    if args.json:
        print_json([_row(e) for e in entries])
        if more is not None:
            # stdout stays the list scripts parse; `| jq length` gave 100 of 150 and
            # nobody learned that more followed.
            print(f"mailstrom: note: {more}", file=sys.stderr)
        return EX_OK
    print_table(
        ["TARGET", "SOURCE", "SINCE", "EXPIRES", "REPLY"],
        [
            [
                e.target,
                cell(e.source),  # "-": unknown (a row that cannot be read)
                _time(e.created_at) or "-",
                _time(e.expires_at) if e.expires_at else "never",
                cell(e.reply),
            ]
            for e in entries
        ],
    )
    if more is not None:
        print(f"\n{more}")
    return EX_OK


def _more(shown: list[Suppression]) -> str:
    """What a listing cut at its limit says: how many it shows and the ``--after`` (as a
    shell word: a bare "#" starts a comment) that lists the next page."""
    count = f"{len(shown):,} {'entry' if len(shown) == 1 else 'entries'}"
    after = shlex.quote(shown[-1].target)
    return f"showing {count}; more follow (--after {after} for the next page)"


def _time(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M") if when is not None else ""


def add_command(args: argparse.Namespace) -> int:
    now = utc_now()
    check_reply(args.reason, what="--reason")
    expires = now + args.expires if args.expires is not None else None
    entries = [
        Suppression(
            target=normalize_target(t),
            source=SuppressionSource(args.source),
            reply=args.reason,
            created_at=now,
            expires_at=expires,
        )
        for t in args.targets
    ]
    with store_from(settings_from(args)) as store:
        store.suppress(entries)
    if args.json:
        print_json({"added": [_row(e) for e in entries]})
    else:
        for e in entries:
            echo(f"{e.target}: suppressed" + (f" until {_time(expires)}" if expires else ""))
    return EX_OK


def remove_command(args: argparse.Namespace) -> int:
    # Every form that taking a target off deletes, by target: "N of M" counts the targets
    # that had an entry, not the rows (a target stored in two forms was "2 of 1").
    forms: dict[str, set[str]] = {}
    for text in args.targets:
        target, *older = stored_forms(text)
        forms.setdefault(target, {target}).update(older)
    # A target of one form is one row: those are removed and counted in one call.
    single = [target for target, each in forms.items() if len(each) == 1]
    removed = 0
    try:
        with store_from(settings_from(args)) as store:
            removed = store.unsuppress(single) if single else 0
            # Each target of more forms in a call of its own, to count it once: a store
            # failing midway leaves those before removed, and the error says how many.
            for each in forms.values():
                if len(each) > 1:
                    removed += store.unsuppress(sorted(each)) > 0
    except StoreError as exc:
        done = f"{removed} of {len(forms)} removed before the store failed"
        raise CLIError(
            f"{done if removed else 'nothing was removed'}: {exc}", exit_code_for(exc)
        ) from exc
    if args.json:
        print_json({"removed": removed})
    else:
        print(f"{removed} of {len(forms)} removed")
    return EX_OK


def import_command(args: argparse.Namespace) -> int:
    from mailstrom.suppression_csv import parse_csv, read_limited

    if args.file == "-":
        text = read_limited(stdin_buffer())
    else:
        try:
            with open(args.file, "rb") as stream:
                text = read_limited(stream)
        except OSError as exc:
            raise CLIError(f"cannot read {args.file}: {exc.strerror or exc}", EX_NOINPUT) from None
    now = utc_now()
    parsed = parse_csv(text, now=now, source=SuppressionSource(args.source))
    del text  # the entries are all that is needed now (the file may be 64 MiB)
    # A row that has expired applies to nobody, and written it would take the place of
    # the entry its target has (an `export --all` of a backup imported over a complaint's
    # left the address unsuppressed): left out, as add refuses such an expiry.
    entries = [e for e in parsed if e.active(now)]
    expired = len(parsed) - len(entries)
    del parsed
    try:
        with store_from(settings_from(args)) as store:
            # One transaction, however long the file: a store failing midway (a full
            # disk, a restarted server) must not leave an unknown part of it written.
            store.suppress(entries)
    except StoreError as exc:
        raise CLIError(f"nothing was imported: {exc}", exit_code_for(exc)) from exc
    if args.json:
        print_json({"imported": len(entries), "expired": expired})
    else:
        print(
            f"{len(entries)} entries imported"
            + (f"; {expired} that had expired left out" if expired else "")
        )
    return EX_OK


def _every(store: Store, *, now: datetime | None) -> Iterator[Suppression]:
    after = ""
    while page := store.list_suppressions(now=now, after=after, limit=_PAGE):
        yield from page
        after = page[-1].target


def export_command(args: argparse.Namespace) -> int:
    now = None if args.all else utc_now()
    with store_from(settings_from(args), read_only=True) as store:
        if args.file == "-":
            _export_to_stdout(_every(store, now=now))
        else:
            try:
                _export_to_file(args.file, _every(store, now=now))
            except OSError as exc:
                raise CLIError(
                    f"cannot write {args.file}: {exc.strerror or exc}", EX_CANTCREAT
                ) from None
    return EX_OK


def _export_to_file(path: str, entries: Iterator[Suppression]) -> None:
    """Write the CSV to a file beside ``path`` and put it in its place once whole. Written
    in place (truncated first, then page by page), a store or a disk failing midway left
    ``path`` cut short, the earlier export in it gone, and a CSV that imports without a
    word. What is no regular file is written in place as before: a symbolic link
    (``/dev/stdout`` among them), a FIFO, and a file in a directory this user may not
    create files in."""
    from mailstrom.suppression_csv import write_csv

    try:
        st: os.stat_result | None = os.lstat(path)
    except OSError:
        st = None  # none yet (or open() below says what is wrong with it)
    temp = None
    if st is None or stat.S_ISREG(st.st_mode):
        folder, name = os.path.split(os.path.abspath(path))
        with contextlib.suppress(OSError):
            fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    if temp is None:
        with open(path, "w", encoding="utf-8", newline="") as stream:
            write_csv(entries, stream)
        return
    try:
        _take_mode(fd, st)
        with open(fd, "w", encoding="utf-8", newline="") as stream:
            write_csv(entries, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _take_mode(fd: int, st: os.stat_result | None) -> None:
    """Give the file ``fd`` the mode (and, where allowed, owner) of the file it replaces
    (``st``), or for a new one the mode ``open()`` would have made (0666 less the umask):
    mkstemp makes it 0600."""
    if st is None:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        return
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        os.fchown(fd, st.st_uid, st.st_gid)


def _export_to_stdout(entries: Iterator[Suppression]) -> None:
    """The CSV on standard output in UTF-8, as import reads it and as a file is written,
    whatever the locale makes ``sys.stdout`` (Latin-1 under a Latin-1 locale, where a
    target it has no letters for stopped the export halfway). But on a terminal, which
    shows it and imports nothing, in the terminal's own encoding, as every other line is
    (what it cannot hold as escapes): in UTF-8, a reply's "Û" (C3 9B) reached one that
    is not UTF-8 as an 8-bit CSI."""
    from mailstrom.suppression_csv import write_csv

    binary = getattr(sys.stdout, "buffer", None)
    if binary is None or is_tty():  # a text stream without one takes str, as a terminal
        write_csv(entries, sys.stdout)
        return
    sys.stdout.flush()
    stream = io.TextIOWrapper(binary, encoding="utf-8", newline="", write_through=True)
    try:
        write_csv(entries, stream)
        stream.flush()
    finally:
        stream.detach()  # sys.stdout keeps its buffer open
