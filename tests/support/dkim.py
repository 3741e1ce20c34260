"""DKIM in tests: keys, publishing them on the loopback DNS server, and two verifiers that
share no code with mailstrom's signer.

- :func:`verify_dkimpy`: dkimpy (Python; RSA and Ed25519), given a DNS function that asks
  the loopback server with dnspython;
- :func:`verify_mail_dkim`: Perl's Mail::DKIM (RSA only in Debian 12's version; it reports
  Ed25519 signatures as an unsupported algorithm), pointed at the same server with
  Net::DNS. Installed by ``scripts/ensure-system-deps dkim`` (``make test`` runs it); a
  test using it is skipped where it is missing.

Both get the public key only from DNS, as a receiver does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import dkim as dkimpy
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailstrom.dkim import DKIMAlgorithm, DKIMConfig, DKIMKey, generate_private_key
from tests.fixtures.dns_server import LoopbackDNS

_PEMS: dict[DKIMAlgorithm, bytes] = {}
_MAIL_DKIM = Path(__file__).with_name("mail_dkim_verify.pl")
_TAGS = re.compile(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", re.M | re.S | re.I)


def pem(algorithm: DKIMAlgorithm) -> bytes:
    """A private key of ``algorithm`` (RSA: 2048 bits), made once per test session."""
    if algorithm not in _PEMS:
        _PEMS[algorithm] = generate_private_key(algorithm)
    return _PEMS[algorithm]


RSA = DKIMAlgorithm.RSA_SHA256
ED25519 = DKIMAlgorithm.ED25519_SHA256

# Well-formed EC keys on curves OpenSSL 3 cannot load (made with `openssl ecparam -genkey`
# for these tests): cryptography raises UnsupportedAlgorithm, not ValueError, for them.
EC_SECP112R1 = b"""-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDhsN15PU+0a994+xpfyYoAcGBSuBBAAGoSADHgAEHvd3K8gk8zK0x50V
X3XM8xhqrBP7teujKQOLOA==
-----END EC PRIVATE KEY-----
"""
EC_BRAINPOOLP160R1 = b"""-----BEGIN EC PRIVATE KEY-----
MFQCAQEEFF2MQfs7EZvdMPnmPfhhHq3vlfW+oAsGCSskAwMCCAEBAaEsAyoABEKh
MTinV22jDYqNTT3T0djGQcWYO/HkfvTuThrLAyf9bq0U0mn6ETo=
-----END EC PRIVATE KEY-----
"""
UNSUPPORTED_CURVE_PEMS = (EC_SECP112R1, EC_BRAINPOOLP160R1)
# The SubjectPublicKeyInfo of a (dummy) secp112r1 point: what a p= tag could hold.
EC_SECP112R1_SPKI = bytes.fromhex("3032301006072a8648ce3d020106052b81040006031e0004" + "00" * 28)


def unchecked_rsa_pem(bits: int) -> bytes:
    """An RSA private key of ``bits`` bits made at once, of random odd "primes": a
    structurally sound PEM that is no valid key."""
    half = bits // 2
    p, q = (int.from_bytes(os.urandom(half // 8), "big") | (3 << (half - 2)) | 1 for _ in "pq")
    e, d = 65537, 3
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), 1, rsa.RSAPublicNumbers(e, p * q)
    )
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


T = TypeVar("T")


def read_from_fifo(fifo: Path, read: Callable[[Path], T], *, within: float = 2.0) -> T:
    """``read(fifo)``'s result (or its exception), failing the test when it has not
    returned ``within`` seconds: a reader that opens a FIFO plainly blocks until a writer
    comes. The writer that then releases it is this function's, so no thread is left."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(read(fifo))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked open()
        thread.join(within)
        pytest.fail(f"reading the FIFO {fifo} blocked for {within} s")
    [result] = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def key(domain: str, selector: str, algorithm: DKIMAlgorithm = RSA) -> DKIMKey:
    return DKIMKey(
        domain=domain, selector=selector, private_key=pem(algorithm), algorithm=algorithm
    )


