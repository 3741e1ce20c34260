"""DKIM keys: what is accepted, what is refused and why, and the DNS record of a key."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from tests.support.dkim import (
    ED25519,
    RSA,
    UNSUPPORTED_CURVE_PEMS,
    pem,
    read_from_fifo,
    unchecked_rsa_pem,
)

from mailstrom.dkim import keys as keys_module
from mailstrom.dkim.keys import (
    DKIMAlgorithm,
    DKIMKey,
    DNSRecord,
    generate_private_key,
    write_private_file,
)
from mailstrom.errors import ConfigError

# Made with `openssl genrsa 512` for this test: too small to be accepted.
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAuAXurNjPF9USrkAL
Nzq2O5L4WPAY3YfVpEkzGtT2beB0cfbuHUnxu2UkxZ+jgkLXeUAObnev0tzPSwBQ
VkuUhQIDAQABAkBg4FaezeBv9m7IJtUAtTrcL+nnwDYG4Yx52UM7G+PDQWLRG1Xy
J5l0ukuuRpGMubib6mIit16tbUAOgZKPX95dAiEA3sSmdpXoRP9qBsPVLDl8sljY
jSW17XfRvN+YYzu0GsMCIQDTeaPJWpFSaitFPXf8VsBcwAo0Yb5yact+P/i6fAlP
FwIgclfP9dh2U0wiuPw15DBRwB14ceKkYhJ5do/yYSUZCg8CIHC3LfBdoIVv5z5R
hAlwZ7lH9mhzDKJI91iEWltzTzbjAiEA0p2Ey2xALFoN/DUjRZ+M+K4ybEdJshXw
rUUGx/AP/yE=
-----END PRIVATE KEY-----
"""


def key_file(tmp_path: Path, data: bytes, mode: int = 0o600, name: str = "key.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_a_private_key_file_is_loaded(tmp_path: Path) -> None:
    path = key_file(tmp_path, pem(RSA))
    key = DKIMKey(domain="Example.COM.", selector="s2026", private_key=path)
    assert (key.domain, key.selector, key.algorithm, key.bits) == (
        "example.com",
        "s2026",
        RSA,
        2048,
    )
    assert DKIMKey(domain="example.com", selector="s", private_key=str(path)) == key.__class__(
        domain="example.com", selector="s", private_key=str(path)
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o601])
def test_a_key_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, pem(RSA), mode)
    with pytest.raises(ConfigError, match=rf"mode {mode:04o}.*chmod 600") as caught:
        DKIMKey(domain="example.com", selector="s", private_key=path)
    assert str(path) in str(caught.value)


def test_a_read_only_key_file_is_fine(tmp_path: Path) -> None:
    DKIMKey(domain="example.com", selector="s", private_key=key_file(tmp_path, pem(RSA), 0o400))


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        DKIMKey(domain="example.com", selector="s", private_key=tmp_path / "nope.pem")
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError):
        DKIMKey(domain="example.com", selector="s", private_key=directory)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo, 0o600)

    def load(path: Path) -> DKIMKey:
        return DKIMKey(domain="example.com", selector="s", private_key=path)

    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):
        read_from_fifo(fifo, load)


def test_a_device_is_refused_unread(tmp_path: Path) -> None:
    link = tmp_path / "key.pem"
    link.symlink_to(os.devnull)  # /dev/zero would be read until memory ran out
    with pytest.raises(ConfigError, match="is a character device, not a regular file"):
        DKIMKey(domain="example.com", selector="s", private_key=link)


def test_a_key_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    limit = keys_module.MAX_KEY_FILE
    at_limit = key_file(tmp_path, pem(RSA).ljust(limit, b"\n"), name="at.pem")
    assert DKIMKey(domain="example.com", selector="s", private_key=at_limit).bits == 2048
    over = key_file(tmp_path, pem(RSA).ljust(limit + 1, b"\n"), name="over.pem")
    with pytest.raises(ConfigError, match=f"has more than {limit} octets"):
        DKIMKey(domain="example.com", selector="s", private_key=over)


def test_small_rsa_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="512 bits; RFC 8301"):
        DKIMKey(domain="example.com", selector="s", private_key=RSA_512)


def test_rsa_1024_is_the_smallest_accepted() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    data = small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # "BEGIN RSA PRIVATE KEY" works too
        serialization.NoEncryption(),
    )
    assert DKIMKey(domain="example.com", selector="s", private_key=data).bits == 1024


