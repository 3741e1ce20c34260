"""Fuzzing the ``mailstrom`` command line as a whole, in-process: whatever a command's
options and arguments hold, it exits with a code from sysexits that says whose fault it
was and never 70 (a crash); stderr is one ``mailstrom: reason`` line (after a usage
block) with no traceback, no raw control character and no line past 1,000 characters;
plain stdout holds no raw control character; and the store still opens afterwards, with
``status`` and ``queue`` working.

Each example runs one command against a copy of a SQLite store holding messages in every
state (queued, deferred, delivered, failed, held), tags and metadata, a suppression and
a suspended domain. Values are drawn from hostile sets: empty, whitespace, huge and
negative numbers, nan and inf, non-ASCII digits, 10,000 characters, NUL, CR/LF, ESC,
bidirectional controls, lone surrogates (an argument that is not UTF-8), ids of every
message, their prefixes, upper case and wrong lengths, odd durations, dates and zones,
paths to directories, /dev/null, /dev/full, missing files and a FIFO (always with a
writer, so nothing blocks), and malformed store URLs.

No network is touched: DNS goes to a LoopbackDNS on 127.0.0.1 with an empty zone, and
every socket connection, name lookup and datagram to anywhere but loopback is refused
(and fails the example). Left out: ``worker``, ``web`` and ``events --follow`` (they
run until stopped), ``send --wait`` (it delivers), ``sendmail`` (its own fuzz test), and
PostgreSQL URLs naming a host other than 127.0.0.1 (libpq connects without Python's
sockets, so the guard would not see it).

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (150 by default), for a longer
run: ``MAILSTROM_FUZZ_EXAMPLES=5000 pytest --timeout=0 tests/cli/test_cli_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import ipaddress
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailstrom.cli import main as cli_main
from mailstrom.cli.exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)
from mailstrom.client.common import prepare_for
from mailstrom.config import Config
from mailstrom.message import Email
from mailstrom.status import Attempt, AttemptOutcome, RecipientState, SMTPReply
from mailstrom.stores import open_store
from mailstrom.stores.base import RecipientResult
from mailstrom.suppression import Suppression, SuppressionSource
from mailstrom.testing.dns import LoopbackDNS

EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "150"))
ACCEPTED_CODES = {
    EX_OK,
    EX_USAGE,
    EX_DATAERR,
    EX_NOINPUT,
    EX_UNAVAILABLE,
    EX_CANTCREAT,
    EX_IOERR,
    EX_TEMPFAIL,
    EX_CONFIG,
}
DOCTOR_CODES = {1, 2}
"""``doctor``'s own verdicts: warnings, failures (its report is on stdout)."""
MAX_ERROR_LINE = 1000
NOW = datetime.now(UTC)

# --- the store every example starts from ------------------------------------------------


def _prepared(config: Config, to: str, **queue: Any) -> Any:
    email = Email(
        from_="app@client.test",
        to=[to],
        subject="Grüße \u202e reversed",
        text="body\n",
    )
    return prepare_for(
        config, email, envelope_from=None, envelope_to=None, now=NOW - timedelta(hours=3), **queue
    )


def _finish(store: Any, state: RecipientState, outcome: AttemptOutcome, code: int) -> None:
    """Lease what is due and record ``state`` for it."""
    lease = store.lease(now=NOW, limit=10, lease_for=timedelta(minutes=5))
    assert lease is not None
    results = [
        RecipientResult(
            message_id=item.message_id,
            address=r.address,
            state=state,
            lease_token=item.lease_token,
            ref=r.ref,
            attempt=Attempt(
                at=NOW - timedelta(hours=2),
                outcome=outcome,
                mx_host="mx.example.test",
                ip="127.0.0.1",
                reply=SMTPReply(code=code, text="reply \x1b]0;title\x07 with controls"),
            ),
            next_attempt_at=NOW + timedelta(hours=1) if state is RecipientState.DEFERRED else None,
        )
        for item in lease.items
        for r in item.recipients
    ]
    store.record(results)


