"""Relative paths in a configuration file are relative to the file, not to wherever a
command starts: every command reading the file opens the same queue and the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings
from tests.cli.conftest import CLI


def elsewhere(cli: CLI, name: str) -> CLI:
    """The same command, started in another directory (a worker's ``/``, a cron job's
    home, an application's checkout)."""
    cwd = cli.cwd.parent / name
    cwd.mkdir()
    return CLI(cwd=cwd, env=cli.env)


@pytest.mark.parametrize("store", ["sqlite:///queue.db", "spool/queue.db"])
def test_commands_in_other_directories_share_the_files_queue(cli: CLI, store: str) -> None:
    conf = cli.cwd.parent / "etc"
    (conf / "spool").mkdir(parents=True)
    (conf / "config.toml").write_text(f'store = "{store}"\n')
    del cli.env["MAILSTROM_STORE"]
    config = ["--config", str(conf / "config.toml")]
    app, worker = elsewhere(cli, "app"), elsewhere(cli, "worker")

    app.ok(*config, "send", "--from", "a@client.test", "--to", "b@example.test")

    # Before: the message went to app/queue.db, and the worker's queue was empty.
    assert len(worker.ok(*config, "queue", "--json").json()) == 1
    assert (conf / store.removeprefix("sqlite:///")).is_file()
    assert not list(app.cwd.iterdir())


def test_a_queue_left_in_the_working_directory_is_not_stranded(cli: CLI) -> None:
    """A file whose relative store used to mean the working directory's queue: opening a
    new empty one beside the file would leave that mail unsent, so it is refused."""
    conf = cli.cwd.parent / "etc"
    conf.mkdir()
    (conf / "config.toml").write_text('store = "sqlite:///queue.db"\n')
    cli.ok("send", "--from", "a@client.test", "--to", "b@example.test")  # ./queue.db
    del cli.env["MAILSTROM_STORE"]

    result = cli("--config", str(conf / "config.toml"), "queue")

    assert result.code == 78, result.err
    assert f"{cli.cwd / 'queue.db'}' holds a queue" in result.err
    assert "absolute path" in result.err
    assert not (conf / "queue.db").exists()


def test_the_environment_and_options_stay_relative_to_the_working_directory(
    cli: CLI,
) -> None:
    (cli.cwd / "c.toml").write_text('store = "sqlite:///from-file.db"\n')
    other = elsewhere(cli, "other")
    other.env["MAILSTROM_STORE"] = "sqlite:///from-env.db"
    other.ok(
        "--config", str(cli.cwd / "c.toml"), "send", "--from", "a@client.test", "--to", "b@x.test"
    )
    assert (other.cwd / "from-env.db").is_file()
    assert not (cli.cwd / "from-file.db").exists()


def test_file_paths_in_a_file_are_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls_ca: trustme.CA
) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    tls_ca.cert_pem.write_to_path(str(conf / "ca.pem"))
    (conf / "aliases").write_text("root: ops@example.com\n")
    (conf / "config.toml").write_text(
        'tls_ca = "ca.pem"\n[mta_sts]\nca_file = "./ca.pem"\n[sendmail]\naliases = "aliases"\n'
    )
    monkeypatch.chdir(tmp_path)  # where none of them is

    s = load_settings(config_path=conf / "config.toml", env={}, search=False)

    assert s.values["tls_ca"] == str(conf / "ca.pem")
    assert s.config.mta_sts.ca_file == str(conf / "ca.pem")
    assert s.values["sendmail.aliases"] == str(conf / "aliases")


def test_an_empty_aliases_setting_still_turns_aliases_off(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[sendmail]\naliases = ""\n')
    s = load_settings(config_path=tmp_path / "config.toml", env={}, search=False)
    assert s.values["sendmail.aliases"] == ""


def test_a_dkim_key_beside_the_file(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = cli.cwd.parent / "etc"
    conf.mkdir()
    key = conf / "s1.pem"
    cli.ok(
        "dkim",
        "keygen",
        "--domain",
        "client.test",
        "--selector",
        "s1",
        "--algorithm",
        "ed25519",
        "--out",
        str(key),
    )
    (conf / "config.toml").write_text(
        f'[[dkim.keys]]\ndomain = "client.test"\nselector = "s1"\nprivate_key = "{key.name}"\n'
        'algorithm = "ed25519-sha256"\n'
    )
    monkeypatch.chdir(cli.cwd)

    s = load_settings(config_path=conf / "config.toml", env={}, search=False)

    assert [str(k.private_key) for k in s.config.dkim.keys] == [str(key)]


def test_a_pasted_key_is_still_refused_unshown(tmp_path: Path) -> None:
    body = "MC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    pem = f"-----BEGIN PRIVATE KEY-----\\n{body}\\n-----END PRIVATE KEY-----"
    (tmp_path / "config.toml").write_text(
        f'[[dkim.keys]]\ndomain = "client.test"\nselector = "s1"\nprivate_key = "{pem}"\n'
    )
    with pytest.raises(ConfigError, match="holds PEM text") as caught:
        load_settings(config_path=tmp_path / "config.toml", env={}, search=False)
    assert "MC4CAQ" not in str(caught.value)


@pytest.mark.parametrize("folder", ["etc", "a:b", "c,d"])
def test_a_dkim_key_in_the_environments_form_in_the_file_is_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    # The file also takes dkim.keys as the environment writes it (domain:selector:path);
    # its path was read against the working directory, where every other path in the
    # file is read against the file's: another directory's s1.pem, or none. A ":" or ","
    # in the file's directory must not split the entry once it is anchored.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    conf = tmp_path / folder
    conf.mkdir()
    key = conf / "s1.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    (conf / "config.toml").write_text('[dkim]\nkeys = "client.test:s1:s1.pem:ed25519-sha256"\n')
    (tmp_path / "app").mkdir()
    monkeypatch.chdir(tmp_path / "app")

    s = load_settings(config_path=conf / "config.toml", env={}, search=False)

    assert [str(k.private_key) for k in s.config.dkim.keys] == [str(key)]
