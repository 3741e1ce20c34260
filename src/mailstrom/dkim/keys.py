"""DKIM signing keys: load and check one, generate one, and the DNS record publishing it.

A key is checked once, when it is configured, so that a message never meets a bad key:

- the PEM file must be private to its owner (no permission bit for group or others), as
  ssh demands of private keys. Whoever can read the key can sign mail that passes DKIM and
  DMARC for the domain until the DNS record is changed, and a warning from a library or a
  cron job is read by nobody, so a readable key is refused (:class:`ConfigError`), not
  merely reported;
- its type must match the algorithm: ``rsa-sha256`` (RFC 6376) with 1024 to 4096 bits
  (RFC 8301 §3.2: signers MUST use at least 1024 and SHOULD use at least 2048 bits;
  verifiers need not check keys over 4096), or ``ed25519-sha256`` (RFC 8463).

The ``cryptography`` package (the ``mailstrom[dkim]`` extra) is imported only here and only
when a key is loaded or made, so mail without DKIM never pays for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailstrom import domains
from mailstrom.dkim.signature import DKIMAlgorithm as DKIMAlgorithm  # re-exported
from mailstrom.errors import ConfigError
from mailstrom.message.chars import shorten

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger("mailstrom.dkim")

MIN_RSA_BITS = 1024
"""Smallest RSA key accepted (RFC 8301 §3.2)."""
RECOMMENDED_RSA_BITS = 2048
"""What RFC 8301 §3.2 says signers SHOULD use, and what ``generate_private_key`` makes."""
MAX_RSA_BITS = 4096
"""Largest RSA key accepted: RFC 8301 §3.2 obliges verifiers to check keys up to 4096
bits only, and a larger public key hardly fits a DNS answer."""
MAX_KEY_FILE = 64 * 1024
"""Octets a key file may hold: a 4096-bit RSA key in PEM has about 3.3 KB (an 8192-bit
one 6.5 KB), so a larger file is no key, and is refused without being read."""
TXT_STRING = 255
"""Octets in one character-string of a TXT record (RFC 1035 §3.3)."""

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True, kw_only=True)
class DNSRecord:
    """The TXT record that publishes a key's public half (RFC 6376 §3.6.2.2)."""

    name: str
    """``selector._domainkey.domain``, without the final dot."""
    value: str
    """``v=DKIM1; k=...; p=...`` in one piece."""

    @property
    def strings(self) -> tuple[str, ...]:
        """``value`` cut into character-strings of at most 255 octets, as a TXT record
        holds it (an RSA-2048 key needs two); receivers join them without a separator."""
        return tuple(self.value[i : i + TXT_STRING] for i in range(0, len(self.value), TXT_STRING))

    def zone_line(self, ttl: int | None = None) -> str:
        """The record as a zone-file line, e.g. for BIND or NSD."""
        quoted = " ".join(f'"{s}"' for s in self.strings)
        ttl_text = f" {ttl}" if ttl is not None else ""
        return f"{self.name}.{ttl_text} IN TXT ( {quoted} )"


