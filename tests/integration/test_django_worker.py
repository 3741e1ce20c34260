"""Where the Django backend's mail is delivered: ``manage.py mailstrom_worker`` (the CLI's
worker with ``settings.MAILSTROM``), and the in-process worker across fork and exit."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.django_project import configure

configure()

from django.core import checks, mail  # noqa: E402  (Django must be configured first)
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.mail.backends.base import BaseEmailBackend  # noqa: E402
from django.test import override_settings  # noqa: E402

from mailstrom import RecipientState  # noqa: E402
from mailstrom.contrib.django import EmailBackend, get_mailstrom, shared  # noqa: E402
from mailstrom.errors import ConfigError  # noqa: E402
from tests.fixtures.dns_server import LoopbackDNS  # noqa: E402
from tests.fixtures.postgres import _free_port  # noqa: E402
from tests.fixtures.smtp_server import ReceivingServer, ServerFactory  # noqa: E402
from tests.support.django import (  # noqa: E402
    HAS_MAILERS,
    loopback_mx,
    mailstrom_setting,
    silently,
)
from tests.support.threads import refuse_thread  # noqa: E402

ROOT = Path(__file__).parents[2]
MANAGE = ROOT / "tests" / "django_project" / "manage.py"


@pytest.fixture
def mx(smtp_server: ServerFactory, dns_server: LoopbackDNS) -> ReceivingServer:
    return loopback_mx(smtp_server, dns_server)


def project_env(setting: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILSTROM_", "DJANGO_"))}
    env["DJANGO_MAILSTROM_JSON"] = json.dumps(setting)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT)]))
    return env


def manage(
    setting: dict[str, Any], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MANAGE), *args],
        env=project_env(setting),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_mailstrom_worker_once_delivers_what_the_backend_queued_without_a_worker(
    dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path
) -> None:
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker=None)
    with override_settings(MAILSTROM=setting):
        message = mail.EmailMessage("Hi", "Hello", to=["bob@example.org"], bcc=["a@example.net"])
        assert message.send() == 1
        ms = get_mailstrom()
        assert ms.worker is None and ms.worker_mode is None
        mid: str = message.mailstrom_id  # type: ignore[attr-defined]
        assert ms.query_status(mid).state is RecipientState.QUEUED
        assert mx.messages == []

        done = manage(setting, "mailstrom_worker", "--once", "--no-live", "--log-format", "json")
        assert done.returncode == 0, done.stderr
        received = mx.wait_for_messages(2)
        assert sorted(r for m in received for r in m.rcpt_tos) == [
            "a@example.net",
            "bob@example.org",
        ]
        assert ms.query_status(mid).state is RecipientState.DELIVERED
    # The CLI's log lines: one JSON object per event, one per delivery attempt.
    events = [json.loads(line) for line in done.stderr.splitlines()]
    attempts = [e for e in events if e["event"] == "attempt"]
    assert {(e["rcpt"], e["state"]) for e in attempts} == {
        ("bob@example.org", "delivered"),
        ("a@example.net", "delivered"),
    }
    assert {"worker started", "worker stopped"} <= {e["event"] for e in events}


def test_sendtestemail_queues_through_the_backend_and_the_worker_delivers_it(
    dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path
) -> None:
    """``manage.py sendtestemail``, Django's own check of a project's mail, goes through
    the backend: queued by one process, delivered by the worker of another."""
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker=None)
    sent = manage(setting, "sendtestemail", "bob@example.org")
    assert sent.returncode == 0, sent.stderr
    assert mx.messages == []
    done = manage(setting, "mailstrom_worker", "--once", "--no-live")
    assert done.returncode == 0, done.stderr
    [received] = mx.wait_for_messages(1)
    assert received.mail_from == "site@sender.test"
    assert received.rcpt_tos == ("bob@example.org",)
    assert b"\r\nSubject: Test email from " in received.content


def test_mailstrom_worker_takes_the_cli_options(tmp_path: Path) -> None:
    shown = manage({"store": "memory:"}, "mailstrom_worker", "--help")
    assert shown.returncode == 0
    for option in ("--once", "--drain-timeout", "--log-format", "--log-level", "--no-live"):
        assert option in shown.stdout
    wrong = manage({"store": "memory:"}, "mailstrom_worker", "--drain-timeout", "-1")
    assert wrong.returncode != 0
    assert "expected a number of seconds" in wrong.stderr


@pytest.mark.parametrize(
    "bad",
    [["--drain-timeout", "nan"], ["--log-level", "loud"], ["--no-such-option"], ["extra"]],
)
def test_mailstrom_worker_exits_64_for_a_bad_command_line_as_the_cli_does(
    tmp_path: Path, bad: list[str]
) -> None:
    # argparse's 2 was the exit code; `mailstrom worker` and docs/cli.md say 64 (EX_USAGE).
    store = f"sqlite:///{tmp_path / 'mail.db'}"
    cli = subprocess.run(
        [sys.executable, "-m", "mailstrom", "--store", store, "worker", "--once", *bad],
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILSTROM_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    done = manage({"store": store}, "mailstrom_worker", "--once", "--no-live", *bad)
    assert done.returncode == cli.returncode == 64, (done.stderr, cli.stderr)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("setting", "code", "says"),
    [
        ({"smtp_prot": 25}, 78, "MAILSTROM: unknown setting 'smtp_prot'"),
        ({"store": "ftp://x"}, 78, "unknown store URL"),
        ("corrupt", 74, "not a mailstrom"),
    ],
)
def test_mailstrom_worker_exits_as_the_cli_does(
    tmp_path: Path, setting: Any, code: int, says: str
) -> None:
    if setting == "corrupt":
        junk = tmp_path / "mail.db"
        junk.write_bytes(b"this is not a database file" * 100)
        setting = {"store": f"sqlite:///{junk}"}
    done = manage(setting, "mailstrom_worker", "--once", "--no-live")
    assert done.returncode == code, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_mailstrom_worker_refuses_a_memory_store() -> None:
    # A memory store is this process's own: the web processes queue into theirs, so the
    # worker started, logged "worker started" and delivered nothing, forever (with --once,
    # exit 0 at once), while every message queued by the backend waited for no one.
    done = manage({"store": "memory:"}, "mailstrom_worker", "--once", "--no-live")
    assert done.returncode == 78, done.stderr
    assert "memory store" in done.stderr
    assert "Traceback" not in done.stderr


def test_mailstrom_worker_listens_for_metrics_before_waiting_for_its_store() -> None:
    """The shared run_worker: a metrics address it cannot listen on fails at once, while
    the store (a loopback port nothing listens on) would be waited for."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        setting = {
            "store": f"postgresql://mailstrom@127.0.0.1:{_free_port()}/mail",
            "metrics": {"listen": f"127.0.0.1:{taken.getsockname()[1]}"},
        }
        done = manage(setting, "mailstrom_worker", "--no-live", timeout=15)
    assert done.returncode == 78, done.stderr
    assert "cannot listen" in done.stderr
    assert "store cannot be opened" not in done.stderr


