"""Checking a server's certificate chain against TLSA records (RFC 6698, RFC 7671,
RFC 7672 §3), a pure function of the DER certificates the server sent.

* DANE-EE (usage 3): the leaf certificate, or its SubjectPublicKeyInfo, matches; names,
  expiry and issuer are not checked (RFC 7672 §3.1.1).
* DANE-TA (usage 2): a certificate of the chain the server sent, above the leaf (RFC 7671
  §5.2.2: it must send the trust anchor, unless the record is ``2 0 0``, which holds the
  anchor itself) matches; the chain from the leaf to it must then verify, with the leaf's
  name matching the MX host or another reference identifier the caller gives (RFC 7672
  §3.2.2: the TLSA base domain, which may be the MX host's CNAME expansion, and the
  next-hop domain whose validated MX records named the host), as if that certificate
  were the only trusted root, built from the other certificates sent, in whatever order
  (RFC 8446 §4.4.2). The chain check is ``cryptography``'s X.509 path validation.
* PKIX usages (0, 1) are never usable for SMTP (RFC 7672 §3.1.3) and are ignored.

Selectors: 0 full certificate, 1 SubjectPublicKeyInfo (as the certificate holds it);
matching types: 0 exact, 1 SHA-256, 2 SHA-512, of which only the strongest published for a
usage and selector is used (RFC 7671 §9, :func:`strongest_digests`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mailstrom.safetext import safe_text
from mailstrom.tls.requirement import TLSARecord, der_element

if TYPE_CHECKING:
    from cryptography.x509 import Certificate, KeyUsage
    from cryptography.x509.verification import Policy

# cryptography is imported by the checks themselves, not with this module: its X.509
# layer costs ~20 ms of start-up, and only a DANE destination needs it.

MAX_CHAIN = 10
"""Certificates of a server's chain looked at; more is no legitimate chain."""
_DIGEST_ORDER = {1: 1, 2: 2}
"""Digest matching types, weakest first: SHA-256(1), SHA-512(2) (RFC 7671 §9)."""


class DaneMismatch(Exception):
    """No usable TLSA record matches the chain; ``str`` says what was tried.

    ``host_mismatch`` when what it names is a DANE-TA(2) chain that reached its anchor
    with a leaf valid for none of the reference names: a certificate for another host
    (RFC 8460's ``certificate-host-mismatch``), rather than TLSA records none of which
    the chain satisfies (its ``tlsa-invalid``). ``expired`` when it is a DANE-TA(2) chain
    that would verify to its anchor but for a certificate outside its validity period
    (``certificate-expired``)."""

    def __init__(self, reason: str, *, host_mismatch: bool = False, expired: bool = False) -> None:
        super().__init__(reason)
        self.host_mismatch = host_mismatch
        self.expired = expired


def available() -> bool:
    """Whether ``cryptography`` (the ``dane`` extra) is installed."""
    try:
        import cryptography.x509.verification  # noqa: F401
    except ImportError:  # pragma: no cover - the dane extra is missing
        return False
    return True


def _require_cryptography() -> None:
    if not available():
        raise DaneMismatch("DANE needs the cryptography package: pip install 'mailstrom[dane]'")