@dataclass(frozen=True, slots=True, kw_only=True)
class DKIMKey:
    """One signing key: the domain it signs for (``d=``), its selector (``s=``), the
    private key and the algorithm.

    >>> DKIMKey(domain="example.com", selector="s2026",
    ...         private_key="/etc/mailstrom/dkim/example.com.s2026.pem")  # doctest: +SKIP

    ``private_key`` is the path of a PEM file (PKCS#8 or the traditional RSA form, not
    encrypted; or, for Ed25519, the base64 of the key's 32-octet seed on one line, as
    dkimpy's ``dknewkey`` writes it) that only its owner may access, or the file's
    content as ``bytes`` (from a secret store, say; a ``bytearray`` is kept as a
    ``bytes`` copy); PEM text or a
    key's base64 as a ``str`` is refused, without being shown, as no path. The key is
    loaded and checked here: a missing or unreadable file, a file others can access, a
    key of the wrong type for ``algorithm``, or an RSA key under 1024 or over 4096 bits
    raises :class:`ConfigError`; an RSA key under 2048 bits is logged as a warning
    (``mailstrom.dkim``). The domain is kept as a lower-case A-label. ``repr`` never
    shows key material.
    """

    domain: str
    selector: str
    private_key: str | os.PathLike[str] | bytes
    algorithm: DKIMAlgorithm = DKIMAlgorithm.RSA_SHA256
    """The ``a=`` value; ``"rsa"`` and ``"ed25519"`` are accepted for it."""
    bits: int = field(init=False)
    """Size of the key (256 for Ed25519)."""
    _signer: _Signer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = f"dkim key {_in_label(self.domain)}/{_in_label(self.selector)}"
        set_ = object.__setattr__
        set_(self, "domain", signing_domain(self.domain, label=label))
        check_selector(self.selector, label=label)
        record_name(self.domain, self.selector, label=label)
        try:
            set_(self, "algorithm", DKIMAlgorithm.named(self.algorithm))
        except ValueError:
            choices = ", ".join(a.value for a in DKIMAlgorithm)
            raise ConfigError(
                f"{label}: algorithm must be one of {choices}, got {self.algorithm!r}"
            ) from None
        if isinstance(self.private_key, bytes | bytearray):
            # Kept as an immutable copy: a bytearray made the frozen key unhashable, met
            # os.fspath() in the doctor, and changed when its owner zeroed it.
            pem = bytes(self.private_key)
            set_(self, "private_key", pem)
        elif isinstance(self.private_key, str | os.PathLike):
            _refuse_pem_text(self.private_key, label)
            pem = read_private_file(Path(self.private_key), what=label)
        else:
            raise ConfigError(
                f"{label}: private_key must be a file path or PEM bytes, "
                f"not {type(self.private_key).__name__}"
            )
        signer = _Signer(pem, self.algorithm, label)
        set_(self, "bits", signer.bits)
        set_(self, "_signer", signer)
        if self.algorithm is DKIMAlgorithm.RSA_SHA256 and signer.bits < RECOMMENDED_RSA_BITS:
            # Accepted (RFC 8301 §3.2: signers MUST use 1024 bits, SHOULD use 2048), but
            # weak: said where it is loaded, not only by `mailstrom doctor`.
            log.warning(
                "%s: the RSA key has %d bits; RFC 8301 §3.2 says signers should use at "
                "least %d, and large mailbox providers treat smaller keys as weak: "
                "generate a %d-bit key (mailstrom dkim keygen) and publish it under a "
                "new selector",
                label,
                signer.bits,
                RECOMMENDED_RSA_BITS,
                RECOMMENDED_RSA_BITS,
            )

    def sign(self, data: bytes) -> bytes:
        """The raw signature of ``data`` (the canonicalised headers, RFC 6376 §3.7)."""
        return self._signer.sign(data)

    def key_id(self) -> str:
        """A short fingerprint of the public key (8 base64url characters of its SHA-256):
        what :func:`~mailstrom.dkim.signing.sign` writes in the ``mailstrom_key_id=`` tag
        of each signature, so that the worker can tell a key replaced under the same
        selector (and algorithm) from the one that signed a queued message."""
        digest = hashlib.sha256(self._signer.public).digest()[:6]
        return base64.urlsafe_b64encode(digest).decode("ascii")

    def dns_record(self) -> DNSRecord:
        """The TXT record to publish for this key."""
        p = base64.b64encode(self._signer.public).decode("ascii")
        return DNSRecord(
            name=record_name(self.domain, self.selector),
            value=f"v=DKIM1; k={self.algorithm.key_type}; p={p}",
        )

    def __repr__(self) -> str:
        source = "<PEM>" if isinstance(self.private_key, bytes | bytearray) else self.private_key
        return (
            f"DKIMKey(domain={self.domain!r}, selector={self.selector!r}, "
            f"algorithm={self.algorithm.value!r}, bits={self.bits}, private_key={source!r})"
        )


class _Signer:
    """The loaded private key, kept out of sight: no repr, no JSON, no deep copy of it.

    It pickles as its PEM (a worker process gets the ``Config``, and the loaded key
    itself cannot be pickled), so the file is not read, nor its checks made, again.
    """

    __slots__ = ("algorithm", "bits", "pem", "public", "sign")

    def __init__(self, pem: bytes, algorithm: DKIMAlgorithm, label: str) -> None:
        self.pem = pem
        self.algorithm = algorithm
        self.sign, self.public, self.bits = _check(_load_pem(pem, label), algorithm, label)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Signer, (self.pem, self.algorithm, "dkim key"))

    def __deepcopy__(self, memo: dict[int, Any]) -> _Signer:
        return self  # immutable; copying would mean exposing the key

    def __repr__(self) -> str:
        return "<DKIM private key>"