def test_the_system_check_reports_a_bad_setting() -> None:
    with override_settings(MAILSTROM={"helo_name": "x", "dns": {"prot": 53}}):
        [error] = checks.run_checks(tags=["mailstrom"])
    assert error.id == "mailstrom.E001"
    assert "unknown setting 'dns.prot'" in error.msg
    with override_settings(MAILSTROM={"store": "memory:"}):
        assert checks.run_checks(tags=["mailstrom"]) == []
        # Django's default senders are at localhost, which mailstrom refuses.
        with override_settings(SERVER_EMAIL="root@localhost"):
            [warning] = checks.run_checks(tags=["mailstrom"])
    assert warning.id == "mailstrom.W001"
    assert warning.msg.startswith("SERVER_EMAIL = 'root@localhost' is refused by mailstrom")


def test_the_system_check_reports_admins_and_managers_mailstrom_refuses() -> None:
    # mail_admins() sends one message to every address in ADMINS, and Django's error
    # reports send it with fail_silently: one address mailstrom refuses (at localhost, or
    # no address at all) had it refuse the whole message, and no admin got any report,
    # while the check said nothing.
    with override_settings(
        MAILSTROM={"store": "memory:"},
        ADMINS=[("Ops", "ops@localhost"), ("Ann", "ann@example.org")],
        MANAGERS=[("Root", "root")],
    ):
        warnings = checks.run_checks(tags=["mailstrom"])
    assert [w.id for w in warnings] == ["mailstrom.W001", "mailstrom.W001"]
    assert "'ops@localhost'" in warnings[0].msg and "ADMINS" in warnings[0].msg
    assert "'root'" in warnings[1].msg and "MANAGERS" in warnings[1].msg
    with override_settings(MAILSTROM={"store": "memory:"}, ADMINS=[("Ann", "ann@example.org")]):
        assert checks.run_checks(tags=["mailstrom"]) == []


