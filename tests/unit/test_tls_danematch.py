"""Matching certificate chains against TLSA records: pure logic over DER bytes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.support.certs import SM2_CERTIFICATE, der, self_signed, spki_sha256, unreadable_variants

from mailstrom.safetext import is_safe
from mailstrom.tls.danematch import DaneMismatch, check_chain, record_matches
from mailstrom.tls.requirement import TLSARecord


def record(usage: int, selector: int, matching: int, data: bytes) -> TLSARecord:
    return TLSARecord(usage=usage, selector=selector, matching=matching, data=data)


def test_dane_ee_ignores_names_and_expiry() -> None:
    cert, _ = self_signed("whatever.example", expired=True)
    assert check_chain([der(cert)], [record(3, 1, 1, spki_sha256(cert))], host="mx.test")


def test_pkix_usages_are_never_used() -> None:
    cert, _ = self_signed("mx.test")
    with pytest.raises(DaneMismatch, match="no usable"):
        check_chain([der(cert)], [record(1, 1, 1, spki_sha256(cert))], host="mx.test")


def test_full_certificate_exact_and_sha512() -> None:
    cert, _ = self_signed("mx.test")
    leaf = der(cert)
    assert record_matches(record(3, 0, 0, leaf), leaf)
    assert record_matches(record(3, 0, 2, hashlib.sha512(leaf).digest()), leaf)
    assert not record_matches(record(3, 0, 1, hashlib.sha512(leaf).digest()), leaf)


def test_dane_ta_needs_the_name_and_the_chain() -> None:
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    good = der(ca.issue_cert("mx.test").cert_chain_pems[0].bytes())
    assert check_chain([good, anchor], tlsa, host="mx.test").startswith("DANE-TA")
    with pytest.raises(DaneMismatch, match="not valid for"):
        check_chain([good, anchor], tlsa, host="other.test")
    stranger = trustme.CA()
    forged = der(stranger.issue_cert("mx.test").cert_chain_pems[0].bytes())
    with pytest.raises(DaneMismatch, match="does not verify"):
        check_chain([forged, anchor], tlsa, host="mx.test")


def test_dane_ta_for_a_name_that_is_no_host_name_is_a_mismatch_not_a_crash() -> None:
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    leaf = der(ca.issue_cert("*.test").cert_chain_pems[0].bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    with pytest.raises(DaneMismatch, match=r"cannot check a certificate chain for mx_1\.test"):
        check_chain([leaf, anchor], tlsa, host="mx_1.test")


def test_dane_ta_finds_the_path_whatever_the_order_of_the_chain() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    issued = intermediate.issue_cert("mx.test")
    leaf, issuer = (der(blob.bytes()) for blob in issued.cert_chain_pems)
    anchor = der(root.cert_pem.bytes())
    tlsa = [record(2, 1, 1, spki_sha256(root.cert_pem.bytes()))]
    assert check_chain([leaf, issuer, anchor], tlsa, host="mx.test") == "DANE-TA 1 1"
    assert check_chain([leaf, anchor, issuer], tlsa, host="mx.test") == "DANE-TA 1 1"


def test_a_key_cryptography_cannot_read_matches_nothing() -> None:
    ca = trustme.CA()
    anchor, sm2 = der(ca.cert_pem.bytes()), der(SM2_CERTIFICATE)
    leaf = der(ca.issue_cert("mx.test").cert_chain_pems[0].bytes())
    tlsa = [record(2, 1, 1, spki_sha256(ca.cert_pem.bytes()))]
    assert not record_matches(tlsa[0], sm2)
    with pytest.raises(DaneMismatch, match=r"matches none"):
        check_chain([leaf, sm2], tlsa, host="mx.test")
    # Among other certificates, it is only one that does not serve the path.
    assert check_chain([leaf, sm2, anchor], tlsa, host="mx.test") == "DANE-TA 1 1"


@pytest.mark.parametrize("spoiled", ["extension twice", "version 4"])
def test_a_leaf_cryptography_cannot_read_is_a_mismatch_not_a_crash(spoiled: str) -> None:
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    leaf = unreadable_variants(der(ca.issue_cert("mx.test").cert_chain_pems[0].bytes()))[spoiled]
    tlsa = [record(2, 1, 1, spki_sha256(ca.cert_pem.bytes())), record(3, 1, 1, b"x" * 32)]
    with pytest.raises(DaneMismatch, match=r"matches none"):
        check_chain([leaf, anchor], tlsa, host="mx.test")


def test_no_certificate_matches_nothing() -> None:
    with pytest.raises(DaneMismatch, match="no certificate"):
        check_chain([], [record(3, 1, 1, b"x" * 32)], host="mx.test")


def test_garbage_certificate_matches_nothing() -> None:
    assert not record_matches(record(3, 1, 1, b"x" * 32), b"not a certificate")


def test_dane_ta_full_certificate_record_needs_no_anchor_in_the_chain() -> None:
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    leaf = der(ca.issue_cert("mx.test").cert_chain_pems[0].bytes())
    assert check_chain([leaf], [record(2, 0, 0, anchor)], host="mx.test") == "DANE-TA 0 0"
    other = der(trustme.CA().cert_pem.bytes())
    with pytest.raises(DaneMismatch, match="does not verify"):
        check_chain([leaf], [record(2, 0, 0, other)], host="mx.test")
    with pytest.raises(DaneMismatch):
        check_chain([leaf], [record(2, 0, 0, b"not a certificate")], host="mx.test")


@pytest.mark.parametrize(
    ("matching", "size", "fits"),
    [(1, 32, True), (1, 31, False), (1, 0, False), (2, 64, True), (2, 65, False)],
)
def test_a_digest_must_have_its_matching_types_size(matching: int, size: int, fits: bool) -> None:
    # dnspython before 2.9.1 hands such records over; the DANE lookup sets them aside.
    assert record(3, 1, matching, bytes(size)).fits_matching_type is fits


@pytest.mark.parametrize("selector", [0, 1])
def test_full_data_must_be_one_der_structure(selector: int) -> None:
    # RFC 6698 §2.1.2: a certificate or a SubjectPublicKeyInfo, a DER SEQUENCE both;
    # dnspython reads any data, and the DANE lookup sets aside what is no such thing.
    cert, _ = self_signed("mx.test")
    whole = der(cert)
    spki = (
        x509.load_der_x509_certificate(whole)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    data = whole if selector == 0 else spki
    assert record(3, selector, 0, data).fits_matching_type
    assert record(3, selector, 0, b"\x30\x00").fits_matching_type  # fits, matches nothing
    for malformed in (b"", data[:-1], data + b"\x00", b"\x02\x01\x05", b"MIIB", b"\x30\x85"):
        assert not record(3, selector, 0, malformed).fits_matching_type
    # Unknown parameters make a record unusable whatever its data: not malformed.
    assert record(3, 2, 0, b"").fits_matching_type
    assert record(3, 1, 3, b"").fits_matching_type


def test_dane_ta_never_takes_the_servers_own_certificate_for_its_trust_anchor() -> None:
    # A DANE-TA(2) record names an issuer, and the chain from the leaf to it must verify,
    # validity included (RFC 7672 §3.1.2; OpenSSL matches usage 2 above depth 0 only). A
    # record that matched the leaf itself accepted it expired, nothing but its name looked at.
    expired, _ = self_signed("mx.test", expired=True)
    with pytest.raises(DaneMismatch):
        check_chain([der(expired)], [record(2, 1, 1, spki_sha256(expired))], host="mx.test")
    with pytest.raises(DaneMismatch):
        check_chain([der(expired)], [record(2, 0, 0, der(expired))], host="mx.test")
    # DANE-EE(3) is the usage that matches the server's own certificate, expiry unchecked.
    assert check_chain([der(expired)], [record(3, 1, 1, spki_sha256(expired))], host="mx.test")


def test_a_certificates_names_are_quoted_as_safe_text() -> None:
    # The names come from the peer's certificate; the reason goes to logs, the recipient's
    # status and TLS reports (where PostgreSQL refused a NUL: see test_tls_sessions).
    ca = trustme.CA()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil\x00\x1b[2J.test")]), False)
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    anchor = der(ca.cert_pem.bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    with pytest.raises(DaneMismatch, match=r"not valid for mx\.test") as caught:
        check_chain([leaf, anchor], tlsa, host="mx.test")
    assert is_safe(str(caught.value)) and "evil" in str(caught.value)


@pytest.mark.parametrize(
    ("host", "accepted"),
    [("a.example.test", True), ("a.b.example.test", False), ("example.test", False)],
)
def test_dane_ta_takes_a_wildcard_for_one_label_only(host: str, accepted: bool) -> None:
    # RFC 7672 §3.2.3 (RFC 6125 §6.4.3): "*.example.test" names one label under it.
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    leaf = der(ca.issue_cert("*.example.test").cert_chain_pems[0].bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    if accepted:
        assert check_chain([leaf, anchor], tlsa, host=host) == "DANE-TA 0 1"
    else:
        with pytest.raises(DaneMismatch, match="not valid for"):
            check_chain([leaf, anchor], tlsa, host=host)


@pytest.mark.parametrize(
    ("usage", "selector", "matching"), [(4, 1, 1), (255, 1, 1), (3, 2, 1), (3, 1, 3), (2, 1, 255)]
)
def test_records_of_unknown_parameters_are_never_used(
    usage: int, selector: int, matching: int
) -> None:
    # RFC 7672 §2.2 / RFC 6698 §4.1: a record of a usage, selector or matching type this
    # client does not know is unusable, even when its data is the certificate's digest.
    cert, _ = self_signed("mx.test")
    unknown = record(usage, selector, matching, spki_sha256(cert))
    assert not unknown.usable
    with pytest.raises(DaneMismatch, match="no usable"):
        check_chain([der(cert)], [unknown], host="mx.test")
    good = record(3, 1, 1, spki_sha256(cert))
    assert check_chain([der(cert)], [unknown, good], host="mx.test") == "DANE-EE 1 1"


def _issued(ca: trustme.CA, common_name: str | None, *san: str) -> bytes:
    """A leaf ``ca`` issues with this subject CN and these DNS names (none: no SAN)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    )
    if san:
        names = [x509.DNSName(name) for name in san]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_dane_ta_takes_the_common_name_of_a_leaf_without_dns_names() -> None:
    # RFC 7672 §3.2.3: the DNS-IDs are matched when the certificate has any; the CN-ID
    # is considered when it has none (as Postfix and OpenSSL do). A DANE-TA(2) host whose
    # private CA issues certificates without a subjectAltName was never delivered to.
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    leaf = _issued(ca, "mx.test")
    assert check_chain([leaf, anchor], tlsa, host="mx.test") == "DANE-TA 0 1"
    wildcard = _issued(ca, "*.example.test")
    assert check_chain([wildcard, anchor], tlsa, host="a.example.test") == "DANE-TA 0 1"
    with pytest.raises(DaneMismatch, match=r"not valid for other\.test"):
        check_chain([leaf, anchor], tlsa, host="other.test")
    # The name is no shortcut past the chain: another CA's leaf for the name still fails.
    forged = _issued(trustme.CA(), "mx.test")
    with pytest.raises(DaneMismatch, match="does not verify"):
        check_chain([forged, anchor], tlsa, host="mx.test")
    # A certificate with DNS names is held to them: its CN is not looked at.
    named = _issued(ca, "mx.test", "other.test")
    with pytest.raises(DaneMismatch, match=r"not valid for mx\.test"):
        check_chain([named, anchor], tlsa, host="mx.test")
    with pytest.raises(DaneMismatch, match=r"not valid for mx\.test"):
        check_chain([_issued(ca, None), anchor], tlsa, host="mx.test")


