"""How a worker child process is started: which interpreter, with which flags, importing
this very mailstrom, its frames on two pipes of its own. One job: the ``Popen``; what is
said over the pipes is :mod:`mailstrom.client.process`'s (and
:mod:`mailstrom.runtime.child`'s) business.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys

CHILD = "mailstrom.runtime.child"
BOOT = """\
import importlib.machinery, importlib.util, os, runpy, site, sys
module, root = sys.argv[1:3]
del sys.argv[1:3]
sites = {os.path.abspath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
at = next((i for i, p in enumerate(sys.path) if os.path.abspath(p) in sites), len(sys.path))
sys.path.insert(at, root)
spec = importlib.machinery.PathFinder.find_spec("mailstrom", [root])
package = importlib.util.module_from_spec(spec)
sys.modules["mailstrom"] = package
spec.loader.exec_module(package)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
"""How a child starts: ``python FLAGS -c BOOT mailstrom.runtime.child ROOT IN OUT`` (the
flags of :func:`interpreter_flags`) runs the module with ``IN OUT`` as its arguments,
once it imported the package ``mailstrom`` from
``ROOT``, where this one was imported from (this very mailstrom, whatever else the
child's path holds), and put ``ROOT`` on its path ahead of the site directories (for what
was installed beside it) but after the standard library.

Not ``ROOT`` first in PYTHONPATH, as it was: that put the application's site-packages
(where mailstrom is installed) before the standard library in the child, which imported
any module installed there under a standard library name (PyPI's ``asyncio`` 3.4.3,
which many requirements files list by mistake; ``enum34``; ``pathlib``) where the
application imports the standard library's, and failed to start or worse."""


def popen_child() -> subprocess.Popen[bytes]:
    """Start a child running ``mailstrom.runtime.child`` (see :data:`BOOT`), its frames
    on two pipes of their own, set as the returned ``Popen``'s ``stdin`` and ``stdout``
    (the ends that are ours).

    Not over its standard input and output: whatever else the child runs writes there
    and reads there too (a banner printed by a ``sitecustomize`` or a ``.pth`` file as
    the interpreter starts, a library's C code, a process it starts that inherits them),
    and one stray line was read as a frame's length, swallowing every later frame. Its
    standard output is this process's standard error (where its own diagnostics go), its
    standard input is empty."""
    executable = sys.executable
    missing = no_interpreter()
    if missing is not None:
        # An OSError is what start() and a restart report as no process.
        raise FileNotFoundError(f"no Python interpreter to start: {missing}")
    out: int = subprocess.DEVNULL
    with contextlib.suppress(OSError):
        os.fstat(2)  # before the pipes: one of them may take a closed standard descriptor
        out = 2
    fds: list[int] = []
    try:
        for _ in range(2):
            # Neither inheritable but by pass_fds; none of 0-2 (an application that
            # closed its standard descriptors), which the child's own would replace.
            fds.extend(_above_standard(fd) for fd in os.pipe())
        (to_child, ours_in), (ours_out, from_child) = fds[:2], fds[2:]
        theirs = (to_child, from_child)
        # The package's root: where this one was imported from.
        root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        proc = subprocess.Popen(
            [executable, *interpreter_flags(), "-c", BOOT, CHILD, root, *map(str, theirs)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            start_new_session=True,  # the application's Ctrl-C is for the application
            close_fds=True,
            pass_fds=theirs,
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in theirs:
        os.close(fd)
    proc.stdin = open(ours_in, "wb")  # noqa: SIM115 - closed by the reader, as Popen's
    proc.stdout = open(ours_out, "rb")  # noqa: SIM115
    return proc


def interpreter_flags() -> list[str]:
    """The flags this interpreter was started with that decide where a child imports
    from and how it runs, for the child's command line (as :mod:`multiprocessing` passes
    them). Without them an application run with ``python -I`` or ``-E`` (a service's
    unit, a system script's shebang), which ignores PYTHONPATH and the user's
    site-packages, had a worker child that imported from them, ahead of the standard
    library, whatever they held.

    ``-P`` always: run with ``-c``, the child had the working directory first on its
    path, ahead of the standard library, where an application run as a script has the
    script's directory (a module in a service's or a shell's working directory under a
    standard library name was imported in its place). The child needs nothing there: it
    imports mailstrom from where this one came from, and what was installed beside it."""
    flags = sys.flags
    if flags.isolated:
        options = ["-I"]  # -E, -s and -P together
    else:
        options = [
            option
            for option, given in (("-E", flags.ignore_environment), ("-s", flags.no_user_site))
            if given
        ]
        options.append("-P")
    if flags.dont_write_bytecode:
        options.append("-B")
    if flags.optimize:
        options.append("-" + "O" * flags.optimize)
    return options


def no_interpreter() -> str | None:
    """Why this program has no Python interpreter to start a worker child with, or None
    when ``sys.executable`` is one.

    A program embedding Python may have no interpreter file (``sys.executable`` None or
    "", as Python's docs allow: Popen raised a TypeError for None, where start() promises
    a WorkerError); a frozen one (PyInstaller, cx_Freeze: ``sys.frozen``) has only
    itself, which ran the whole application again with the child's arguments. Under a
    server that embeds Python (uWSGI, mod_wsgi) it is the server's own program
    (``uwsgi``, ``httpd``, ``apache2``), which was started with the child's Python
    arguments: a program is taken for an interpreter by its name, as every Python's
    (CPython's ``python3.11``, a venv's ``python``, PyPy's, GraalPy's) begins."""
    if getattr(sys, "frozen", False):
        return f"sys.executable ({sys.executable}) is this frozen program's own"
    if not sys.executable:
        return f"sys.executable is {sys.executable!r}"
    name = os.path.basename(sys.executable).lower()
    if not name.startswith(_INTERPRETER_NAMES):
        return (
            f"sys.executable ({sys.executable}) is not named as a Python interpreter is "
            "(a server embedding Python, such as uWSGI or mod_wsgi, names its own program)"
        )
    return None


_INTERPRETER_NAMES = ("python", "pypy", "graalpy")


def _above_standard(fd: int) -> int:
    """``fd``, moved past the standard descriptors if it is one of them (not
    inheritable)."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)