def test_the_system_check_reports_a_local_part_django_cannot_write() -> None:
    """Django 5.2 writes a local part that is not ASCII as an RFC 2047 encoded word, which
    mailstrom refuses: error reports from such a SERVER_EMAIL, or to ADMINS holding such
    an address, were all lost (they fail silently) while the check said nothing."""
    with override_settings(
        MAILSTROM={"store": "memory:"},
        SERVER_EMAIL="jörg@sender.test",
        ADMINS=[("Ops", "ops@example.org"), ("Jörg", "jörg@example.org")],
    ):
        server, admin = checks.run_checks(tags=["mailstrom"])
    assert server.id == admin.id == "mailstrom.W001"
    assert server.msg.startswith("SERVER_EMAIL = 'jörg@sender.test' is refused")
    assert "'jörg@example.org'" in admin.msg and "ADMINS" in admin.msg
    assert "not ASCII" in admin.msg


def test_the_system_check_reports_a_sender_no_required_dkim_key_signs(tmp_path: Path) -> None:
    """With ``dkim.required`` mailstrom refuses (NoDKIMKey) a message from a domain no
    key aligns with: every error report from such a ``SERVER_EMAIL`` was refused, and
    since Django's error reports fail silently, lost, while the check said nothing."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "example.org.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    dkim = {"keys": [{"domain": "example.org", "selector": "s1", "private_key": str(path)}]}
    setting = {"store": "memory:", "worker": None, "dkim": {**dkim, "required": True}}
    with override_settings(
        MAILSTROM=setting,
        DEFAULT_FROM_EMAIL="Shop <shop@news.example.org>",
        SERVER_EMAIL="errors@sender.test",
        ADMINS=[("Ops", "ops@example.org")],
    ):
        [warning] = checks.run_checks(tags=["mailstrom"])
        assert mail.mail_admins("Boom", "Traceback ...", **silently()) is None
        assert get_mailstrom().query_recent() == []
    assert warning.id == "mailstrom.W001"
    assert warning.msg.startswith("SERVER_EMAIL = 'errors@sender.test' is refused by mailstrom")
    assert "DKIM" in warning.msg and "sender.test" in warning.msg
    for required, server_email in (
        (True, "errors@shop.example.org"),
        (False, "errors@sender.test"),
    ):
        setting = {"store": "memory:", "worker": None, "dkim": {**dkim, "required": required}}
        with override_settings(
            MAILSTROM=setting, DEFAULT_FROM_EMAIL="shop@example.org", SERVER_EMAIL=server_email
        ):
            assert checks.run_checks(tags=["mailstrom"]) == []


@pytest.mark.skipif(HAS_MAILERS, reason="with MAILERS, a mailer's OPTIONS hold them")
def test_the_system_check_warns_of_smtp_settings_mailstrom_does_not_use() -> None:
    """A project moving from Django's SMTP backend keeps EMAIL_TIMEOUT and its login:
    mailstrom's backend ignored them without a word, a bound that was not kept and a
    relay login that never happened."""
    setting = {"MAILSTROM": {"store": "memory:"}}
    with override_settings(**setting, EMAIL_TIMEOUT=5, EMAIL_HOST_PASSWORD="s3cret"):
        timeout, credentials = checks.run_checks(tags=["mailstrom"])
    assert timeout.id == credentials.id == "mailstrom.W002"
    assert timeout.msg.startswith("EMAIL_TIMEOUT is set, and mailstrom's backend does not")
    assert credentials.msg.startswith("EMAIL_HOST_PASSWORD is set")
    assert "MAILSTROM['relay']" in credentials.hint
    assert "s3cret" not in credentials.msg
    # Set to nothing (os.environ.get(..., "")), or not set: nothing to say.
    with override_settings(**setting, EMAIL_TIMEOUT=None, EMAIL_HOST_USER=""):
        assert checks.run_checks(tags=["mailstrom"]) == []
    # Nor when another backend sends the mail.
    other = f"{__name__}._ProjectBackend"
    with override_settings(**setting, EMAIL_BACKEND=other, EMAIL_TIMEOUT=5):
        assert checks.run_checks(tags=["mailstrom"]) == []


class _ProjectBackend(BaseEmailBackend):
    """Not mailstrom's: the check has nothing to say about its senders."""


