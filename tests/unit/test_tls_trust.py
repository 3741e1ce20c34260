"""verifying_context(): a CA file this host cannot read for want of a descriptor is told
(LocalResourceShortage); any other trouble reading it is what it was before, a context
that trusts what it could load (the CA directory still works)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from mailstrom.tls.trust import verifying_context


def test_a_system_ca_file_unreadable_for_another_reason_leaves_the_context_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The system's CA file loads nothing and, read again, fails with an error that is
    no shortage (here EISDIR; EACCES, EIO, a file gone meanwhile alike): the context is
    returned as create_default_context made it, its CA directory still usable. Was: that
    error was raised, a bare OSError no caller expects, and every verified session of
    the worker crashed where it had verified against the CA directory."""
    paths = ssl.get_default_verify_paths()
    monkeypatch.setattr(
        ssl, "get_default_verify_paths", lambda: paths._replace(cafile=str(tmp_path))
    )
    monkeypatch.setattr(
        ssl, "create_default_context", lambda cafile=None: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    )
    context = verifying_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 0
