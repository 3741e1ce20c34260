"""verifying_context(): a CA file this host cannot read for want of a descriptor is told
(LocalResourceShortage); any other trouble reading it is what it was before, a context
that trusts what it could load (the CA directory still works). The CA directory is read
when the context is made: a handshake out of descriptors needs none to verify."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trustme
from tests.support.certs import hashed_ca_directory

from mailstrom.tls import trust
from mailstrom.tls.trust import verifying_context

ROOT = Path(__file__).parents[2]


def test_a_system_ca_file_unreadable_for_another_reason_leaves_the_context_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The system's CA file loads nothing and, read again, fails with an error that is
    no shortage (here EISDIR; EACCES, EIO, a file gone meanwhile alike): the context is
    returned as create_default_context made it, its CA directory still usable. Was: that
    error was raised, a bare OSError no caller expects, and every verified session of
    the worker crashed where it had verified against the CA directory."""
    paths = ssl.get_default_verify_paths()
    no_directory = paths._replace(cafile=str(tmp_path), openssl_capath=str(tmp_path / "none"))
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: no_directory)
    monkeypatch.delenv(paths.openssl_capath_env, raising=False)
    monkeypatch.setattr(
        ssl, "create_default_context", lambda cafile=None: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    )
    context = verifying_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 0


HANDSHAKE_WITHOUT_DESCRIPTORS = textwrap.dedent(
    """
    import encodings.idna, json, os, resource, ssl, sys
    from mailstrom.tls.trust import verifying_context
    from mailstrom.tls_spec import TLSContextSpec

    if sys.argv[2] == "rebuilt":  # as a worker process rebuilds a context of the system's
        client = TLSContextSpec.of(ssl.create_default_context()).build()
    else:
        client = verifying_context()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(sys.argv[1])
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        # In memory: the handshake itself needs no descriptor.
        to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        ends = [
            client.wrap_bio(to_client, to_server, server_hostname="mx.test"),
            server.wrap_bio(to_server, to_client, server_side=True),
        ]
        outcome = "unfinished"
        for _ in range(8):
            for end in ends:
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as exc:
                    outcome = exc.verify_message
                except ssl.SSLError:
                    pass  # the server, told the client refused its certificate
                else:
                    if end is ends[0] and outcome == "unfinished":
                        outcome = "verified"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(json.dumps(outcome))
    """
)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
@pytest.mark.parametrize("context", ["verifying", "rebuilt"])
def test_a_ca_of_the_system_directory_verifies_a_certificate_out_of_descriptors(
    tmp_path: Path, context: str
) -> None:
    """A CA that ``SSL_CERT_DIR`` holds, first needed while this host has no descriptor
    left: the certificate it signed is verified, by the context of the system's CAs and
    by a worker process's copy of an application's context that trusts them. OpenSSL
    opened the directory's file only then, and could not: "unable to get local issuer
    certificate", the server's certificate blamed for this host's shortage."""
    ca = trustme.CA()
    directory = hashed_ca_directory(tmp_path / "cas", trustme.CA(), ca)
    chain = tmp_path / "server.pem"
    ca.issue_cert("mx.test").private_key_and_cert_chain_pem.write_to_path(str(chain))
    proc = subprocess.run(
        [sys.executable, "-c", HANDSHAKE_WITHOUT_DESCRIPTORS, str(chain), context],
        env=os.environ
        | {
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            ssl.get_default_verify_paths().openssl_capath_env: str(directory),
        },
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == "verified"


def test_the_files_read_from_ca_directories_are_bounded_all_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound on certificate files read when the context is made (on the event loop)
    is one for every directory ``SSL_CERT_DIR`` names, not one per directory: eight
    directories were eight times the time."""
    first = hashed_ca_directory(tmp_path / "one", *(trustme.CA() for _ in range(3)))
    second = hashed_ca_directory(tmp_path / "two", *(trustme.CA() for _ in range(3)))
    variable = ssl.get_default_verify_paths().openssl_capath_env
    monkeypatch.setenv(variable, "")  # set and empty: no directory at all
    none = verifying_context().cert_store_stats()["x509_ca"]
    monkeypatch.setenv(variable, os.pathsep.join([str(first), str(second)]))
    assert verifying_context().cert_store_stats()["x509_ca"] == none + 6
    monkeypatch.setattr(trust, "_MAX_DIRECTORY_FILES", 4)
    assert verifying_context().cert_store_stats()["x509_ca"] == none + 4
