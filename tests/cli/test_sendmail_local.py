"""The sendmail personality as local programs use it (issue 14 §1): bare local names get an
origin domain, an aliases file maps them, ``-bp`` and a ``mailq`` symlink list the queue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import CLI

CRON_MAIL = b"""From: root (Cron Daemon)
To: root
Subject: Cron <root@host> run-parts /etc/cron.daily

/etc/cron.daily/logrotate: error
"""


def local_names(cli: CLI, aliases: str | None) -> None:
    cli.env["MAILSTROM_SENDMAIL_ORIGIN"] = "host.example.test"
    path = cli.cwd / "aliases"
    if aliases is None:
        cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""
    else:
        path.write_text(aliases)
        cli.env["MAILSTROM_SENDMAIL_ALIASES"] = str(path)


def test_cron_mail_to_root_reaches_the_alias(cli: CLI) -> None:
    local_names(cli, "# mail for root\npostmaster: root\nroot: ops@example.test,\n  backup\n")
    cli.ok("sendmail", "-t", "-i", stdin=CRON_MAIL)
    [message] = cli.ok("queue", "--json").json()
    assert message["envelope_from"] == "root@host.example.test"
    assert [r["address"] for r in message["recipients"]] == [
        "ops@example.test",
        "backup@host.example.test",
    ]
    headers = cli.ok("show", "--headers", message["id"]).out
    assert "From: Cron Daemon <root@host.example.test>" in headers
    assert "To: root@host.example.test" in headers
    assert "Subject: Cron <root@host> run-parts /etc/cron.daily" in headers


def test_a_name_at_localhost_is_a_local_name(cli: CLI) -> None:
    """fail2ban mails ``destemail = root@localhost`` (its default) as ``sendmail -f
    root@<host> root@localhost`` with that address in To, and many a script writes
    ``MAILTO=root@localhost``. Postfix delivers it locally, through the aliases
    (localhost is in its default mydestination); here it was refused as a special-use
    name (exit 65), the report lost. A name at localhost (or a name under it, RFC 6761
    §6.3) is now a local name: through the aliases, else given the origin, in the
    envelope and in the header fields alike."""
    local_names(cli, "root: ops@example.test\n")
    message = (
        b"Subject: [Fail2Ban] sshd: banned 192.0.2.1\n"
        b"From: Fail2Ban <root@localhost>\nTo: root@localhost, www-data@LocalHost\n\nbanned\n"
    )
    cli.ok(
        "sendmail", "-f", "root@localhost", "root@localhost", "nobody@ip6.localhost", stdin=message
    )
    cli.ok("sendmail", "-t", "-i", stdin=message)
    first, second = sorted(cli.ok("queue", "--json").json(), key=lambda m: m["created_at"])
    assert first["envelope_from"] == "root@host.example.test"
    assert [r["address"] for r in first["recipients"]] == [
        "ops@example.test",
        "nobody@host.example.test",
    ]
    assert [r["address"] for r in second["recipients"]] == [
        "ops@example.test",
        "www-data@host.example.test",
    ]
    headers = cli.ok("show", "--headers", first["id"]).out
    assert "From: Fail2Ban <root@host.example.test>" in headers
    assert "To: root@host.example.test, www-data@host.example.test" in headers


@pytest.mark.parametrize("has_from", [True, False])
def test_f_with_a_display_name_at_localhost_is_a_local_name(cli: CLI, has_from: bool) -> None:
    """``sendmail -f 'Fail2Ban <root@localhost>'``: Postfix takes the address of such a
    sender, and root@localhost is a local name as ``-f root@localhost`` is; it was refused
    as a special-use name (exit 65). Two addresses or a line break are still refused."""
    local_names(cli, None)
    head = b"From: app@example.test\n" if has_from else b""
    message = head + b"Subject: banned\n\nbanned\n"
    cli.ok("sendmail", "-i", "-f", "Fail2Ban <root@localhost>", "bob@example.test", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == "root@host.example.test"
    fields = cli.ok("show", "--headers", queued["id"]).out.splitlines()
    author = "app@example.test" if has_from else "Fail2Ban <root@host.example.test>"
    assert f"From: {author}" in fields
    for sender in [
        "Fail2Ban <root@localhost>, a@example.test",
        "A <a@example.test>\nBcc: b@x.test",
    ]:
        result = cli("sendmail", "-i", "-f", sender, "bob@example.test", stdin=message)
        assert result.code == 65, result.err
    assert len(cli.ok("queue", "--json").json()) == 1


def test_a_name_at_localhost_localdomain_is_a_local_name(cli: CLI) -> None:
    """Red Hat's /etc/hosts names 127.0.0.1 ``localhost.localdomain`` too, and Postfix's
    default mydestination holds ``localhost.$mydomain``, which is that name on a host
    without a domain (``mydomain`` is then ``localdomain``): scripts there write
    ``root@localhost.localdomain``. It was queued as it was written, for a domain no
    mail can be sent to, and root's mail was lost; it is now a local name."""
    local_names(cli, "root: ops@example.test\n")
    message = b"From: root@localhost.localdomain\nTo: root@LocalHost.LocalDomain\n\nfull\n"
    cli.ok("sendmail", "-t", "-i", "-f", "cron@localhost.localdomain", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == "cron@host.example.test"
    assert [r["address"] for r in queued["recipients"]] == ["ops@example.test"]
    fields = cli.ok("show", "--headers", queued["id"]).out.splitlines()
    assert "From: root@host.example.test" in fields
    assert "To: root@host.example.test" in fields


def test_bare_names_get_the_origin_without_aliases(cli: CLI) -> None:
    local_names(cli, None)
    message = b"Subject: disk\n\nfull\n"
    cli.ok("sendmail", "-i", "-f", "www-data", "root", "bob@example.test", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert queued["envelope_from"] == "www-data@host.example.test"
    assert [r["address"] for r in queued["recipients"]] == [
        "root@host.example.test",
        "bob@example.test",
    ]
    assert "From: www-data@host.example.test" in cli.ok("show", "--headers", queued["id"]).out


def test_alias_loops_stop_and_programs_are_skipped(cli: CLI) -> None:
    local_names(cli, "a: b, |/usr/bin/procmail\nb: a, c@example.test\n")
    cli.ok("sendmail", "-i", "a", stdin=b"Subject: x\n\ny\n")
    [queued] = cli.ok("queue", "--json").json()
    assert sorted(r["address"] for r in queued["recipients"]) == [
        "a@host.example.test",
        "c@example.test",
    ]


def test_an_oversized_aliases_file_is_a_configuration_error(cli: CLI) -> None:
    local_names(cli, "x: y\n" * 300_000)
    result = cli("sendmail", "-i", "root", stdin=b"Subject: x\n\ny\n")
    assert result.code == 78
    assert "sendmail.aliases" in result.err
    assert cli.queue_ids() == []


def test_an_aliases_path_that_is_no_regular_file_is_a_configuration_error(cli: CLI) -> None:
    """A FIFO (or a device) named as the aliases file: opening it waited for a writer
    that never came, and `sendmail` (from cron, a web application) hung for good, each
    run one more process stuck. Only regular files are read, as the config file is."""
    local_names(cli, None)
    fifo = cli.cwd / "aliases.fifo"
    os.mkfifo(fifo)
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = str(fifo)
    result = cli("sendmail", "-i", "root", stdin=b"Subject: x\n\ny\n", timeout=60)
    assert result.code == 78, result.err
    assert "sendmail.aliases" in result.err and "not a regular file" in result.err
    assert cli.queue_ids() == []


def test_bp_and_a_mailq_symlink_list_the_queue(cli: CLI) -> None:
    local_names(cli, None)
    cli.ok("sendmail", "-i", "root", stdin=b"Subject: x\n\ny\n")
    [mid] = cli.queue_ids()
    listing = cli.ok("sendmail", "-bp").out.splitlines()
    assert listing[0].split()[:3] == ["ID", "STATE", "AGE"]
    assert listing[1].startswith(mid)
    assert "root@host.example.test" in listing[1]

    script = cli.cwd / "mailstrom-entry.py"
    # What the console script does, under the name "mailq".
    script.write_text("import sys\nfrom mailstrom.cli.main import main\nsys.exit(main())\n")
    link = cli.cwd / "mailq"
    link.symlink_to(script)
    proc = run(link, cli)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith(mid)
    counted = run(link, cli, "--shape")
    assert counted.stdout.splitlines()[1].split()[:2] == ["TOTAL", "1"]


def run(link: Path, cli: CLI, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(link), *args],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_an_aliases_path_with_a_nul_is_a_configuration_error(cli: CLI) -> None:
    """A TOML string may hold \\u0000; open() then raised ValueError: exit 70, "internal
    error"."""
    config = cli.cwd / "config.toml"
    config.write_text(
        '[sendmail]\norigin = "host.example.test"\naliases = "/etc/aliases\\u0000x"\n'
    )
    cli.env["MAILSTROM_CONFIG"] = str(config)
    result = cli("sendmail", "-i", "root", stdin=b"Subject: x\n\ny\n")
    assert result.code == 78, result.err
    assert "sendmail.aliases" in result.err


def test_an_origin_that_is_no_domain_is_a_configuration_error(cli: CLI) -> None:
    """Every bare name then made an invalid address, and each message was refused as
    malformed (exit 65, "From header is malformed"), blaming the message."""
    cli.env["MAILSTROM_SENDMAIL_ORIGIN"] = "host example.test"
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""
    result = cli("sendmail", "-i", "root", stdin=b"Subject: x\n\ny\n")
    assert result.code == 78, result.err
    assert "sendmail.origin" in result.err
    del cli.env["MAILSTROM_SENDMAIL_ORIGIN"]  # every command reads it
    assert cli.queue_ids() == []


@pytest.mark.parametrize("origin", ["xn--zz.example.test", "printer.local", "nas.home.arpa"])
def test_an_origin_no_address_may_have_is_a_configuration_error(cli: CLI, origin: str) -> None:
    """A name of letters, digits and hyphens that no mail address may have (an A-label
    that is no IDNA, a special-use name such as ``.local`` or ``.home.arpa``) passed as
    an origin, and then every message with a bare local name was refused as malformed
    (exit 65, "invalid address 'root@printer.local'"), blaming the message."""
    cli.env["MAILSTROM_SENDMAIL_ORIGIN"] = origin
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""
    result = cli("sendmail", "-i", "root", stdin=b"Subject: x\n\ny\n")
    assert result.code == 78, result.err
    assert "sendmail.origin" in result.err
    assert origin in result.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["root"], b"From: app@example.test\nSubject: x\n\ny\n"),  # a bare recipient
        (["-t"], b"From: root (Cron Daemon)\nTo: ops@example.test\nSubject: x\n\ny\n"),
        (["-f", "root", "ops@example.test"], b"From: app@example.test\n\ny\n"),
    ],
)
def test_no_usable_default_origin_says_what_to_set(
    cli: CLI, args: list[str], message: bytes
) -> None:
    """With no sendmail.origin, a host whose name is private or special-use (``host.local``)
    has no default origin but ``helo_name``, itself that name unless configured: every
    message with a bare name was refused as malformed (exit 65, "invalid address
    'root@host.local': The part after the @-sign is a special-use or reserved name"),
    blaming the message and naming no setting. It is the configuration's fault, as with
    such a sendmail.origin: exit 78, saying what to set; mail without bare names goes."""
    cli.env["MAILSTROM_HELO_NAME"] = "host.local"
    cli.env["MAILSTROM_SENDMAIL_ALIASES"] = ""
    cli.env.pop("MAILSTROM_SENDMAIL_ORIGIN", None)
    result = cli("sendmail", "-i", *args, stdin=message)
    assert result.code == 78, result.err
    assert "root: no domain to qualify a local name with" in result.err
    assert "helo_name host.local" in result.err
    assert "set sendmail.origin (MAILSTROM_SENDMAIL_ORIGIN) or helo_name" in result.err
    assert cli.queue_ids() == []
    cli.ok("sendmail", "-i", "ops@example.test", stdin=b"From: app@example.test\n\ny\n")
    assert len(cli.queue_ids()) == 1


