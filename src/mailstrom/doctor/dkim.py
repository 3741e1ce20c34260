"""DKIM (RFC 6376): is each configured key's public half published where receivers look?

For a key with selector ``s`` and domain ``d`` the record is the TXT at
``s._domainkey.d``: tags such as ``v=DKIM1; k=rsa; p=<base64>``. The public key is
derived from the private key file with ``cryptography``; for RSA ``p=`` holds the DER
SubjectPublicKeyInfo (RFC 6376 §3.6.1; a bare PKCS#1 RSAPublicKey is accepted too), for
Ed25519 the 32 raw octets (RFC 8463). RFC 8301: keys under 1024 bits must not be
trusted, 2048 is what to use, and verifiers need not check keys over 4096 bits, which the
signer refuses (:data:`mailstrom.dkim.keys.MAX_RSA_BITS`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from mailstrom.dkim import keys as signer_keys
from mailstrom.dkim.keys import read_key_file
from mailstrom.doctor.extras import MissingExtra
from mailstrom.doctor.lookup import Outcome, Resolver
from mailstrom.doctor.report import Check, Status, capped, listed, piece
from mailstrom.domains import ldh_domain_name
from mailstrom.errors import ConfigError

# The signer's bounds (RFC 8301 §3.2), not copies: below the least verifiers must treat
# the signature as failed; the recommended size is what signers should use.
MIN_RSA_BITS = signer_keys.MIN_RSA_BITS
GOOD_RSA_BITS = signer_keys.RECOMMENDED_RSA_BITS


@dataclass(frozen=True, slots=True, kw_only=True)
class DKIMKey:
    """One signing key as the doctor needs it (the shape of a ``Config.dkim`` entry)."""

    domain: str
    """The ``d=`` of signatures made with it, taken as a lower-case A-label as the signer
    takes it; :class:`ValueError` when it is no letter-digit-hyphen domain name."""
    selector: str
    private_key: str | bytes = field(repr=False)
    """Path of the PEM private key file, or the PEM itself."""
    algorithm: str = "rsa-sha256"
    """``rsa-sha256`` or ``ed25519-sha256`` (``rsa`` and ``ed25519`` are accepted)."""

    def __post_init__(self) -> None:
        # Compared with the From domain (which key signs it) as the signer compares them:
        # "Example.COM" or "example.com." signed nothing for example.com, and DMARC then
        # passed "by SPF alone".
        object.__setattr__(self, "domain", ldh_domain_name(self.domain))

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def kind(self) -> str | None:
        """``rsa`` or ``ed25519`` (the ``k=`` its record needs); None for an unknown
        algorithm."""
        return _wanted_kind(self.algorithm)

    @property
    def source(self) -> str:
        """Where the private key comes from, as reports name it (never the key itself)."""
        if isinstance(self.private_key, bytes):
            return "the configured private key"
        return self.private_key


_FWS = " \t\r\n"
"""Folding white space (RFC 6376 §2.8: WSP and CRLF), what verifiers strip around names
and values: not ``str.strip()``'s, which takes NBSP and the rest of Unicode's too."""
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
"""RFC 6376 §3.2: tag-name = ALPHA *ALNUMPUNC, ALNUMPUNC = ALPHA / DIGIT / "_"."""
_FWS_RUN = re.compile(r"[ \t\r\n]+")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
"""A character p= may not hold once its FWS is gone (RFC 6376 §3.6.1: base64string)."""
_PADDED = re.compile(r"[A-Za-z0-9+/]*={0,2}")
"""base64 as RFC 4648 §4 writes it: padding only at the end, at most two ``=``."""
_P_TAG = re.compile(r"p[ \t\r\n]*=")
"""What makes a TXT record look like a key record: a ``p`` and its ``=``, with any folding
white space between them that RFC 6376 §3.2 allows (a tab too: verifiers take it), not
spaces only."""
_DKIM_VERSION = re.compile(r"[ \t\r\n]*v[ \t\r\n]*=[ \t\r\n]*DKIM1[ \t\r\n]*(?:;|\Z)")
"""A record starting with ``v=DKIM1`` (the tag must come first, RFC 6376 §3.6.1): a key
record, even one whose p= is missing or misspelt (``P=``, tag names are case-sensitive)."""


def parse_tags(text: str) -> dict[str, str]:
    """A DKIM tag-list (RFC 6376 §3.2): ``v=DKIM1; k=rsa; p=MII…`` → {"v": "DKIM1", …}.
    Whitespace inside values (folded base64) is dropped; raises ValueError on a tag
    without ``=``, a tag name of other characters than the grammar's, a tag given
    twice, or an empty one (``;;``)."""
    tags: dict[str, str] = {}
    parts = text.strip(_FWS).split(";")
    if parts[-1] == "":
        parts.pop()  # one ";" may end the list
    for part in parts:
        if not part.strip(_FWS):
            # tag-list = tag-spec *(";" tag-spec) [";"] (RFC 6376 §3.2): dkimpy finds a
            # record with ";;" (or a leading ";") invalid, and fails every signature.
            raise ValueError("an empty tag between semicolons")
        name, eq, value = part.partition("=")
        name = name.strip(_FWS)
        if not eq or not name:
            raise ValueError(f"not a tag=value pair: {piece(part.strip(_FWS))!r}")
        if not _TAG_NAME.fullmatch(name):
            raise ValueError(f"tag name {piece(name)!r} is not a letter, then letters, digits, _")
        if name in tags:
            raise ValueError(f"tag {piece(name)}= appears twice")
        # Folding whitespace may split base64 anywhere (RFC 6376 §3.2) and surround the
        # colons of a list (§3.6.1's h=, s=, t=); elsewhere it only surrounds the value.
        # Only FWS goes: str.split() also took NBSP and the rest of Unicode's white space,
        # which Mail::DKIM keeps (and then finds the key, or the list, invalid).
        folded = name in ("p", "h", "s", "t")
        tags[name] = _FWS_RUN.sub("", value) if folded else value.strip(_FWS)
    return tags


@dataclass(frozen=True, slots=True)
class PublicKey:
    kind: str
    """``rsa`` or ``ed25519``: the record's ``k=``."""
    p: str
    """The base64 value of ``p=``."""
    bits: int
    key: Any


