"""``mailstrom dkim keygen``, DKIM in the configuration file, and ``send``'s options for
the headers providers require — through the real command in a subprocess."""

from __future__ import annotations

import resource
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailstrom.dkim import DKIMKey
from tests.cli.conftest import CLI, MailEnv
from tests.support.dkim import EC_SECP112R1, assert_all_pass, verify_dkimpy


def keygen(cli: CLI, *args: str) -> str:
    return cli.ok("dkim", "keygen", "--domain", "client.test", *args).out


def test_keygen_writes_a_private_key_and_prints_the_record(cli: CLI) -> None:
    out = keygen(cli, "--selector", "s2026")
    path = cli.cwd / "client.test.s2026.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert "name:  s2026._domainkey.client.test" in out
    value_line = next(line for line in out.splitlines() if line.startswith("  value: "))
    strings = value_line.removeprefix("  value: ").split('" "')
    assert len(strings) == 2 and len(strings[0].strip('"')) == 255  # RSA-2048: two strings
    assert 's2026._domainkey.client.test. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    assert f'private_key = "{path}"' in out and 'algorithm = "rsa-sha256"' in out


@pytest.mark.parametrize("name", ['a"b.pem', "a\\tb.pem", "dkim-é.pem", "a'b.pem"])
def test_keygen_prints_a_table_toml_reads_as_the_key_file(cli: CLI, name: str) -> None:
    """The printed [[dkim.keys]] table is TOML that names the file written, whatever its
    name: a quote in it made the table unreadable, and a backslash an escape ("\\t" read
    as a tab) that named another file."""
    out = keygen(cli, "--selector", "s1", "--algorithm", "ed25519", "--out", name)
    table = out[out.index("[[dkim.keys]]") :]
    [entry] = tomllib.loads(table)["dkim"]["keys"]
    assert entry["private_key"] == str((cli.cwd / name).resolve())
    assert entry["domain"] == "client.test" and entry["selector"] == "s1"


def test_keygen_never_overwrites(cli: CLI) -> None:
    keygen(cli, "--selector", "s1", "--algorithm", "ed25519")
    path = cli.cwd / "client.test.s1.pem"
    before = path.read_bytes()
    again = cli("dkim", "keygen", "--domain", "client.test", "--selector", "s1")
    assert again.code == 73 and "exists" in again.err
    assert path.read_bytes() == before


def test_keygen_leaves_no_partial_key_file_when_the_write_fails(cli: CLI) -> None:
    """A key file that could not be written whole (a full disk; here a file size limit)
    is removed: a truncated key left behind was no key, yet blocked the next keygen
    ("exists; mailstrom never replaces a key file")."""

    def small_files() -> None:  # in the child: files may not grow past 100 octets
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    args = ("dkim", "keygen", "--domain", "client.test", "--selector", "s1")
    failed = subprocess.run(
        [sys.executable, "-m", "mailstrom", *args, "--bits", "1024"],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        timeout=60,
        check=False,
        preexec_fn=small_files,
    )
    assert failed.returncode == 73, failed.stderr
    assert b"cannot create client.test.s1.pem" in failed.stderr
    assert not (cli.cwd / "client.test.s1.pem").exists()
    cli.ok(*args)  # once there is room, the same command makes the key


def test_keygen_json_and_bad_options(cli: CLI) -> None:
    out = cli.ok(
        "dkim", "keygen", "--domain", "Client.Test", "--selector", "e1",
        "--algorithm", "ed25519", "--out", "keys.pem", "--json",
    ).json()  # fmt: skip
    assert out["dns_name"] == "e1._domainkey.client.test"
    assert out["dns_strings"][0].startswith("v=DKIM1; k=ed25519; p=")
    assert out["bits"] == 256 and (cli.cwd / "keys.pem").exists()
    for args in (
        ["--selector", "e2", "--algorithm", "ed25519", "--bits", "2048"],
        ["--selector", "r2", "--bits", "512"],
        ["--selector", "bad_selector"],
    ):
        result = cli("dkim", "keygen", "--domain", "client.test", *args)
        assert result.code == 64, result.err
    assert cli("dkim", "keygen", "--domain", "x", "--selector", "s").code == 64


