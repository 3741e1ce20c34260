"""Bad input ends as one line on stderr, the documented exit code, and nothing queued."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import os
import re
from pathlib import Path

import pytest

from tests.cli.conftest import CLI


def assert_one_line_error(result: object, code: int, *fragments: str) -> None:
    from tests.cli.conftest import Result

    assert isinstance(result, Result)
    assert result.code == code, result.err
    assert result.out == ""
    assert len(result.err_lines) == 1, result.err
    [line] = result.err_lines
    assert line.startswith("mailstrom: ")
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in line


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--to", "not-an-address"], 65, "not-an-address"),
        (["--to", "bob@example.test", "--cc", "carol@"], 65, "Cc"),
        (["--to", "bob@example.test", "--attach", "missing.pdf"], 66, "cannot read missing.pdf"),
        (["--to", "bob@example.test", "--html-file", "nope.html"], 66, "nope.html"),
        (["--to", "bob@example.test", "--header", "X-A: b\nBcc: evil@x"], 65, ""),
    ],
)
def test_send_bad_input_enqueues_nothing(
    cli: CLI, args: list[str], code: int, fragment: str
) -> None:
    result = cli("send", "--from", "app@client.test", "--text", "x", *args)
    assert_one_line_error(result, code, fragment)
    assert cli.queue_ids() == []


def test_send_unreadable_text_file(cli: CLI) -> None:
    result = cli("send", "--from", "a@client.test", "--to", "b@x.test", "--text-file", "no.txt")
    assert_one_line_error(result, 66, "cannot read no.txt")
    assert cli.queue_ids() == []


def test_send_attaches_a_file_whose_name_is_not_utf8(cli: CLI) -> None:
    # A name from an old Latin-1 archive: the file reads fine, only its name has octets
    # that are not UTF-8 (os.fsdecode keeps them as lone surrogates). It was refused as
    # "attachment filename contains a lone surrogate (U+DCE9)", exit 65.
    name = os.fsdecode(b"caf\xe9.txt")
    (cli.cwd / name).write_bytes(b"menu\n")
    sent = cli.ok(
        "send", "--from", "a@client.test", "--to", "b@x.test", "--text", "x", "--attach", name
    )
    raw = cli.ok("show", "--raw", sent.out.strip()).out.encode()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(message.iter_attachments())
    assert part.get_filename() == "caf\ufffd.txt"
    assert part.get_payload(decode=True) == b"menu\n"


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("a\nb.txt", "a_b.txt"),
        ("a\rb.txt", "a_b.txt"),
        ("esc\x1b[31m.txt", "esc_[31m.txt"),
        ("line\u2028sep.txt", "line_sep.txt"),
        ("tab\tkept.txt", "tab\tkept.txt"),
    ],
)
def test_send_attaches_a_file_whose_name_holds_a_control_character(
    cli: CLI, name: str, sent: str
) -> None:
    # A name the file system takes (one saved from an upload, a script's typo) but no
    # header may hold: the file was refused for its name alone, exit 65 ("attachment
    # filename header value contains a CR or LF character").
    (cli.cwd / name).write_bytes(b"menu\n")
    queued = cli.ok(
        "send", "--from", "a@client.test", "--to", "b@x.test", "--text", "x", "--attach", name
    )
    raw = cli.ok("show", "--raw", queued.out.strip()).out.encode()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(message.iter_attachments())
    assert part.get_filename() == sent
    assert part.get_payload(decode=True) == b"menu\n"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        # Saved as it arrived, with UTF-8 headers (RFC 6532): message/global may carry it.
        (b"From: a@client.test\nSubject: Gr\xc3\xbc\xc3\x9fe\n\nbody\n", "message/global"),
        # Its own headers ASCII, but a part's UTF-8 (a file name written raw, RFC 6532):
        # the downgrade re-encodes bodies, never headers, so message/rfc822 cannot carry it.
        (
            b"From: a@client.test\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
            b"Content-Type: text/plain\n\nbody\n--b\n"
            b"Content-Type: text/plain\nContent-Disposition: attachment;\n"
            b' filename="Gr\xc3\xbc\xc3\x9fe.txt"\n\nhi\n--b--\n',
            "message/global",
        ),
        # No message at all, only named like one.
        (b"\x00\x01binary\xff\n", "application/octet-stream"),
    ],
)
def test_send_attaches_an_eml_file_that_message_rfc822_cannot_carry(
    cli: CLI, content: bytes, content_type: str
) -> None:
    # The type is guessed from the name (.eml: message/rfc822), which must be sent 7bit
    # with 7-bit headers (RFC 2046 §5.2.1, RFC 6532 §3.7). Such a file was refused, exit
    # 65, "attach it as message/global", which no option of send can do.
    (cli.cwd / "saved.eml").write_bytes(content)
    build = ["--from", "a@client.test", "--to", "b@x.test", "--text", "x"]
    queued = cli.ok("send", *build, "--attach", "saved.eml")
    raw = cli.ok("show", "--raw", queued.out.strip()).out.encode()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(message.iter_attachments())
    assert part.get_content_type() == content_type
    assert part.get_filename() == "saved.eml"
    assert part["Content-Transfer-Encoding"] == "base64"
    # Read from the raw text: the stdlib parses any message/* part as a message, base64
    # or not.
    [body] = re.findall(rb'filename="saved.eml"\r?\n\r?\n(.*?)\r?\n--', raw, re.DOTALL)
    assert base64.b64decode(body) == content


def test_send_attaches_an_eml_file_with_only_8bit_bodies_as_message_rfc822(cli: CLI) -> None:
    # Its 8-bit body is re-encoded as it is sent: message/rfc822 carries it, unlike a
    # message with an 8-bit header section, its own or a part's (above).
    content = (
        b"From: a@client.test\nSubject: Hi\nContent-Type: text/plain; charset=utf-8\n\n"
        b"Gr\xc3\xbc\xc3\x9fe\n"
    )
    (cli.cwd / "saved.eml").write_bytes(content)
    build = ["--from", "a@client.test", "--to", "b@x.test", "--text", "x"]
    queued = cli.ok("send", *build, "--attach", "saved.eml")
    raw = cli.ok("show", "--raw", queued.out.strip()).out.encode()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(message.iter_attachments())
    assert part.get_content_type() == "message/rfc822"
    [inner] = part.iter_parts()
    assert inner.get_content().splitlines() == ["Grüße"]


def test_send_text_and_html_files_lose_a_utf8_byte_order_mark(cli: CLI) -> None:
    # Notepad and PowerShell 5 write UTF-8 with a byte order mark: it is no text of the
    # body, and was sent as an invisible U+FEFF at the start of each part.
    (cli.cwd / "body.txt").write_bytes(b"\xef\xbb\xbfHello\r\n")
    (cli.cwd / "body.html").write_bytes(b"\xef\xbb\xbf<p>Hello</p>\r\n")
    sent = cli.ok(
        "send",
        "--from",
        "a@client.test",
        "--to",
        "b@x.test",
        "--text-file",
        "body.txt",
        "--html-file",
        "body.html",
    )
    raw = cli.ok("show", "--raw", sent.out.strip()).out.encode()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().rstrip() == "Hello"
    assert html.get_content().startswith("<p>Hello</p>")


def test_send_usage_errors(cli: CLI) -> None:
    bad_header = cli("send", "--from", "a@client.test", "--to", "b@x.test", "--header", "Bad")
    assert bad_header.code == 64
    assert bad_header.err_lines[-1] == "mailstrom: --header expects 'Name: value', got 'Bad'"
    both = cli("send", "--file", "m.eml", "--subject", "x")
    assert both.code == 64
    assert "--subject" in both.err_lines[-1]
    assert cli.queue_ids() == []


def test_send_header_given_twice_is_a_usage_error(cli: CLI) -> None:
    """``--header "X-Tag: one" --header "X-Tag: two"`` queued the message with only
    ``X-Tag: two``: the first value was dropped without a word."""
    twice = cli(
        "send", "--from", "a@client.test", "--to", "b@x.test", "--text", "x",
        "--header", "X-Tag: one", "--header", "X-Tag : two",
    )  # fmt: skip
    assert twice.code == 64
    assert twice.err_lines[-1] == "mailstrom: --header X-Tag given twice"
    assert cli.queue_ids() == []


def test_send_without_recipients(cli: CLI) -> None:
    assert_one_line_error(cli("send", "--from", "app@client.test", "--text", "x"), 65)
    assert cli.queue_ids() == []


def test_send_file_unreadable(cli: CLI) -> None:
    assert_one_line_error(cli("send", "--file", "no-such.eml"), 66, "no-such.eml")


def test_send_file_with_no_message_is_no_input(cli: CLI) -> None:
    """An empty stdin (a producer that failed and wrote nothing) or an empty file is no
    message: exit 66 as for sendmail (docs/cli.md, "no message on stdin"), not 65 with a
    complaint about a missing From header that was never sent."""
    empty = cli("send", "--file", "-", "--to", "bob@example.test", stdin=b"")
    assert_one_line_error(empty, 66, "no message on standard input")
    blank = cli("send", "--file", "-", "--to", "bob@example.test", stdin=b"\r\n \n")
    assert_one_line_error(blank, 66, "no message on standard input")
    (cli.cwd / "empty.eml").write_bytes(b"")
    assert_one_line_error(cli("send", "--file", "empty.eml"), 66, "no message in empty.eml")
    assert cli.queue_ids() == []


@pytest.mark.parametrize("command", ["status", "hold", "release", "retry", "cancel"])
def test_unknown_id(cli: CLI, command: str) -> None:
    result = cli(command, "0123456789abcdef0123456789abcdef")
    assert_one_line_error(result, 66)
    assert result.err == "mailstrom: unknown message id: 0123456789abcdef0123456789abcdef\n"


def test_bad_configuration_names_the_key(cli: CLI) -> None:
    cli.env["MAILSTROM_SMTP_PORT"] = "lots"
    assert_one_line_error(cli("queue"), 78, "smtp_port")
    del cli.env["MAILSTROM_SMTP_PORT"]
    cli.env["MAILSTROM_SMTP_PROT"] = "25"
    assert_one_line_error(cli("queue"), 78, "MAILSTROM_SMTP_PROT")
    del cli.env["MAILSTROM_SMTP_PROT"]
    (cli.cwd / "bad.toml").write_text("[dns]\nnameserver = '127.0.0.1'\n")
    assert_one_line_error(cli("queue", "--config", "bad.toml"), 78, "dns.nameserver")


def test_bad_store_url(cli: CLI) -> None:
    cli.env["MAILSTROM_STORE"] = "mysql://x/y"  # configuration: 78
    assert_one_line_error(cli("queue"), 78, "mysql://x/y")
    option = cli("--store", "mysql://x/y", "queue")  # the command line: 64 (hardening #12)
    assert option.code == 64
    assert option.err_lines[-1].startswith("mailstrom: argument --store: unknown store URL")


def test_malformed_postgresql_url_is_a_bad_store_url(cli: CLI) -> None:
    """Exit 78 from the configuration and 64 from --store, as any bad store URL; not
    "internal error: ValueError" (70)."""
    cli.env["MAILSTROM_STORE"] = "postgresql://[::1"
    assert_one_line_error(cli("queue"), 78, "malformed store URL", "Invalid IPv6 URL")
    option = cli("--store", "postgresql://[::1", "queue")
    assert option.code == 64, option.err
    assert option.err_lines[-1].startswith("mailstrom: argument --store: malformed store URL")


def test_a_postgresql_url_that_is_not_utf8_is_a_bad_store_url(cli: CLI) -> None:
    """A MAILSTROM_STORE set in Latin-1 reads with a lone surrogate, which libpq cannot
    take: "internal error: UnicodeEncodeError" (70) in every command; now a bad store
    URL (78), its password not shown."""
    cli.env["MAILSTROM_STORE"] = "postgresql://app:s3cret\udce9@db.invalid/mail"
    result = cli("queue")
    assert_one_line_error(result, 78, "not UTF-8")
    assert "s3cret" not in result.err


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret%FF@127.0.0.1:1/mail",
        "postgresql://app@127.0.0.1:1/mail?password=s3cret%E9",
        "postgresql://app:s3cret@127.0.0.1:1/m%E9il",
    ],
)
def test_a_percent_escape_that_is_not_utf8_is_a_bad_store_url(cli: CLI, url: str) -> None:
    """libpq decodes "%FF" to that octet and psycopg reads its values as UTF-8: every
    command ended in "internal error: UnicodeDecodeError" (70), and a worker died of it;
    now a bad store URL (78), its password not shown."""
    cli.env["MAILSTROM_STORE"] = url
    for command in (["queue"], ["worker", "--once", "--no-live"]):
        result = cli(*command)
        assert_one_line_error(result, 78, "percent-escape that is not UTF-8")
        assert "s3cret" not in result.err


def test_usage_errors_exit_64(cli: CLI) -> None:
    assert cli("frobnicate").code == 64
    assert cli("queue", "--older-than", "soon").code == 64
    # One line, as every error (docs/cli.md): argparse's usage lines came first, a dozen
    # of them for `send`, pushing the reason to the end of a screenful.
    assert_one_line_error(cli("queue", "--older-than", "soon"), 64, "--older-than")
    assert_one_line_error(cli("send", "--limit", "1"), 64, "--limit")
    assert_one_line_error(cli("frobnicate"), 64, "frobnicate")
    result = cli("retry")
    assert result.code == 64
    assert result.err_lines[-1].startswith("mailstrom: ")


def test_config_file_option_and_precedence(cli: CLI) -> None:
    (cli.cwd / "other.toml").write_text('store = "sqlite:///from-file.db"\n')
    del cli.env["MAILSTROM_STORE"]
    cli.ok("--config", "other.toml", "send", "--from", "a@client.test", "--to", "b@x.test")
    assert (cli.cwd / "from-file.db").exists()
    # The environment beats the file, the option beats both.
    cli.env["MAILSTROM_STORE"] = "sqlite:///from-env.db"
    cli.ok("send", "--config", "other.toml", "--from", "a@client.test", "--to", "b@x.test")
    assert (cli.cwd / "from-env.db").exists()
    # (queue only reads: it never creates a store, so a command that writes shows the choice.)
    args = ["--config", "other.toml", "--store", "sqlite:///from-option.db"]
    cli.ok("send", *args, "--from", "a@client.test", "--to", "b@x.test")
    assert (cli.cwd / "from-option.db").exists()
    assert len(cli.ok("queue", "--json", *args).json()) == 1
    missing = cli("--config", "absent.toml", "queue")
    assert_one_line_error(missing, 78, "absent.toml")


def test_help_reads_well(cli: CLI) -> None:
    top = cli.ok("--help").out
    for command in ("send", "sendmail", "status", "queue", "worker", "check", "db", "purge"):
        assert f"    {command}" in top
    assert "exit codes" in top
    for command in ("send", "status", "queue", "retry", "hold", "cancel", "purge", "worker"):
        text = cli.ok(command, "--help").out
        assert "examples:" in text or "example:" in text, command
    assert "-t" in cli.ok("sendmail", "--help").out


def test_help_examples_keep_their_line_breaks(cli: CLI) -> None:
    # An example continued with a lone "\\" at the end of an epilog's line is a Python
    # line continuation, not a shell one: the two lines became one of 160 characters.
    from mailstrom.cli.main import COMMAND_MODULES

    cli.env["COLUMNS"] = "80"
    for command in ["", *COMMAND_MODULES]:
        text = cli.ok(*filter(None, [command, "--help"])).out
        long = [line for line in text.splitlines() if len(line) > 100]
        assert long == [], command


# --- sendmail ----------------------------------------------------------------------------


def test_sendmail_errors(cli: CLI) -> None:
    message = b"From: a@client.test\nSubject: x\n\nbody\n"
    no_rcpt = cli("sendmail", stdin=message)
    assert no_rcpt.code == 64
    assert no_rcpt.err == "mailstrom: no recipients: name them as arguments, or use -t\n"
    assert cli("sendmail", "-t", stdin=message).code == 64
    assert_one_line_error(cli("sendmail", "bad address@", stdin=message), 65)
    assert_one_line_error(cli("sendmail", "bob@example.test", stdin=b""), 66, "no message")
    # -bs takes recipients from RCPT only.
    assert_one_line_error(cli("sendmail", "-bs", "bob@example.test"), 64, "-bs")
    # Address test mode: a user checking how root is rewritten must not send mail.
    assert_one_line_error(cli("sendmail", "-bt", "root", stdin=message), 64, "-bt")
    assert cli("sendmail", "-Z", "bob@example.test", stdin=message).code == 64
    assert cli.queue_ids() == []


def test_sendmail_symlink_dispatch(cli: CLI) -> None:
    import sys

    link = cli.cwd / "sendmail"
    script = cli.cwd / "sendmail-entry.py"
    # What the console script does, under the name "sendmail".
    script.write_text("import sys\nfrom mailstrom.cli.main import main\nsys.exit(main())\n")
    link.symlink_to(script)
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(link), "-i", "bob@example.test"],
        input=b"From: a@client.test\nSubject: via link\n\nhi\n",
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    [message] = cli.ok("queue", "--json").json()
    assert message["subject"] == "via link"


@pytest.mark.parametrize(
    "args",
    [
        ["sendmail", "-i", "bob@example.test"],
        ["send", "--file", "-", "--to", "bob@example.test"],
        ["send", "--from", "a@client.test", "--to", "b@example.test", "--text-file", "-"],
        ["cancel", "-"],
        ["suppress", "import", "-"],
        ["bounce"],
    ],
)
def test_closed_standard_input_is_no_input(cli: CLI, args: list[str]) -> None:
    """With fd 0 closed (``<&-``) Python's sys.stdin is None: reading it was an
    AttributeError, exit 70 "internal error", where sendmail's 66 (no input) is meant."""
    import subprocess
    import sys

    from tests.cli.conftest import Result

    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, "-m", "mailstrom", *args],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    result = Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert_one_line_error(result, 66, "no standard input")
    assert cli.queue_ids() == []