def public_key(pem: bytes) -> PublicKey:
    """The public half of a private key (PEM, or an Ed25519 seed in base64 as the signer
    takes it), as a DKIM record publishes it."""
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    except ImportError:
        raise MissingExtra(["cryptography"]) from None
    # The signer's reading of dknewkey's form (ValueError for libsodium's, as for bad PEM).
    key: Any = signer_keys.raw_ed25519_key(pem)
    try:
        # Checking an RSA key tests its primes, which takes minutes for the largest key a
        # 64 KiB file holds: one over the signer's bound fails by its size (check_dkim)
        # and is not checked; the others are, as the signer checks them.
        if key is None:
            key = serialization.load_pem_private_key(
                pem, password=None, unsafe_skip_rsa_key_validation=True
            )
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size <= signer_keys.MAX_RSA_BITS:
            key = serialization.load_pem_private_key(pem, password=None)
    except UnsupportedAlgorithm as exc:  # e.g. EC on a curve OpenSSL does not know
        raise ValueError(f"unsupported kind of key ({exc}); use RSA or Ed25519") from None
    pub = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        der = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return PublicKey("rsa", base64.b64encode(der).decode(), key.key_size, pub)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey("ed25519", base64.b64encode(raw).decode(), 256, pub)
    raise ValueError(f"{type(key).__name__} keys cannot sign DKIM (use RSA or Ed25519)")


