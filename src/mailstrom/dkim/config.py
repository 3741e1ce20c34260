"""DKIM settings (``Config.dkim``): the keys, and which of them sign which message.

Kept apart from the signing itself so that :class:`~mailstrom.config.Config` can name the
type at run time (``typing.get_type_hints(Config)`` resolves it) without loading the
signer; ``cryptography`` is still imported only when a key is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from mailstrom.bounds import check_bool, check_duration
from mailstrom.dkim.keys import DKIMKey
from mailstrom.dkim.signature import DKIMAlgorithm
from mailstrom.errors import ConfigError

log = logging.getLogger("mailstrom.dkim")


@dataclass(frozen=True, slots=True, kw_only=True)
class DKIMConfig:
    """DKIM signing at submission (``Config.dkim``).

    >>> DKIMConfig(keys=(
    ...     DKIMKey(domain="example.com", selector="s2026r", private_key="/etc/dkim/r.pem"),
    ...     DKIMKey(domain="example.com", selector="s2026e", private_key="/etc/dkim/e.pem",
    ...             algorithm="ed25519-sha256"),
    ... ), required=True)  # doctest: +SKIP

    A message is signed by every key of the most specific key domain that equals, or is
    a parent of, the domain of a From address (DMARC relaxed alignment, RFC 7489 §3.1.1):
    with keys for ``example.com`` and ``news.example.com``, mail from
    ``a@news.example.com`` is signed by the ``news.example.com`` keys only, mail from
    ``a@shop.example.com`` by the ``example.com`` keys. Keys of one domain are typically
    an RSA and an Ed25519 key (RFC 8463 §4 suggests signing with both); a domain with
    Ed25519 keys only is logged as a warning (``mailstrom.dkim``). A message no key
    matches is sent unsigned, or refused with
    :class:`~mailstrom.errors.NoDKIMKey` when ``required`` is true.

    The worker signs a queued message again with these keys when no signature of a
    domain they sign for is by one of them any more, or none of an algorithm the domain
    has a key of while one of that algorithm is by a key no longer configured, or none of
    its RSA signatures is while the domain has an RSA key, or one it made itself at
    ``send_email`` is by a key no longer configured while the domain has one of its
    algorithm (keys rotated, or a subdomain's or a parent's removed, while it waited),
    or one it made is by a key replaced since under the same selector and algorithm
    (told by the key's fingerprint, ``mailstrom_key_id=``, in the signature), or its
    signature's ``x=`` is about to pass (:func:`~mailstrom.dkim.signing.resign_stale`).
    """

    keys: Sequence[DKIMKey] = ()
    required: bool = False
    """Refuse (``NoDKIMKey``) a message that no key can sign, instead of sending it
    unsigned."""
    expire: timedelta | None = None
    """Signatures carry ``x=`` this long after the message may first be sent (its ``t=``,
    or its ``send_at`` when later); receivers treat a signature past it as invalid (RFC
    6376 §3.5). An attempt sends the bytes signed at queueing unless their ``x=`` passes
    within the hour: the worker then signs the message again with these keys
    (:func:`~mailstrom.dkim.signing.resign_stale`). ``None``: no expiry."""
    _by_domain: dict[str, tuple[DKIMKey, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _selectors: dict[str, frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _algorithms: dict[str, frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _names: dict[str, frozenset[tuple[bytes, bytes]]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _below: dict[str, tuple[str, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _key_ids: dict[tuple[str, bytes, bytes], bytes] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        given = self.keys
        # One key without a tuple around it raised TypeError ("not iterable"); a string is
        # a sequence too, of one-letter "keys": refused, not split.
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise ConfigError(
                f"dkim.keys: expected a sequence of DKIMKey values, got {type(given).__name__}"
            )
        keys = tuple(given)
        object.__setattr__(self, "keys", keys)
        seen: set[tuple[str, str]] = set()
        for key in keys:
            if not isinstance(key, DKIMKey):
                raise ConfigError(f"dkim.keys must be DKIMKey values, not {type(key).__name__}")
            # DNS names ignore case (RFC 4343): S1 and s1 name one record, one key.
            name = (key.domain, key.selector.lower())
            if name in seen:
                raise ConfigError(
                    f"dkim key {key.domain}/{key.selector} is configured twice; a selector "
                    "names one key (in any case: DNS names ignore it)"
                )
            seen.add(name)
            selector = key.selector.lower().encode("ascii")
            algorithm = key.algorithm.value.encode("ascii")
            self._key_ids[key.domain, selector, algorithm] = key.key_id().encode("ascii")
            self._by_domain[key.domain] = (*self._by_domain.get(key.domain, ()), key)
        for domain, found in self._by_domain.items():
            self._selectors[domain] = frozenset(k.selector.lower() for k in found)
            self._algorithms[domain] = frozenset(k.algorithm.value for k in found)
            self._names[domain] = frozenset(
                (k.selector.lower().encode("ascii"), k.algorithm.value.encode("ascii"))
                for k in found
            )
            parent = domain.find(".")
            while parent != -1:
                above = domain[parent + 1 :]
                self._below[above] = (*self._below.get(above, ()), domain)
                parent = domain.find(".", parent + 1)
            if all(k.algorithm is DKIMAlgorithm.ED25519_SHA256 for k in found):
                # Said where it is configured, as a small RSA key is: the mail goes out
                # signed, and only the DMARC reports of the receivers that drop it tell.
                log.warning(
                    "dkim keys for %s are Ed25519 only: RFC 8301 obliges verifiers to "
                    "rsa-sha256 alone, and a receiver that does not verify Ed25519 (RFC "
                    "8463) sees mail from %s and its subdomains as unsigned, which fails "
                    "DMARC there; add an RSA key for it (mailstrom dkim keygen --domain %s)",
                    domain,
                    domain,
                    domain,
                )
        if self.expire is not None:
            check_duration(self.expire, "dkim.expire")
        check_bool(self.required, "dkim.required")
        if self.required and not keys:
            raise ConfigError("dkim.required is set but no dkim.keys are configured")

    def selectors(self, domain: str) -> frozenset[str]:
        """The selectors (lower-case) of the keys of ``domain`` (a lower-case A-label,
        the ``d=`` of a signature) itself, not of a parent; empty when it has none. A
        signature of ``domain`` by another selector was made by a key rotated away."""
        return self._selectors.get(domain, frozenset())

    def key_names(self, domain: str) -> frozenset[tuple[bytes, bytes]]:
        """``(s=, a=)`` (ASCII octets, the selector lower-case) of each key of ``domain`` (a
        lower-case A-label, the ``d=`` of a signature) itself; empty when it has none. A
        signature of ``domain`` is by a key configured now only when its ``s=`` and
        ``a=`` name one: a selector given to a key of another algorithm since publishes
        that key, which the signature no longer verifies with."""
        return self._names.get(domain, frozenset())

    def key_id(self, domain: str, selector: bytes, algorithm: bytes) -> bytes | None:
        """The :meth:`DKIMKey.key_id` (ASCII octets) of the key of ``domain`` (a
        lower-case A-label) named by ``selector`` (lower-case) and ``algorithm`` (the
        ``s=`` and ``a=`` of a signature); None when no key is. A signature whose
        ``mailstrom_key_id=`` differs was made by a key since replaced under that name."""
        return self._key_ids.get((domain, selector, algorithm))

    def algorithms(self, domain: str) -> frozenset[str]:
        """The ``a=`` values of the keys of ``domain`` (a lower-case A-label, the ``d=``
        of a signature) itself; empty when it has none."""
        return self._algorithms.get(domain, frozenset())

    def has_rsa(self, domain: str) -> bool:
        """Whether ``domain`` (a lower-case A-label, the ``d=`` of a signature) itself
        has an RSA key: the signature every verifier checks (RFC 8301)."""
        return DKIMAlgorithm.RSA_SHA256.value in self.algorithms(domain)

    def signing_domain(self, domain: str) -> str | None:
        """The key domain whose keys sign mail from ``domain`` (a lower-case A-label):
        ``domain`` itself when it has keys, else its most specific parent that has;
        None when none has (:func:`signing_domain_for`)."""
        return signing_domain_for(domain, self._by_domain)

    def domains_below(self, domain: str) -> tuple[str, ...]:
        """The key domains below ``domain`` (a lower-case A-label, the ``d=`` of a
        signature): ``news.example.com`` of ``example.com``; empty when none is. Mail
        from one of them was signed by ``domain``'s keys while it had keys and they had
        none (:func:`~mailstrom.dkim.signing.resign_stale`)."""
        return self._below.get(domain, ())

    def keys_for(self, domains: Iterable[str]) -> tuple[DKIMKey, ...]:
        """The keys that sign mail from ``domains`` (lower-case A-labels, the From
        addresses' domains), without repeats; empty when none aligns."""
        found: list[DKIMKey] = []
        for domain in domains:
            name = signing_domain_for(domain, self._by_domain)
            if name is not None:
                found.extend(k for k in self._by_domain[name] if k not in found)
        return tuple(found)


def signing_domain_for(domain: str, key_domains: Container[str]) -> str | None:
    """The one of ``key_domains`` whose keys sign mail from ``domain``: the most specific
    that equals it or is a parent of it (DMARC relaxed alignment); None when none is.
    ``mailstrom doctor`` asks it too, so that it judges the keys the signer would use.

    >>> signing_domain_for("a.news.example.com", {"example.com", "news.example.com"})
    'news.example.com'
    """
    name = domain
    while name not in key_domains:
        dot = name.find(".")
        if dot == -1:
            return None
        name = name[dot + 1 :]
    return name
