"""capture() around the command line's library calls: ``send`` and ``sendmail`` in-process."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from mailstrom.cli.main import main
from mailstrom.stores import SQLiteStore
from mailstrom.testing import capture


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Settings from nowhere but MAILSTROM_STORE: a queue in the test's directory."""
    for name in [n for n in os.environ if n.startswith("MAILSTROM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    monkeypatch.setenv("MAILSTROM_STORE", url)
    return url


def test_send_is_captured_and_held(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with capture() as outbox:
        code = main(["send", "--from", "app@example.com", "--to", "bob@example.org",
                     "--subject", "Hi", "--text", "Hello"])  # fmt: skip
    assert code == 0
    [mail] = outbox
    assert capsys.readouterr().out.strip() == mail.message_id
    assert (mail.envelope_from, mail.envelope_to) == ("app@example.com", ["bob@example.org"])
    assert mail.subject == "Hi"
    store = SQLiteStore(store_url.removeprefix("sqlite:///"))
    try:
        assert store.status(mail.message_id).held
    finally:
        store.close()


def test_sendmail_is_captured(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = b"From: app@example.com\nTo: bob@example.org\nSubject: cron\n\nreport\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    with capture() as outbox:
        code = main(["sendmail", "-t", "-f", "bounces@example.com"])
    assert code == 0
    [mail] = outbox
    assert (mail.envelope_from, mail.envelope_to) == ("bounces@example.com", ["bob@example.org"])
    assert mail.text == "report\n"