def published_matches(kind: str, p: str, ours: PublicKey) -> bool:
    """Whether the record's ``p=`` is ``ours``, however the record encodes it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        data = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        return False
    if kind == "ed25519":
        return base64.b64encode(data).decode() == ours.p
    if data == base64.b64decode(ours.p):
        return True
    try:  # SPKI with other (equivalent) DER, or a bare PKCS#1 RSAPublicKey
        try:
            theirs = serialization.load_der_public_key(data)
        except ValueError:
            pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(data)
            theirs = serialization.load_pem_public_key(pem + b"-----END RSA PUBLIC KEY-----\n")
        return bool(theirs.public_numbers() == ours.key.public_numbers())  # type: ignore[union-attr]
    except (ValueError, TypeError, AttributeError, UnsupportedAlgorithm):
        # Not a key, or one of a kind cryptography cannot load (EC on secp112r1, say):
        # either way not the configured key.
        return False


def record_for(key: PublicKey) -> str:
    """The TXT value to publish for ``key``."""
    return f"v=DKIM1; k={key.kind}; p={key.p}"


def _wanted_kind(algorithm: str) -> str | None:
    algorithm = algorithm.strip().lower()
    if algorithm in ("rsa", "rsa-sha256"):
        return "rsa"
    if algorithm in ("ed25519", "ed25519-sha256"):
        return "ed25519"
    return None


def _read_pem(private_key: str | bytes) -> bytes:
    if isinstance(private_key, bytes):
        return private_key
    # The signer's own reader: bounded, and never blocked by a FIFO or fed by a device.
    # Permissions are the signer's business: the doctor only asks whether the key is
    # published, for keys other signers (opendkim's 0640 ones, say) use too.
    return read_key_file(private_key, owner_only=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`judge_dkim` found for one key."""

    check: Check
    verifies: bool
    """Whether a signature made with the key would verify."""
    testing: bool = False
    """Whether its record says ``t=y``: "Verifiers MUST NOT treat messages from Signers in
    testing mode differently from unsigned email" (RFC 6376 §3.6.1), so a DMARC pass
    that rests on it is one such receivers do not grant."""


def check_dkim(resolver: Resolver, key: DKIMKey) -> tuple[Check, bool]:
    """The check for one key, and whether a signature made with it would verify."""
    verdict = judge_dkim(resolver, key)
    return verdict.check, verdict.verifies