@pytest.mark.parametrize(
    "args", [["queue"], ["sendmail", "-bp"], ["sendmail", "--help"], ["--help"]]
)
def test_a_reader_that_went_away_is_no_internal_error(cli: CLI, args: list[str]) -> None:
    """``mailq | head -1``: the reader closes the pipe before the listing is written.
    That is no bug to report (exit 70, "internal error: BrokenPipeError"), which the
    sendmail personality's ``-bp`` said; every listing ends quietly with 0."""
    import os
    import subprocess
    import sys

    cli.ok("send", "--from", "a@client.test", "--to", "b@example.test", "--text", "x")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before a byte is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mailstrom", *args],
            cwd=cli.cwd,
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert (proc.returncode, "error" in err, "Traceback" in err) == (0, False, False), err


@pytest.mark.parametrize(
    ("entry", "at"),
    [
        *[
            (entry, at)
            for entry in ("script", "module")
            for at in (
                "mailstrom.settings",  # importing mailstrom.cli.main (the script's import)
                "mailstrom.cli.views",  # parsing: the command's module, for its options
                "mailstrom.stores.memory",  # running the command (a store not created yet)
            )
        ],
        # The console script's first import: the package's __init__ (logging, ~20 ms).
        # (``python -m mailstrom`` imports the package before any code of the command.)
        ("script", "logging"),
        ("script", "mailstrom._lazy"),
    ],
)
def test_ctrl_c_while_the_command_starts_exits_130(cli: CLI, at: str, entry: str) -> None:
    """A Ctrl-C while the command was still importing or parsing (a good part of its
    start-up: mailstrom.cli.main alone takes ~0.1 s) printed Python's traceback of
    KeyboardInterrupt; once the command ran, it exited 130 silently, as it does now
    from any moment the command's code has begun. The console script imported the
    package (its ``__init__``) before any of it could catch one: a traceback still."""
    from tests.support.interrupting import AT_VARIABLE, ENTRY_VARIABLE

    env = {**cli.env, AT_VARIABLE: at, ENTRY_VARIABLE: entry}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parents[2])])
    interrupted = dataclasses.replace(cli, env=env, module="tests.support.interrupting")
    result = interrupted("queue")
    assert (result.code, result.out) == (130, ""), result.err
    assert "Traceback" not in result.err and "KeyboardInterrupt" not in result.err
    assert result.err == ""