def build_template(path: Path) -> dict[str, str]:
    """A store with a message in each state; returns state → message id."""
    config = Config(helo_name="client.test")
    store = open_store(f"sqlite:///{path}")
    ids: dict[str, str] = {}
    try:
        for state, outcome, code in [
            (RecipientState.DELIVERED, AttemptOutcome.DELIVERED, 250),
            (RecipientState.FAILED, AttemptOutcome.PERMANENT, 550),
            (RecipientState.DEFERRED, AttemptOutcome.TEMPORARY, 451),
        ]:
            ids[state.value] = store.enqueue(
                _prepared(config, f"{state.value}@example.test", tags=[state.value]),
                now=NOW - timedelta(hours=3),
            )
            _finish(store, state, outcome, code)
        ids["queued"] = store.enqueue(
            _prepared(config, "q@other.test", tags=["news"], metadata={"k": "v"}), now=NOW
        )
        ids["held"] = store.enqueue(
            _prepared(config, "h@example.test", priority=None), now=NOW, hold=True
        )
        store.suppress(
            [
                Suppression(
                    target="gone@example.test",
                    source=SuppressionSource.MANUAL,
                    created_at=NOW,
                    reply="550 left",
                )
            ]
        )
        store.suspend("example.test", now=NOW, until=NOW + timedelta(days=1))
    finally:
        store.close()
    return ids


# --- the inputs -------------------------------------------------------------------------

HUGE = "x" * 10_000
HOSTILE = [
    "",
    " ",
    "\t",
    "0",
    "-1",
    "-0",
    "+5",
    " 5 ",
    "1_000",
    "0x10",
    "1e999",
    "1e20",
    "nan",
    "inf",
    "-inf",
    "9" * 30,
    "²",
    "٣",
    "\uff11\uff12",  # fullwidth 12
    HUGE,
    "\0",
    "a\0b",
    "\r\n",
    "line\nbreak",
    "\x1b[31mred",
    "\u202eevil",
    "\u2028",
    "\ufeff",
    os.fsdecode(b"\xff\xfe"),  # not UTF-8: surrogateescape, as Python reads such an argv
    os.fsdecode(b"\xed\xa0\x80"),  # an encoded surrogate, the same way
    "%",
    "%s%n",
    "{}",
    "'\"\\",
    "-",
    "--",
    "é",
    "İ",
    "ß",
]
DURATIONS = [
    "30s",
    "15m",
    "2h",
    "3d",
    "1w",
    "0s",
    "0",
    "-2h",
    "2H",
    "2 h",
    "1.5h",
    "9999999d",
    "36500d",
    "36501d",
    "99999999999999999999d",
    "٣d",
    "²h",
    "h",
    "1e3s",
    "nan",
    "infs",
]
TIMES = [
    "2026-12-01T09:00Z",
    "2026-12-01T09:00:00+00:00",
    "2026-12-01",
    "2026-13-01",
    "2026-02-30",
    "2026-12-01T25:00",
    "2026-12-01T09:00+99:00",
    "2026-12-01T09:00+23:59",
    "0001-01-01T00:00+14:00",
    "0001-01-01T00:00",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59",
    "1970-01-01T00:00Z",
    "\u0662\u0660\u0662\u0666-\u0661\u0662-\u0660\u0661",  # Arabic-Indic digits
    "2026-12-01T09:00:00.123456789Z",
    "T09:00",
    "yesterday",
]
DOMAINS = [
    "example.test",
    "EXAMPLE.TEST",
    "other.test",
    "bücher.example",
    "xn--bcher-kva.example",
    "xn--",
    "xn--a.test",
    "a..b",
    ".",
    "..",
    "-a.test",
    "a" * 64 + ".test",
    ("a" * 60 + ".") * 5 + "test",
    "[127.0.0.1]",
    "127.0.0.1",
    "[IPv6:::1]",
    "localhost",
    "*.test",
    "@example.test",
    "bob@example.test",
    "ex ample.test",
    "example.test.",
    "\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.test",  # fullwidth EXAMPLE
    "ß.test",
]
ADDRESSES = [
    "bob@example.test",
    "gone@example.test",
    "Gone@Example.Test",
    "ñoño@bücher.example",
    "<bob@example.test>",
    "Bob <bob@example.test>",
    "<>",
    "@",
    "bob",
    "bob@",
    "a b@example.test",
    "x" * 400 + "@example.test",
    "bob@[127.0.0.1]",
    "bob@[999.1.1.1]",
    "bob@[IPv6:::1]",
    "=?utf-8?q?x?= <a@b.test>",
    "bob@example.test, carol@example.test",
    "bob@example..test",
    "mailto:bob@example.test",
]
TAGS = ["delivered", "news", "NEWS", "a b", "x" * 200, "ü", "tag,comma"]
PRIORITIES = ["default", "bulk", "urgent", "high", "BULK", "lane-1", "x" * 100, "a b"]
STATES = ["pending", "finished", "any", "queued", "deferred", "delivered", "failed"]
STORE_URLS = [
    "sqlite:///{work}/other.db",
    "sqlite:///{work}/dir",
    "sqlite:///{work}/text.txt",
    "sqlite:///{work}/missing/dir/q.db",
    "sqlite:////dev/null",
    "sqlite:///",
    "sqlite://",
    "sqlite:",
    "sqlite:relative.db",
    "sqlite:///q.db?mode=ro",
    "sqlite:///q%00.db",
    "sqlite:///%ff.db",
    "sqlite:///{work}/fifo",
    "memory://",
    "mysql://x/y",
    "postgresql://127.0.0.1:1/db?connect_timeout=1",
    "postgresql://u:p%zz@127.0.0.1:1/db",
    "postgresql://127.0.0.1:99999/db",
    "postgresql://[::1/db",
    "postgresql:///db?host=/nonexistent",
    "postgres://",
    "http://127.0.0.1/",
    "",
    "sqlite:///" + "x" * 5000,
]