def test_an_rsa_key_under_2048_bits_loads_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # RFC 8301 §3.2: signers SHOULD use 2048 bits. A 1024-bit key loaded without a word;
    # only `mailstrom doctor` said so, and only once its record was published.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    data = small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with caplog.at_level("WARNING", logger="mailstrom.dkim"):
        DKIMKey(domain="example.com", selector="weak", private_key=data)
        DKIMKey(domain="example.com", selector="s", private_key=pem(RSA))
        DKIMKey(domain="example.com", selector="e", private_key=pem(ED25519), algorithm="ed25519")
    warned = [r for r in caplog.records if r.name == "mailstrom.dkim"]
    assert [r.levelname for r in warned] == ["WARNING"]
    message = warned[0].getMessage()
    assert "example.com/weak" in message and "1024 bits" in message and "2048" in message


def test_large_rsa_keys_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 4097-bit key takes seconds to make; lowering the bound shows it is enforced.
    monkeypatch.setattr(keys_module, "MAX_RSA_BITS", 1024)
    with pytest.raises(ConfigError, match="2048 bits; receivers need not verify"):
        DKIMKey(domain="example.com", selector="s", private_key=pem(RSA))


def test_an_oversized_rsa_key_is_refused_by_its_size_before_it_is_checked() -> None:
    """Checking an RSA key tests its primes, in time that grows with the cube of their
    size: a 64 KiB file holds a key of some 60,000 bits, whose check takes many minutes
    (an 8192-bit one already seconds). Its size, read first, refuses it at once; a key
    within the bounds is still checked."""
    with pytest.raises(ConfigError, match="8192 bits; receivers need not verify"):
        DKIMKey(domain="example.com", selector="s", private_key=unchecked_rsa_pem(8192))
    with pytest.raises(ConfigError, match="not a valid RSA private key"):
        DKIMKey(domain="example.com", selector="s", private_key=unchecked_rsa_pem(2048))


def test_key_type_must_match_the_algorithm() -> None:
    with pytest.raises(ConfigError, match="ed25519-sha256 needs an Ed25519 key, got RSA key"):
        DKIMKey(domain="example.com", selector="s", private_key=pem(RSA), algorithm=ED25519)
    with pytest.raises(ConfigError, match="rsa-sha256 needs an RSA key, got Ed25519 key"):
        DKIMKey(domain="example.com", selector="s", private_key=pem(ED25519))


def test_algorithm_names() -> None:
    for name, algorithm in [("rsa", RSA), ("RSA-SHA256", RSA), ("ed25519", ED25519)]:
        key = DKIMKey(
            domain="example.com", selector="s", private_key=pem(algorithm), algorithm=name
        )  # type: ignore[arg-type]
        assert key.algorithm is algorithm
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        DKIMKey(domain="example.com", selector="s", private_key=pem(RSA), algorithm="rsa-sha1")  # type: ignore[arg-type]


def test_encrypted_and_malformed_keys_are_refused() -> None:
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError, match="encrypted"):
        DKIMKey(domain="example.com", selector="s", private_key=encrypted, algorithm=ED25519)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        DKIMKey(domain="example.com", selector="s", private_key=b"-----BEGIN NONSENSE-----")


@pytest.mark.parametrize("data", UNSUPPORTED_CURVE_PEMS)
@pytest.mark.parametrize("algorithm", [RSA, ED25519])
def test_a_key_on_a_curve_openssl_cannot_load_is_a_config_error(
    tmp_path: Path, data: bytes, algorithm: DKIMAlgorithm
) -> None:
    for source in (data, key_file(tmp_path, data)):
        with pytest.raises(ConfigError, match=r"unsupported kind of private key.*RSA or Ed25519"):
            DKIMKey(domain="example.com", selector="s", private_key=source, algorithm=algorithm)


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "com",
        "[192.0.2.1]",
        "a..b",
        "exa mple.com",
        "a@b.com",
        # DNS holds these, but d= is an RFC 5321 Domain: letters, digits, inner hyphens.
        "ex=ample.com",
        "ex,ample.com",
        "ex:ample.com",
        "ex{ample}.com",
        "ex/ample.com",
        "-lead.example.com",
    ],
)
def test_bad_domains(domain: str) -> None:
    with pytest.raises(ConfigError, match="domain"):
        DKIMKey(domain=domain, selector="s", private_key=pem(RSA))


