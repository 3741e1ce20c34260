"""The TLS context of hook requests over HTTPS: made once, not for every request, and
never kept trusting no CA when this host could not read them."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailstrom.runtime.hook_post import post
from tests.fixtures.https_server import Answer


def _trusting(tls_ca: trustme.CA, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the session's CA this process's "system" trust store, from a file of its own."""
    tls_ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))


def _counting_contexts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every verifying context made from now on (by http.client's default too,
    which calls ``create_default_context`` under another name)."""
    made: list[int] = []
    original = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    monkeypatch.setattr(ssl, "_create_default_https_context", counted)
    return made


def test_hook_requests_over_https_share_one_verifying_context(
    https_server: Any, tls_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request made its own context, loading the whole system trust store again: 22
    ms of CPU a request here (144 CAs), paid for every batch of events a worker sent."""
    _trusting(tls_ca, tmp_path / "ca.pem", monkeypatch)
    server = https_server(names=("localhost",))
    server.routes["/h"] = Answer(status=200)
    made = _counting_contexts(monkeypatch)
    for _ in range(5):
        assert post(f"https://localhost:{server.port}/h", b"{}", {}, timeout=10.0) is None
    assert len(made) == 1
    assert server.count("/h") == 5


def test_a_new_ca_file_in_the_environment_is_the_one_trusted(
    https_server: Any, tls_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context kept is the one of the CA file the environment names now: a CA file
    named later is read, not the first one kept for the process's life."""
    server = https_server(names=("localhost",))
    server.routes["/h"] = Answer(status=200)
    url = f"https://localhost:{server.port}/h"
    other = trustme.CA()
    _trusting(other, tmp_path / "other.pem", monkeypatch)
    untrusted = post(url, b"{}", {}, timeout=10.0)
    assert untrusted is not None and "CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted
    _trusting(tls_ca, tmp_path / "ca.pem", monkeypatch)
    assert post(url, b"{}", {}, timeout=10.0) is None


SHORT_THEN_BACK = textwrap.dedent(
    """
    import json, os, resource, sys
    from mailstrom.runtime.hook_post import post

    url = sys.argv[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = [int(fd) for fd in os.listdir("/proc/self/fd")]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(held) + 16, hard))
    filler = []
    while True:  # every descriptor under the limit taken
        try:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    short = post(url, b"{}", {}, timeout=10.0)
    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(json.dumps([short, post(url, b"{}", {}, timeout=10.0)]))
    """
)


def test_a_request_short_of_a_descriptor_for_the_cas_fails_and_the_next_trusts_them(
    https_server: Any, tls_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (in a process of its own: pytest and the server keep theirs),
    the CA file cannot be read: the request fails as this host's shortage (its batch is
    given back and sent again with backoff, as for any failure), and no context trusting
    no CA is kept, so the next request, once descriptors are back, checks the certificate
    against the CAs and succeeds."""
    _trusting(tls_ca, tmp_path / "ca.pem", monkeypatch)
    server = https_server(names=("localhost",))
    server.routes["/h"] = Answer(status=200)
    url = f"https://localhost:{server.port}/h"
    ran = subprocess.run(
        [sys.executable, "-c", SHORT_THEN_BACK, url], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    short, back = json.loads(ran.stdout)
    assert short is not None and short.startswith("local resource shortage: "), short
    assert back is None
    assert server.count("/h") == 1