@pytest.mark.parametrize(
    "twice",
    [
        ["--text-file", "-", "--attach", "-"],
        ["--text-file", "-", "--html-file", "-"],
        ["--text", "x", "--attach", "-", "--attach", "-"],
    ],
)
def test_send_standard_input_named_twice_is_a_usage_error(cli: CLI, twice: list[str]) -> None:
    """Standard input holds one stream: the first option naming ``-`` read it to its end,
    the next got nothing, and the message was queued with an empty HTML part or an empty
    attachment named "-", exit 0."""
    result = cli("send", "--from", "a@client.test", "--to", "b@x.test", *twice, stdin=b"text\n")
    assert_one_line_error(result, 64, "standard input (-) can be read once")
    assert cli.queue_ids() == []


@pytest.mark.parametrize(
    "twice",
    [
        ["--text-file", "-", "--attach", "/dev/stdin"],
        ["--text", "x", "--attach", "/dev/stdin", "--attach", "/dev/fd/0"],
        ["--html-file", "/dev/stdin", "--text-file", "-"],
    ],
)
def test_send_standard_input_named_twice_by_path_is_a_usage_error(
    cli: CLI, twice: list[str]
) -> None:
    """``-`` and ``/dev/stdin`` are the same pipe: the second read nothing, and the
    message was queued with an empty attachment named "stdin", exit 0."""
    result = cli("send", "--from", "a@client.test", "--to", "b@x.test", *twice, stdin=b"text\n")
    assert_one_line_error(result, 64, "read the same pipe")
    assert cli.queue_ids() == []


def test_send_reads_standard_input_once_by_path(cli: CLI) -> None:
    cli.ok(
        "send",
        "--from",
        "a@client.test",
        "--to",
        "b@x.test",
        "--text",
        "x",
        "--attach",
        "/dev/stdin",
        stdin=b"data\n",
    )
    assert len(cli.queue_ids()) == 1


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["status", "--store", "bogus://x"], 64),  # a usage error
        (["worker", "--no-live", "--store", "memory:"], 78),  # the command refuses
        (["worker", "--once", "--no-live", "--store", "postgresql://u@127.0.0.1:1/x"], 75),
    ],
)
def test_the_exit_code_stands_when_standard_error_is_a_broken_pipe(
    cli: CLI, args: list[str], code: int
) -> None:
    """A service's standard error is a pipe or a socket to its logger (journald, a
    collector), which breaks when that logger restarts. Writing the error line then
    failed and the command ended with Python's exit 1: a supervisor told to leave 74 and
    78 alone (``RestartPreventExitStatus=``) or to retry on 75 read a crash instead."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before a byte is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mailstrom", *args],
            cwd=cli.cwd,
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == code