def test_the_record_name_fits_in_dns() -> None:
    # 126 one-letter labels: each label is fine, the name is 274 characters.
    with pytest.raises(ConfigError, match="274 characters, and DNS allows 253"):
        DKIMKey(domain="example.com", selector="a." * 125 + "a", private_key=pem(RSA))
    longest = "a." * 114 + "aa"  # 230, and "._domainkey.example.com" 23: 253 in all
    key = DKIMKey(domain="example.com", selector=longest, private_key=pem(RSA))
    assert len(key.dns_record().name) == 253


@pytest.mark.parametrize("selector", ["", "s_1", "-s", "s.", "sel ector", "sél", "a" * 64])
def test_bad_selectors(selector: str) -> None:
    with pytest.raises(ConfigError, match="selector"):
        DKIMKey(domain="example.com", selector=selector, private_key=pem(RSA))


def test_unicode_domain_becomes_an_a_label() -> None:
    key = DKIMKey(
        domain="Bücher.Example", selector="mail.2026", private_key=pem(ED25519), algorithm=ED25519
    )
    assert key.domain == "xn--bcher-kva.example"
    assert key.dns_record().name == "mail.2026._domainkey.xn--bcher-kva.example"


def test_key_material_never_shows(tmp_path: Path) -> None:
    from_bytes = DKIMKey(domain="example.com", selector="s", private_key=pem(RSA))
    from_file = DKIMKey(
        domain="example.com", selector="s", private_key=key_file(tmp_path, pem(RSA))
    )
    for key in (from_bytes, from_file):
        assert "PRIVATE" not in repr(key) and "MII" not in repr(key)
    assert "'<PEM>'" in repr(from_bytes) and str(tmp_path) in repr(from_file)


def test_pem_given_as_a_bytearray_is_kept_as_bytes() -> None:
    # Accepted beside bytes (a secret store's buffer), a bytearray stayed in the frozen
    # key: hashing it raised TypeError (unhashable), the doctor's view of the
    # configuration (SenderSetup.from_config) raised TypeError from os.fspath(), and
    # zeroing the buffer afterwards, as callers of secret stores do, changed the key.
    from mailstrom.config import Config
    from mailstrom.dkim import DKIMConfig
    from mailstrom.doctor import SenderSetup

    buffer = bytearray(pem(RSA))
    key = DKIMKey(domain="example.com", selector="s", private_key=buffer)
    buffer[:] = bytes(len(buffer))
    assert type(key.private_key) is bytes and key.private_key == pem(RSA)
    assert key == DKIMKey(domain="example.com", selector="s", private_key=pem(RSA))
    assert hash(key) == hash(DKIMKey(domain="example.com", selector="s", private_key=pem(RSA)))
    setup = SenderSetup.from_config(Config(dkim=DKIMConfig(keys=(key,))), domain="example.com")
    assert [k.private_key for k in setup.dkim_keys] == [pem(RSA)]


def test_keys_pickle_and_copy_without_reading_the_file_again(tmp_path: Path) -> None:
    path = key_file(tmp_path, pem(RSA))
    key = DKIMKey(domain="example.com", selector="s", private_key=path)
    path.chmod(0o644)  # would now be refused, but the copy does not look again
    clone = pickle.loads(pickle.dumps(key))
    assert clone == key and clone.private_key == path
    assert clone.sign(b"data") == key.sign(b"data")  # RSA PKCS#1 v1.5 is deterministic
    assert copy.deepcopy(key) == key


def test_rsa_dns_record_is_split_into_character_strings() -> None:
    key = DKIMKey(domain="example.com", selector="s2026", private_key=pem(RSA))
    record = key.dns_record()
    assert record.name == "s2026._domainkey.example.com"
    assert record.value.startswith("v=DKIM1; k=rsa; p=MIIB")
    assert len(record.strings) == 2
    assert all(len(s) <= 255 for s in record.strings) and "".join(record.strings) == record.value
    public = serialization.load_der_public_key(base64.b64decode(record.value.partition("p=")[2]))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    assert record.zone_line(3600) == (
        f's2026._domainkey.example.com. 3600 IN TXT ( "{record.strings[0]}" "{record.strings[1]}" )'
    )


