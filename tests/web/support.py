"""For the dashboard's browser tests: a queue filled by real deliveries, the real
``mailstrom web`` command in a subprocess, and headless Chromium."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mailstrom import Email, Mailstrom
from mailstrom.stores import SQLiteStore
from mailstrom.testing import FakeMX
from tests.support.delivery import Results

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@dataclass(frozen=True)
class Scenario:
    """What the queue holds: message ids by what happened to them."""

    delivered: str
    deferred: str
    failed: str
    queued: tuple[str, ...]
    held: str


def fill_queue(path: Path, mx: FakeMX) -> Scenario:
    """Deliver a few messages through ``mx`` for real (one deferred, one rejected), then
    queue more without delivering them."""
    mx.defer("dave@slow.example", "451 4.7.0 Too many messages from your IP, slow down")
    mx.reject("nobody@example.org", "550 5.1.1 The email account does not exist")
    results = Results()
    sent = [
        Email(from_="App <app@example.com>", to=to, subject=subject, text=f"{subject}.\n")
        for to, subject in (
            (["alice@example.org", "bob@example.net"], "Your invoice"),
            (["dave@slow.example"], "Weekly newsletter"),
            (["nobody@example.org"], "Password reset"),
        )
    ]
    store = SQLiteStore(path)
    with Mailstrom(mx.config, store=store, worker="thread", on_result=results) as ms:
        delivered, deferred, failed = ms.send_emails(sent)
        results.wait_final(
            {"alice@example.org", "bob@example.net", "dave@slow.example", "nobody@example.org"}
        )
    second = SQLiteStore(path)  # a store given to Mailstrom is the caller's to close
    with Mailstrom(mx.config, store=second, worker=None) as ms:
        queued = tuple(
            ms.send_email(
                Email(
                    from_="App <app@example.com>",
                    to=[f"user{i}@example.com"],
                    subject=f"Order {1000 + i} shipped",
                    text="On its way.\n",
                )
            )
            for i in range(3)
        )
        held = ms.send_email(
            Email(from_="ops@example.com", to=["audit@example.net"], subject="Audit", text="x")
        )
        ms.store.set_held(held, True)
    second.close()
    store.close()
    return Scenario(delivered=delivered, deferred=deferred, failed=failed, queued=queued, held=held)


@contextmanager
def web_server(store_url: str, home: Path, *, token: str | None = None) -> Iterator[str]:
    """``mailstrom web`` on a free loopback port; yields its base URL and checks that it
    stops cleanly (exit 0) on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")}
    env |= {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    if token is not None:
        env["MAILSTROM_WEB_TOKEN"] = token
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailstrom", "web", "--store", store_url, "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=30):
                raise AssertionError("mailstrom web printed no address within 30 s")
        line = proc.stdout.readline()
        assert line.startswith("mailstrom web: serving http://127.0.0.1:"), line
        yield line.rpartition(" ")[2].strip().rstrip("/")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr


def chromium(width: int = 1280, height: int = 900) -> object:
    """Debian's headless Chromium through its own chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
