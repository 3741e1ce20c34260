"""MTA-STS records and policies (RFC 8461): parsing, validation and MX matching, pure.

Two texts come from a recipient domain that publishes MTA-STS:

* the ``_mta-sts.<domain>`` TXT record, ``v=STSv1; id=20240101T000000;`` (§3.1), whose
  ``id`` changes whenever the policy does — :func:`parse_sts_record`;
* the policy file at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (§3.2)::

      version: STSv1
      mode: enforce
      mx: mail.example.com
      mx: *.example.net
      max_age: 604800

  — :func:`parse_policy`.

Everything here is hostile input: its size is bounded (so the count of patterns is), and
anything that does not follow the grammar raises :class:`PolicyError` with the reason, so the
caller can log it and treat the domain as having no (new) policy.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from mailstrom.errors import MailstromError
from mailstrom.message.chars import shorten
from mailstrom.policy.throttle import CLOCK_SET_BACK

MAX_POLICY_SIZE = 64 * 1024
"""Octets of a policy file read at most (RFC 8461 §3.3 lets senders bound it; 64 KiB is the
size the RFC's examples and the major implementations use)."""
MAX_MX_PATTERNS = MAX_POLICY_SIZE // len("mx:a\n")
"""``mx`` patterns a policy can hold at most: no bound of its own (RFC 8461 §3.2 sets
none), only the one :data:`MAX_POLICY_SIZE` implies; a repeated pattern is kept once."""
MAX_AGE_LIMIT = 31_557_600
"""The largest ``max_age`` RFC 8461 §3.2 allows (about one year), in seconds; a larger one
(the grammar takes ten digits) is read as this."""
MIN_CACHE = 60
"""Seconds a policy is kept at least, whatever its ``max_age`` says, so that a domain
publishing ``max_age: 0`` does not cost one HTTPS fetch per message."""

REFRESH_AFTER = timedelta(days=1)
"""The longest a cached policy goes without a fetch while mail flows to its domain."""
TOO_LARGE = "sts-policy-too-large"
"""The ``failure-reason-code`` of a policy over :data:`MAX_POLICY_SIZE` (parsed or read)."""
_SYNTAX = "sts-policy-syntax-error"
_NO_MX = "sts-policy-no-mx"

_RECORD_START = re.compile(r"v=STSv1[ \t]*;")
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # fullmatch: "$" would let a final "\n" in
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Control characters but TAB (WSP) and the LF lines end with, once CR LF is made LF; and
# what safetext calls unsafe beyond them (line and paragraph separators, bidi controls):
# the policy's text is stored, reported and shown as it came.
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_MAX_AGE = re.compile(r"^[0-9]{1,10}$")
_WSP = " \t"
"""RFC 5234's WSP, the only white space the policy grammar has (``str.strip()`` would
also take a no-break space, U+3000 and the like)."""


class PolicyError(MailstromError, ValueError):
    """An MTA-STS record or policy that cannot be used; ``reason`` says why and
    ``result_type`` is the RFC 8460 §4.3 failure type it is reported under, ``code`` its
    ``failure-reason-code`` (the result type when not given).

    The code is one short name per kind of failure: the reason quotes the peer's values,
    addresses and the time a connection was given, and as the code each variant of one
    failure was a failure detail of its own in a report, with its own count."""

    def __init__(
        self, reason: str, *, result_type: str = "sts-policy-invalid", code: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result_type = result_type
        self.code = code or result_type


class Mode(StrEnum):
    """What a policy asks of senders (RFC 8461 §5)."""

    ENFORCE = "enforce"
    """Deliver only to matching MX hosts, over TLS with a valid certificate."""
    TESTING = "testing"
    """Deliver as usual; report what would have failed."""
    NONE = "none"
    """The domain has withdrawn its policy."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A validated policy file (RFC 8461 §3.2)."""

    mode: Mode
    mx: tuple[str, ...]
    """Patterns of the MX hosts allowed, lower-case, without the final dot."""
    max_age: int
    """Seconds the policy may be cached (0 to :data:`MAX_AGE_LIMIT`)."""
    text: str
    """The policy as fetched (normalised to LF), for ``check`` and TLS reports."""
    ignored: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    """``mx`` values that are no pattern, as published: they allow no host. Known when the
    policy is fetched (for logs and ``check``); not stored, as they change nothing."""

    def allows(self, host: str) -> bool:
        """Whether MX ``host`` matches one of the patterns (RFC 8461 §4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    @property
    def lines(self) -> list[str]:
        """The policy's lines, as RFC 8460 §4.4's ``policy-string`` wants them."""
        return [line for line in self.text.split("\n") if line.strip()]


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedPolicy:
    """A policy as the store keeps it for all workers: fetched under the TXT record's
    ``policy_id`` at ``fetched_at``, usable until ``expires_at``."""

    domain: str
    """The recipient (policy) domain, lower-case A-label."""
    policy_id: str
    policy: Policy
    fetched_at: datetime
    expires_at: datetime

    def fresh(self, now: datetime) -> bool:
        """Whether the policy may still be applied at ``now`` (RFC 8461 §5.1)."""
        return now < self.expires_at

    def refresh_due(self, now: datetime) -> bool:
        """Whether to fetch the policy again although its id did not change: half its
        lifetime (at most a day) has passed. RFC 8461 §10.2 asks senders to refresh before
        expiry, so that an attacker must block the fetch for the rest of the lifetime
        (not just at the moment it runs out) to make a sender forget the policy."""
        return now >= self._refresh_at(now)

    def look_again_at(self, now: datetime) -> datetime:
        """When a worker that remembers this policy must look at the domain again: when a
        refresh is due or, once that has passed (the refresh failed), when it expires."""
        refresh = self._refresh_at(now)
        return refresh if now < refresh else self.expires_at

    def rebased(self, now: datetime) -> CachedPolicy:
        """This policy, when a clock since set back fetched it (more than
        :data:`CLOCK_SET_BACK` ahead of ``now``), expiring its lifetime after ``now`` at the
        latest, else itself. When it was really fetched is not known, but not after
        ``now``; as that clock stamped it, it applied as far past its ``max_age`` as the
        clock had been ahead (a year) while its refresh failed. Its ``fetched_at`` stays
        as stamped, so its refresh stays due (every ``recheck``, as for any policy whose
        refresh failed), and a later call, at a later ``now``, moves the expiry no further."""
        if self.fetched_at - now <= CLOCK_SET_BACK:
            return self
        latest = now + timedelta(seconds=max(self.policy.max_age, MIN_CACHE))
        if self.expires_at <= latest:
            return self
        return dataclasses.replace(self, expires_at=latest)

    def _refresh_at(self, now: datetime) -> datetime:
        if self.fetched_at - now > CLOCK_SET_BACK:
            # Fetched by a clock since set back (a host a year ahead, corrected by NTP):
            # its refresh lay as far ahead, and a policy changed under the same id (the
            # domain's new MX host) went unseen all that time. Due now, until a fetch
            # replaces it; while that fails, rebased() bounds its expiry.
            return now
        lifetime = self.expires_at - self.fetched_at
        return self.fetched_at + min(lifetime / 2, REFRESH_AFTER)

    @classmethod
    def of(cls, domain: str, policy_id: str, policy: Policy, now: datetime) -> CachedPolicy:
        lifetime = max(policy.max_age, MIN_CACHE)
        return cls(
            domain=domain,
            policy_id=policy_id,
            policy=policy,
            fetched_at=now,
            expires_at=now + timedelta(seconds=lifetime),
        )


def normalize_host(host: str) -> str:
    """``host`` as patterns are compared with it: lower-case, without the final dot."""
    return host.strip().rstrip(".").lower()


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``pattern`` names ``host`` exactly, or ``*.rest`` where ``host`` is
    one label followed by ``rest`` (the wildcard covers exactly one label, the leftmost).

    >>> mx_matches("*.example.com", "mx1.example.com")
    True
    >>> mx_matches("*.example.com", "a.b.example.com")
    False
    """
    host = normalize_host(host)
    pattern = normalize_host(pattern)
    if not host or not pattern:
        return False
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_sts_record(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records (each record's strings joined), or
    None when there is no MTA-STS record. Raises :class:`PolicyError` when the domain's
    records are unusable: several STSv1 records, or one that breaks the grammar (RFC 8461
    §3.1 says to treat both as no policy; the caller decides what to keep).
    """
    # sts-field-delim is *WSP ";" *WSP: only SP and HTAB are trimmed (see _WSP).
    sts = [r for r in records if r.split(";", 1)[0].strip(_WSP) == "v=STSv1"]
    if len(sts) > 1:
        # §3.1: of several records, those not beginning with "v=STSv1;" are discarded
        # (its delimiter may have WSP before the ";"). A bare "v=STSv1" beside the real
        # record made two, and the domain no policy; alone, it stays a broken record.
        sts = [r for r in sts if _RECORD_START.match(r)]
    if not sts:
        return None
    if len(sts) > 1:
        raise PolicyError(
            f"{len(sts)} v=STSv1 TXT records (exactly one allowed)", code="sts-record-multiple"
        )
    fields = [f.strip(_WSP) for f in sts[0].split(";")]
    policy_id: str | None = None
    for field in fields[1:]:
        if not field:
            continue
        key, eq, value = field.partition("=")
        if not eq:
            raise PolicyError(
                f"TXT record field without '=': {shorten(field, 40)}",
                code="sts-record-syntax-error",
            )
        if key.strip(_WSP) == "id" and policy_id is None:
            policy_id = value.strip(_WSP)
    if policy_id is None:
        raise PolicyError("TXT record has no id field", code="sts-record-no-id")
    if not _RECORD_ID.fullmatch(policy_id):
        raise PolicyError(
            f"TXT record id {shorten(policy_id, 40)} is not 1-32 letters and digits",
            code="sts-record-invalid-id",
        )
    return policy_id


def _quote(value: str | None) -> str:
    """``value`` quoted for a reason: a value may be long, the reason stays short."""
    return repr(value if value is None or len(value) <= 40 else value[:40] + "...")


def _valid_pattern(pattern: str) -> bool:
    labels = pattern[2:].split(".") if pattern.startswith("*.") else pattern.split(".")
    return len(pattern) <= 253 and len(labels) >= 1 and all(_LABEL.match(x) for x in labels)


def parse_policy(body: bytes) -> Policy:
    """Validate a policy file (RFC 8461 §3.2) and return it; :class:`PolicyError` says what
    is wrong. Lines end with CRLF or LF; unknown keys are ignored (extensions); of a
    repeated key other than ``mx`` the first counts.

    The grammar's literals are case-sensitive: it writes them ``%s"version"``,
    ``%s"STSv1"``, ``%s"mode"``, ``%s"enforce"`` (RFC 7405), where a plain ``"..."`` would
    match any case. So ``mode: Enforce`` is no mode, and ``Mode: enforce`` is an unknown
    extension field, ignored: neither policy has a mode. A field is its key, the colon,
    then spaces or tabs and the value, then spaces or tabs (``sts-policy-field-delim =
    ":" *WSP``): white space before the key or the colon breaks the line, and no other
    white space (a no-break space, say) is trimmed from a value. Blank lines, which the
    grammar does not have, are skipped: a file ending in two line breaks is common and
    harmless.

    Leniency goes only where it cannot loosen what the policy asks: a UTF-8 byte order
    mark before the first line is dropped; a ``max_age`` above :data:`MAX_AGE_LIMIT` is
    read as that limit (§3.2 names it the largest value); an ``mx`` value that is no host
    name or ``*.`` and one (``.example.com``) is ignored and listed in ``ignored``, as it
    can only take hosts away from the allowed set (a policy left with none is refused).
    """
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError(f"policy larger than {MAX_POLICY_SIZE} octets", code=TOO_LARGE)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy is not UTF-8: {exc.reason} at octet {exc.start}", code="sts-policy-not-utf8"
        ) from None
    # A BOM is no character of the grammar, and means nothing in UTF-8: Windows editors
    # write one, and it made the first key "\ufeffversion".
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    control = _CONTROL.search(text)
    if control is not None:
        # RFC 8461 §3.2 allows none in a value; and a NUL could not even be stored.
        where = text.count("\n", 0, control.start()) + 1
        raise PolicyError(
            f"line {where} holds a control character (U+{ord(control[0]):04X})",
            code="sts-policy-control-character",
        )
    fields: dict[str, str] = {}
    patterns: list[str] = []
    seen: set[str] = set()
    ignored: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        # No bound of its own on a line: §3.2 sets none on an extension's value or the WSP
        # after a colon, and parsers MUST accept such a policy. Refusing one line over
        # 1 KiB left the domain with no policy; the body's bound already bounds the work.
        line = raw.rstrip(_WSP)
        if not line:
            continue
        key, colon, value = line.partition(":")
        value = value.lstrip(_WSP)
        if colon and key != key.strip(_WSP) and _KEY.match(key.strip(_WSP)):
            raise PolicyError(
                f"line {number} has white space before its key or colon, which RFC 8461 "
                f"§3.2 does not allow: {shorten(line, 60)}",
                code=_SYNTAX,
            )
        if not colon or not _KEY.match(key):
            raise PolicyError(
                f"line {number} is not 'key: value': {shorten(line, 60)}", code=_SYNTAX
            )
        if key == "mx":
            # No count refused: §3.2 sets none, and refusing 101 lines left the domain
            # with no policy. The body's size bounds them, and a repeat is kept once.
            pattern = normalize_host(value)
            # ASCII before lower-casing: the KELVIN SIGN lower-cases to "k", and a pattern
            # is the name the text shows (RFC 8461 §3.2: a Domain, LDH labels).
            if value.isascii() and _valid_pattern(pattern):
                if pattern not in seen:
                    seen.add(pattern)
                    patterns.append(pattern)
            else:
                # Ignored, not fatal: it matches no host, so the policy allows fewer MX
                # hosts than its author meant, never more. Refusing the whole policy for
                # it left the domain with none, so any MX went, over any TLS.
                ignored.append(value)
        else:
            fields.setdefault(key, value)
    # Compared as they are, not folded: %s"STSv1" and %s"enforce" (see the docstring).
    version = fields.get("version")
    if version != "STSv1":
        raise PolicyError(
            f"version is {_quote(version)}, not 'STSv1'", code="sts-policy-invalid-version"
        )
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError(
            f"mode is {_quote(fields.get('mode'))}, not enforce, testing or none",
            code="sts-policy-invalid-mode",
        ) from None
    max_age_text = fields.get("max_age")
    if max_age_text is None or not _MAX_AGE.match(max_age_text):
        raise PolicyError(
            f"max_age is {_quote(max_age_text)}, not 0 to 10 digits of seconds",
            code="sts-policy-invalid-max-age",
        )
    # Capped, not refused: a longer lifetime than the RFC's largest asks for more
    # protection, and refusing it left the domain with none at all.
    max_age = min(int(max_age_text), MAX_AGE_LIMIT)
    if mode is not Mode.NONE and not patterns:
        if ignored:
            raise PolicyError(
                f"mode {mode} without any valid mx line ({len(ignored)} ignored, not a host "
                f"name or *.name: {shorten(ignored[0], 60)})",
                code=_NO_MX,
            )
        raise PolicyError(f"mode {mode} without any mx line", code=_NO_MX)
    return Policy(
        mode=mode,
        mx=tuple(patterns),
        max_age=max_age,
        text=text.strip("\n"),
        ignored=tuple(ignored),
    )