def test_ed25519_dns_record_is_the_raw_public_key() -> None:
    key = DKIMKey(domain="example.com", selector="e", private_key=pem(ED25519), algorithm="ed25519")  # type: ignore[arg-type]
    record = key.dns_record()
    assert record.value.startswith("v=DKIM1; k=ed25519; p=") and len(record.strings) == 1
    assert len(base64.b64decode(record.value.partition("p=")[2])) == 32  # RFC 8463 §4.2


def test_dns_record_strings_are_at_most_255_octets() -> None:
    record = DNSRecord(name="s._domainkey.example.com", value="x" * 600)
    assert [len(s) for s in record.strings] == [255, 255, 90]


def test_generated_keys() -> None:
    assert b"BEGIN PRIVATE KEY" in generate_private_key(DKIMAlgorithm.ED25519_SHA256)
    for bits in (512, 8192):
        with pytest.raises(ConfigError, match="1024 to 4096"):
            generate_private_key(RSA, bits=bits)


def test_private_files_are_0600_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "new.pem"
    old_umask = os.umask(0)
    try:
        write_private_file(path, b"secret")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"secret"
    with pytest.raises(FileExistsError):
        write_private_file(path, b"other")
    link = tmp_path / "link.pem"
    link.symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(FileExistsError):
        write_private_file(link, b"other")
    assert not (tmp_path / "elsewhere.pem").exists()


def test_pem_text_given_as_a_path_is_refused_without_showing_it() -> None:
    """A PEM pasted as text (a TOML ``private_key = \"\"\"-----BEGIN ...\"\"\"``, an
    environment variable read in Python) is a str, so a path: the error said the file
    could not be read, naming the "file" - the whole private key, into logs and terminals."""
    text = pem(RSA).decode("ascii")
    with pytest.raises(ConfigError, match="PEM text") as caught:
        DKIMKey(domain="example.com", selector="s", private_key=text)
    body = text.splitlines()[1]
    assert body not in str(caught.value) and "PRIVATE KEY" not in str(caught.value)


def _secret_pieces(text: str) -> list[str]:
    """Every 16 characters of a PEM's base64, its line breaks gone: none may be shown."""
    body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    return [body[i : i + 16] for i in range(0, len(body) - 15, 8)]


@pytest.mark.parametrize("algorithm", [RSA, ED25519])
@pytest.mark.parametrize(
    "shape",
    [
        # The base64 of the DER key, one line: how secret stores and environment
        # variables often hold a key.
        lambda text: "".join(text.splitlines()[1:-1]),
        # The PEM's lines without the BEGIN line (a copy that missed the first line).
        lambda text: "\n".join(text.splitlines()[1:]),
    ],
    ids=["base64", "pem-without-begin"],
)
def test_key_material_given_as_a_path_is_refused_without_showing_it(
    algorithm: DKIMAlgorithm, shape: Callable[[str], str]
) -> None:
    # Such text is no path either: the error said the file could not be read, naming
    # the "file" - the private key, into logs and terminals.
    text = pem(algorithm).decode("ascii")
    given = shape(text)
    with pytest.raises(ConfigError, match="not a file path") as caught:
        DKIMKey(domain="example.com", selector="s", private_key=given, algorithm=algorithm)
    shown = str(caught.value)
    assert not [piece for piece in _secret_pieces(text) if piece in shown], shown
    # The doctor reads a key file through the same reader.
    with pytest.raises(ConfigError, match="not a file path") as caught:
        keys_module.read_key_file(given, owner_only=False)
    assert not [piece for piece in _secret_pieces(text) if piece in str(caught.value)]


@pytest.mark.parametrize("with_public", [False, True], ids=["seed", "seed+public"])
def test_a_raw_ed25519_key_given_as_a_path_is_refused_without_showing_it(
    with_public: bool,
) -> None:
    # dkimpy's dknewkey keeps an Ed25519 key as the base64 of its 32-octet seed (libsodium
    # and rspamd as 64 octets, the public half appended): 44 or 88 characters, too short
    # or no DER, so the error said the "file" could not be read, naming the key.
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    if with_public:
        raw += key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    given = base64.b64encode(raw).decode("ascii")
    with pytest.raises(ConfigError, match="not a file path") as caught:
        DKIMKey(domain="example.com", selector="s", private_key=given, algorithm=ED25519)
    pieces = [given[i : i + 12] for i in range(0, len(given) - 11, 4)]
    assert not [piece for piece in pieces if piece in str(caught.value)], caught.value
    # The doctor reads a key file through the same reader.
    with pytest.raises(ConfigError, match="not a file path") as caught:
        keys_module.read_key_file(given, owner_only=False)
    assert not [piece for piece in pieces if piece in str(caught.value)], caught.value


