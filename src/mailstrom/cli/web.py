"""``mailstrom web``: serve the dashboard (overview, queue, message, destinations) until
SIGTERM/SIGINT. Needs the ``web`` extra (Starlette, Jinja2, uvicorn)."""

from __future__ import annotations

import argparse
import logging
import socket

from mailstrom.cli.context import settings_from, store_from
from mailstrom.cli.exits import EX_OK, UsageError
from mailstrom.cli.logs import configure_logging
from mailstrom.cli.parsing import Subparsers, setting_arg
from mailstrom.config import MIN_SECRET
from mailstrom.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:8025"

EPILOG = """\
examples:
  mailstrom web                                   # http://127.0.0.1:8025/
  mailstrom web --listen 127.0.0.1:9000
  MAILSTROM_WEB_TOKEN=... mailstrom web --listen 0.0.0.0:8025   # every page needs the token

On loopback anyone on this host may use the dashboard (as anyone who can read the queue
can run `mailstrom queue`). Any other address needs the setting web.token (or
MAILSTROM_WEB_TOKEN); every page then asks for it. With a token, a browser may name the
dashboard by an address, a loopback name or the name given to --listen; behind a proxy
that terminates TLS, or by another name, set web.public_url (MAILSTROM_WEB_PUBLIC_URL)
to the address browsers use, such as https://dash.example.org: requests naming it are
answered, forms posted from there accepted, and an https one makes cookies Secure.
Actions (retry, hold, release, cancel a message; suspend, resume a destination) are
confirmed, POSTed with a CSRF token, and logged on stderr.
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "web",
        parents=parents,
        help="serve the queue dashboard in the browser",
        description="Serve a dashboard of the queue: counts and the last hour's throughput, "
        "the queue with filters and search, each message with its attempts, and pending "
        "mail per destination; retry, hold, release or cancel a message, suspend or "
        "resume a destination. Needs "
        "mailstrom[web].",
        epilog=EPILOG,
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=None,
        # Checked as the setting is: an empty one ("$ADDR" unset) fell back to web.listen.
        type=setting_arg("web.listen", "--listen"),
        help=f"address to serve on (default {DEFAULT_LISTEN}; the setting web.listen); "
        "port 0 picks a free one",
    )
    p.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="key=value or JSON lines"
    )
    p.set_defaults(handler=web_command)


def web_command(args: argparse.Namespace) -> int:
    from mailstrom.ops.server import parse_listen

    settings = settings_from(args)
    listen = args.listen or settings.web_listen or DEFAULT_LISTEN
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    check_access(host, settings.web_token, public_url=settings.web_public_url)
    try:
        from mailstrom.web import create_app
        from mailstrom.web.security import MAX_TOKEN, unsendable
        from mailstrom.web.server import serve
    except ImportError as exc:
        raise ConfigError(
            f"mailstrom web needs the web extra ({exc.name} is missing): "
            "pip install 'mailstrom[web]'"
        ) from None
    if settings.web_token is not None and len(settings.web_token) < MIN_SECRET:
        # Never shown: a secret (its length says little).
        raise ConfigError(
            f"web.token is {len(settings.web_token)} characters long; the dashboard takes "
            f"at least {MIN_SECRET}, which its 10 tries per address in 10 minutes do not "
            "guess: set a longer one (`openssl rand -base64 24` makes one)"
        )
    if settings.web_token is not None and len(settings.web_token) > MAX_TOKEN:
        # Tries at the token are read up to MAX_TOKEN characters: every login would fail.
        raise ConfigError(
            f"web.token is {len(settings.web_token)} characters long; the dashboard takes "
            f"at most {MAX_TOKEN}: set a shorter one"
        )
    if settings.web_token is not None and unsendable(settings.web_token):
        # A header drops white space at its ends: no script could give the token.
        raise ConfigError(
            "web.token begins or ends with white space or holds a control character, "
            "which no Authorization header can carry: set it without"
        )
    configure_logging(args.log_format, level=logging.INFO)
    sock = _bind(host, port)
    try:
        # Opened to write (its actions change it), so never a memory store: one new in
        # this process is empty, no other process fills it, and every change ends here.
        with store_from(settings) as store:
            if settings.config.outbox:
                store.enable_events()  # a cancel's recipients end for hooks and `events` too
            app = create_app(
                store,
                token=settings.web_token,
                public_origin=settings.web_public_url,
                # The name it listens on is its own (an IPv6 address needs no naming).
                hosts=() if ":" in host else (host,),
            )
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            # The first line on stdout: scripts (and the tests) read the address from it.
            print(f"mailstrom web: serving http://{shown}:{bound[1]}/", flush=True)
            serve(app, sock)
    finally:
        sock.close()
    return EX_OK


def check_access(host: str, token: str | None, *, public_url: str | None = None) -> None:
    """Refuse (ConfigError) to serve anything but loopback without a token, or to be
    reached through a proxy (``web.public_url``) without one."""
    from mailstrom.loopback import is_loopback

    if token is None and not is_loopback(host):
        raise ConfigError(
            f"listening on {host} (not loopback) needs a token: set web.token in the "
            "configuration file or MAILSTROM_WEB_TOKEN; every page then asks for it"
        )
    if token is None and public_url is not None:
        # A proxy makes a loopback listener reachable from everywhere.
        raise ConfigError(
            f"web.public_url ({public_url}) needs a token: set web.token in the "
            "configuration file or MAILSTROM_WEB_TOKEN; every page then asks for it"
        )


def _bind(host: str, port: int) -> socket.socket:
    from mailstrom.ops.guarded_http import listen_family

    # What the name resolves to: an IPv4 socket bound to ``ip6-localhost`` (::1 only)
    # listened on 127.0.0.1, where a browser resolving the name does not go.
    family = listen_family(host)
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"--listen {host}:{port}: cannot listen: {exc.strerror or exc}") from None