@pytest.mark.parametrize(
    "backend",
    [
        # The class where it is defined, and a project's subclass: mailstrom sends the mail
        # all the same, and the check said nothing about DEFAULT_FROM_EMAIL at localhost.
        "mailstrom.contrib.django.backend.EmailBackend",
        f"{__name__}._ProjectEmailBackend",
    ],
)
def test_the_system_check_knows_mailstroms_backend_by_any_path(backend: str) -> None:
    if HAS_MAILERS:
        names = {"MAILERS": {"default": {"BACKEND": backend}}}
    else:
        names = {"EMAIL_BACKEND": backend}
    with override_settings(MAILSTROM={"store": "memory:"}, SERVER_EMAIL="root@localhost"):
        with override_settings(**names):
            [warning] = checks.run_checks(tags=["mailstrom"])
        other = f"{__name__}._ProjectBackend"
        unknown = "no.such.module.EmailBackend"
        broken = "tests.django_project.broken_backend.EmailBackend"
        for elsewhere in (other, unknown, broken):
            mailers = {"MAILERS": {"default": {"BACKEND": elsewhere}}}
            with override_settings(**(mailers if HAS_MAILERS else {"EMAIL_BACKEND": elsewhere})):
                assert checks.run_checks(tags=["mailstrom"]) == []
    assert warning.id == "mailstrom.W001"


@pytest.mark.parametrize("parameter", ["dead_after=zz", "lock_timeout=-1", "bogus=1"])
def test_a_store_url_parameter_the_store_refuses_is_a_bad_setting(parameter: str) -> None:
    # It passed the check, and the first send raised InvalidStoreURL, which fail_silently
    # swallowed: every message lost (mail_admins sends that way). Nothing connects here.
    url = f"postgresql://mail:s3cret@127.0.0.1:{_free_port()}/mail?{parameter}"
    with override_settings(MAILSTROM={"store": url, "worker": None}):
        [error] = checks.run_checks(tags=["mailstrom"])
        with pytest.raises(ImproperlyConfigured) as info:
            mail.send_mail("Hi", "x", None, ["bob@example.org"], **silently())
    assert error.id == "mailstrom.E001"
    assert parameter.partition("=")[0] in error.msg or "libpq cannot parse" in error.msg
    assert "s3cret" not in error.msg and "s3cret" not in str(info.value)


def test_a_store_that_refuses_its_url_when_opened_is_improperly_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What load() cannot see still must not become a MailstromError at the send, which
    # fail_silently would swallow.
    def refuse(url: str) -> None:
        raise ConfigError("PostgreSQL stores need the psycopg driver, which cannot be loaded")

    monkeypatch.setattr(shared, "open_store", refuse)
    with (
        override_settings(MAILSTROM={"store": "memory:", "worker": None}),
        pytest.raises(ImproperlyConfigured, match="psycopg") as info,
    ):
        mail.send_mail("Hi", "x", None, ["bob@example.org"], **silently())
    assert isinstance(info.value.__cause__, ConfigError)


@pytest.mark.skipif(not HAS_MAILERS, reason="settings.MAILERS came with Django 6.1")
def test_the_system_check_finds_mailstrom_among_the_mailers() -> None:
    """With MAILERS, EMAIL_BACKEND is not there to read (AttributeError): the check looks
    for mailstrom's backend in every mailer, since all of them use the default senders."""
    smtp = {"BACKEND": "django.core.mail.backends.smtp.EmailBackend", "OPTIONS": {"host": "x"}}
    ours = {"BACKEND": "mailstrom.contrib.django.EmailBackend"}
    with override_settings(MAILSTROM={"store": "memory:"}, SERVER_EMAIL="root@localhost"):
        with override_settings(MAILERS={"default": smtp}):
            assert checks.run_checks(tags=["mailstrom"]) == []
        with override_settings(MAILERS={"default": smtp, "queued": ours}):
            [warning] = checks.run_checks(tags=["mailstrom"])
    assert warning.id == "mailstrom.W001"