def text_values(*specific: list[str]) -> st.SearchStrategy[str]:
    """Values meant for an option (mostly), or hostile ones."""
    pool = [v for values in specific for v in values]
    return st.one_of(st.sampled_from(pool), st.sampled_from(HOSTILE), st.text(max_size=12))


PATHS = [
    "file.txt",
    "binary.bin",
    "empty",
    "dir",
    "dir/",
    "missing.txt",
    "missing/dir/x",
    "/dev/null",
    "/dev/full",
    "fifo",
    "-",
    "",
    ".",
    "/",
    "key.pem",
    "bad.toml",
    "x" * 300,
    ("d" * 200 + "/") * 30,
    "\0",
    os.fsdecode(b"\xffname"),
]
OUT_PATHS = [p for p in PATHS if p not in ("fifo",)] + ["new.pem", "newdir/x", "out"]


def paths() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(PATHS), st.sampled_from(HOSTILE))


def out_paths() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(OUT_PATHS), st.sampled_from(HOSTILE).filter(_no_fifo))


def _no_fifo(value: str) -> bool:
    return value != "fifo"


def id_values(ids: dict[str, str]) -> st.SearchStrategy[str]:
    full = sorted(ids.values())
    odd = [
        *(i.upper() for i in full),
        *(i[:8] for i in full),
        *(i[:1] for i in full),
        *(i + "0" for i in full),  # 33 hex digits
        *(i[:-1] for i in full),
        *(f" {i}\n" for i in full),
        "0" * 32,
        "f" * 32,
        "g" * 32,
        "0",
        "-",
        "%",
        "_",
        "*",
    ]
    return st.one_of(st.sampled_from(full), st.sampled_from(odd), st.sampled_from(HOSTILE))


@st.composite
def options(draw: Any, specs: list[tuple[str, st.SearchStrategy[str] | None]]) -> list[str]:
    """Some of ``specs`` (option, value strategy or None for a flag), in any order."""
    chosen = draw(st.lists(st.sampled_from(specs), max_size=4))
    argv: list[str] = []
    for option, values in chosen:
        if values is None:
            argv.append(option)
        elif draw(st.integers(0, 9)) == 0:
            argv.append(f"{option}={draw(values)}")
        else:
            argv += [option, draw(values)]
    return argv


def durations() -> st.SearchStrategy[str]:
    return text_values(DURATIONS)


def counts() -> st.SearchStrategy[str]:
    return text_values(["1", "5", "100", "9223372036854775807", "9223372036854775808"])


def seconds() -> st.SearchStrategy[str]:
    return text_values(["0", "0.5", "1", "1e-300", "1e308"])


FILTERS: list[tuple[str, st.SearchStrategy[str] | None]] = [
    ("--state", text_values(STATES)),
    ("--domain", text_values(DOMAINS)),
    ("--older-than", durations()),
    ("--tag", text_values(TAGS)),
    ("--json", None),
]