def _unreadable() -> tuple[type[Exception], ...]:
    """What ``cryptography`` raises for a certificate it cannot read, which a server may
    send (the handshake checks nothing of the certificates after the leaf, nor the
    leaf's extensions): malformed DER (ValueError), a version it does not know, a key of
    an algorithm or curve it does not know (SM2), an extension given twice, a kind of
    name it does not know."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    return (
        ValueError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    )


def _selected(der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    from cryptography import x509

    # Read by cryptography first: a certificate it cannot read matches nothing. The key
    # is then taken as the certificate holds it (RFC 6698 §2.1.2), never written anew:
    # cryptography writes an EC point uncompressed whatever the certificate has, and the
    # record, made by any other tool from the certificate, would not match that.
    tbs = x509.load_der_x509_certificate(der).tbs_certificate_bytes
    return _subject_public_key_info(tbs)


_TBS_FIELDS_BEFORE_SPKI = 5
"""serialNumber, signature, issuer, validity and subject (RFC 5280 §4.1)."""


def _subject_public_key_info(tbs: bytes) -> bytes:
    """The DER octets of the subjectPublicKeyInfo of ``tbs``, a TBSCertificate: after the
    optional ``[0]`` version and five other fields (RFC 5280 §4.1)."""
    offset, _ = der_element(tbs, 0)
    if tbs[offset : offset + 1] == b"\xa0":  # [0] EXPLICIT version
        offset = der_element(tbs, offset)[1]
    for _ in range(_TBS_FIELDS_BEFORE_SPKI):
        offset = der_element(tbs, offset)[1]
    if tbs[offset : offset + 1] != b"\x30":
        raise ValueError("no SubjectPublicKeyInfo where RFC 5280 puts it")
    return tbs[offset : der_element(tbs, offset)[1]]


def _digest(data: bytes, matching: int) -> bytes:
    if matching == 1:
        return hashlib.sha256(data).digest()
    if matching == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: TLSARecord, der: bytes) -> bool:
    """Whether ``record``'s selector and matching type applied to certificate ``der`` give
    its data (the usage is not looked at)."""
    _require_cryptography()
    try:
        selected = _selected(der, record.selector)
    except _unreadable():
        return False  # a certificate cryptography cannot read matches nothing
    return _digest(selected, record.matching) == record.data


def strongest_digests(records: Sequence[TLSARecord]) -> list[TLSARecord]:
    """``records`` without those whose digest is weaker than another of the same usage
    and selector (RFC 7671 §9, digest algorithm agility): with "3 1 1" and "3 1 2"
    published, a key matching only the SHA-256 one is not accepted, so that a domain
    moving to SHA-512 is not held to SHA-256's strength. Full(0) is no digest and is
    kept ("3 1 0" or "3 1 2" is accepted). A digest of the wrong size counts for none.

    >>> from mailstrom.tls.requirement import TLSARecord as R
    >>> sizes = {0: 9, 1: 32, 2: 64}
    >>> kept = strongest_digests([R(usage=3, selector=1, matching=m, data=bytes(n))
    ...                           for m, n in sizes.items()])
    >>> [(r.usage, r.selector, r.matching) for r in kept]
    [(3, 1, 0), (3, 1, 2)]
    """
    strongest: dict[tuple[int, int], int] = {}
    for r in records:
        if r.matching in _DIGEST_ORDER and r.fits_matching_type:
            key = (r.usage, r.selector)
            best = strongest.get(key)
            if best is None or _DIGEST_ORDER[r.matching] > _DIGEST_ORDER[best]:
                strongest[key] = r.matching
    return [
        r
        for r in records
        if r.matching not in _DIGEST_ORDER or r.matching == strongest.get((r.usage, r.selector))
    ]


@dataclass(frozen=True, slots=True)
class DaneMatch:
    """What a certificate chain matched."""

    record: str
    """A short description of the TLSA record, e.g. ``DANE-TA 1 1``."""
    name: str | None = None
    """For DANE-TA(2), the first of the reference names the leaf is valid for; None for
    DANE-EE(3), which checks no name."""


def check_chain(
    chain: Sequence[bytes],
    records: Sequence[TLSARecord],
    *,
    host: str,
    now: datetime | None = None,
    names: Sequence[str] = (),
) -> str:
    """Check ``chain`` (DER, leaf first, as sent) against ``records`` for MX ``host``.

    ``names`` are the reference identifiers a DANE-TA(2) leaf may be issued for (see
    :func:`mailstrom.tls.dane.reference_names`); empty means ``host`` alone.

    Returns a short description of the record that matched; raises :class:`DaneMismatch`
    when none does.
    """
    return match_chain(chain, records, host=host, now=now, names=names).record


def match_chain(
    chain: Sequence[bytes],
    records: Sequence[TLSARecord],
    *,
    host: str,
    now: datetime | None = None,
    names: Sequence[str] = (),
) -> DaneMatch:
    """:func:`check_chain`, saying also which reference name a DANE-TA(2) leaf was
    accepted for (names are tried in the order given)."""
    _require_cryptography()
    usable = strongest_digests([r for r in records if r.usable])
    if not chain:
        raise DaneMismatch("the server sent no certificate")
    if not usable:
        raise DaneMismatch("no usable TLSA record")
    chain = list(chain[:MAX_CHAIN])
    leaf = chain[0]
    wanted = tuple(names) or (host,)
    for record in usable:
        if record.usage == 3 and record_matches(record, leaf):
            return DaneMatch(f"DANE-EE {record.selector} {record.matching}")
    problems: list[DaneMismatch] = []
    for record in usable:
        if record.usage != 2:
            continue
        matched = False
        # A trust anchor is an issuer of the leaf, never the leaf itself (as in OpenSSL,
        # which matches DANE-TA only above depth 0): taken for its own anchor, the server's
        # certificate went through no path validation, so an expired one was accepted as
        # if the record were DANE-EE. A "2 0 0" naming it still gets a checked path below.
        for index, der in enumerate(chain[1:], start=1):
            if not record_matches(record, der):
                continue
            matched = True
            try:
                name = _verify_to_anchor(chain, index, reference=wanted, now=now)
            except DaneMismatch as trouble:
                problems.append(trouble)
                continue
            return DaneMatch(f"DANE-TA {record.selector} {record.matching}", name)
        if not matched and record.selector == 0 and record.matching == 0:
            # "2 0 0" holds the trust anchor itself: the server need not send it
            # (RFC 7671 §5.2.2).
            try:
                name = _verify_to_anchor(
                    [*chain, record.data], len(chain), reference=wanted, now=now
                )
            except DaneMismatch as trouble:
                problems.append(trouble)
                continue
            return DaneMatch("DANE-TA 0 0", name)
    kinds = sorted({f"{r.usage} {r.selector} {r.matching}" for r in usable})
    detail = f"; {problems[0]}" if problems else ""
    raise DaneMismatch(
        f"certificate of {host} matches none of its TLSA records ({', '.join(kinds)}){detail}",
        # The kind of the problem the reason names: the two always agree.
        host_mismatch=bool(problems) and problems[0].host_mismatch,
        expired=bool(problems) and problems[0].expired,
    )


def _verify_to_anchor(
    chain: list[bytes], anchor: int, *, reference: Sequence[str], now: datetime | None
) -> str:
    """The first ``reference`` name the leaf is valid for, when it chains up to
    ``chain[anchor]``; else DaneMismatch says why not."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    from cryptography.x509.verification import (
        ClientVerifier,
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        ServerVerifier,
        Store,
        VerificationError,
    )

    unreadable = _unreadable()
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except unreadable as exc:
        raise DaneMismatch(f"unparsable certificate: {exc}") from None
    leaf = certs[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = names.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    except unreadable as exc:
        raise DaneMismatch(f"the certificate's names cannot be read: {exc}") from None
    # RFC 7672 §3.2.3: only the DNS-IDs when there are any; the CN-ID when there is none
    # (as OpenSSL's host check, and so Postfix's, falls back to the subject's CN).
    by_common_name = not dns_names
    if by_common_name:
        dns_names = [
            attribute.value
            for attribute in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(attribute.value, str)
        ]
    host = next((name for name in reference if _name_matches(name, dns_names)), None)
    if host is None:
        # The names are the peer's: control characters (a NUL, an ESC) made safe, since the
        # reason goes to logs, the recipient's status and TLS reports.
        names_shown = ", ".join(safe_text(name[:100]) for name in dns_names[:5])
        raise DaneMismatch(
            f"the certificate is not valid for {' or '.join(reference)} (names: {names_shown})",
            host_mismatch=True,
        )
    # Path validation up to the anchor: signatures, validity, CA constraints. The leaf's
    # extensions are not held to the Web PKI's profile (private DANE-TA CAs seldom follow
    # it); its name was checked above against its DNS names (or its CN), as RFC 7672
    # §3.2.2 asks.
    ee_policy = ExtensionPolicy.permit_all()
    if not by_common_name:
        ee_policy = ee_policy.require_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
    # Nor are the CAs, the anchor among them: they are held to RFC 5280 as OpenSSL holds
    # them (and so Postfix and Exim, which DANE-TA domains test against). A CA is one
    # whose basicConstraints assert cA (cryptography checks that, and the path length,
    # itself), critical or not, and whose keyUsage, if it has one, allows signing
    # certificates: ``openssl req -x509`` makes CAs without a keyUsage, Easy-RSA ones
    # whose basicConstraints are not critical, and their hosts were never delivered to.
    ca_policy = (
        ExtensionPolicy.webpki_defaults_ca()
        .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _signs_certificates)
    )
    policies = {"ca_policy": ca_policy, "ee_policy": ee_policy}

    def verifier_at(when: datetime) -> ServerVerifier | ClientVerifier:
        builder = (
            PolicyBuilder().store(Store([certs[anchor]])).time(when).extension_policies(**policies)
        )
        if by_common_name:
            # The server verifier matches names in a subjectAltName only, which this leaf
            # does not have: the path alone is checked, by the verifier that checks no
            # name (its extended key usage is not asked for either: the leaf's extensions
            # are permitted).
            return builder.build_client_verifier()
        try:
            # cryptography takes host names only (letters, digits, hyphens): DNS serves
            # others (an underscore), which a wildcard or a certificate's own name may
            # match above.
            return builder.build_server_verifier(x509.DNSName(host))
        except ValueError as exc:
            raise DaneMismatch(f"cannot check a certificate chain for {host}: {exc}") from None

    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:  # cryptography reads a naive time as UTC
        now = now.replace(tzinfo=UTC)
    verifier = verifier_at(now)
    # The other certificates sent, before the anchor and after it: TLS 1.3 lets a server
    # send them in any order (RFC 8446 §4.4.2), and the path is built from them.
    intermediates = certs[1:anchor] + certs[anchor + 1 :]
    refused: tuple[type[Exception], ...] = (VerificationError, *unreadable)
    try:
        verifier.verify(leaf, intermediates)
    except refused as exc:
        if _verifies_but_for_validity(
            certs, now, lambda when: verifier_at(when).verify(leaf, intermediates), refused
        ):
            raise DaneMismatch(
                "chain to the TLSA trust anchor does not verify: a certificate of it has "
                f"expired or is not yet valid ({exc})",
                expired=True,
            ) from None
        raise DaneMismatch(f"chain to the TLSA trust anchor does not verify: {exc}") from None
    return host


def _signs_certificates(_policy: Policy, _ca: Certificate, usage: KeyUsage | None) -> None:
    """Refuse a CA whose keyUsage does not allow signing certificates (RFC 5280
    §4.2.1.3); one without a keyUsage may sign them, as OpenSSL has it."""
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("the CA's keyUsage does not allow signing certificates (keyCertSign)")


def _verifies_but_for_validity(
    certs: Sequence[Any],
    now: datetime,
    verify: Callable[[datetime], object],
    refused: tuple[type[Exception], ...],
) -> bool:
    """Whether a chain that failed to verify at ``now`` fails only for a certificate
    outside its validity period then (RFC 8460's ``certificate-expired`` rather than
    ``tlsa-invalid``): one of ``certs`` (those sent, and the anchor) is, and ``verify``
    passes at a time all of them are valid. Asked only when verification failed."""
    starts = [c.not_valid_before_utc for c in certs]
    ends = [c.not_valid_after_utc for c in certs]
    if all(start <= now <= end for start, end in zip(starts, ends, strict=True)):
        return False
    when = max(starts)
    if when > min(ends):
        return False  # never all valid at once
    try:
        verify(when)
    except refused:
        return False
    return True


def _name_matches(host: str, names: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for name in names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False