def test_mail_is_queued_while_the_worker_cannot_start_and_goes_out_once_it_can(
    dns_server: LoopbackDNS,
    mx: ReceivingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under uWSGI or mod_wsgi sys.executable is the server's own program, and a worker
    # process cannot be started. The store works: queueing must not depend on the worker
    # (with fail_silently, as Django's error reports send, the mail was lost without a
    # word), the failure is said once, and the start is tried again off the request path.
    python = sys.executable
    monkeypatch.setattr(sys, "executable", "/usr/local/bin/uwsgi")
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker="process")
    with (
        caplog.at_level(logging.ERROR, logger="mailstrom.django"),
        override_settings(MAILSTROM=setting),
    ):
        assert mail.send_mail("one", "x", None, ["bob@example.org"], **silently()) == 1
        message = mail.EmailMessage("two", "x", to=["ann@example.org"])
        assert message.send() == 1
        ms = get_mailstrom()
        assert ms.query_status(message.mailstrom_id).state is RecipientState.QUEUED  # type: ignore[attr-defined]
        for _ in range(500):  # the first attempt runs on a thread of its own
            if ms.worker_status.error is not None:
                break
            threading.Event().wait(0.02)
        assert "no Python interpreter" in (ms.worker_status.error or "")
        assert not ms.worker_status.running
        monkeypatch.setattr(sys, "executable", python)  # the interpreter is back
        received = mx.wait_for_messages(2)
        assert sorted(r for m in received for r in m.rcpt_tos) == [
            "ann@example.org",
            "bob@example.org",
        ]
    said = [r.getMessage() for r in caplog.records if "did not start" in r.getMessage()]
    assert len(said) == 1, said
    assert "uwsgi" in said[0]


def test_a_send_does_not_wait_for_the_worker_to_start(
    dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker process that is slow to answer (a loaded host, a slow disk) held the
    # request that sent first for up to 30 s, and each later send tried again. Here the
    # interpreter waits for the test to let it go, which it does once the send returned.
    go = tmp_path / "go"
    os.mkfifo(go)
    interpreter = tmp_path / "bin" / "python3"
    interpreter.parent.mkdir()
    interpreter.write_text(f'#!/bin/sh\nread line < "{go}"\nexec "{sys.executable}" "$@"\n')
    interpreter.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(interpreter))
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker="process")
    with override_settings(MAILSTROM=setting):
        assert mail.send_mail("one", "x", None, ["bob@example.org"]) == 1
        with open(go, "w") as release:  # (waits for the child to be there to read it)
            release.write("go\n")
        mx.wait_for_messages(1)
        assert get_mailstrom().worker_status.error is None


