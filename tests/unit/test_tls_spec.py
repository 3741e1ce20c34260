"""The TLS context a worker process builds again from its parent's (tls_spec.py). The
handshakes run over memory BIOs: no socket, the rebuilt context meets a server context."""

from __future__ import annotations

import pickle
import ssl
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailstrom.tls_spec import TLSContextSpec


def crossed(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` as a worker process builds it: its spec, pickled, built again."""
    spec = pickle.loads(pickle.dumps(TLSContextSpec.of(context)))
    assert isinstance(spec, TLSContextSpec)
    return spec.build()


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """The protocol version ``client`` agrees with ``server`` for mx.test; raises the
    client's or the server's :class:`ssl.SSLError` if they agree on none."""
    to_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    to_server, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, from_client, server_hostname="mx.test")
    theirs = server.wrap_bio(to_server, from_server, server_side=True)
    done = {ours: False, theirs: False}
    for _ in range(10):  # a handshake takes 2 or 3 flights: 10 only catch a loop
        for end in (ours, theirs):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if all(done.values()):
            return ours.version()
    raise AssertionError("the handshake did not end")


def serving(ca: trustme.CA) -> ssl.SSLContext:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(server)
    return server


def empty_crl(ca: trustme.CA) -> bytes:
    """A CRL of ``ca`` revoking nothing, in PEM."""
    certificate = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(certificate.subject)
        .last_update(now - timedelta(days=1))
        .next_update(now + timedelta(days=30))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def test_a_context_checking_crls_has_no_spec_for_a_worker_process(tmp_path: Path) -> None:
    """The CRLs of a context cannot be listed: the spec took its CAs and dropped its CRL
    checks, so a worker process accepted certificates the context's CRLs revoke. No spec
    is made for such a context now (the facade keeps its worker in its own process)."""
    ca = trustme.CA()
    server = serving(ca)
    parent = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    crl = tmp_path / "crl.pem"  # cadata takes certificates only
    crl.write_bytes(empty_crl(ca))
    parent.load_verify_locations(crl)
    parent.verify_flags |= ssl.VERIFY_X509_STRICT
    child = crossed(parent)
    assert handshake(child, server) is not None
    assert child.verify_flags & ssl.VERIFY_X509_STRICT  # the other flags cross
    for flag in (ssl.VERIFY_CRL_CHECK_LEAF, ssl.VERIFY_CRL_CHECK_CHAIN):
        checking = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
        checking.load_verify_locations(crl)
        checking.verify_flags |= flag
        assert handshake(checking, server) is not None
        with pytest.raises(ValueError, match="CRLs"):
            TLSContextSpec.of(checking)


def legacy(context: ssl.SSLContext, most: ssl.TLSVersion | None = None) -> None:
    """Let ``context`` speak TLS 1.0 and 1.1 as the operator of an old MX asks: the
    minimum version, and security level 0 for their MD5+SHA-1 signatures; and TLS ``most``
    at most."""
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: we mean them
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        if most is not None:
            context.maximum_version = most
    context.set_ciphers("DEFAULT:@SECLEVEL=0")


@pytest.mark.parametrize("level", [0, 1, 2])
def test_the_security_level_crosses_to_a_worker_process(level: int) -> None:
    parent = ssl.create_default_context()
    parent.set_ciphers(f"DEFAULT:@SECLEVEL={level}")
    assert crossed(parent).security_level == level


def test_a_context_lowered_to_reach_an_old_mx_reaches_it_from_a_worker_process() -> None:
    """``@SECLEVEL=n`` is in no cipher name, so the child took level 2: a context given
    TLS 1.0 at least and level 0 to reach an MX offering TLS 1.1 at most reached it in the
    parent and failed "legacy sigalg disallowed" in a worker process."""
    ca = trustme.CA()
    server = serving(ca)
    legacy(server, most=ssl.TLSVersion.TLSv1_1)
    parent = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    legacy(parent)
    try:
        reached = handshake(parent, server)
    except ssl.SSLError as error:  # an OpenSSL built without TLS 1.1 at all
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1: {error}")
    assert reached == "TLSv1.1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        child = crossed(parent)
    assert handshake(child, server) == "TLSv1.1"


def named_in_its_subject_alone(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    """A server context whose certificate (from ``ca``) names mx.test in its subject's
    common name, with no subjectAltName: what RFC 6125 §6.4.4 and the CA/Browser Forum
    no longer accept, and OpenSSL still matches unless told not to."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "mx.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = tmp_path / "cn-only.pem"
    chain.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain)
    return server


def test_a_context_refusing_common_names_refuses_them_in_a_worker_process(
    tmp_path: Path,
) -> None:
    """``hostname_checks_common_name`` did not cross: a context set not to match a host
    name in a certificate's common name refused such a certificate in the parent, and the
    worker process's context, at Python's default, accepted it."""
    ca = trustme.CA()
    server = named_in_its_subject_alone(ca, tmp_path)
    lenient = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    assert handshake(lenient, server) is not None  # OpenSSL matches the CN by default
    strict = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    strict.hostname_checks_common_name = False
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(strict, server)
    child = crossed(strict)
    assert not child.hostname_checks_common_name
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(child, server)
    assert crossed(lenient).hostname_checks_common_name
