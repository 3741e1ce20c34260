"""Traffic shaping through the command: a throttled destination shows in ``status``."""

from __future__ import annotations

from tests.cli.conftest import CLI, MailEnv
from tests.cli.test_delivery import send


def test_status_says_the_destination_is_throttled(mail_env: MailEnv) -> None:
    cli, mx = mail_env.cli, mail_env.mx
    mx.greeting = "421 4.7.28 Too much mail from your IP, slow down - gsmtp"
    first = send(cli, "--text", "Hi Bob")
    cli.ok("worker", "--once", "--no-live")
    assert mx.connections == 1
    second = send(cli, "--text", "Hi again")
    cli.ok("worker", "--once", "--no-live")
    assert mx.connections == 1  # paused: the second worker did not connect either

    for message_id, attempts in ((first, 1), (second, 0)):
        [rcpt] = cli.ok("status", "--json", message_id).json()["recipients"]
        assert rcpt["attempts"] == attempts
        throttle = rcpt["throttle"]
        assert throttle["destination"] == "example.test"  # no rule: the domain itself
        assert throttle["strikes"] == 1
        assert "4.7.28" in throttle["reply"]
        assert rcpt["next_attempt_at"] == throttle["until"]
        text = cli.ok("status", message_id).out
        assert "bob@example.test: destination example.test throttled until " in text

    # The pauses running, as the dashboard's destinations page lists them: status alone
    # showed one only through a message it held back.
    [pause] = cli.ok("queue", "--throttled", "--json").json()
    assert (pause["destination"], pause["strikes"]) == ("example.test", 1)
    assert "4.7.28" in pause["reply"]
    listed = cli.ok("queue", "--throttled").out
    assert "example.test" in listed and "4.7.28" in listed


def test_a_bad_rule_is_a_configuration_error(cli: CLI) -> None:
    cli.env["MAILSTROM_SHAPING_RULES"] = "mail.*.example max_connections=2"
    result = cli("queue")
    assert result.code == 78
    assert "shaping.rules[0]: match" in result.err
