"""What a worker process needs to build again a TLS context its parent was given: an
:class:`ssl.SSLContext` cannot be pickled. Beside :mod:`mailstrom.config`, which pickles
``MTASTSConfig.tls_context`` this way, and the worker-process frames
(:mod:`mailstrom.runtime.pipes`), which send ``Config.tls_context``: both import it, and
config may not import the runtime."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass

from mailstrom.tls.trust import verifying_context


def portable_trust(context: ssl.SSLContext) -> tuple[bool, tuple[bytes, ...]]:
    """What a worker process needs to trust what ``context`` trusts (an SSLContext cannot
    be pickled): whether it trusts the system's CAs, and the DER certificates of the other
    CAs it holds. :func:`trusting` builds the context again.

    A context holding every CA the system's default context loads trusts the system's;
    one made from a CA file of its own (``create_default_context(cafile=...)``) trusts
    that file's alone, and so does the one rebuilt from it. Where the system's CAs are
    loaded only when a lookup needs them (a CA directory alone), none is held up front
    and the system's are trusted as well, as they cannot be told apart."""
    held = tuple(c for c in context.get_ca_certs(binary_form=True) if isinstance(c, bytes))
    system = _system_cas()
    return system.issubset(held), tuple(c for c in held if c not in system)


def trusting(system: bool, cas: tuple[bytes, ...]) -> ssl.SSLContext:
    """A verifying context trusting ``cas`` (DER), and the system's CAs if ``system``.
    Those as :func:`~mailstrom.tls.trust.verifying_context` loads them, the CA directory's
    too: left to OpenSSL, a CA of it was read only during a handshake, which out of
    descriptors failed as the server's certificate. A shortage now is raised
    (:class:`~mailstrom.errors.LocalResourceShortage`)."""
    if system:
        context = verifying_context()
        if cas:
            context.load_verify_locations(cadata=b"".join(cas))
        return context
    if cas:
        return ssl.create_default_context(cadata=b"".join(cas))
    # create_default_context() loads the system's CAs when given none: a context trusting
    # nothing stays one.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@functools.cache
def _system_cas() -> frozenset[bytes]:
    found = ssl.create_default_context().get_ca_certs(binary_form=True)
    return frozenset(c for c in found if isinstance(c, bytes))


# The verification flags that need CRLs loaded, which a child cannot be given.
_CRL_CHECKS = ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_CRL_CHECK_CHAIN


def checks_crls(context: ssl.SSLContext | None) -> bool:
    """Whether ``context`` checks certificates against CRLs, which no worker process can
    do with it: the ssl module cannot list the CRLs a context holds, so none can cross."""
    return context is not None and bool(context.verify_flags & _CRL_CHECKS)


def left_behind(context: ssl.SSLContext) -> str | None:
    """What a worker process would lose of ``context`` that changes which certificates
    it accepts, or None. Neither can be read back from an SSLContext: its CRLs, and the
    CAs of a directory (``capath``), which OpenSSL loads only as a handshake needs them.
    A verifying context holding no CA while the system's hold some is one of those
    (or trusts nothing, as its child would): its child refused every certificate that
    the directory's CAs let the parent accept."""
    if checks_crls(context):
        return "checks CRLs"
    if context.verify_mode != ssl.CERT_NONE and not context.get_ca_certs() and _system_cas():
        return "holds no CA certificate (a capath directory's load only when needed)"
    return None


@dataclass(frozen=True, slots=True)
class TLSContextSpec:
    """What a child needs to rebuild ``Config.tls_context`` or ``MTASTSConfig.tls_context``:
    an :class:`ssl.SSLContext` cannot cross a process boundary, so what it trusts and its
    checks are sent instead (:func:`portable_trust`): the child trusts the system's CAs
    only if the parent's context does. The protocol versions, options, verification flags,
    host name checks, ciphers and OpenSSL security level cross too: without them the child
    took Python's defaults, and a context asking for TLS 1.3 at least delivered over TLS
    1.2 (or fetched an MTA-STS policy over it) from a worker process.

    A context checking CRLs (:func:`checks_crls`) has no spec: :meth:`of` raises
    ValueError. Its CRLs cannot be listed, so the child would have none: with the flags it
    failed every verified handshake ("unable to get certificate CRL"), and without them it
    accepted revoked certificates. Such a context keeps the worker in its own process."""

    system: bool
    ca_der: tuple[bytes, ...]
    check_hostname: bool
    verify_mode: int
    common_name: bool
    """``hostname_checks_common_name``: without it the child took Python's default, and
    matched a host name in the common name of a certificate without subjectAltName,
    which a context set not to do (as RFC 6125 §6.4.4 asks) refused in the parent."""
    minimum_version: int
    maximum_version: int
    options: int
    verify_flags: int
    ciphers: tuple[str, ...]
    security_level: int

    @classmethod
    def of(cls, context: ssl.SSLContext) -> TLSContextSpec:
        if checks_crls(context):
            raise ValueError(
                "a TLS context that checks CRLs cannot cross to a worker process: "
                "the CRLs it holds cannot be read back from it"
            )
        system, cas = portable_trust(context)
        return cls(
            system=system,
            ca_der=cas,
            check_hostname=context.check_hostname,
            verify_mode=int(context.verify_mode),
            common_name=context.hostname_checks_common_name,
            minimum_version=int(context.minimum_version),
            maximum_version=int(context.maximum_version),
            options=int(context.options),
            verify_flags=int(context.verify_flags),
            ciphers=tuple(cipher["name"] for cipher in context.get_ciphers()),
            security_level=context.security_level,
        )

    def build(self) -> ssl.SSLContext:
        context = trusting(self.system, self.ca_der)
        context.check_hostname = self.check_hostname
        context.verify_mode = ssl.VerifyMode(self.verify_mode)
        context.hostname_checks_common_name = self.common_name
        context.minimum_version = ssl.TLSVersion(self.minimum_version)
        context.maximum_version = ssl.TLSVersion(self.maximum_version)
        context.options = ssl.Options(self.options)
        context.verify_flags = ssl.VerifyFlags(self.verify_flags)
        if self.ciphers:
            # The names OpenSSL enabled in the parent (its TLS 1.3 suites are not set by
            # this call, and are ignored in the list). The security level is set only in
            # a cipher string and no name carries it: without it the child took level 2,
            # which refuses the keys and signatures (so the TLS 1.0 and 1.1) that a parent
            # lowered its level to accept.
            names = ":".join(self.ciphers)
            context.set_ciphers(f"{names}:@SECLEVEL={self.security_level}")
        return context
