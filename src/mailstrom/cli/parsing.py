"""argparse, adjusted: usage errors raise (exit 64, EX_USAGE) instead of exiting with 2."""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from mailstrom.bounds import MAX_SECONDS
from mailstrom.cli.exits import UsageError
from mailstrom.domains import helo_name_problem
from mailstrom.errors import ConfigError, InvalidStoreURL
from mailstrom.message.chars import shorten
from mailstrom.settings import (
    KEYS,
    MAX_INTEGER,
    ascii_only,
    parse_dns_servers,
    parse_duration,
)

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[Any]
else:  # not subscriptable at run time
    Subparsers = argparse._SubParsersAction
"""What ``add_subparsers`` returns (argparse does not name the type publicly)."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs but keeps indented lines (examples) exactly as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs: list[str] = []
        for block in text.strip("\n").split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines[1:]) or block.startswith(" "):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(
                    textwrap.fill(
                        " ".join(block.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
        return "\n\n".join(paragraphs) + "\n"


class ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` so ``main`` prints one line and exits with EX_USAGE."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        for name in (None, "store"):  # None: add_argument without an action
            self.register("action", name, StoreOnce)
        self.register("action", "parsers", _Commands)
        self.given: set[str] = set()
        """The single-value options given so far in this parse (see :class:`StoreOnce`)."""
        self.given_before: frozenset[str] = frozenset()
        """Those given before this (sub)command's name, by the parser that chose it."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.given, self.given_before = set(self.given_before), frozenset()
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # The reason alone, as every error is one line (docs/cli.md); argparse's usage
        # lines (a dozen for `send`) are what `COMMAND --help` shows.
        raise UsageError(message)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python before 3.12.7 drops the "--" of "--limit=--" as if it ended the options
        # and hands the option [] unconverted: a list where count_arg's int was expected
        # (exit 70 further on). Written with "=", "--" is the option's value.
        if action.option_strings and arg_strings == ["--"] and action.nargs in (None, "?"):
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def once(action: argparse.Action, parser: argparse.ArgumentParser) -> None:
    """Refuse a second value for ``action``'s option in one parse: argparse keeps the
    last without a word, so ``send --from a --from b`` sent as b and ``purge
    --delivered-before 30d --delivered-before 1s`` purged mail finished a second ago.
    Options that collect values (``--to``, ``--dns-server``) take ``append`` instead."""
    given = getattr(parser, "given", None)
    if not isinstance(given, set) or not action.option_strings:
        return  # a positional argument, or a parser of argparse's own
    if action.dest in given:
        raise argparse.ArgumentError(action, "given twice")
    given.add(action.dest)


class StoreOnce(argparse._StoreAction):
    """argparse's ``store`` that refuses a second value (see :func:`once`)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        once(self, parser)
        super().__call__(parser, namespace, values, option_string)


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """argparse's subcommands, telling the chosen command's parser which single-value
    options came before its name: a global option given before and after it
    (``--store a queue --store b``) is given twice too."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        chosen = self._name_parser_map.get(values[0]) if values else None
        if isinstance(chosen, ArgumentParser) and isinstance(parser, ArgumentParser):
            chosen.given_before = frozenset(parser.given)
        super().__call__(parser, namespace, values, option_string)


# --- option value types: a bad value is a usage error (64) with a plain reason ---------------


def duration_arg(text: str) -> timedelta:
    """An argparse ``type`` for ages like 30s, 15m, 2h, 3d (at most 100 years)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count_arg(text: str) -> int:
    """An argparse ``type`` for a count ≥ 1 that a store can take (a bigint)."""
    try:
        value = int(text.strip()) if ascii_only(text) else 0
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_INTEGER:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_INTEGER}, got {text!r}"
        )
    return value


def seconds_arg(text: str) -> float:
    """An argparse ``type`` for a number of seconds: from 0 to 100 years (not nan or inf).
    Longer ones overflowed where they are used, after the command had acted: ``send --wait
    --timeout 1e20`` queued the message and then exited 70 (``now + timedelta``), ``events
    --follow --interval 1e10`` too (``time.sleep``)."""
    try:
        value = float(text.strip()) if ascii_only(text) else math.nan
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_SECONDS:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds from 0 to {MAX_SECONDS:.0f}, got {text!r}"
        )
    return value


def setting_arg(key: str, option: str) -> Callable[[str], str]:
    """An argparse ``type`` checking an option's value with the parser of setting ``key``
    (so ``--smtp-port x`` is a usage error naming the option); the text is kept, for
    :func:`~mailstrom.settings.load_settings` to layer over the file and environment."""

    def check(text: str) -> str:
        try:
            KEYS[key](option, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(_without_prefix(str(exc), option)) from None
        return text

    return check


def helo_arg(text: str) -> str:
    """An argparse ``type`` for a host name (what Config requires of helo_name)."""
    problem = helo_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"expected a host name, got {text!r:.80}: {problem}")
    return text


def dns_server_arg(text: str) -> str:
    """An argparse ``type`` for one ``HOST[:PORT]`` of ``--dns-server``."""
    try:
        parse_dns_servers([text])
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(_without_prefix(str(exc), "--dns-server")) from None
    return text


def path_arg(text: str) -> str:
    """An argparse ``type`` for a file path. No file name holds a NUL character (and with
    one, ``open()`` raises ValueError rather than the OSError the commands report), nor
    is empty: ``--html-file "$F"`` with F unset sent the message without its HTML part,
    and ``dkim keygen --out ""`` wrote the default file, without a word."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    if "\0" in text:
        raise argparse.ArgumentTypeError(
            f"a file name cannot hold a NUL character: {shorten(text)}"
        )
    return text


def config_arg(text: str) -> str:
    """An argparse ``type`` for ``--config``: a file path, not empty. An empty one
    (``--config "$CFG"`` with CFG unset) read the default files instead, silently."""
    if not text:
        raise argparse.ArgumentTypeError("expected a configuration file, got ''")
    return path_arg(text)


def store_arg(text: str) -> str:
    """An argparse ``type`` for a store URL (checked, not opened)."""
    from mailstrom.stores.url import parse_store_url

    try:
        parse_store_url(text)
    except InvalidStoreURL as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _without_prefix(reason: str, option: str) -> str:
    # argparse already says "argument --smtp-port: ".
    return reason.removeprefix(f"{option}: ")