def dual(domain: str = "sender.test", **options: object) -> DKIMConfig:
    """An RSA-2048 and an Ed25519 key for ``domain`` (selectors ``rsa`` and ``ed``)."""
    keys = (key(domain, "rsa", RSA), key(domain, "ed", ED25519))
    return DKIMConfig(keys=keys, **options)  # type: ignore[arg-type]


def publish(server: LoopbackDNS, config: DKIMConfig) -> None:
    """Serve the TXT record of every key of ``config``, as ``dkim keygen`` prints it."""
    for k in config.keys:
        record = k.dns_record()
        server.txt(record.name, record.strings)


@dataclass(frozen=True, slots=True)
class Verdict:
    domain: str
    algorithm: str
    result: str
    """``pass``, ``fail``, or another word the verifier uses (``invalid``, ...)."""
    detail: str = ""


def signature_tags(data: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field of ``data``, top first, FWS removed."""
    head = data[: data.find(b"\r\n\r\n") + 2]
    out = []
    for match in _TAGS.finditer(head):
        text = re.sub(rb"\s+", b"", match[1]).decode("ascii")
        out.append(dict(tag.split("=", 1) for tag in text.strip(";").split(";")))
    return out


def txt_lookup(server: LoopbackDNS) -> Callable[..., bytes | None]:
    """dkimpy's ``dnsfunc``: the TXT record of a name, asked of the loopback server only."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.address]
    resolver.port = server.port

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return lookup


def verify_dkimpy(data: bytes, server: LoopbackDNS) -> list[Verdict]:
    """dkimpy's verdict on each signature of ``data``, top first."""
    lookup = txt_lookup(server)
    checker = dkimpy.DKIM(data)
    verdicts = []
    for index, tags in enumerate(signature_tags(data)):
        try:
            ok, detail = checker.verify(idx=index, dnsfunc=lookup), ""
        except dkimpy.DKIMException as exc:  # e.g. a body hash mismatch
            ok, detail = False, str(exc)
        verdicts.append(Verdict(tags["d"], tags["a"], "pass" if ok else "fail", detail))
    return verdicts


def mail_dkim_available() -> bool:
    if shutil.which("perl") is None:
        return False
    probe = ["perl", "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-e1"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def verify_mail_dkim(data: bytes, server: LoopbackDNS) -> list[Verdict]:
    """Mail::DKIM's verdict on each signature of ``data``; skips the test without it."""
    if not mail_dkim_available():
        pytest.skip("Perl's Mail::DKIM is missing: run scripts/ensure-system-deps dkim")
    done = subprocess.run(
        ["perl", str(_MAIL_DKIM), str(server.port)],
        input=data,
        capture_output=True,
        timeout=60,
        check=True,
    )
    verdicts = []
    for line in done.stdout.decode().splitlines():
        domain, _selector, algorithm, result, *detail = line.split(" ")
        verdicts.append(Verdict(domain, algorithm, result, " ".join(detail)))
    return verdicts


def assert_all_pass(data: bytes, server: LoopbackDNS, *, signatures: int = 2) -> None:
    """Every signature passes dkimpy; the RSA ones pass Mail::DKIM too (where installed),
    which may only call Ed25519 unsupported."""
    verdicts = verify_dkimpy(data, server)
    assert len(verdicts) == signatures, verdicts
    assert all(v.result == "pass" for v in verdicts), verdicts
    if mail_dkim_available():
        for v in verify_mail_dkim(data, server):
            if v.algorithm == "rsa-sha256":
                assert v.result == "pass", v
            else:
                assert v.result == "pass" or "unsupported" in v.detail, v


def assert_all_fail(data: bytes, server: LoopbackDNS) -> None:
    """No signature of ``data`` passes either verifier."""
    verdicts = verify_dkimpy(data, server)
    assert verdicts and all(v.result != "pass" for v in verdicts), verdicts
    if mail_dkim_available():
        assert all(v.result != "pass" for v in verify_mail_dkim(data, server))