@st.composite
def command_lines(draw: Any, ids: dict[str, str]) -> list[str]:
    """A subcommand with options and arguments (and maybe global options)."""
    some_ids = st.lists(id_values(ids), min_size=0, max_size=3)
    addresses = text_values(ADDRESSES)
    commands: dict[str, Any] = {
        "send": st.tuples(
            options(
                [
                    ("--from", addresses),
                    ("--to", addresses),
                    ("--cc", addresses),
                    ("--bcc", addresses),
                    ("--reply-to", addresses),
                    ("--subject", text_values(["Hi"])),
                    ("--text", text_values(["Hello"])),
                    ("--text-file", paths()),
                    ("--html-file", paths()),
                    ("--attach", paths()),
                    ("--header", text_values(["X-A: b", "Subject: x", "Bcc: a@b.test", ":"])),
                    ("--unsubscribe-url", text_values(["https://u.test/x", "http://u.test"])),
                    ("--unsubscribe-mailto", addresses),
                    ("--feedback-id", text_values(["a:b:c"])),
                    ("--auto-submitted", text_values(["auto-generated"])),
                    ("--file", paths()),
                    ("--tag", text_values(TAGS)),
                    ("--meta", text_values(["k=v", "k=", "=v", "k", "k==v", "ü=1"])),
                    ("--priority", text_values(PRIORITIES)),
                    ("--at", text_values(TIMES)),
                    ("--expires", text_values(TIMES, DURATIONS)),
                    ("--idempotency-key", text_values(["key-1"])),
                    ("--notify", text_values(["never", "success,failure", "delay,never", ","])),
                    ("--ret", text_values(["full", "hdrs"])),
                    ("--envid", text_values(["env-1", "a+b=c"])),
                    ("--hold", None),
                    ("--require-tls", None),
                    ("--json", None),
                ]
            ).map(lambda argv: ["--from", "app@client.test", "--to", "b@example.test", *argv]),
        ),
        "status": st.tuples(
            options([("--history", None), ("--json", None)]), id_values(ids).map(lambda i: [i])
        ),
        "show": st.tuples(
            options([("--raw", None), ("--headers", None), ("--json", None)]),
            id_values(ids).map(lambda i: [i]),
        ),
        "queue": st.tuples(
            options(
                [
                    *FILTERS,
                    ("--held", None),
                    ("--not-held", None),
                    ("--limit", counts()),
                    ("--counts", None),
                    ("--shape", None),
                    ("--suspended", None),
                    ("--throttled", None),
                ]
            )
        ),
        "events": st.tuples(
            options(
                [
                    ("--json", None),
                    ("--after", counts()),
                    ("--limit", counts()),
                    ("--interval", seconds()),
                    ("--prune", durations()),
                ]
            )
        ),
        "suspend": st.tuples(
            options([("--for", durations()), ("--json", None)]),
            text_values(DOMAINS).map(lambda d: [d]),
        ),
        "resume": st.tuples(options([("--json", None)]), text_values(DOMAINS).map(lambda d: [d])),
        "check": st.tuples(options([("--json", None)]), text_values(DOMAINS).map(lambda d: [d])),
        "doctor": st.tuples(
            options(
                [
                    ("--ip", text_values(["192.0.2.1", "::1", "127.0.0.1", "999.1.1.1", "::"])),
                    ("--probe", text_values(["127.0.0.1:1", "[::1]:1", "127.0.0.1:99999"])),
                    ("--dkim", text_values(["example.test:s1:key.pem", "a:b:c:d:e", "::"])),
                    ("--dnsbl", text_values(["zen.test", ".", "a..b"])),
                    ("--no-dnsbl", None),
                    ("--bulk", None),
                    ("--json", None),
                ]
            ),
            text_values([*DOMAINS, *ADDRESSES]).map(lambda d: [d]),
        ),
        "db": st.tuples(st.sampled_from([["migrate"], ["compact"]]), options([("--json", None)])),
        "dkim": st.tuples(
            st.just(["keygen"]),
            options(
                [
                    ("--domain", text_values(DOMAINS)),
                    ("--selector", text_values(["s1", "s 1", "s.1", "_s", "-s"])),
                    ("--algorithm", text_values(["ed25519", "rsa"])),
                    ("--bits", text_values(["1024", "2048", "512", "99999999"])),
                    ("--out", out_paths()),
                    ("--json", None),
                ]
            ),
        ),
        "tlsrpt": st.tuples(
            options(
                [
                    ("--date", text_values(["2026-11-29", *TIMES])),
                    ("--out", out_paths()),
                    ("--send", None),
                    ("--organization", text_values(["Org"])),
                    ("--contact", text_values(["mailto:ops@example.test"])),
                    ("--from", addresses),
                    ("--post-timeout", durations()),
                    ("--json", None),
                ]
            )
        ),
        "suppress": st.one_of(
            st.tuples(
                st.just(["list"]),
                options(
                    [
                        ("--all", None),
                        ("--after", text_values(ADDRESSES, DOMAINS)),
                        ("--limit", counts()),
                        ("--json", None),
                    ]
                ),
            ),
            st.tuples(
                st.sampled_from([["add"], ["remove"]]),
                options(
                    [
                        ("--reason", text_values(["bounced"])),
                        ("--expires", durations()),
                        ("--source", text_values(["manual", "complaint"])),
                        ("--json", None),
                    ]
                ),
                st.lists(text_values(ADDRESSES, DOMAINS), min_size=1, max_size=3),
            ),
            st.tuples(
                st.just(["import"]),
                options([("--source", text_values(["manual"])), ("--json", None)]),
                st.lists(paths(), max_size=1),
            ),
            st.tuples(
                st.just(["export"]), options([("--all", None)]), st.lists(out_paths(), max_size=1)
            ),
        ),
        "bounce": st.tuples(
            options(
                [
                    ("--recipient", addresses),
                    ("--max-size", counts()),
                    ("--json", None),
                ]
            )
        ),
    }
    for bulk in ("hold", "release", "retry", "cancel", "purge"):
        extra: list[tuple[str, st.SearchStrategy[str] | None]] = [
            ("--all", None),
            ("--dry-run", None),
        ]
        if bulk == "retry":
            extra.append(("--all-deferred", None))
        if bulk == "purge":
            extra += [
                ("--delivered-before", durations()),
                ("--failed-before", durations()),
                ("--finished-before", durations()),
            ]
        commands[bulk] = st.tuples(options([*FILTERS, *extra]), some_ids)
    name = draw(st.sampled_from(sorted(commands)))
    parts = draw(commands[name])
    argv = [name, *(arg for part in parts for arg in part)]
    if draw(st.integers(0, 4)) == 0:  # global options, before or after the command
        more = draw(
            options(
                [
                    ("--store", text_values(STORE_URLS)),
                    ("--config", paths()),
                    ("--helo-name", text_values(["client.test", "a b", "[127.0.0.1]"])),
                    ("--smtp-port", text_values(["25", "0", "65536"])),
                    ("--dns-server", text_values(["127.0.0.1", "127.0.0.1:53", "[::1]:53"])),
                    ("--tls", text_values(["verify", "required"])),
                    ("--tls-ca", paths()),
                    ("--traceback", None),
                ]
            )
        )
        argv = [*more, *argv] if draw(st.booleans()) else [*argv, *more]
    return argv


