"""Certificates for DANE tests, made with ``cryptography``: self-signed ones (expired or
not), ones ``cryptography`` cannot read, and TLSA record data for any certificate; and a
CA directory as OpenSSL reads one (``capath``)."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# A self-signed certificate for a key on the SM2 curve, which OpenSSL reads and
# cryptography does not ("Curve 1.2.156.10197.1.301 is not supported"); it expires in 2126.
SM2_CERTIFICATE = b"""-----BEGIN CERTIFICATE-----
MIIBdDCCARmgAwIBAgIUHqFSw9N4ocBAH5DGrSP4Aj5A+XEwCgYIKoEcz1UBg3Uw
DjEMMAoGA1UEAwwDc20yMCAXDTI2MTIwMzE2MzIxNloYDzIxMjYxMTA5MTYzMjE2
WjAOMQwwCgYDVQQDDANzbTIwWTATBgcqhkjOPQIBBggqgRzPVQGCLQNCAARSlZlS
P3gxHqgVs6gBaoxPRzEDss2DQ2cuDR85KPWKpH598b5DwEiPk30kWn4hgqJjTM7s
0VQYIaI6Yc8At1q7o1MwUTAdBgNVHQ4EFgQUlDqlE75Z56MIWseVhZW8xaAefhEw
HwYDVR0jBBgwFoAUlDqlE75Z56MIWseVhZW8xaAefhEwDwYDVR0TAQH/BAUwAwEB
/zAKBggqgRzPVQGDdQNJADBGAiEA3BulOvnT48U6w8AvonYqbIOdRkIzbX+E5+Qc
+NZnLy8CIQDNHTtlpQVbQNKWJT7m/ya/wpWECcR6Bq0IbeR5cj1YkA==
-----END CERTIFICATE-----
"""


# A self-signed certificate for mx.test whose P-256 key is written as a compressed point
# (X9.62 form 02/03, which OpenSSL writes with "ec -conv_form compressed"), and that key;
# it expires in 2126. ``cryptography`` re-encodes such a key uncompressed (91 octets, not
# 59): its SubjectPublicKeyInfo as the certificate holds it is COMPRESSED_POINT_SPKI.
COMPRESSED_POINT_CERTIFICATE = b"""-----BEGIN CERTIFICATE-----
MIIBcDCCARWgAwIBAgIUYj9P5/SH8nkAcFySEKPttUVfbCQwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHbXgudGVzdDAgFw0yNjEyMDQxNzI3NDRaGA8yMTI2MTExMDE3
Mjc0NFowEjEQMA4GA1UEAwwHbXgudGVzdDA5MBMGByqGSM49AgEGCCqGSM49AwEH
AyIAAoExpne6RbKd2Dd6uFsxjDzgSqX+x23RUSMH2w7EP2wfo2cwZTAdBgNVHQ4E
FgQUyDsjv9SAF1bPymzI6K7SBaHenm4wHwYDVR0jBBgwFoAUyDsjv9SAF1bPymzI
6K7SBaHenm4wDwYDVR0TAQH/BAUwAwEB/zASBgNVHREECzAJggdteC50ZXN0MAoG
CCqGSM49BAMCA0kAMEYCIQDiYxjdG21LvnJIzfniPaqjZyvaexFGnKR/H5nW6G7f
dQIhAPOwJUayibwD2D0YCwgpoDN+Cy5nJJrQ92EKieCrs/4Z
-----END CERTIFICATE-----
"""
COMPRESSED_POINT_KEY = b"""-----BEGIN PRIVATE KEY-----
MGcCAQAwEwYHKoZIzj0CAQYIKoZIzj0DAQcETTBLAgEBBCBMsqRLhXBbubsBbpQR
0Ya/mHXKaZsMdmb4g3u3fgLNXKEkAyIAAoExpne6RbKd2Dd6uFsxjDzgSqX+x23R
USMH2w7EP2wf
-----END PRIVATE KEY-----
"""
COMPRESSED_POINT_SPKI = bytes.fromhex(
    "3039301306072a8648ce3d020106082a8648ce3d030107032200028131a677ba45b29dd8377ab85b31"
    "8c3ce04aa5fec76dd1512307db0ec43f6c1f"
)
"""What ``openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER`` gives for
COMPRESSED_POINT_CERTIFICATE: the octets of its SubjectPublicKeyInfo."""


def unreadable_variants(leaf: bytes) -> dict[str, bytes]:
    """DER certificate ``leaf`` spoiled in ways ``cryptography`` refuses to read, as a
    hostile peer may send it (OpenSSL itself refuses to serve them): its key usage
    extension made a second basic constraints one, or its version 4."""
    key_usage, basic_constraints = bytes.fromhex("0603551d0f"), bytes.fromhex("0603551d13")
    version_3 = bytes.fromhex("a003020102")
    assert leaf.count(key_usage) == 1 and leaf.count(version_3) == 1
    return {
        "extension twice": leaf.replace(key_usage, basic_constraints),
        "version 4": leaf.replace(version_3, bytes.fromhex("a003020103")),
    }


def self_signed(name: str, *, expired: bool = False) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a self-signed certificate for ``name``; ``expired``
    makes it a year past its validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    start, end = (
        (now - timedelta(days=730), now - timedelta(days=365))
        if expired
        else (
            now - timedelta(days=1),
            now + timedelta(days=365),
        )
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_context(tmp: Path, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context presenting ``cert_pem`` (a chain: leaf first) with ``key_pem``."""
    path = tmp / f"server-{hashlib.sha256(cert_pem).hexdigest()[:12]}.pem"
    path.write_bytes(key_pem + cert_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(path)
    return context


def chain_with_anchor(ca: trustme.CA, *names: str) -> tuple[bytes, bytes]:
    """(chain PEM: leaf then the CA's own certificate, key PEM) for a leaf ``ca`` issues:
    a server that sends its trust anchor, as DANE-TA needs (RFC 7671 §5.2.2)."""
    leaf = ca.issue_cert(*names)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    return chain, leaf.private_key_pem.bytes()


def der(pem: bytes) -> bytes:
    """The first certificate of ``pem``, DER-encoded."""
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki_sha256(pem: bytes) -> bytes:
    """SHA-256 of the first certificate's SubjectPublicKeyInfo (TLSA ``x 1 1`` data)."""
    key = x509.load_pem_x509_certificate(pem).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def hashed_ca_directory(directory: Path, *cas: trustme.CA) -> Path:
    """``directory`` holding ``cas`` as OpenSSL looks them up (``openssl rehash``): each
    named by its subject's hash, which the openssl command computes."""
    directory.mkdir()
    for n, ca in enumerate(cas):
        pem = directory / f"ca{n}.pem"
        ca.cert_pem.write_to_path(str(pem))
        found = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(pem)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        number = 0  # the next free one when subjects share a hash, as openssl rehash does
        while (directory / f"{found.stdout.strip()}.{number}").exists():
            number += 1
        (directory / f"{found.stdout.strip()}.{number}").symlink_to(pem.name)
    return directory
