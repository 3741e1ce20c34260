"""The domain of the Message-IDs mailstrom makes: the From domain when it is a public name,
never localhost, an address literal or a name private to one host or network."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from mailstrom import Config
from mailstrom.client.common import prepare_for
from mailstrom.domains import is_public_name
from mailstrom.errors import ConfigError
from mailstrom.message import Email, prepare

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def message_id(message: Email | bytes, **options: object) -> str:
    p = prepare(message, now=NOW, **options)  # type: ignore[arg-type]
    assert p.header_message_id is not None
    assert re.fullmatch(r"<[0-9a-f]{32}@[^>]+>", p.header_message_id)
    return p.header_message_id.rpartition("@")[2].rstrip(">")


def test_the_from_domain_not_the_sender_domain() -> None:
    email = Email(from_="a@example.com", sender="desk@example.net", to="b@example.org")
    assert message_id(email) == "example.com"
    group = Email(from_="Team:;", sender="desk@example.net", to="b@example.org")
    assert message_id(group) == "example.net"


@pytest.mark.parametrize(
    "sender",
    ["root@myhost", "app@[192.0.2.1]", "app@db.lan", "app@build.internal", "a@h.localdomain"],
)
def test_a_from_domain_private_to_a_host_is_never_used(sender: str) -> None:
    email = Email(from_=sender, to="b@example.org")
    assert message_id(email, fallback_id_domain="Mail.Example.com.") == "mail.example.com"
    assert message_id(email, fallback_id_domain="myhost") == "mailstrom.invalid"
    assert message_id(email) == "mailstrom.invalid"
    raw = f"From: {sender}\r\nTo: b@example.org\r\n\r\nx\r\n".encode()
    assert message_id(raw, fallback_id_domain="mail.example.com") == "mail.example.com"


def test_config_message_id_domain_and_helo_name() -> None:
    email = Email(from_="root@myhost", to="b@example.org")
    config = Config(helo_name="mx1.example.com")
    p = prepare_for(config, email, envelope_from=None, envelope_to=None, now=NOW)
    assert (p.header_message_id or "").endswith("@mx1.example.com>")
    config = Config(helo_name="mx1.example.com", message_id_domain="Mail.Example.net")
    assert config.message_id_domain == "mail.example.net"
    public = Email(from_="a@example.com", to="b@example.org")
    p = prepare_for(config, public, envelope_from=None, envelope_to=None, now=NOW)
    assert (p.header_message_id or "").endswith("@mail.example.net>")


@pytest.mark.parametrize("domain", ["localhost", "host", "db.lan", "[192.0.2.1]", "a b.com", ""])
def test_bad_config_message_id_domain(domain: str) -> None:
    with pytest.raises(ConfigError, match="message_id_domain"):
        Config(helo_name="mx.example.com", message_id_domain=domain)


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("example.com", True),
        ("mail.example.test", True),
        ("xn--bcher-kva.example", True),
        ("Bücher.example", True),
        ("localhost", False),
        ("localhost.localdomain", False),
        ("x.local", False),
        ("router.home.arpa", False),
        ("host", False),
        ("[127.0.0.1]", False),
        ("", False),
    ],
)
def test_public_names(name: str, public: bool) -> None:
    assert is_public_name(name) is public