def dknewkey_seed() -> tuple[bytes, str]:
    """An Ed25519 key file's content as dkimpy's ``dknewkey --ktype ed25519`` writes it
    (the base64 of the 32-octet seed, one line, no line end), and its public key in
    base64, both made by PyNaCl as dkimpy makes them."""
    import nacl.encoding
    import nacl.signing

    signing = nacl.signing.SigningKey.generate()
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode("ascii")
    return signing.encode(encoder=nacl.encoding.Base64Encoder), public


@pytest.mark.parametrize("line_end", [b"", b"\n"])
def test_a_raw_ed25519_seed_file_is_loaded_as_dkimpy_reads_it(
    tmp_path: Path, line_end: bytes
) -> None:
    """dkimpy-milter signs with the seed file ``dknewkey`` writes; loading it said "not
    a PEM private key (Unable to load PEM file. See https://cryptography.io/...
    MalformedFraming)". It signs here too, with the key dkimpy reads from it."""
    seed, public = dknewkey_seed()
    path = key_file(tmp_path, seed + line_end, name="example.com.s.key")
    key = DKIMKey(domain="example.com", selector="s", private_key=path, algorithm=ED25519)
    assert key.bits == 256
    assert key.dns_record().value == f"v=DKIM1; k=ed25519; p={public}"
    from_bytes = DKIMKey(domain="example.com", selector="s", private_key=seed, algorithm=ED25519)
    assert from_bytes.sign(b"data") == key.sign(b"data")  # Ed25519 is deterministic
    clone = pickle.loads(pickle.dumps(key))  # a worker process loads it from the content
    assert clone.sign(b"data") == key.sign(b"data")
    assert "'<PEM>'" in repr(from_bytes) and seed.decode() not in repr(from_bytes)
    # The doctor reads it as the signer does.
    from mailstrom.doctor.dkim import public_key

    assert (public_key(seed).kind, public_key(seed).p) == ("ed25519", public)


def test_a_raw_ed25519_seed_needs_the_ed25519_algorithm(tmp_path: Path) -> None:
    seed, _ = dknewkey_seed()
    with pytest.raises(ConfigError, match="rsa-sha256 needs an RSA key, got Ed25519 key"):
        DKIMKey(domain="example.com", selector="s", private_key=key_file(tmp_path, seed))


def test_a_raw_ed25519_key_with_its_public_half_is_refused_naming_the_form(
    tmp_path: Path,
) -> None:
    # libsodium and rspamd keep the seed and the public key, 64 octets; dkimpy (PyNaCl's
    # SigningKey) refuses that too, so mailstrom says which form to give, not showing it.
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ) + key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    given = base64.b64encode(raw)
    with pytest.raises(ConfigError, match=r"64 octets.*base64 of its first 32 octets") as caught:
        DKIMKey(
            domain="example.com",
            selector="s",
            private_key=key_file(tmp_path, given + b"\n"),
            algorithm=ED25519,
        )
    text = given.decode()
    pieces = [text[i : i + 12] for i in range(0, len(text) - 11, 4)]
    assert not [piece for piece in pieces if piece in str(caught.value)], caught.value


@pytest.mark.parametrize(
    "data",
    [b"not a key at all\n", base64.b64encode(b"x" * 31), b"\x30\x82\x01\x02binary"],
    ids=["text", "31 octets", "binary"],
)
def test_a_file_that_is_neither_pem_nor_a_raw_seed_names_the_forms_expected(
    tmp_path: Path, data: bytes
) -> None:
    with pytest.raises(
        ConfigError, match=r"not a PEM private key, nor an Ed25519 key in base64 \(its 32-octet"
    ) as caught:
        DKIMKey(
            domain="example.com",
            selector="s",
            private_key=key_file(tmp_path, data),
            algorithm=ED25519,
        )
    assert "cryptography.io" not in str(caught.value)


def test_a_path_that_is_no_key_is_named_in_the_error(tmp_path: Path) -> None:
    # Paths of base64 characters that decode to no key are named as they are.
    for name in ("MIIEvQIBADANBgkqhkiG", "keys/M2026/dkimkeyfile1"):
        path = tmp_path / name
        with pytest.raises(ConfigError, match=f"cannot read {path}"):
            DKIMKey(domain="example.com", selector="s", private_key=str(path))