STDINS = [
    b"",
    b"Subject: hi\r\n\r\nbody\r\n",
    b"target,reason\nbob@example.test,x\n",
    b"\xff\xfe\0\x1b[2J\r\n",
    b"0190f3a2\n# comment\n\n",
]

# --- running it -------------------------------------------------------------------------


class NetworkGuard:
    """Refuses (and remembers) any connection, lookup or datagram beyond loopback."""

    def __init__(self) -> None:
        self.violations: list[str] = []

    def allowed(self, address: Any) -> bool:
        if isinstance(address, str | bytes):  # AF_UNIX
            return True
        host = str(address[0]).strip("[]")
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False

    def check(self, address: Any) -> None:
        if not self.allowed(address):
            self.violations.append(repr(address)[:200])
            raise OSError(errno.ENETUNREACH, "network access refused by the fuzz test")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        real_getaddrinfo = socket.getaddrinfo
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex
        real_sendto = socket.socket.sendto

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host is not None:
                self.check((host.decode() if isinstance(host, bytes) else host, port))
            return real_getaddrinfo(host, port, *args, **kwargs)

        def connect(sock: socket.socket, address: Any) -> Any:
            self.check(address)
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> Any:
            self.check(address)
            return real_connect_ex(sock, address)

        def sendto(sock: socket.socket, data: Any, *args: Any) -> Any:
            self.check(args[-1])
            return real_sendto(sock, data, *args)

        with (
            mock.patch.object(socket, "getaddrinfo", getaddrinfo),
            mock.patch.object(socket.socket, "connect", connect),
            mock.patch.object(socket.socket, "connect_ex", connect_ex),
            mock.patch.object(socket.socket, "sendto", sendto),
        ):
            yield