def _refuse_pem_text(path: str | os.PathLike[str], label: str) -> None:
    """Refuse a key pasted as text where a path belongs (a TOML string, an environment
    variable read in Python): the error for the "file" it names would show the whole
    private key, in logs and on terminals."""
    kind = key_text(os.fspath(path))
    if kind is not None:
        raise ConfigError(
            f"{label}: private_key holds {kind}, not a file path; put the key in a file "
            "only its owner can read and give its path (from Python, PEM bytes also do)"
        )


_MIN_KEY_BASE64 = 64
"""Characters of base64 the smallest DKIM private key takes in DER: an Ed25519 key's
48 octets (PKCS#8). An RSA key takes 800 and more."""
_RAW_ED25519 = frozenset({32, 64})
"""Octets of an Ed25519 private key kept raw, as dkimpy's ``dknewkey`` keeps it (the
32-octet seed) or libsodium and rspamd (the seed and the public key): its base64 is 44
or 88 characters ending in ``=``, which a file name hardly does."""
_ED25519_SEED = 32
"""Octets of an Ed25519 seed: the raw form a key file may hold (:func:`raw_ed25519_key`)."""
_MIN_RAW_BASE64 = 44
"""Characters of base64 the shortest key takes: a raw Ed25519 seed's 32 octets."""


def key_text(name: str) -> str | None:
    """What private key ``name`` holds instead of naming a file: ``"PEM text"`` (also
    with its first line missing), ``"a key in base64"`` (its DER, or a raw Ed25519 key:
    how secret stores and environment variables often hold one), or None. Such a name
    must never be shown."""
    if "-----BEGIN" in name or "PRIVATE KEY-----" in name:
        return "PEM text"
    compact = "".join(name.split())
    if len(compact) < _MIN_RAW_BASE64:
        return None
    try:
        der = base64.b64decode(compact, validate=True)
    except ValueError:  # binascii.Error: "/etc/dkim/key.pem" is no base64
        return None
    if len(der) in _RAW_ED25519:  # no key in DER is that short
        return "a key in base64"
    if len(compact) < _MIN_KEY_BASE64:
        return None
    return "a key in base64" if _is_private_der(der) else None


def _is_private_der(der: bytes) -> bool:
    """Whether ``der`` is a private key in DER (PKCS#8 or the traditional form)."""
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.serialization import load_der_private_key
    except ImportError:  # pragma: no cover - depends on the installation
        return der[:1] == b"\x30"  # an ASN.1 SEQUENCE, as every key is: keep it unseen
    try:
        load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:  # encrypted, but a key
        return True
    except UnsupportedAlgorithm:  # a key OpenSSL cannot load (EC on secp112r1), still one
        return True
    except ValueError:
        return False
    return True


def _in_label(value: object) -> str:
    """A configured value as error messages name the key by it: as written when short and
    printable, else quoted and cut (:func:`~mailstrom.domains.shown`)."""
    if isinstance(value, str) and len(value) <= 40 and value.isprintable():
        return value
    return domains.shown(value, 40)


