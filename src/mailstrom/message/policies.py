"""The stdlib ``email`` header registry mailstrom decodes header text with."""

from __future__ import annotations

from email.headerregistry import BaseHeader, HeaderRegistry

from mailstrom.message.unstructured import (
    LinearUnstructuredHeader,
    UniqueLinearUnstructuredHeader,
)


class CachingHeaderRegistry(HeaderRegistry):
    """A :class:`~email.headerregistry.HeaderRegistry` that builds each header class once.

    The stock registry creates a new class with ``type()`` on every header it parses,
    which costs more than parsing a simple header; caching halves the cost of building a
    message. Concurrent first use at worst builds a class twice, which is harmless.

    Unstructured fields (Subject, and every field the registry does not know) are parsed
    by :func:`~mailstrom.message.unstructured.parse_unstructured`, as the stdlib parses
    them but in work that grows with the length, not its square.
    """

    def __init__(self) -> None:
        super().__init__(default_class=LinearUnstructuredHeader)
        self.registry["subject"] = UniqueLinearUnstructuredHeader
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


HEADER_FACTORY = CachingHeaderRegistry()
"""Parses one header value the way ``email.policy.default`` does: ``(name, value)``."""
