"""``mailstrom worker`` and its stop signals: the first drains, a second stops at once,
and what was leased and never attempted is given back either way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.cli.conftest import MailEnv, ended
from tests.cli.test_delivery import send


def _until(predicate: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)  # polling a server's command log; nothing to wait on
    return bool(predicate())


def test_a_second_signal_during_the_clean_up_still_gives_back_the_work_not_attempted(
    mail_env: MailEnv, smtp_server: Any
) -> None:
    """The second signal cancelled the worker's task wherever it was: once the drain was
    over, in the middle of the clean-up (here: the QUIT of an idle connection, which a
    server may take 5 s to answer), it skipped giving back what was leased and never
    attempted, which then waited for its lease to expire (15 minutes)."""
    cli, dns, quitting = mail_env.cli, mail_env.dns, mail_env.mx
    quitting.stall_on = "quit"
    silent = smtp_server(host="127.0.0.2", port=quitting.port, stall_on="greeting")
    dns.mx("other.test", [(10, "mx2.test")])
    dns.a("mx2.test", "127.0.0.2")
    delivered = send(cli, "--text", "Hi", to="bob@example.test")
    stuck = send(cli, "--text", "Hi", to="carol@other.test")
    proc = cli.popen("worker", "--no-live", "--drain-timeout", "0")
    try:
        quitting.wait_for_messages(1, timeout=30)
        assert _until(lambda: silent.connections >= 1)  # carol's delivery waits for a greeting
        assert _until(lambda: cli.ok("status", "--json", delivered).json()["state"] == "delivered")
        proc.send_signal(signal.SIGTERM)
        assert _until(lambda: "QUIT" in quitting.commands)  # the clean-up has begun
    finally:
        code, err = ended(proc)
    assert code == 0, err
    [carol] = cli.ok("status", "--json", stuck).json()["recipients"]
    assert carol["state"] == "queued" and carol["attempts"] == 0, carol
    # Given back, due at once: the next worker delivers it now, not in 15 minutes.
    silent.stall_on = None
    once = cli("worker", "--once", "--no-live", "--log-format", "json")
    assert once.code == 0, once.err
    events = [json.loads(line) for line in once.err.splitlines()]
    assert [e["rcpt"] for e in events if e["event"] == "attempt"] == ["carol@other.test"]


def test_a_worker_started_from_a_thread_blocking_sigterm_still_stops_on_it(
    mail_env: MailEnv,
) -> None:
    """A process inherits the signal mask of the thread that starts it (a supervisor
    written in Python, leaving signals to its main thread): with SIGTERM blocked, the
    worker never saw it and ran on until SIGKILL."""
    cli = mail_env.cli
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        started.append(cli.popen("worker", "--no-live"))

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    [proc] = started
    assert proc.stderr is not None
    while b"worker started" not in (line := proc.stderr.readline()):
        assert line, "the worker ended before it started"
    code, err = ended(proc)
    assert code == 0, err
    assert "worker stopped" in err


def test_a_stop_signal_ignored_by_whoever_started_the_worker_stays_ignored(
    mail_env: MailEnv,
) -> None:
    """``nohup mailstrom worker &`` starts it with SIGHUP ignored, so that the ssh
    session's end does not stop it (and a shell script's ``&`` with SIGINT ignored, so
    that Ctrl-C on the script does not): the worker handled every stop signal all the
    same, and stopped when the session closed. Python keeps an ignored SIGINT too."""
    cli = mail_env.cli

    def as_nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", cli.module, "worker", "--no-live"],
        cwd=cli.cwd,
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=as_nohup,
    )
    assert proc.stderr is not None
    while b"worker started" not in (line := proc.stderr.readline()):
        assert line, "the worker ended before it started"
    proc.send_signal(signal.SIGHUP)  # the session closed
    proc.send_signal(signal.SIGINT)  # Ctrl-C on the script that started it
    send(cli, "--text", "Hi")
    mail_env.mx.wait_for_messages(1, timeout=30)  # it still delivers
    assert proc.poll() is None
    code, err = ended(proc)
    assert code == 0, err
    assert err.count("event=stopping") == 1, err


def test_a_worker_whose_terminal_went_away_still_stops_cleanly(mail_env: MailEnv) -> None:
    """A closed terminal window or ssh session hangs the terminal up and sends SIGHUP: the
    worker drained and gave back as it should, and then, writing the live view's last
    frame to the terminal (EIO once hung up), ended with "internal error: OSError" and
    exit 70 instead of 0. The view only shows; a terminal gone ends the view, not the
    worker."""
    import os
    import pty

    cli = mail_env.cli
    screen, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", cli.module, "worker"],
        cwd=cli.cwd,
        env={**cli.env, "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    try:
        shown = b""
        while b"Recent attempts" not in shown:  # the live view is on the terminal
            chunk = os.read(screen, 4096)
            assert chunk, "the worker ended before it showed its view"
            shown += chunk
    finally:
        os.close(screen)  # the terminal goes away: writing to it fails from now on
    code, err = ended(proc, signal.SIGHUP)
    assert (code, "internal error" in err) == (0, False), err


@pytest.mark.parametrize("buffer", [[], ["--no-log-buffer"]])
def test_a_worker_whose_standard_error_is_a_broken_pipe_delivers_and_stops(
    mail_env: MailEnv, buffer: list[str]
) -> None:
    """A service's standard error is a pipe or a socket to its logger (journald, a
    collector), which breaks when that restarts. Writing "worker started" then raised
    BrokenPipeError out of the worker's start: it delivered nothing and, its store loop
    left waiting, did not stop on SIGTERM either. A log line that cannot be written is
    lost; the mail is not."""
    import os

    cli = mail_env.cli
    send(cli, "--text", "Hi")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the logger is gone
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", cli.module, "worker", "--no-live", *buffer],
            cwd=cli.cwd,
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
    finally:
        os.close(write_end)
    try:
        mail_env.mx.wait_for_messages(1, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_whose_standard_error_is_a_broken_pipe_keeps_its_exit_code(
    mail_env: MailEnv,
) -> None:
    """The log lines still held are written as the worker ends: their BrokenPipeError
    replaced the error it ended on, and a worker whose store was deleted exited 0 (the
    code for a reader gone) rather than 74, which tells a supervisor not to restart it."""
    import os

    cli = mail_env.cli
    read_end, write_end = os.pipe()
    os.close(read_end)  # the logger is gone
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", cli.module, "worker", "--no-live"],
            cwd=cli.cwd,
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
    finally:
        os.close(write_end)
    try:
        database = cli.cwd / "queue.db"
        assert _until(database.exists)
        send(cli, "--text", "Hi")
        mail_env.mx.wait_for_messages(1, timeout=30)  # it runs
        database.unlink()
        assert proc.wait(timeout=30) == 74
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_gives_back_what_the_rate_holds_without_waiting_for_it(
    mail_env: MailEnv,
) -> None:
    """Was: the messages the worker queued for a destination's rate (one a second here)
    counted as deliveries in flight, so SIGTERM's drain waited for the rate to send them
    all, up to ``--drain-timeout``. They go back to the store at once, untried, each due
    at its place in the rate's schedule."""
    cli, mx = mail_env.cli, mail_env.mx
    cli.env["MAILSTROM_SHAPING_RULES"] = "example.test messages_per_minute=60"
    ids = [send(cli, "--text", f"Hi {i}") for i in range(6)]
    proc = cli.popen("worker", "--no-live", "--drain-timeout", "60")
    try:
        mx.wait_for_messages(1, timeout=30)  # the rest waits for the rate
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - began
    finally:
        code, err = ended(proc)
    assert code == 0, err
    statuses = [cli.ok("status", "--json", i).json()["recipients"][0] for i in ids]
    left = [s for s in statuses if s["state"] != "delivered"]
    assert took < 3, f"SIGTERM waited {took:.1f} s for the rate: {len(left)} of 6 left"
    assert len(mx.messages) == 6 - len(left) and len(left) >= 3, statuses
    for rcpt in left:  # untried, each at its own place in the rate's schedule
        assert rcpt["state"] == "queued" and rcpt["attempts"] == 0, rcpt
    assert len({s["next_attempt_at"] for s in left}) == len(left), left