class FifoFeeder:
    """Keeps a writer at ``path`` so that a command reading the FIFO gets a line and its
    end, never a read that waits forever."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stopping = False
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        while not self.stopping:
            with contextlib.suppress(OSError), open(self.path, "wb") as pipe:
                pipe.write(b"Subject: fifo\r\n\r\nbody\r\n")

    def __enter__(self) -> FifoFeeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        # The feeder may be waiting for a reader in open(): be one, until it has gone.
        while self.thread.is_alive():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 1 << 16)
            os.close(fd)
            self.thread.join(0.05)


def make_workdir(work: Path, template: Path) -> None:
    shutil.copy(template, work / "queue.db")
    (work / "dir").mkdir()
    (work / "file.txt").write_text("hello\n")
    (work / "binary.bin").write_bytes(b"\xff\xfe\0\x1b")
    (work / "empty").write_bytes(b"")
    (work / "text.txt").write_text("not a database\n" * 10)
    (work / "bad.toml").write_text("store = [\n")
    (work / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    (work / ".config").mkdir()
    os.mkfifo(work / "fifo")


@contextlib.contextmanager
def environment(work: Path, dns: LoopbackDNS | None = None) -> Iterator[None]:
    """MAILSTROM_* as the tests set them, none from the developer's environment, and
    the working directory ``work``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env.update(
        HOME=str(work),
        XDG_CONFIG_HOME=str(work / ".config"),
        XDG_STATE_HOME=str(work / ".state"),
        MAILSTROM_STORE=f"sqlite:///{work}/queue.db",
        MAILSTROM_HELO_NAME="client.test",
        MAILSTROM_DNS_NAMESERVERS="127.0.0.1",
        MAILSTROM_DNS_PORT=str(dns.port if dns is not None else 9),  # discard: no answer
        MAILSTROM_DNS_TIMEOUT="1",
        MAILSTROM_SMTP_PORT="1",
        MAILSTROM_TIMEOUTS_CONNECT="1",
        MAILSTROM_MAX_MESSAGE_SIZE="100000",
    )
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with mock.patch.dict(os.environ, env, clear=True):
            yield
    finally:
        os.chdir(cwd)