def judge_dkim(resolver: Resolver, key: DKIMKey) -> Verdict:
    """The check for one key, whether a signature made with it would verify, and whether
    its record puts it in testing mode (``t=y``)."""
    name = key.record_name

    def result(
        status: Status,
        summary: str,
        fix: str | None = None,
        details: tuple[str, ...] = (),
        *,
        testing: bool = False,
    ) -> Verdict:
        verifies = status in (Status.PASS, Status.WARN)
        check = Check(
            name="dkim", subject=name, status=status, summary=summary, details=details, fix=fix
        )
        return Verdict(check, verifies, testing)

    wanted = _wanted_kind(key.algorithm)
    if wanted is None:
        return result(
            Status.FAIL,
            f"unknown algorithm {key.algorithm!r}",
            "use rsa-sha256 or ed25519-sha256 (RFC 6376, RFC 8463)",
        )
    try:
        pem = _read_pem(key.private_key)
    except ConfigError as exc:
        return result(
            Status.FAIL,
            f"unusable private key: {exc}",
            "point the DKIM key setting at a readable PEM file",
        )
    # Commands name the file; a key given as PEM bytes has none.
    path = key.private_key if isinstance(key.private_key, str) else "KEY.pem"
    try:
        ours = public_key(pem)
    except TypeError:
        # cryptography's word for a key that needs a password. It is still the key whose
        # public half may be published: writing a new key over it (the advice below) would
        # fail every signature against that record.
        return result(
            Status.FAIL,
            f"{key.source} is encrypted: the signer needs the key unencrypted",
            "store it unencrypted, readable by its owner only, and configure that file: "
            f"(umask 077; openssl pkey -in {path} -out NEW.pem)",
        )
    except ValueError as exc:
        generate = "ED25519" if wanted == "ed25519" else "RSA -pkeyopt rsa_keygen_bits:2048"
        return result(
            Status.FAIL,
            f"{key.source} is no usable private key: {exc}",
            f"generate one: (umask 077; openssl genpkey -algorithm {generate} -out {path})",
        )
    publish = f'publish TXT at {name}: "{record_for(ours)}"'
    if ours.kind != wanted:
        return result(
            Status.FAIL,
            f"the key is {ours.kind} but the algorithm is {key.algorithm}",
            f"set the algorithm to {ours.kind}-sha256, or use a {wanted} key",
        )
    # The signer's own bound (read when asked, not copied): a key that passed here would
    # then fail to load as a configured key (RFC 8301 §3.2).
    if ours.kind == "rsa" and ours.bits > signer_keys.MAX_RSA_BITS:
        return result(
            Status.FAIL,
            f"RSA key of {ours.bits} bits: mailstrom signs with keys of at most "
            f"{signer_keys.MAX_RSA_BITS} bits, the largest receivers must verify (RFC 8301)",
            f"generate a {GOOD_RSA_BITS}-bit key and publish its record under a new selector",
        )
    # Below the least verifiers must accept (and the signer takes): whatever DNS holds,
    # publishing this key's record is no fix, a new key is.
    if ours.kind == "rsa" and ours.bits < MIN_RSA_BITS:
        return result(
            Status.FAIL,
            f"RSA key of {ours.bits} bits: receivers ignore signatures by keys under "
            f"{MIN_RSA_BITS} bits (RFC 8301), and mailstrom does not sign with one",
            f"generate a {GOOD_RSA_BITS}-bit key and publish its record under a new selector",
        )
    answer = resolver.lookup(name, "TXT")
    if answer.outcome is Outcome.ERROR:
        return result(Status.UNKNOWN, f"temporary DNS error: {answer.error}")
    candidates = [r for r in answer.records if _P_TAG.search(r) or _DKIM_VERSION.match(r)]
    shown = capped([f"TXT {name}: {r}" for r in candidates])
    if not candidates and answer.records:
        # A selector holds one TXT record (RFC 6376 §3.6.2.2): the key published beside
        # another one (a verification token, a wildcard's record) would make two, which
        # receivers pick from at random. It takes their place.
        one = len(answer.records) == 1
        found = "its TXT record holds none" if one else "its TXT records hold none"
        return result(
            Status.FAIL,
            f"no DKIM key published at {name}: {found}",
            f"replace the TXT record{'' if one else 's'} at {name} by "
            f'"{record_for(ours)}" (a selector holds '
            "one record: RFC 6376 §3.6.2.2)",
            capped([f"TXT {name}: {r}" for r in answer.records]),
        )
    if not candidates:
        return result(Status.FAIL, f"no DKIM key published at {name}", publish)
    if len(answer.records) > 1:
        # "TXT RRs MUST be unique for a particular selector name ... if there are multiple
        # records in an RRset, the results are undefined" (RFC 6376 §3.6.2.2): verifiers
        # take one (dkimpy and Mail::DKIM the first, in an order DNS servers rotate), so a
        # stale key left beside the current one fails a share of the mail.
        return result(
            Status.FAIL,
            f"{len(answer.records)} TXT records at {name}: receivers use one of them "
            "at random (RFC 6376 §3.6.2.2)",
            f'keep one TXT record at {name}: "{record_for(ours)}"; remove the others',
            capped([f"TXT {name}: {r}" for r in answer.records]),
        )
    # A selector holds one record (RFC 6376 §3.6.2.2): the right one published beside a
    # wrong one would make two, which receivers pick from at random. It takes its place.
    replace = f'replace the TXT record at {name} by "{record_for(ours)}"'
    problems: list[str] = []
    for text in candidates:
        try:
            tags = parse_tags(text)
        except ValueError as exc:
            problems.append(f"malformed record: {exc}")
            continue
        problem = _record_problem(tags, ours) or _spaced_list(text)
        if problem is not None:
            problems.append(problem)
            continue
        warnings = []
        if ours.kind == "rsa" and ours.bits < GOOD_RSA_BITS:
            warnings.append(f"RSA key of {ours.bits} bits; use {GOOD_RSA_BITS} (RFC 8301)")
        testing = "y" in tags.get("t", "").split(":")
        if testing:
            warnings.append(
                "t=y: the domain is testing DKIM, and verifiers are to treat its mail as "
                "unsigned (RFC 6376 §3.6.1)"
            )
        if warnings:
            fix = (
                f"generate a {GOOD_RSA_BITS}-bit key and publish its record under a new selector"
                if ours.bits < GOOD_RSA_BITS
                else f"drop t=y: {replace}"
            )
            return result(Status.WARN, "; ".join(warnings), fix, shown, testing=testing)
        return result(
            Status.PASS, f"published key matches {key.source} ({_size(ours)})", None, shown
        )
    return result(Status.FAIL, listed(problems, 3, "; "), replace, shown)


