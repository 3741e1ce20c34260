"""The ``mailstrom`` command: argument parsing, dispatch, and errors turned into exit codes.

Invoked under the name ``sendmail`` (a symlink), it behaves as ``mailstrom sendmail``;
under the name ``mailq``, as ``mailstrom queue``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

try:
    from mailstrom._version import __version__
    from mailstrom.cli.context import GLOBAL_VALUE_OPTIONS, add_global_options, global_parser
    from mailstrom.cli.exits import (
        EX_INTERRUPTED,
        EX_OK,
        EX_SOFTWARE,
        EX_USAGE,
        UsageError,
        discard_stdout,
        fail,
        reader_gone,
        reason_for,
        say,
    )
    from mailstrom.cli.parsing import ArgumentParser
except KeyboardInterrupt:
    # Ctrl-C while the command starts (these imports take about 0.1 s): the console
    # script imports this module before main() can catch anything, and Python printed
    # KeyboardInterrupt's traceback. An exit, as main()'s: 130 (EX_INTERRUPTED).
    raise SystemExit(130) from None

COMMAND_MODULES: dict[str, str] = {
    "send": "send",
    "sendmail": "sendmail",
    "status": "views",
    "queue": "views",
    "show": "views",
    "hold": "manage",
    "release": "manage",
    "retry": "manage",
    "cancel": "manage",
    "purge": "manage",
    "worker": "worker",
    "workers": "workers",
    "check": "check",
    "doctor": "doctor",
    "db": "db",
    "events": "events",
    "dkim": "dkim",
    "suspend": "destinations",
    "resume": "destinations",
    "tlsrpt": "tlsrpt",
    "web": "web",
    "suppress": "suppress",
    "bounce": "bounce",
}
"""Each command and the module of ``mailstrom.cli`` whose ``register`` adds it, in the
order ``mailstrom --help`` lists them. A run loads only the module of the command it
names: a command pays for its own imports and no other's (``mailstrom status`` ~70 ms
less; ``benchmarks/startup.py``)."""

DESCRIPTION = """\
Queue email durably and deliver it straight to each recipient's MX servers.

Settings come from a TOML file (--config or $MAILSTROM_CONFIG, else
$XDG_CONFIG_HOME/mailstrom/config.toml or /etc/mailstrom/config.toml; never a file in
the working directory unless --config names it), then MAILSTROM_* environment
variables, then options; see docs/cli.md. The sendmail command reads only
$MAILSTROM_CONFIG or /etc/mailstrom/config.toml and takes no mailstrom options.
"""

EPILOG = """\
examples:
  mailstrom send --from app@example.com --to bob@example.org --subject Hi --text Hello
  mailstrom worker                        # deliver until SIGTERM/SIGINT
  mailstrom status 0190f3a2c4e1            # any unique prefix of an id
  mailstrom queue                          # pending mail, with reasons and next attempts
  mailstrom queue --shape                  # pending recipients by destination and age
  mailstrom show 0190f3a2c4e1              # the message as stored
  mailstrom hold --domain example.org --dry-run
  mailstrom suspend example.org --for 2h
  mailstrom check example.org
  mailstrom doctor example.com             # will receivers accept our mail?
  mailstrom events --follow --json        # delivery events as workers record them
  mailstrom tlsrpt --date 2026-11-29 --send  # daily TLS reports (RFC 8460)
  mailstrom web                           # the queue in the browser, on 127.0.0.1:8025
  printf 'Subject: hi\\n\\nbody\\n' | mailstrom sendmail -f app@example.com bob@example.org
  mailstrom suppress add bob@example.org  # never send to bob again
  mailstrom bounce < bounce.eml           # a late bounce: fail and suppress the recipient

exit codes (sysexits): 0 ok, 64 usage, 65 bad message or address, 66 unreadable
input, unknown or ambiguous message id, or resume of a domain not suspended,
69 send --wait: a recipient failed, 70 internal error, 73 dkim keygen: the key file
cannot be created, 74 store damaged, not a mailstrom database, newer schema, or
replaced (retrying will not help), 75 try again later
(store unavailable; send --wait: still pending), 78 bad configuration.
"""

LISTINGS = frozenset({"status", "queue", "show", "workers", "events", "check", "doctor"})
"""The commands that only print what they find: a reader of their standard output that
goes (``| head``) ends them, exit 0 (:func:`~mailstrom.cli.output.end_with_reader`).
Every other command acts, and its output outlives its readers
(:func:`~mailstrom.cli.output.outlive_readers`): the exit code is its work's."""

Handler = Callable[[argparse.Namespace], int]