def signing_domain(value: object, *, label: str = "dkim key") -> str:
    """``value`` as a lower-case A-label domain name of letter-digit-hyphen labels (the
    ``d=`` of RFC 6376 §3.5 is an RFC 5321 ``Domain``), or :class:`ConfigError`."""
    try:
        return domains.ldh_domain_name(value)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def check_selector(value: object, *, label: str = "dkim key") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a selector: ASCII DNS labels
    (RFC 6376 §3.1)."""
    if not isinstance(value, str) or not _SELECTOR.fullmatch(value):
        raise ConfigError(
            f"{label}: the selector must be DNS labels of letters, digits and hyphens "
            f"(like s2026 or mail.2026), got {domains.shown(value)}"
        )


def record_name(domain: str, selector: str, *, label: str = "dkim key") -> str:
    """``selector._domainkey.domain``, where the key is published, or
    :class:`ConfigError` when DNS cannot hold so long a name (RFC 1035 §2.3.4)."""
    name = f"{selector}._domainkey.{domain}"
    if len(name) > domains.MAX_DOMAIN:
        raise ConfigError(
            f"{label}: the key's DNS name, SELECTOR._domainkey.DOMAIN, would have "
            f"{len(name)} characters, and DNS allows {domains.MAX_DOMAIN}: use a shorter "
            "selector"
        )
    return name


def read_private_file(path: Path, *, what: str) -> bytes:
    """The content of a private key file, refused unless only its owner can access it
    (see :func:`read_key_file`); errors begin with ``what``."""
    try:
        return read_key_file(path)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def read_key_file(
    path: str | os.PathLike[str], *, owner_only: bool = True, limit: int = MAX_KEY_FILE
) -> bytes:
    """The content of the key file at ``path``, read without ever blocking and at most
    ``limit`` octets of it; :class:`ConfigError` saying why for a file that cannot be
    read, anything but a regular file, a file over ``limit`` octets, and (``owner_only``)
    a file others can access.

    The signer and ``mailstrom doctor`` both read keys through it. A FIFO would block
    ``open()`` until some writer came, and ``/dev/zero`` would be read until memory ran
    out: so the file is looked at before it is opened, opened with ``O_NONBLOCK`` (which
    also keeps a FIFO swapped in meanwhile from blocking), and looked at again, by its
    descriptor, before a single octet is read.
    """
    name = os.fspath(path)
    kind = key_text(name)
    if kind is not None:  # its own errors would show it
        raise ConfigError(
            f"the key file's name holds {kind}, not a file path; put the key in a file "
            "and give its path"
        )
    if "\0" in name:  # os.stat would raise ValueError, not OSError
        raise ConfigError(f"cannot read {shorten(name)}: a file name cannot hold a NUL character")
    try:
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        _check_regular(path, info.st_mode)
        mode = info.st_mode & 0o777
        if owner_only and mode & 0o077:
            raise ConfigError(
                f"{path} can be accessed by other users (mode {mode:04o}); whoever "
                "reads a DKIM key can sign mail as the domain, so mailstrom refuses it, "
                f"as ssh does: chmod 600 {path}"
            )
        try:
            # One octet more than allowed tells a file at the limit from a longer one,
            # even one that grew since fstat().
            data = f.read(limit + 1) if info.st_size <= limit else b""
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        if info.st_size > limit or len(data) > limit:
            raise ConfigError(
                f"{path} has more than {limit} octets: not a DKIM private key (a 4096-bit "
                "RSA key in PEM has about 3,300)"
            )
        return data


def _check_regular(path: str | os.PathLike[str], mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
        raise ConfigError(f"{path} is {kind}, not a regular file with a key in PEM")


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


_RAW_KEY_MAX = 200
"""Octets a raw Ed25519 key file may hold: its 88 characters of base64 at most, and some
white space around them. Anything longer is read as PEM."""


def raw_ed25519_key(data: bytes) -> Ed25519PrivateKey | None:
    """The Ed25519 key in ``data`` when it is kept raw, as dkimpy's ``dknewkey`` and
    dkimpy-milter keep it: the base64 of its 32-octet seed on one line, no PEM armour
    (white space around it is ignored, as dkimpy ignores it); None when ``data`` is no
    such thing (PEM, say). :class:`ValueError` for the 64-octet form of libsodium and
    rspamd (seed, then public key), which dkimpy does not sign with either. The signer
    and ``mailstrom doctor`` both read keys through it; no error shows the key."""
    compact = data.strip()
    if len(compact) > _RAW_KEY_MAX or b"-----" in compact:
        return None
    try:
        raw = base64.b64decode(compact, validate=True)
    except ValueError:  # binascii.Error: no base64 (also inner white space, as dkimpy's)
        return None
    if len(raw) not in _RAW_ED25519:
        return None
    if len(raw) != _ED25519_SEED:
        raise ValueError(
            "a raw Ed25519 key of 64 octets (seed and public key), which dkimpy-milter "
            "cannot use either; give the base64 of its first 32 octets (the seed, as "
            "dknewkey writes it) or the key in PEM"
        )
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def _load_pem(pem: bytes, label: str) -> PrivateKeyTypes:
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigError(
            f"{label}: DKIM signing needs the cryptography package: pip install 'mailstrom[dkim]'"
        ) from None
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        raw = raw_ed25519_key(pem)
    except ValueError as exc:
        raise ConfigError(f"{label}: the private key is {exc}") from None
    if raw is not None:
        return raw
    if b"-----BEGIN" not in pem:
        # cryptography's own words ("Unable to load PEM file ... MalformedFraming") do
        # not say what would do.
        raise ConfigError(
            f"{label}: not a PEM private key, nor an Ed25519 key in base64 (its 32-octet "
            "seed on one line, as dkimpy's dknewkey writes it)"
        )
    try:
        # Checking an RSA key tests its primes, in time growing with the cube of their
        # size: a 64 KiB file holds a key of some 60,000 bits, which would take many
        # minutes. So the key is read unchecked first, and checked only if _check()
        # will take it by its size; a larger one is refused by its size, unchecked.
        key = load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, rsa.RSAPrivateKey) or not (
            MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS
        ):
            return key
    except TypeError:
        raise ConfigError(f"{label}: the private key is encrypted; give it unencrypted") from None
    except (ValueError, UnicodeError) as exc:
        raise ConfigError(f"{label}: not a PEM private key ({exc})") from None
    except UnsupportedAlgorithm as exc:
        # A well-formed key OpenSSL cannot load, such as EC on secp112r1: DKIM could not
        # use it anyway (RFC 6376 and RFC 8463 define RSA and Ed25519 only).
        raise ConfigError(
            f"{label}: unsupported kind of private key ({exc}); use an RSA or Ed25519 key"
        ) from None
    try:
        return load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"{label}: not a valid RSA private key ({exc})") from None


def _check(
    key: PrivateKeyTypes, algorithm: DKIMAlgorithm, label: str
) -> tuple[Callable[[bytes], bytes], bytes, int]:
    """(sign function, public key as DNS publishes it, bits) of a key fit for ``algorithm``."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    if algorithm is DKIMAlgorithm.RSA_SHA256:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{label}: rsa-sha256 needs an RSA key, got {_kind(key)}")
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise ConfigError(
                f"{label}: the RSA key has {bits} bits; RFC 8301 §3.2 requires at least "
                f"{MIN_RSA_BITS} (use {RECOMMENDED_RSA_BITS}), and receivers ignore smaller ones"
            )
        if bits > MAX_RSA_BITS:
            raise ConfigError(
                f"{label}: the RSA key has {bits} bits; receivers need not verify keys over "
                f"{MAX_RSA_BITS} (RFC 8301 §3.2), use {RECOMMENDED_RSA_BITS}"
            )
        rsa_key = key
        pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()

        def sign_rsa(data: bytes) -> bytes:
            return rsa_key.sign(data, pkcs1, sha256)

        # RFC 6376 §3.6.1: p= is the DER SubjectPublicKeyInfo of an RSA key.
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return sign_rsa, public, bits
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{label}: ed25519-sha256 needs an Ed25519 key, got {_kind(key)}")
    ed_key = key

    def sign_ed25519(data: bytes) -> bytes:
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash of the data, not the data itself.
        return ed_key.sign(hashlib.sha256(data).digest())

    # RFC 8463 §4.2: p= is the raw 32-octet public key.
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return sign_ed25519, public, 256


def _kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", " key")


def generate_private_key(
    algorithm: DKIMAlgorithm = DKIMAlgorithm.RSA_SHA256, *, bits: int = RECOMMENDED_RSA_BITS
) -> bytes:
    """A new private key as unencrypted PKCS#8 PEM (``bits`` applies to RSA only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    algorithm = DKIMAlgorithm.named(algorithm)
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm is DKIMAlgorithm.RSA_SHA256:
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ConfigError(
                f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits (RFC 8301), got {bits}"
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_file(path: Path, pem: bytes) -> None:
    """Write ``pem`` to a new file of mode 0600; an existing file is never replaced
    (:class:`FileExistsError`). A file that cannot be written whole (a full disk) is
    removed again: a truncated key is no key, and would block writing the next one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # whatever the umask
            f.write(pem)
            f.flush()
            os.fsync(fd)
    except BaseException:
        # The file is ours: O_EXCL made it just now.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