def _spaced_list(text: str) -> str | None:
    """The problem of a record whose ``h=`` or ``s=`` list has white space inside it
    (``h=sha1 : sha256``): RFC 6376 §3.6.1 allows FWS around its colons, but Mail::DKIM,
    SpamAssassin's verifier, splits the list at the colons alone and then finds neither
    ``sha256`` nor ``email`` in it, failing every signature. None when there is none."""
    for part in text.split(";"):
        name, _, value = part.partition("=")
        name = name.strip(_FWS)
        if name in ("h", "s") and any(c in value.strip(_FWS) for c in _FWS):
            return (
                f"{name}={piece(value.strip(_FWS))} has white space inside its list: "
                f"Mail::DKIM then finds no {'sha256' if name == 'h' else 'email'} in it"
            )
    return None


def _size(key: PublicKey) -> str:
    return f"RSA {key.bits} bits" if key.kind == "rsa" else "Ed25519"


def _record_problem(tags: dict[str, str], ours: PublicKey) -> str | None:
    p = tags.get("p")
    if p is None:  # often a missing ";" that glued p= to the tag before it
        return "the record has no p= tag (is a ';' missing?)"
    if tags.get("v", "DKIM1") != "DKIM1":
        return f"v={piece(tags['v'])} is not DKIM1"
    # Case-sensitive, as tag values are unless their tag says otherwise (§3.2): dkimpy
    # refuses k=RSA as an unknown algorithm, so the signatures would not verify.
    kind = tags.get("k", "rsa")
    if kind != ours.kind:
        return f"the record is for k={piece(kind)}, the key is {ours.kind}"
    hashes = tags.get("h")
    # Case-sensitive as well: Mail::DKIM (SpamAssassin's verifier) finds a record with
    # h=SHA256 invalid for an rsa-sha256 signature ("does not support hash algorithm").
    if hashes is not None and "sha256" not in hashes.split(":"):
        return f"h={piece(hashes)} excludes sha256, which mailstrom signs with"
    services = tags.get("s")
    # Verifiers "MUST ignore this record" unless s= lists email or * (RFC 6376 §3.6.1;
    # TLSRPT report keys carry s=tlsrpt, RFC 8460 §3). Values are case-sensitive (§3.2).
    if services is not None and not {"*", "email"} & set(services.split(":")):
        return f"s={piece(services)} excludes email: verifiers of mail ignore the record"
    # A list is RFC 6376's, but dkimpy (dkimpy-milter's verifier) compares s= whole with
    # "*", "email" and "tlsrpt": with "tlsrpt:email" it finds no key, for every signature.
    if services is not None and ":" in services:
        return (
            f"s={piece(services)} lists several services: dkimpy takes s= as one and "
            "ignores the record (write s=email, or no s=)"
        )
    granularity = tags.get("g")
    # RFC 4871's g= (dropped by RFC 6376, which verifiers like dkimpy follow) is still
    # applied by Mail::DKIM, SpamAssassin's verifier: our signatures carry no i=, so the
    # identity has no local part, and only "*" matches it there.
    if granularity is not None and granularity != "*":
        return (
            f"g={piece(granularity)} limits the key to some local parts (RFC 4871): "
            "Mail::DKIM fails every signature without i=, as mailstrom's are"
        )
    if p == "":
        return "p= is empty: the key is revoked"
    odd = _NOT_BASE64.search(p)
    if odd is not None:
        return (
            f"p= holds {odd[0]!r}, which is no base64 (RFC 6376 §3.6.1): Mail::DKIM "
            "finds the key invalid"
        )
    if not _PADDED.fullmatch(p) or len(p) % 4:
        # Python's decoder ignores what follows the padding; OpenSSL's, which Mail::DKIM
        # hands the key to, refuses it ("bad base64 decode").
        return "p= is no well-formed base64: its '=' padding is misplaced or its length odd"
    if not published_matches(kind, p, ours):
        return "the published key is not the public half of the configured private key"
    return None
