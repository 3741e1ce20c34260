"""The dashboard behind a proxy that terminates TLS (``web.public_url``): the browser's
page is ``https://dash.example.org`` and its forms say so in ``Origin``, while the
dashboard sees plain ``http`` requests (``proxy_headers`` off), with the public name or
the proxy's own (nginx's default) in ``Host``. With the setting those forms are
accepted (CSRF token still required) and cookies are ``Secure``; without it they are
refused, as is any other site's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from mailstrom import settings as loader
from mailstrom.errors import ConfigError
from mailstrom.settings import load_settings
from mailstrom.stores import MemoryStore
from mailstrom.web import create_app

TOKEN = "secret-token-0123"
PUBLIC = "https://dash.example.org"


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@contextmanager
def _proxied(store: MemoryStore, host: str, **options: object) -> Iterator[TestClient]:
    """The dashboard as the proxy reaches it: http, with ``Host: host``."""
    app = create_app(store, token=TOKEN, **options)  # type: ignore[arg-type]
    with TestClient(app, base_url=f"http://{host}") as client:
        yield client


def _login(client: TestClient, origin: str, *, csrf: bool = True) -> httpx.Response:
    """The login form posted as the browser on ``origin`` does. The CSRF cookie is sent
    by hand: the test client keeps no ``Secure`` cookie over http, a browser on the
    https page does."""
    page = client.get("/login")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    token = found.group(1)
    return client.post(
        "/login",
        data={"csrf": token if csrf else "", "token": TOKEN, "next": "/"},
        headers={"Origin": origin, "Cookie": f"mailstrom_csrf={token}"},
        follow_redirects=False,
    )


def _cookies(response: httpx.Response) -> dict[str, SimpleCookie]:
    cookies = {}
    for header in response.headers.get_list("set-cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        cookies.update({name: cookie for name in cookie})
    return cookies


@pytest.mark.parametrize("host", ["dash.example.org", "127.0.0.1:8025"])
def test_the_login_form_works_from_the_public_address_only_with_the_setting(
    store: MemoryStore, host: str
) -> None:
    """The proxy passes the public name as Host, or (nginx's default) its upstream's."""
    with _proxied(store, host, public_origin=PUBLIC) as client:
        answer = _login(client, PUBLIC)
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/"
    with _proxied(store, host) as client:
        if host == "dash.example.org":
            # A name it was not given (a rebound page's, as far as it knows): no page.
            assert client.get("/login").status_code == 400
            return
        answer = _login(client, PUBLIC)
        assert answer.status_code == 403
        assert "cross-site request refused" in answer.text


def test_an_https_public_address_makes_the_cookies_secure(store: MemoryStore) -> None:
    with _proxied(store, "dash.example.org", public_origin=PUBLIC) as client:
        page = client.get("/login")
        assert _cookies(page)["mailstrom_csrf"]["mailstrom_csrf"]["secure"]
        answer = _login(client, PUBLIC)
        # Named by the port the browser uses, the public address's.
        session = _cookies(answer)["mailstrom_session_443"]["mailstrom_session_443"]
        assert session["secure"] and session["httponly"]
    with _proxied(store, "127.0.0.1:8025", public_origin="http://10.0.0.7:8080") as client:
        # Over plain http a browser would not keep a Secure cookie.
        assert not _cookies(client.get("/login"))["mailstrom_csrf"]["mailstrom_csrf"]["secure"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://dash.example.org.evil.example",
        "https://dash.example.org:8443",
        "null",
    ],
)
def test_another_site_is_still_refused_with_the_setting(store: MemoryStore, origin: str) -> None:
    with _proxied(store, "dash.example.org", public_origin=PUBLIC) as client:
        answer = _login(client, origin)
        assert answer.status_code == 403
        assert "cross-site request refused" in answer.text


def test_the_csrf_token_is_still_required_from_the_public_address(store: MemoryStore) -> None:
    with _proxied(store, "dash.example.org", public_origin=PUBLIC) as client:
        answer = _login(client, PUBLIC, csrf=False)
        assert answer.status_code == 403
        assert not any(name.startswith("mailstrom_session") for name in _cookies(answer))


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("https://dash.example.org", "https://dash.example.org"),
        ("HTTPS://Dash.Example.ORG/", "https://dash.example.org"),
        ("https://dash.example.org:443", "https://dash.example.org"),
        ("http://dash.example.org:80", "http://dash.example.org"),
        ("https://dash.example.org:8443", "https://dash.example.org:8443"),
        ("http://[0:0::1]:8025", "http://[::1]:8025"),
        ("https://xn--caf-dma.example", "https://xn--caf-dma.example"),
    ],
)
def test_the_setting_is_normalised_to_an_origin(tmp_path: Path, given: str, origin: str) -> None:
    assert loader.parse_origin(given) == origin
    settings = load_settings(env={"MAILSTROM_WEB_PUBLIC_URL": given}, search=False)
    assert settings.web_public_url == origin
    config = tmp_path / "config.toml"
    config.write_text(f'[web]\npublic_url = "{given}"\n')
    assert load_settings(config_path=config, env={}).web_public_url == origin


@pytest.mark.parametrize(
    "given",
    [
        "",
        "dash.example.org",
        "ftp://dash.example.org",
        "https://dash.example.org/dashboard",
        "https://dash.example.org/?x=1",
        "https://dash.example.org#top",
        "https://ann@dash.example.org",
        "https://dash.example.org:0",
        "https://dash.example.org:65536",
        "https://dash.example.org:\u0668\u0660",  # Arabic-Indic digits: not a port
        "https://café.example",
        "https://[::g]",
        "https://dash example.org",
    ],
)
def test_a_malformed_setting_is_a_config_error_naming_it(given: str) -> None:
    with pytest.raises(ConfigError, match=r"^web\.public_url: "):
        load_settings(env={"MAILSTROM_WEB_PUBLIC_URL": given}, search=False)
    with pytest.raises(ValueError, match=r"expected scheme|port must be|not an IPv6"):
        create_app(MemoryStore(), token=TOKEN, public_origin=given)


def test_a_public_origin_needs_a_token() -> None:
    with pytest.raises(ValueError, match="needs a token"):
        create_app(MemoryStore(), public_origin=PUBLIC)


def test_the_command_refuses_a_public_url_that_is_malformed_or_without_a_token(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env |= {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    command = [sys.executable, "-m", "mailstrom", "web", "--listen", "127.0.0.1:0"]
    for extra, said in [
        ({"MAILSTROM_WEB_PUBLIC_URL": PUBLIC}, "needs a token"),
        (
            {
                "MAILSTROM_WEB_PUBLIC_URL": "https://dash.example.org/x",
                "MAILSTROM_WEB_TOKEN": "t0ken-t0ken-t0ken",
            },
            "expected scheme://host[:port]",
        ),
    ]:
        run = subprocess.run(
            command, env=env | extra, capture_output=True, text=True, timeout=60, check=False
        )
        assert run.returncode == 78, run.stderr
        assert "web.public_url" in run.stderr and said in run.stderr