def test_a_mismatch_says_whether_it_is_the_leafs_name() -> None:
    """A DANE-TA chain that reaches its anchor with a leaf for another name is a
    certificate for the wrong host (TLS reports: certificate-host-mismatch); any other
    mismatch is records none of which the chain satisfies (tlsa-invalid)."""
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    good = der(ca.issue_cert("mx.test").cert_chain_pems[0].bytes())
    with pytest.raises(DaneMismatch, match="not valid for") as caught:
        check_chain([good, anchor], tlsa, host="other.test")
    assert caught.value.host_mismatch
    forged = der(trustme.CA().issue_cert("mx.test").cert_chain_pems[0].bytes())
    with pytest.raises(DaneMismatch, match="does not verify") as caught:
        check_chain([forged, anchor], tlsa, host="mx.test")
    assert not caught.value.host_mismatch
    cert, _ = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    with pytest.raises(DaneMismatch, match="matches none") as caught:
        check_chain([der(cert)], [record(3, 1, 1, spki_sha256(other))], host="mx.test")
    assert not caught.value.host_mismatch


def _spki_sha512(pem: bytes) -> bytes:
    key = x509.load_pem_x509_certificate(pem).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha512(spki).digest()


def test_only_the_strongest_digest_of_a_usage_and_selector_is_used() -> None:
    """RFC 7671 §9 (digest algorithm agility): with "3 1 1" and "3 1 2" records published,
    a key matching only the weaker "3 1 1" is not accepted, so a broken SHA-256 cannot
    stand in for the SHA-512 the domain moved to. It was: any record that matched did."""
    cert, _ = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    leaf = der(cert)
    weak = record(3, 1, 1, spki_sha256(cert))
    with pytest.raises(DaneMismatch, match=r"matches none of its TLSA records \(3 1 2\)"):
        check_chain([leaf], [weak, record(3, 1, 2, _spki_sha512(other))], host="mx.test")
    strong = record(3, 1, 2, _spki_sha512(cert))
    assert check_chain([leaf], [record(3, 1, 1, spki_sha256(other)), strong], host="mx.test")
    # Full(0) is no digest: it is used beside the strongest one ("3 1 0" or "3 1 2").
    full = (
        x509.load_pem_x509_certificate(cert)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    both = [record(3, 1, 0, full), weak, record(3, 1, 2, _spki_sha512(other))]
    assert check_chain([leaf], both, host="mx.test") == "DANE-EE 1 0"


def test_digest_agility_is_per_usage_and_selector() -> None:
    cert, _ = self_signed("mx.test")
    other, _ = self_signed("mx.test")
    weak = record(3, 1, 1, spki_sha256(cert))
    # A SHA-512 record of another selector, or another usage, leaves "3 1 1" in use.
    for stronger in (
        record(3, 0, 2, hashlib.sha512(der(other)).digest()),
        record(2, 1, 2, _spki_sha512(other)),
    ):
        assert check_chain([der(cert)], [stronger, weak], host="mx.test") == "DANE-EE 1 1"


def test_a_dane_ta_chain_that_fails_only_for_expiry_says_so() -> None:
    """A DANE-TA chain whose leaf has expired failed as any chain that does not verify,
    reported as tlsa-invalid; one that would verify but for a certificate outside its
    validity is now marked expired (TLS reports: certificate-expired). A forged one that
    has expired too is not."""
    from mailstrom.errors import DeliveryError
    from mailstrom.runtime.connection import TLSVerifyError
    from mailstrom.tlsrpt import ResultType
    from mailstrom.tlsrpt.recorder import classify

    now = datetime.now(UTC)
    ca = trustme.CA()
    anchor = der(ca.cert_pem.bytes())
    tlsa = [record(2, 0, 1, hashlib.sha256(anchor).digest())]
    past = {"not_before": now - timedelta(days=30), "not_after": now - timedelta(days=1)}
    expired = der(ca.issue_cert("mx.test", **past).cert_chain_pems[0].bytes())
    forged = der(trustme.CA().issue_cert("mx.test", **past).cert_chain_pems[0].bytes())

    def reported(chain: list[bytes]) -> tuple[DaneMismatch, ResultType | None]:
        with pytest.raises(DaneMismatch, match="does not verify") as caught:
            check_chain(chain, tlsa, host="mx.test", now=now)
        error: DeliveryError = TLSVerifyError(f"DANE: {caught.value}", host="mx.test")
        error.__cause__ = caught.value
        found = classify(error)
        return caught.value, None if found is None else found[0]

    mismatch, kind = reported([expired, anchor])
    assert mismatch.expired and not mismatch.host_mismatch
    assert kind is ResultType.CERTIFICATE_EXPIRED
    assert "expired" in str(mismatch)
    # Not yet valid is outside its validity too, as OpenSSL's CERT_NOT_YET_VALID.
    future = {"not_before": now + timedelta(days=1), "not_after": now + timedelta(days=30)}
    early = der(ca.issue_cert("mx.test", **future).cert_chain_pems[0].bytes())
    assert reported([early, anchor])[1] is ResultType.CERTIFICATE_EXPIRED
    mismatch, kind = reported([forged, anchor])
    assert not mismatch.expired
    assert kind is ResultType.TLSA_INVALID
    assert check_chain([expired, anchor], tlsa, host="mx.test", now=now - timedelta(days=2))


def _private_ca(
    *, critical: bool, key_usage: x509.KeyUsage | None
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed CA as private CA tools make them: ``openssl req -x509`` gives no
    keyUsage, Easy-RSA a basicConstraints that is not critical."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Private CA")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER), key


