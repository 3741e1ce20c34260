"""SMTP TLS reporting (RFC 8460): counting TLS sessions and writing daily reports."""

from mailstrom.tlsrpt.sessions import PolicyType, ResultType, TLSSessions

__all__ = ["PolicyType", "ResultType", "TLSSessions"]
