"""``mailstrom web`` as a command: where it may listen, and its settings. (The pages
themselves are tested in tests/web.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailstrom.cli.web import check_access
from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings
from tests.support.private_hosts import private_mounts, run_with_hosts

from .conftest import CLI


def test_a_non_loopback_address_needs_a_token(cli: CLI) -> None:
    result = cli("web", "--listen", "0.0.0.0:0")
    assert result.code == 78
    assert "needs a token" in result.err and "web.token" in result.err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "mail.example.org"])
def test_any_other_address_is_allowed_with_a_token(host: str) -> None:
    check_access(host, "s3cret")  # no error: every page then asks for the token
    with pytest.raises(ConfigError):
        check_access(host, None)
    check_access("127.0.0.1", None)


def test_a_malformed_listen_address_is_a_usage_error(cli: CLI) -> None:
    result = cli("web", "--listen", "127.0.0.1:port")
    assert result.code == 64
    assert "--listen" in result.err


def test_an_empty_listen_address_is_a_usage_error(cli: CLI) -> None:
    """``--listen "$ADDR"`` with ADDR unset fell back to web.listen (or 127.0.0.1:8025)
    without a word: the dashboard served somewhere else than the command line said. The
    setting web.listen refuses an empty value; so does the option (exit 64)."""
    cli.env["MAILSTROM_WEB_LISTEN"] = "0.0.0.0:0"  # the fall-back would say "needs a token"
    result = cli("web", "--listen", "")
    assert result.code == 64, result.err
    assert result.err_lines == ["mailstrom: argument --listen: expected a non-empty string, got ''"]


def test_a_port_in_use_is_reported(cli: CLI) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("web", "--listen", f"127.0.0.1:{port}")
    assert result.code == 78
    assert "cannot listen" in result.err


def test_web_settings_come_from_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[web]\nlisten = "127.0.0.1:9000"\ntoken = "from the file"\n')
    config.chmod(0o600)
    settings = load_settings(config_path=config, env={"MAILSTROM_WEB_TOKEN": "from env"})
    assert settings.web_listen == "127.0.0.1:9000"
    assert settings.web_token == "from env"
    assert "from env" not in repr(settings) and "from the file" not in repr(settings)


def test_a_token_longer_than_a_request_may_give_is_refused_at_start(cli: CLI) -> None:
    """Tries at the token are read up to 1024 characters (a longer one is refused
    unread), so a longer web.token could never be given: every login failed as a wrong
    token, and counted as a guess, while the command said it was serving."""
    cli.env["MAILSTROM_WEB_TOKEN"] = "x" * 1025
    result = cli("web", "--listen", "127.0.0.1:0", timeout=20)
    assert result.code == 78
    assert "web.token" in result.err and "1024" in result.err


def test_a_token_a_header_cannot_carry_is_refused_at_start(cli: CLI) -> None:
    """A trailing space (an environment file's, a TOML typo) is dropped from every
    Authorization header, so no script could give the token: the command said it was
    serving all the same."""
    cli.env["MAILSTROM_WEB_TOKEN"] = "s3cret-s3cret-s3cret "
    result = cli("web", "--listen", "127.0.0.1:0", timeout=20)
    assert result.code == 78
    assert "web.token" in result.err and "white space" in result.err


def test_the_dashboard_listens_over_ipv6_on_a_name_that_has_only_ipv6(tmp_path: Path) -> None:
    """``web --listen ip6-localhost:8025`` bound an IPv4 socket, which glibc gives
    127.0.0.1 for a name /etc/hosts maps to ``::1`` only: a browser resolving the name
    found nothing listening. Bound in a mount namespace with a private /etc/hosts."""
    if not private_mounts():
        pytest.skip("needs unshare(1) and mount(8)")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 v6only.test\n")
    code = (
        "from mailstrom.cli.web import _bind\n"
        "sock = _bind('v6only.test', 0)\n"
        "print(sock.getsockname()[0])\n"
        "sock.close()\n"
    )
    proc = run_with_hosts(hosts, code)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == "::1"


@pytest.mark.parametrize("token", ["t", "s3cret", "fifteen-chars-x"])
def test_a_token_shorter_than_16_characters_is_refused_at_start(cli: CLI, token: str) -> None:
    """A 1-character token was accepted: on an address others reach, 10 guesses per
    address and 10 minutes from many addresses find it. 16 characters (96 bits and
    more when random) is the least taken, as for hook.secret."""
    cli.env["MAILSTROM_WEB_TOKEN"] = token
    result = cli("web", "--listen", "127.0.0.1:0", timeout=20)
    assert result.code == 78, result.err
    assert "web.token" in result.err and "16" in result.err
    assert len(token) < 5 or token not in result.err