def test_a_worker_thread_that_cannot_be_started_is_reported_and_started_later(
    dns_server: LoopbackDNS,
    mx: ReceivingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No thread left for the worker (a container's pids limit): the mail is queued, the
    # reason is in worker_status, and the worker starts once a thread can.
    restore = refuse_thread(monkeypatch, "mailstrom-worker")
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker="thread")
    with override_settings(MAILSTROM=setting):
        assert mail.send_mail("one", "x", None, ["bob@example.org"]) == 1
        ms = get_mailstrom()
        for _ in range(500):  # the first attempt runs on a thread of its own
            if ms.worker_status.error is not None:
                break
            threading.Event().wait(0.02)
        assert "can't start new thread" in (ms.worker_status.error or "")
        restore()
        mx.wait_for_messages(1)
        assert ms.worker_status.running and ms.worker_status.error is None


def test_no_thread_to_start_the_worker_queues_and_the_next_send_tries_again(
    dns_server: LoopbackDNS,
    mx: ReceivingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    restore = refuse_thread(monkeypatch, "mailstrom-django-start")
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker="thread")
    with (
        caplog.at_level(logging.ERROR, logger="mailstrom.django"),
        override_settings(MAILSTROM=setting),
    ):
        assert mail.send_mail("one", "x", None, ["bob@example.org"]) == 1
        assert mail.send_mail("two", "x", None, ["ann@example.org"]) == 1
        assert [r.getMessage() for r in caplog.records if r.name == "mailstrom.django"] == [
            "the mailstrom worker cannot be started yet: can't start new thread"
        ]
        assert not get_mailstrom().worker_status.running
        restore()
        assert mail.send_mail("three", "x", None, ["eve@example.org"]) == 1
        assert len(mx.wait_for_messages(3)) == 3


FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import django
    django.setup()
    from django.core import mail
    from mailstrom.contrib.django import get_mailstrom

    def send(subject, to):
        message = mail.EmailMessage(subject, "x", to=[to])
        message.send()
        ms = get_mailstrom()
        deadline = time.monotonic() + 20
        while ms.query_status(message.mailstrom_id).state != "delivered":
            if time.monotonic() > deadline:
                sys.exit(f"{subject} was not delivered")
            time.sleep(0.02)  # polling the store: nothing else to wait on across processes

    send("parent-1", "p1@example.org")
    parent = get_mailstrom()
    pid = os.fork()
    if pid == 0:
        # A forked child (a gunicorn worker, say) gets its own facade on first use.
        send("child", "c@example.org")
        mine = get_mailstrom()
        deadline = time.monotonic() + 20
        while not mine.worker_status.running:  # it starts on a thread of its own
            if time.monotonic() > deadline:
                sys.exit(f"the child's worker did not start: {mine.worker_status.error}")
            time.sleep(0.02)
        print("child-worker", getattr(mine.worker, "pid", None), flush=True)
        # A normal exit runs atexit: it must stop the child's worker, not the parent's.
        sys.exit(0 if mine is not parent and mine.worker_status.running else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("the child failed")
    send("parent-2", "p2@example.org")
    if get_mailstrom() is not parent or not parent.worker_status.running:
        sys.exit("the parent's worker was disturbed")
    print("parent-worker", getattr(parent.worker, "pid", None), flush=True)
    """
)


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_a_forked_child_gets_its_own_worker_and_exits_without_stopping_the_parents(
    dns_server: LoopbackDNS, mx: ReceivingServer, tmp_path: Path, worker: str
) -> None:
    setting = mailstrom_setting(dns_server, mx, tmp_path, worker=worker)
    env = project_env(setting) | {"DJANGO_SETTINGS_MODULE": "tests.django_project.settings"}
    done = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    received = mx.wait_for_messages(3)
    assert sorted(r for m in received for r in m.rcpt_tos) == [
        "c@example.org",
        "p1@example.org",
        "p2@example.org",
    ]
    if worker == "process":
        pids = dict(line.split() for line in done.stdout.splitlines())
        assert pids["child-worker"] != pids["parent-worker"]
        # Both worker processes were stopped at their parents' exit, not left behind.
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)


class _ProjectEmailBackend(EmailBackend):
    """A project's own subclass of mailstrom's backend (for the system check's test)."""


def _in_get_mailstrom(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code is shared.get_mailstrom.__code__:
            return True
        frame = frame.f_back
    return False


def test_sends_at_once_wait_for_one_opening_of_the_store_not_each_their_own() -> None:
    # A PostgreSQL server that holds the first connection without a word (as one behind
    # a dropped route does, until connect_timeout) and drops the next ones. Opened under
    # the lock, each send opened the store in turn: ten error reports sent at once during
    # an outage waited up to ten connect_timeouts.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    release = threading.Event()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            if len(held) == 1:
                release.wait(60)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    store = f"postgresql://mail@127.0.0.1:{port}/mail?connect_timeout=60"
    with override_settings(MAILSTROM={"store": store, "worker": None}):
        senders = [
            threading.Thread(
                target=mail.send_mail, args=("x", "x", None, ["bob@example.org"]), kwargs=silently()
            )
            for _ in range(4)
        ]
        senders[0].start()
        while not held:  # the first send is connecting
            threading.Event().wait(0.01)
        for sender in senders[1:]:
            sender.start()
        while not all(_in_get_mailstrom(sender) for sender in senders[1:]):
            threading.Event().wait(0.01)
        release.set()
        for sender in senders:
            sender.join(60)
    listener.close()
    assert len(held) == 1
