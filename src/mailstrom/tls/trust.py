"""The context that checks certificates against the system's CAs (or a CA file), made so
that a CA file this host cannot read for want of a descriptor is told, not trusted as
empty.

:func:`ssl.create_default_context` reads the system's CA file (``SSL_CERT_FILE``, or
OpenSSL's default) and says nothing when it cannot: out of file descriptors (EMFILE) it
returns a context that trusts no CA. A caller that keeps its context (made once, at the
first verified connection) then failed every verified handshake of the process, as the
server's certificate, long after the descriptors returned.

The system's CA directory (``SSL_CERT_DIR``, or OpenSSL's default) is read into the context
when it is made, not left to OpenSSL, which opens a file of it only when a handshake needs
that CA: out of descriptors then, the open failed unseen, and the handshake failed as
"unable to get local issuer certificate", the server's certificate blamed for this host's
shortage (an attempt counted, a permanent failure under a policy that says so). Read so,
every CA the directory holds is trusted, also one OpenSSL's lookup would have passed over:
under a name that is not its subject's hash, or of a subject the CA file has a CA of too.
The directory is the system's trust store, so what it holds is meant to be trusted.
"""

from __future__ import annotations

import os
import re
import ssl

from mailstrom.errors import LocalResourceShortage, local_shortage

__all__ = ["verifying_context"]


def verifying_context(cafile: str | None = None) -> ssl.SSLContext:
    """``ssl.create_default_context(cafile=cafile)``; raises
    :class:`~mailstrom.errors.LocalResourceShortage` when this host could not open the CA
    file (out of descriptors, or memory), so that no context trusting none is kept.

    A system CA file that is read and holds no certificate, or that cannot be read for
    another reason, is no shortage: the context is returned as it was made, as before."""
    try:
        context = ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # a cafile given: its reading failure is raised
        _raise_if_shortage(exc)
        raise
    if cafile is None and not context.cert_store_stats()["x509_ca"]:
        system = ssl.get_default_verify_paths().cafile  # None when there is no such file
        if system is not None:
            try:
                # Read again, to learn why none came: OpenSSL kept the reason to itself.
                context.load_verify_locations(cafile=system)
            except ssl.SSLError:
                pass  # read, and no certificate in it: nothing is trusted, as before
            except OSError as exc:
                # Only a shortage is told: any other trouble (EACCES, EIO, the file gone
                # meanwhile) left the context as create_default_context made it before,
                # its CA directory still usable; raised, it crashed every verified session.
                _raise_if_shortage(exc)
    if cafile is None:
        _load_ca_directories(context)
    return context


_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")
"""How a CA directory names a certificate file (``openssl rehash``, ``c_rehash``): its
subject's hash and a number. OpenSSL looks up no other name there."""

_MAX_DIRECTORY_FILES = 1_000
"""Certificate files read from the CA directories, all of them together; any beyond are
left to OpenSSL's lookup during the handshake, as before. The context is made on the
worker's event loop, once per process: 1,000 files take about half a second there
(Debian's directory has 290 entries, 45 ms)."""

_MAX_DIRECTORY_ENTRIES = 20_000
"""Entries of one directory looked at, so that listing a huge one is bounded too."""


def _load_ca_directories(context: ssl.SSLContext) -> None:
    """Load into ``context`` the certificate files of the CA directories it trusts by
    OpenSSL's defaults, so that no handshake needs a descriptor to verify a certificate.
    A directory or file OpenSSL could not use either (missing, not PEM, unreadable) is
    passed over, as its lookup passes over it; a shortage is raised, as for the CA file."""
    paths = ssl.get_default_verify_paths()
    listed = os.environ.get(paths.openssl_capath_env)  # OpenSSL's rule: set, even empty, wins
    left = _MAX_DIRECTORY_FILES
    for directory in (paths.openssl_capath if listed is None else listed).split(os.pathsep):
        if not directory or left <= 0:
            continue
        names: list[str] = []
        try:
            with os.scandir(directory) as entries:
                for seen, entry in enumerate(entries):
                    if seen >= _MAX_DIRECTORY_ENTRIES or len(names) >= left:
                        break
                    # Regular files only: a FIFO or device named so would hold the read
                    # for ever.
                    if _HASHED_NAME.fullmatch(entry.name) and entry.is_file():
                        names.append(entry.name)
        except OSError as exc:
            _raise_if_shortage(exc)
            continue
        left -= len(names)
        for name in sorted(names):
            try:
                context.load_verify_locations(cafile=os.path.join(directory, name))
            except OSError as exc:  # ssl.SSLError too: no certificate in it
                _raise_if_shortage(exc)


def _raise_if_shortage(exc: OSError) -> None:
    """Raise this host's shortage when ``exc``, a CA file's reading failure, is one."""
    shortage = None if isinstance(exc, ssl.SSLError) else local_shortage(exc)
    if shortage is not None:
        raise LocalResourceShortage("reading the CA certificates", shortage) from exc
