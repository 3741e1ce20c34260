"""The context that checks certificates against the system's CAs (or a CA file), made so
that a CA file this host cannot read for want of a descriptor is told, not trusted as
empty.

:func:`ssl.create_default_context` reads the system's CA file (``SSL_CERT_FILE``, or
OpenSSL's default) and says nothing when it cannot: out of file descriptors (EMFILE) it
returns a context that trusts no CA. A caller that keeps its context (made once, at the
first verified connection) then failed every verified handshake of the process, as the
server's certificate, long after the descriptors returned.
"""

from __future__ import annotations

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
    return context


def _raise_if_shortage(exc: OSError) -> None:
    """Raise this host's shortage when ``exc``, a CA file's reading failure, is one."""
    shortage = None if isinstance(exc, ssl.SSLError) else local_shortage(exc)
    if shortage is not None:
        raise LocalResourceShortage("reading the CA certificates", shortage) from exc