def test_a_long_folded_field_with_a_bare_name_stays_folded(cli: CLI) -> None:
    """Giving ``root`` the origin rewrote the whole To field on one line: 80 addresses
    folded one a line became a line of 1,700 octets, and the message was refused as
    over RFC 5322's 998 (exit 65)."""
    local_names(cli, None)
    many = b",\n ".join([b"root"] + [b"user%d@example.test" % i for i in range(80)])
    cli.ok("sendmail", "-t", "-i", stdin=b"From: a@example.test\nTo: " + many + b"\n\nhi\n")
    [message] = cli.ok("queue", "--json").json()
    assert len(message["recipients"]) == 81
    raw = cli.ok("show", "--raw", message["id"]).out
    head = raw.partition("\r\n\r\n")[0] if "\r\n\r\n" in raw else raw.partition("\n\n")[0]
    assert "root@host.example.test, user0@example.test" in head
    assert max(len(line) for line in head.splitlines()) <= 78


def test_a_name_of_several_words_is_refused_not_cut_to_its_first(cli: CLI) -> None:
    """The stdlib parser reads ``Bob Smith`` as the mailbox ``Bob``: ``To: Bob Smith``
    with -t, or the argument ``Bob Smith``, queued mail for ``Bob@`` the origin (another
    user), the To field rewritten to it. Such text is no address: exit 65, nothing queued."""
    local_names(cli, None)
    message = b"From: a@example.test\nTo: Bob Smith\nSubject: x\n\nhi\n"
    refused = cli("sendmail", "-t", "-i", stdin=message)
    assert refused.code == 65, refused.err
    assert "Bob Smith" in refused.err
    refused = cli("sendmail", "-i", "Bob Smith", stdin=b"Subject: x\n\nhi\n")
    assert refused.code == 65, refused.err
    assert cli.ok("queue", "--json").json() == []
    # A bare name in a display-name form, or in a group, is still a local name.
    message = b'From: root (Cron Daemon)\nTo: "Doe, J" <www-data>, ops: root;\n\nhi\n'
    cli.ok("sendmail", "-t", "-i", "Kim <kim>", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in queued["recipients"]] == [
        "www-data@host.example.test",
        "root@host.example.test",
        "kim@host.example.test",
    ]


