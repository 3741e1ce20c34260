"""argparse, adjusted: usage errors raise (exit 64, EX_USAGE) instead of exiting with 2."""

from __future__ import annotations

import argparse
import textwrap
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from mailstrom.cli.exits import UsageError
from mailstrom.settings import parse_duration

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

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())


def duration_arg(text: str) -> timedelta:
    """An argparse ``type`` for ages like 30s, 15m, 2h, 3d."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