def test_keygen_refuses_names_dkim_cannot_use_before_writing_a_key(cli: CLI) -> None:
    long_selector = "a." * 125 + "a"  # each label fine, the record name 274 characters
    for domain, selector, words in (
        ("ex=ample.com", "s1", "not a letter-digit-hyphen domain name"),
        ("client.test", long_selector, "274 characters, and DNS allows 253"),
    ):
        result = cli(
            "dkim", "keygen", "--domain", domain, "--selector", selector,
            "--algorithm", "ed25519", "--out", "k.pem",
        )  # fmt: skip
        assert result.code == 64 and words in result.err, result.err
        assert not (cli.cwd / "k.pem").exists()


def dkim_config(cli: CLI, *lines: str) -> Path:
    keygen(cli, "--selector", "rsa")
    keygen(cli, "--selector", "ed", "--algorithm", "ed25519")
    config = cli.cwd / "config.toml"
    config.write_text(
        "\n".join(
            [
                *lines,
                "[[dkim.keys]]",
                'domain = "client.test"',
                'selector = "rsa"',
                f'private_key = "{cli.cwd / "client.test.rsa.pem"}"',
                "[[dkim.keys]]",
                'domain = "client.test"',
                'selector = "ed"',
                f'private_key = "{cli.cwd / "client.test.ed.pem"}"',
                'algorithm = "ed25519"',
            ]
        )
    )
    return config


def publish(env: MailEnv) -> None:
    """Publish the keys the way keygen printed them: the record of each key file."""
    for selector, algorithm in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")):
        key = DKIMKey(
            domain="client.test",
            selector=selector,
            private_key=env.cli.cwd / f"client.test.{selector}.pem",
            algorithm=algorithm,  # type: ignore[arg-type]
        )
        record = key.dns_record()
        env.dns.txt(record.name, record.strings)