def build_parser(command: str | None = None) -> ArgumentParser:
    """The command tree; global options work before or after the subcommand. With
    ``command`` (a key of :data:`COMMAND_MODULES`), only the module that adds it is
    loaded; otherwise every command is (``--help``, an unknown command)."""
    parser = ArgumentParser(
        prog="mailstrom", description=DESCRIPTION + _default_store_line(), epilog=EPILOG
    )
    add_global_options(parser)
    parser.add_argument(
        "--version", action="version", version=f"mailstrom {__version__}", help="print the version"
    )
    common = global_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = list(dict.fromkeys(COMMAND_MODULES.values()))
    if command in COMMAND_MODULES:
        modules = [COMMAND_MODULES[command]]
    for name in modules:
        importlib.import_module(f"mailstrom.cli.{name}").register(sub, [common])
    return parser


def _default_store_line() -> str:
    from mailstrom.errors import ConfigError
    from mailstrom.stores.url import default_store_path

    try:
        path = str(default_store_path())
    except ConfigError:
        return ""
    # One fixed place per user (root: the system spool), never the working directory.
    return f"\nWithout a store setting the queue is {path}.\n"


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code (the console script passes it to exit).
    Interrupted (Ctrl-C, SIGINT) at any moment, parsing and the command's own imports
    included: :data:`EX_INTERRUPTED`, without a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return EX_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    from mailstrom.cli.output import (
        OutputFailed,
        ReaderGone,
        end_with_reader,
        outlive_readers,
        tolerant_stdout,
    )

    tolerant_stdout()
    if argv is None:
        argv = sys.argv[1:]
        name = os.path.basename(sys.argv[0])
        if name == "sendmail":
            from mailstrom.cli import sendmail

            return sendmail.main(argv)
        if name == "mailq":
            argv = ["queue", *argv]  # Postfix's and Sendmail's mailq: list the queue
    try:
        split = _split_sendmail(argv)
        if split is not None:
            from mailstrom.cli import sendmail

            head, rest = split
            return sendmail.main(rest, mailstrom_options=head)
        at = _command_index(argv)
        args = build_parser(None if at is None else argv[at]).parse_args(argv)
    except UsageError as exc:
        say(f"mailstrom: {reason_for(exc)}")
        return EX_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EX_OK
    except Exception as exc:  # a bug in parsing: still one line, not a traceback
        return fail(exc)
    handler: Handler = args.handler
    if args.command in LISTINGS:
        end_with_reader()
    else:
        outlive_readers()
    try:
        code = handler(args)
        # Here, not at the interpreter's exit: a write that fails is then the command's
        # error, with its code, not a traceback Python prints and exit 120.
        sys.stdout.flush()
        return code
    except ReaderGone:  # `mailstrom queue | head -1`: the reader had what it wanted
        return reader_gone()
    except OutputFailed as exc:  # `> file` on a full disk
        discard_stdout()
        return fail(exc)
    except BrokenPipeError as exc:
        return fail(exc)  # not its standard output's (a socket's): a failure
    except Exception as exc:
        code = fail(exc)
        if code == EX_SOFTWARE and getattr(args, "traceback", False):
            raise
        return code


def _split_sendmail(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``[global options] sendmail ARGS`` → (global options, ARGS), else None.

    sendmail's flags (``-t``, ``-oi``, ``-fADDR``) are not argparse's, so the sendmail
    command parses its own arguments rather than being a normal subparser.
    """
    at = _command_index(argv)
    if at is None or argv[at] != "sendmail":
        return None
    return argv[:at], argv[at + 1 :]


def _takes_value(arg: str) -> bool:
    """Whether ``arg`` is a global option that takes the next argument as its value:
    written out, or abbreviated as argparse allows (``--sto`` for ``--store``). Read as
    a flag, an abbreviation made its value the command's name, and ``mailstrom --sto X
    sendmail`` reached argparse's stand-in for sendmail (a traceback) instead of the
    refusal of mailstrom options."""
    if arg in GLOBAL_VALUE_OPTIONS:
        return True
    if not arg.startswith("--") or "=" in arg:
        return False
    matches = [o for o in (*GLOBAL_VALUE_OPTIONS, *GLOBAL_FLAGS) if o.startswith(arg)]
    return bool(matches) and all(o in GLOBAL_VALUE_OPTIONS for o in matches)


GLOBAL_FLAGS = ("--traceback", "--version", "--help")
"""The global options that take no value (for abbreviations: see :func:`_takes_value`)."""


def _command_index(argv: list[str]) -> int | None:
    """Where the command's name is in ``argv``: the first word after the global options
    (skipping the values of those that take one), or None."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if _takes_value(arg):
            i += 2
        elif arg.startswith("--"):
            i += 1
        else:
            return i
    return None