def test_recipients_whose_aliases_lead_only_to_programs_are_no_usage_error(cli: CLI) -> None:
    """``sendmail root`` with ``root: |/usr/bin/procmail`` (mailstrom delivers to no
    program, file or include) exited 64 with "no recipients: name them as arguments, or
    use -t", though the caller had named one: a usage error it could do nothing about. It
    is 65, a recipient that cannot be used (as an alias to a bad address is), saying why."""
    local_names(cli, 'root: |/usr/bin/procmail, "/var/mail/root"\nlog: :include:/etc/x\n')
    for args in (["root"], ["root", "log"], ["-t"]):
        stdin = b"To: root\nSubject: x\n\ny\n" if args == ["-t"] else b"Subject: x\n\ny\n"
        result = cli("sendmail", "-i", *args, stdin=stdin)
        assert result.code == 65, result.err
        assert "programs, files or includes" in result.err
        assert "root" in result.err
        assert len(result.err_lines) == 1
    assert cli.queue_ids() == []


def test_a_message_read_on_standard_input_gets_a_received_field_on_top(cli: CLI) -> None:
    """RFC 5321 §4.4 (as Postfix's pickup does for its sendmail): where and when the
    message came in, and from which local user; it had no trace at all."""
    from email import policy
    from email.parser import BytesParser
    from email.utils import parsedate_to_datetime

    local_names(cli, None)
    cli.ok("sendmail", "-t", "-i", "-f", "root", "ops@example.test", stdin=CRON_MAIL)
    [message] = cli.ok("queue", "--json").json()
    raw = cli.ok("show", "--raw", message["id"]).out
    assert raw.startswith("Received: by client.test (mailstrom, from userid "), raw[:200]
    parsed = BytesParser(policy=policy.default).parsebytes(raw.encode())
    [received] = parsed.get_all("Received")
    assert not received.defects
    text = " ".join(str(received).split())
    head, _, date = text.partition(";")
    assert head == f"by client.test (mailstrom, from userid {os.getuid()})"
    assert parsedate_to_datetime(date.strip()).tzinfo is not None
    assert "ops@example.test" not in text  # an argument recipient of -t may be a Bcc


@pytest.mark.parametrize("blank", [b"\r\n", b"\n"])
def test_header_like_lines_of_the_body_are_not_given_the_origin(cli: CLI, blank: bytes) -> None:
    """Header fields ending in LF and the empty line after them in CRLF (a script's
    ``printf 'Subject: x\\n'`` before a body from a Windows file): the empty line was
    looked for as LF LF or CRLF CRLF only, so the body, up to its first empty line, was
    read as header fields, and its ``To: admin`` and ``Cc: root (The admin)`` lines
    rewritten with the origin. The body goes as it was given."""
    local_names(cli, None)
    body = b"Forwarded:\nTo: admin\nCc: root (The admin)\n\nend\n"
    message = b"Subject: forwarded\nTo: root\n" + blank + body
    cli.ok("sendmail", "-t", "-i", stdin=message)
    [queued] = cli.ok("queue", "--json").json()
    assert [r["address"] for r in queued["recipients"]] == ["root@host.example.test"]
    raw = cli.ok("show", "--raw", queued["id"]).out.replace("\r\n", "\n")
    head, _, sent_body = raw.partition("\n\n")
    assert "To: root@host.example.test" in head.splitlines()
    assert sent_body == body.decode()