def test_send_signs_with_the_configured_keys(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    config = dkim_config(cli)
    publish(mail_env)
    sent = cli.ok(
        "--config", str(config), "send", "--from", "App <app@client.test>",
        "--to", "bob@example.test", "--subject", "Signed", "--text", "Grüße",
        "--unsubscribe-url", "https://client.test/u?t=1",
        "--unsubscribe-mailto", "unsubscribe@client.test",
        "--feedback-id", "c1:app:notice:client", "--auto-submitted", "auto-generated",
        "--json",
    ).json()  # fmt: skip
    assert sent["dkim"] == ["client.test (rsa, rsa-sha256)", "client.test (ed, ed25519-sha256)"]
    cli.ok("--config", str(config), "worker", "--once", "--no-live")
    [received] = mail_env.mx.messages
    content = received.content
    unsubscribe = (
        b"List-Unsubscribe: <https://client.test/u?t=1>,\r\n <mailto:unsubscribe@client.test>"
    )
    assert unsubscribe in content
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in content
    assert b"Feedback-ID: c1:app:notice:client\r\n" in content
    assert b"Auto-Submitted: auto-generated\r\n" in content
    assert_all_pass(content, mail_env.dns)


def test_unsigned_mail_is_reported(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    config = dkim_config(cli)
    sent = cli(
        "--config", str(config), "send", "--from", "app@other.test", "--to", "bob@example.test",
        "--text", "x",
    )  # fmt: skip
    assert sent.code == 0 and "not DKIM-signed" in sent.err


def test_unsigned_mail_is_queued_when_the_warning_cannot_be_written(mail_env: MailEnv) -> None:
    """The "not DKIM-signed" warning is written before the message is queued. With stderr
    a pipe whose reader had gone, the BrokenPipeError was taken for a reader of the
    output gone: exit 0, and nothing queued. The warning is lost; the message is queued."""
    cli = mail_env.cli
    config = dkim_config(cli)
    argv = ["--config", str(config), "send", "--from", "app@other.test"]
    argv += ["--to", "bob@example.test", "--text", "x"]
    proc = cli.gone_reader(*argv, stream="stderr")
    assert proc.returncode == 0
    assert len(cli.queue_ids()) == 1


def test_required_refuses_unsigned_mail(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    config = dkim_config(cli, "[dkim]", "required = true", 'expire = "7d"')
    refused = cli(
        "--config", str(config), "send", "--from", "app@other.test", "--to", "bob@example.test",
        "--text", "x",
    )  # fmt: skip
    assert refused.code == 65 and "no DKIM key" in refused.err
    assert cli.queue_ids() == []


def test_key_file_others_can_read_is_a_configuration_error(cli: CLI) -> None:
    config = dkim_config(cli)
    (cli.cwd / "client.test.rsa.pem").chmod(0o644)
    result = cli("--config", str(config), "send", "--from", "a@client.test", "--to", "b@x.test")
    assert result.code == 78 and "chmod 600" in result.err


def test_key_openssl_cannot_load_is_a_configuration_error(cli: CLI) -> None:
    path = cli.cwd / "ec.pem"
    path.write_bytes(EC_SECP112R1)
    path.chmod(0o600)
    config = cli.cwd / "config.toml"
    config.write_text(
        f'[[dkim.keys]]\ndomain = "client.test"\nselector = "s1"\nprivate_key = "{path}"\n'
    )
    message = b"From: a@client.test\r\nTo: b@x.test\r\nSubject: x\r\n\r\nhi\r\n"
    result = cli("--config", str(config), "send", "--file", "-", stdin=message)
    assert result.code == 78, result.err
    assert "unsupported kind of private key" in result.err and "internal error" not in result.err
    assert cli.queue_ids() == []


def test_provider_options_are_validated_and_need_a_built_message(cli: CLI) -> None:
    bad = cli(
        "send", "--from", "a@client.test", "--to", "b@x.test", "--unsubscribe-url", "http://x"
    )
    assert bad.code == 65 and "https" in bad.err
    raw = cli.cwd / "m.eml"
    raw.write_bytes(b"From: a@client.test\r\nTo: b@x.test\r\n\r\nx\r\n")
    mixed = cli("send", "--file", str(raw), "--feedback-id", "a:b")
    assert mixed.code == 64 and "--feedback-id" in mixed.err


def test_dkimpy_sees_no_signature_without_dkim(mail_env: MailEnv) -> None:
    cli = mail_env.cli
    cli.ok("send", "--from", "app@client.test", "--to", "bob@example.test", "--text", "x")
    cli.ok("worker", "--once", "--no-live")
    [received] = mail_env.mx.messages
    assert verify_dkimpy(received.content, mail_env.dns) == []


def dkim_line(out: str) -> str:
    [line] = [line for line in out.splitlines() if line.startswith("DKIM:")]
    return line.removeprefix("DKIM:").strip()


def test_status_shows_how_each_message_was_signed(cli: CLI) -> None:
    config = dkim_config(cli)
    send = ("send", "--to", "bob@example.test", "--text", "x", "--from")
    signed = cli.ok("--config", str(config), *send, "App <app@client.test>").out.strip()
    unsigned = cli.ok("--config", str(config), *send, "app@other.test").out.strip()
    plain = cli.ok(*send, "app@client.test").out.strip()  # no DKIM configured

    assert dkim_line(cli.ok("status", signed).out) == (
        "signed: client.test (rsa, rsa-sha256), client.test (ed, ed25519-sha256)"
    )
    assert dkim_line(cli.ok("status", unsigned).out) == (
        "unsigned: no DKIM key for the From domain other.test"
    )
    assert dkim_line(cli.ok("status", plain).out).startswith("not recorded")

    assert cli.ok("status", "--json", signed).json()["dkim"] == {
        "signed": True,
        "signatures": [
            {"domain": "client.test", "selector": "rsa", "algorithm": "rsa-sha256"},
            {"domain": "client.test", "selector": "ed", "algorithm": "ed25519-sha256"},
        ],
        "reason": None,
    }
    assert cli.ok("status", "--json", unsigned).json()["dkim"] == {
        "signed": False,
        "signatures": [],
        "reason": "no DKIM key for the From domain other.test",
    }
    assert cli.ok("status", "--json", plain).json()["dkim"] is None
