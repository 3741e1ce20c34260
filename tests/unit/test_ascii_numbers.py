"""Numbers in options and settings are ASCII digits: int(), float(), str.isdigit() and a
regex's \\d also take other scripts' digits ("\\u0663" is 3 to int()), so a value that
shows as something else was taken as a number. Settings and durations are tested in
tests/cli/test_settings.py, the store URL's prepare_threshold in test_postgres_connect.py."""

from __future__ import annotations

import argparse

import pytest

from mailstrom.cli.events import _event_id
from mailstrom.cli.parsing import count_arg, seconds_arg
from mailstrom.doctor.outgoing import split_probe
from mailstrom.ops.server import parse_listen

NON_ASCII = ["\u0663", "\u0663\u0660", "\uff13", "\u0967", "3\u3000", "\u00a03"]
"""ARABIC-INDIC THREE, thirty, FULLWIDTH THREE, DEVANAGARI ONE, 3 with an ideographic or a
no-break space (which str.strip() took)."""


@pytest.mark.parametrize("text", NON_ASCII)
@pytest.mark.parametrize("parse", [count_arg, seconds_arg, _event_id])
def test_count_seconds_and_id_options_take_ascii_digits_only(
    parse: argparse._ActionsContainer, text: str
) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        parse(text)  # type: ignore[operator]


def test_ascii_option_numbers_still_parse() -> None:
    assert (count_arg(" 30 "), seconds_arg("2.5"), _event_id("7")) == (30, 2.5, 7)


@pytest.mark.parametrize("text", NON_ASCII)
def test_listen_ports_take_ascii_digits_only(text: str) -> None:
    """metrics.listen / web.listen: "127.0.0.1:\\u0669\\u0664\\u0666\\u0666" was port 9466."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(f"127.0.0.1:{text}")


@pytest.mark.parametrize("text", [t for t in NON_ASCII if not t.startswith("3")])
def test_probe_ports_take_ascii_digits_only(text: str) -> None:
    """--probe HOST:PORT: the host may be an IDN name, and white space around the whole
    option is stripped; the port is ASCII digits."""
    with pytest.raises(ValueError, match="port"):
        split_probe(f"mx.example.org:{text}", 25)