def run(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``mailstrom argv`` in this process."""
    out, err = io.BytesIO(), io.BytesIO()
    streams = {
        "stdin": io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
        "stdout": io.TextIOWrapper(out, encoding="utf-8", write_through=True),
        "stderr": io.TextIOWrapper(err, encoding="utf-8", write_through=True),
    }
    with contextlib.ExitStack() as stack:
        for name, stream in streams.items():
            stack.enter_context(mock.patch.object(sys, name, stream))
        code = cli_main.main(argv)
        streams["stdout"].flush()
        streams["stderr"].flush()
    return code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8")


_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\ud800-\udfff]")


def check_output(argv: list[str], code: int, out: str, err: str) -> None:
    accepted = ACCEPTED_CODES | (DOCTOR_CODES if "doctor" in argv else set())
    assert code in accepted, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    assert "internal error" not in err, err[-2000:]
    for line in err.splitlines():
        assert len(line) <= MAX_ERROR_LINE, f"stderr line of {len(line)}: {line[:200]}..."
        assert not _RAW_CONTROL.search(line), f"raw control in stderr: {line[:300]!r}"
    if code != EX_OK and err:  # check and doctor say why on stdout, in their report
        assert err.splitlines()[-1].startswith("mailstrom: "), err[-2000:]
    # JSON is for parsers (the json module escapes what they would misread); --raw and
    # export are the stored bytes and CSV as they are.
    verbatim = {"--raw", "--json", "export"} & set(argv)
    if not verbatim:
        for line in out.replace("\r\n", "\n").splitlines():
            assert not _RAW_CONTROL.search(line), f"raw control in stdout: {line[:300]!r}"


def check_store_still_works(work: Path) -> None:
    code, out, err = run(["queue", "--state", "any", "--json"])
    assert code == EX_OK, f"queue afterwards: exit {code}: {err}"
    code, _, err = run(["queue", "--counts"])
    assert code == EX_OK, f"queue --counts afterwards: exit {code}: {err}"
    for message_id in re.findall(r'"id": "([0-9a-f]{32})"', out)[:2]:
        code, _, err = run(["status", message_id])
        assert code == EX_OK, f"status afterwards: exit {code}: {err}"


@pytest.fixture(scope="module")
def template() -> Iterator[tuple[Path, dict[str, str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queue.db"
        ids = build_template(path)
        yield path, ids


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


def fuzz_once(
    template: Path, dns: LoopbackDNS, argv: list[str], stdin: bytes
) -> tuple[int, str, str]:
    guard = NetworkGuard()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_workdir(work, template)
        with FifoFeeder(work / "fifo"), environment(work, dns), guard.installed():
            code, out, err = run(argv, stdin)
            check_store_still_works(work)
    assert not guard.violations, f"network access beyond loopback: {guard.violations}"
    return code, out, err


def test_every_command_exits_with_a_reason(
    template: tuple[Path, dict[str, str]], dns: LoopbackDNS
) -> None:
    path, ids = template

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(argv=command_lines(ids), stdin=st.sampled_from(STDINS))
    def property(argv: list[str], stdin: bytes) -> None:
        code, out, err = fuzz_once(path, dns, argv, stdin)
        event(f"{argv[0]}: exit {code}")
        check_output(argv, code, out, err)

    property()


# --- what the fuzzing found -------------------------------------------------------------


def run_in(work: Path, *argv: str) -> tuple[int, str, str]:
    """``mailstrom argv`` in this process, in ``work`` with a store of its own."""
    with environment(work):
        return run(list(argv))


def one_line_error(err: str) -> str:
    *_, last = err.splitlines()
    assert "internal error" not in err and "Traceback" not in err, err[:500]
    assert len(last) <= MAX_ERROR_LINE, f"{len(last)} characters: {last[:200]}..."
    assert not _RAW_CONTROL.search(last), repr(last[:200])
    return last


def test_an_unknown_id_is_quoted_with_escapes_and_cut(tmp_path: Path) -> None:
    # Was: "unknown message id: " then the argument as typed: an ESC or CR from a
    # script's input reached the terminal raw, and 10,000 characters made one line.
    code, _, err = run_in(tmp_path, "cancel", "\x1b[2J\rforged")
    assert code == EX_NOINPUT
    assert one_line_error(err) == "mailstrom: unknown message id: \\x1b[2J\\x0dforged"
    code, _, err = run_in(tmp_path, "status", "0" * 10_000)
    assert code == EX_NOINPUT
    assert one_line_error(err) == f"mailstrom: unknown message id: {'0' * 61}..."


@pytest.mark.parametrize(
    "argv",
    [
        ["dkim", "keygen", "--domain", "example.test", "--selector", "s", "--algorithm", HUGE],
        ["queue", "--limit", HUGE],
        ["queue", "--state", HUGE],
        ["queue", HUGE],  # unrecognized arguments
        ["send", "--from", "a@client.test", "--header", HUGE],
        ["--store", HUGE, "queue"],
        ["--store", "postgresql://" + HUGE, "queue"],
    ],
)
def test_an_error_quoting_a_huge_value_is_one_short_line(tmp_path: Path, argv: list[str]) -> None:
    # Was: the whole value quoted, an error line of over 10,000 characters (argparse's
    # "invalid choice", the option types' "got ...", the store URL's errors).
    code, _, err = run_in(tmp_path, *argv)
    assert code in (EX_USAGE, EX_CONFIG, EX_TEMPFAIL, EX_IOERR), err[:500]
    one_line_error(err)


def test_a_nul_in_a_config_file_path_is_a_config_error(tmp_path: Path) -> None:
    # Was: exit 70, "ValueError: embedded null byte", for every command (a DKIM key's
    # file) or any that opens the store: TOML writes a NUL as "\u0000".
    key = tmp_path / "key.toml"
    key.write_text(
        'helo_name = "client.test"\n[[dkim.keys]]\ndomain = "example.test"\n'
        'selector = "s"\nprivate_key = "a\\u0000"\n'
    )
    code, _, err = run_in(tmp_path, "--config", str(key), "queue")
    assert code == EX_CONFIG
    assert "a file name cannot hold a NUL character" in one_line_error(err)
    store = tmp_path / "store.toml"
    store.write_text('store = "sqlite:///q\\u0000.db"\n')
    with environment(tmp_path):
        del os.environ["MAILSTROM_STORE"]  # it would win over the file's
        code, _, err = run(["--config", str(store), "hold", "0123"])
    assert code == EX_CONFIG
    assert "store URL with a NUL character" in one_line_error(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "--file", "m\0.eml"],
        ["send", "--from", "a@client.test", "--to", "b@example.test", "--attach", "a\0"],
        ["suppress", "import", "list\0.csv"],
        ["suppress", "export", "list\0.csv"],
        ["dkim", "keygen", "--domain", "example.test", "--selector", "s", "--out", "k\0"],
        ["--store", "sqlite:///q\0.db", "hold", "0123"],
    ],
)
def test_a_nul_in_a_path_argument_is_a_usage_error(tmp_path: Path, argv: list[str]) -> None:
    # Was: exit 70, "ValueError: embedded null byte" (open() raises it, not OSError).
    # No shell passes a NUL, but main() takes any list of strings.
    code, _, err = run_in(tmp_path, *argv)
    assert code == EX_USAGE
    assert "NUL character" in one_line_error(err)


def test_a_path_too_long_for_the_system_is_an_error_not_a_crash(tmp_path: Path) -> None:
    # Was: exit 70, "OSError: [Errno 36] File name too long" (Path.is_file lets it out).
    code, _, err = run_in(tmp_path, "--config", "c" * 300, "queue")
    assert code == EX_CONFIG
    assert one_line_error(err).startswith("mailstrom: cannot read config file 'ccc")
    # The same from tlsrpt's check that --out is a directory (Path.is_dir).
    code, _, err = run_in(tmp_path, "tlsrpt", "--date", "2026-11-29", "--out", "o" * 300)
    assert code == EX_USAGE
    assert one_line_error(err).startswith("mailstrom: --out: File name too long: ooo")


def test_a_postgresql_host_that_is_no_dns_name_is_refused_before_connecting(
    tmp_path: Path,
) -> None:
    # Was: exit 70, "UnicodeError: encoding with 'idna' codec failed (label too long)":
    # psycopg looks the host up itself, and getaddrinfo raises that, not an OSError.
    for host in ("h" * 64, "a..b"):
        code, _, err = run_in(tmp_path, "--store", f"postgresql://{host}/mail", "queue")
        assert code == EX_CONFIG
        assert "with a host that is no DNS name" in one_line_error(err)


def test_a_nameserver_that_is_no_ip_address_is_refused(tmp_path: Path) -> None:
    # Was: exit 70, "ValueError: nameserver ... is not a dns.nameserver.Nameserver
    # instance" at the first lookup (check, doctor, tlsrpt; the worker's every route).
    code, _, err = run_in(tmp_path, "--dns-server", " ", "check", "example.test")
    assert code == EX_USAGE
    assert "--dns-server: expected an IP address, got ' '" in one_line_error(err)
    with environment(tmp_path):
        os.environ["MAILSTROM_DNS_NAMESERVERS"] = "dns.example.test"
        code, _, err = run(["check", "example.test"])
    assert code == EX_CONFIG
    assert "dns.nameservers: expected IP addresses" in one_line_error(err)


@pytest.mark.parametrize(
    "argv",
    [["bounce", "--max-size=--"], ["queue", "--limit=--"], ["events", "--interval=--"]],
)
def test_an_option_written_with_equals_dashes_gets_the_value_dashes(
    tmp_path: Path, argv: list[str]
) -> None:
    # Was: exit 70, "TypeError: '>=' not supported between instances of 'int' and
    # 'list'": argparse (before 3.12.7) dropped the "--" and handed the option [].
    code, _, err = run_in(tmp_path, *argv)
    assert code == EX_USAGE
    assert one_line_error(err).endswith("got '--'")
    code, out, err = run_in(tmp_path, "queue", "--tag=--", "--json")
    assert (code, out) == (EX_OK, "[]\n"), err


@pytest.mark.parametrize("value", [HUGE, f"{HUGE}: a@b.test", f"a@b.test {HUGE}"])
def test_a_malformed_address_is_quoted_cut(tmp_path: Path, value: str) -> None:
    # Was: "From header is malformed ('xxx...' is not an address: ...)" quoting the
    # token whole: a 10,000-character error line (the value itself was already cut).
    code, _, err = run_in(tmp_path, "send", "--from", value, "--to", "b@example.test")
    assert code == EX_DATAERR
    one_line_error(err)