def _leaf_of(ca: bytes, ca_key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.load_der_x509_certificate(ca).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.mark.parametrize(
    ("critical", "key_usage"),
    [(True, None), (False, _key_usage(cert_sign=True)), (False, None)],
    ids=["openssl-req-x509", "easy-rsa", "neither"],
)
def test_dane_ta_takes_a_private_ca_as_openssl_does(
    critical: bool, key_usage: x509.KeyUsage | None
) -> None:
    # A DANE-TA(2) anchor is the domain's own CA, held to RFC 5280 as OpenSSL holds it
    # (and so Postfix and Exim): a CA is one whose basicConstraints say so, critical or
    # not, and whose keyUsage, if it has one, allows signing certificates. Held to the
    # Web PKI's profile, such a CA's hosts were deferred on every attempt.
    ca, ca_key = _private_ca(critical=critical, key_usage=key_usage)
    leaf = _leaf_of(ca, ca_key, "mx.test")
    tlsa = [record(2, 0, 1, hashlib.sha256(ca).digest())]
    assert check_chain([leaf, ca], tlsa, host="mx.test") == "DANE-TA 0 1"


def test_dane_ta_refuses_a_ca_whose_key_usage_forbids_signing_certificates() -> None:
    ca, ca_key = _private_ca(critical=True, key_usage=_key_usage(cert_sign=False))
    leaf = _leaf_of(ca, ca_key, "mx.test")
    with pytest.raises(DaneMismatch, match="does not verify"):
        check_chain([leaf, ca], [record(2, 0, 1, hashlib.sha256(ca).digest())], host="mx.test")
