"""The ``mailstrom`` console script's entry point: runs :func:`mailstrom.cli.main.main`.

The script pip writes imports its entry point's module before calling anything, and a
module inside the ``mailstrom`` package runs the package's ``__init__`` first (about
20 ms: the logging module, the lazy exports): a Ctrl-C in that time printed Python's
traceback of KeyboardInterrupt, where from then on the command exits 130 quietly. This
top-level module imports nothing itself; :func:`main` imports the command, and catches
a Ctrl-C in doing so.
"""

from __future__ import annotations

EX_INTERRUPTED = 130
""":data:`mailstrom.cli.exits.EX_INTERRUPTED`, not imported from there: it is what the
import being interrupted would have given."""


def main() -> int:
    """Import and run the command; :data:`EX_INTERRUPTED` when a Ctrl-C stops the import."""
    try:
        from mailstrom.cli.main import main as command
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    return command()
