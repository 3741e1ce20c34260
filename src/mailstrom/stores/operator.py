"""Value types and pure helpers behind the operator's tools (schema version 10).

Short message ids (unique prefixes, as git takes them), the queue's shape (pending
recipients per destination and age, like Postfix's ``qshape``), and suspended
destinations. Every store implements the matching :class:`~mailstrom.stores.base.Store`
methods; the command line and both facades call them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING

from mailstrom.arguments import check_age, shown
from mailstrom.bounds import MAX_INTEGER
from mailstrom.domains import a_label
from mailstrom.errors import AmbiguousMessageId, InvalidAddress, InvalidArgument, UnknownMessage
from mailstrom.status import MessageStatus, RecipientState, RecipientStatus
from mailstrom.suppression import stored_literal

if TYPE_CHECKING:  # base imports this module
    from mailstrom.stores.base import QueueFilter

ID_LENGTH = 32
"""Hex digits in a full message id (see :func:`~mailstrom.stores.base.new_message_id`)."""
MAX_CANDIDATES = 10
"""Ids an ambiguous prefix reports (the store reads one more to know there are more)."""
_HEX = re.compile(r"[0-9a-f]{1,32}")

PENDING_STATES = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED})
"""The derived states of messages still to be delivered (the queue's default view)."""
FINISHED_STATES = frozenset({RecipientState.DELIVERED, RecipientState.FAILED})
"""The derived states of messages a purge may delete."""

AGE_EDGES: tuple[timedelta, ...] = tuple(timedelta(minutes=m) for m in (5, 10, 20, 40, 80, 160))
"""Where the age buckets of :meth:`Store.shape` split: 0-5m, 5-10m, ... 80-160m, 160m+
(qshape's doubling buckets)."""

MAX_DOMAIN = 253
"""Octets of a domain name (RFC 1035 §2.3.4, without the root's dot)."""
MAX_LABEL = 63
"""Octets of one label of a domain name (RFC 1035 §2.3.4)."""


def effective_states(
    state: RecipientState | None, states: frozenset[RecipientState] | None
) -> frozenset[RecipientState] | None:
    """The derived states a queue filter admits: its ``states`` narrowed by its ``state``
    (None: any state)."""
    if state is None:
        return states
    return frozenset({state}) if states is None else states & {state}


_AT_DOMAIN: Mapping[RecipientState, frozenset[RecipientState]] = {
    RecipientState.DELIVERED: frozenset({RecipientState.DELIVERED}),
    RecipientState.FAILED: FINISHED_STATES,
    RecipientState.QUEUED: frozenset(RecipientState),
    RecipientState.DEFERRED: frozenset(RecipientState),
}


def states_at_domain(where: QueueFilter) -> frozenset[RecipientState]:
    """The states a recipient at ``where.domain`` may be in when its message is in a
    state ``where`` admits (:func:`mailstrom.status.derive_message_state`): a delivered
    message's recipients are all delivered, a failed one has none pending, a pending
    one's may be in any. A store's index of recipients by state and domain holds the
    messages ``where`` may list in these states' ranges."""
    states = effective_states(where.state, where.states)
    admitted = frozenset(RecipientState) if states is None else states
    return frozenset(s for state in admitted for s in _AT_DOMAIN[state])


def purge_candidates(
    where: QueueFilter, older_than: timedelta | None, state: RecipientState | None
) -> QueueFilter:
    """``where`` narrowed to messages a purge of those finished more than ``older_than``
    ago (in ``state``, when given) can delete: finished ones (in ``state``), queued more
    than ``older_than`` ago (finished before the cutoff, a message was queued before it).
    A query returns the newest ``limit`` matches: left wide, they were pending or recent
    mail the purge leaves alone, and older mail behind them was never reached."""
    finished = FINISHED_STATES if state is None else frozenset({state})
    states = finished if where.states is None else where.states & finished
    age = where.older_than
    if older_than is not None and older_than > timedelta(0):
        age = older_than if age is None else max(age, older_than)
    return replace(where, states=states, older_than=age)


@dataclass(frozen=True, slots=True)
class ListingKey:
    """Where a message stands in the order every listing takes (newest first: by enqueue
    time, then by the store's own queue order), as the store that listed it gave it: a
    page of :meth:`~mailstrom.stores.base.Store.select_page` goes on after it. Opaque,
    and meant for the store that gave it: ``created`` is its enqueue time as that store
    holds it, ``seq`` its place in that store's queue order. It stays valid when the
    message it came from is deleted. A store refuses only a key of a kind it never
    gives (:func:`foreign_place`): another store's key of the same kind is taken as a
    place in its own order, not told apart."""

    created: object
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IdPage:
    """A page of ids :meth:`~mailstrom.stores.base.Store.select_page` lists, and where
    the last of them stands (None for an empty page); asked with ``examine``, where the
    next page starts (None: nothing is left)."""

    ids: list[str]
    last: ListingKey | None


def check_examine(value: object) -> int:
    """``value``, the ``examine`` of :meth:`~mailstrom.stores.base.Store.select_page`:
    a whole number from 1 (none at all would end every walk at once)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INTEGER:
        raise InvalidArgument(
            f"examine: expected a whole number from 1 to {MAX_INTEGER}, got {shown(value)}",
            argument="examine",
        )
    return value


def foreign_place(key: ListingKey) -> InvalidArgument:
    """The error for ``key`` passed to a store that never gives a key of its kind: an
    SQLite key (an integer time) in the memory store or PostgreSQL, or theirs (a
    datetime) in SQLite. The memory store's and PostgreSQL's keys are of one kind, and
    each store takes the other's (as any store takes another database's of its own
    backend): no store can tell them from its own."""
    return InvalidArgument(
        f"after: not a place in this store's lists: {shown(key)}", argument="after"
    )


def normalize_prefix(prefix: str) -> str:
    """``prefix`` lower-cased, or :class:`UnknownMessage` when it cannot start any id
    (not a string of 1 to 32 hex digits)."""
    if not isinstance(prefix, str):
        raise UnknownMessage(prefix)  # None, 5 or b"..." name no message
    text = prefix.strip().lower()
    if not _HEX.fullmatch(text):
        raise UnknownMessage(prefix)
    return text


def comparable(text: object) -> bool:
    """Whether SQLite and PostgreSQL can compare ``text`` with what they hold: text with a
    NUL (PostgreSQL refuses it) or a lone surrogate (no driver can encode it) names nothing
    stored. A lookup of one finds nothing, as in the memory store, instead of raising
    StoreRefusedData; nor does what is no string (None, bytes), where the check itself
    raised a bare TypeError."""
    if not isinstance(text, str):
        return False
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def listed_ids(message_ids: Sequence[str]) -> list[str]:
    """The listed ids that could name a stored message, once each, in order: text without
    NUL or a lone surrogate, which SQLite and PostgreSQL cannot compare (they raised
    StoreRefusedData where the memory store skipped them, as unknown ids are)."""
    named = dict.fromkeys(m for m in message_ids if isinstance(m, str))
    return [mid for mid in named if comparable(mid)]


def pick_one(prefix: str, found: Sequence[str]) -> str:
    """The one id ``found`` for ``prefix``; UnknownMessage for none, AmbiguousMessageId
    (listing up to :data:`MAX_CANDIDATES`) for several."""
    if not found:
        raise UnknownMessage(prefix)
    if len(found) > 1:
        raise AmbiguousMessageId(
            prefix, sorted(found)[:MAX_CANDIDATES], more=len(found) > MAX_CANDIDATES
        )
    return found[0]


def prefix_upper_bound(prefix: str) -> str:
    """The smallest string above every id starting with ``prefix`` (for a range scan on
    the id index: ``prefix <= id < bound``); ids are lower-case hex, so "g" sorts after
    every digit."""
    return prefix + "g"


def normalize_domain(domain: str, *, stored: bool = False) -> str:
    """A destination domain as stores key it: lower case, no trailing dot, U-labels as
    A-labels (recipients' domains are stored so: ``bücher.example`` is
    ``xn--bcher-kva.example``), an address literal as
    :func:`~mailstrom.suppression.stored_literal` makes it;
    :class:`~mailstrom.errors.InvalidArgument` (a ValueError) when it is no string, is
    empty, too long (or a label is), or not a plain domain or a valid literal.

    ``stored``: a name to look up among those stored (resume), whose labels may hold
    what a recipient's never does: an earlier version suspended ``*.example.org``, and
    its suspension can still be ended."""
    if not isinstance(domain, str):
        raise InvalidArgument(f"not a domain: {shown(domain)}", argument="domain")
    # Lowered by a_label below, as IDNA 2008 maps case: str.lower() writes a capital
    # sigma before a hyphen or a digit as a final sigma, a letter of another domain.
    text = domain.strip().rstrip(".")
    if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        raise InvalidArgument(f"not a domain: {shown(domain)}", argument="domain")
    if text.startswith("["):
        # Mail to bob@[192.0.2.1] goes to that address, a destination of its own (RFC
        # 5321 §4.1.3), kept under the form prepare() stores the literal in.
        literal = stored_literal(text)
        if literal is None:
            raise InvalidArgument(f"not a domain: {shown(domain)}", argument="domain")
        return literal
    if any(c.isspace() or c in "@/\\[]<>\"'," for c in text) or not text.isprintable():
        raise InvalidArgument(f"not a domain: {shown(domain)}", argument="domain")
    try:
        name = a_label(text)
    except ValueError:
        raise InvalidArgument(f"not a domain: {shown(domain)}", argument="domain") from None
    # RFC 1035 §2.3.4: labels of 1 to 63 octets (no DNS name has a longer or empty one),
    # and of the characters a recipient's domain has (letters, digits, inner hyphens; an
    # underscore let through): "*.google.com" or "example.org:25" was suspended, and no
    # recipient is ever at such a name.
    label_ok = _STORED_LABEL if stored else _DOMAIN_LABEL
    if any(label_ok.fullmatch(label) is None for label in name.split(".")):
        raise InvalidArgument(f"not a domain: {shown(domain)}", argument="domain")
    return name


_DOMAIN_LABEL = re.compile(rf"(?!-)[a-z0-9_-]{{1,{MAX_LABEL}}}(?<!-)")
_STORED_LABEL = re.compile(rf".{{1,{MAX_LABEL}}}", re.DOTALL)


def filter_domain(text: str) -> str:
    """A domain typed into a filter (``--domain``, the dashboard's) as recipients' domains
    are stored: stripped, lower case, without a trailing dot (``example.org.``, the
    absolute form, as :func:`normalize_domain` and ``suspend`` take it), U-labels as
    A-labels (``bücher.example`` finds ``xn--bcher-kva.example``). A name with no A-label
    form is kept as given: it finds nothing, or the caller's own check refuses it. An
    address literal is taken as prepare() stores it (``[IPv6:2001:DB8:0::1]`` finds
    ``[ipv6:2001:db8::1]``, its address in the shortest form)."""
    written = text.strip().rstrip(".")
    value = written.lower()
    if value.startswith("["):
        return stored_literal(written) or value
    try:
        return a_label(written)  # lowered by IDNA's case mapping, as normalize_domain's
    except ValueError:
        return value


def filter_address(text: str) -> str:
    """An address typed into a lookup or a filter as recipients are stored (what prepare()
    put into the envelope): a UTF-8 local part in NFC, a role name such as ``Postmaster``
    in lower case, needless quotes dropped, the domain in lower-case A-labels (an address
    literal's tag too: prepare() stores ``bob@[ipv6:::1]``). Text that is no valid address
    keeps its local part as typed, its domain as :func:`filter_domain` makes it: it finds
    nothing, or what was stored as written."""
    from mailstrom.message.addrspec import validate_address

    try:
        envelope = validate_address(text).envelope
    except InvalidAddress:
        local, _, domain = text.rpartition("@")
        return f"{local}@{filter_domain(domain)}"
    # validate_address() keeps a literal's tag as written ("IPv6"); dedupe() in prepare()
    # lower-cases every domain, so that is the form the recipient is stored in.
    local, _, domain = envelope.rpartition("@")
    return f"{local}@{domain.lower()}"


def earliest(*times: datetime | None) -> datetime | None:
    """The earliest of ``times`` that is not None (None when all are)."""
    return min((t for t in times if t is not None), default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspension:
    """A destination no worker delivers to until ``until`` (None: until resumed)."""

    domain: str
    suspended_at: datetime | None
    """When it was suspended; None when the stored time is no time (a row changed by hand)."""
    until: datetime | None = None

    def active(self, now: datetime) -> bool:
        """Whether the suspension is in force at ``now``."""
        return self.until is None or self.until > now


def next_due(r: RecipientStatus, suspended: Mapping[str, Suspension]) -> datetime | None:
    """When pending ``r`` can next be attempted, as the views say it: its next attempt,
    or the end of its destination's pause (:attr:`RecipientStatus.throttle`: a worker
    gives it back until then, as after a retry) or suspension (``suspended``: by domain)
    when that is later; None while suspended without an end."""
    due = r.next_attempt_at
    if due is not None and r.throttle is not None:
        due = max(due, r.throttle.until)
    pause = suspended.get(r.domain)
    if pause is None or due is None:
        return due
    return None if pause.until is None else max(due, pause.until)


def next_try(
    st: MessageStatus, r: RecipientStatus, suspended: Mapping[str, Suspension]
) -> datetime | None:
    """When recipient ``r`` of ``st`` is next tried, as every view says it (``queue``
    the earliest of a message's, ``status``, ``show`` and the dashboard each one's):
    :func:`next_due` of a pending one, whether deferred or queued (for its ``send_at``,
    say); None for a final one, and while its message is held (no worker leases it until
    it is released)."""
    if st.held or r.state.is_final:
        return None
    return next_due(r, suspended)


def count_recipients(
    messages: Iterable[MessageStatus],
    states: Collection[RecipientState],
    *,
    at: Collection[str] | None = None,
) -> int:
    """How many recipients of ``messages`` are in one of ``states`` and, given ``at``, at
    one of those domains (lower case): what a retry tells apart, those at a suspended
    destination waiting for it to be resumed. A message listed twice counts once."""
    return len(
        {
            (m.id, r.address)
            for m in messages
            for r in m.recipients
            if r.state in states and (at is None or r.domain.lower() in at)
        }
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShapeRow:
    """Pending recipients at one destination domain by age of their message: ``counts[i]``
    is the bucket below ``AGE_EDGES[i]`` (the last one: older than the last edge)."""

    domain: str
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def age_edges(edges: Sequence[timedelta]) -> tuple[timedelta, ...]:
    """``edges`` as :meth:`~mailstrom.stores.base.Store.shape` takes them in every store:
    ages from 0 to 100 years (:func:`~mailstrom.arguments.check_age`, as ``older_than``),
    ascending; InvalidArgument naming ``edges`` otherwise. An edge past any age
    (``timedelta(days=10**8)``) was StoreRefusedData in SQLite, which reckons ``now -
    edge``, and an empty bucket in the others; a negative edge, or edges out of order,
    gave each store's own buckets."""
    checked = tuple(check_age(edge, "edges") for edge in edges)
    if any(later < earlier for earlier, later in pairwise(checked)):
        raise InvalidArgument(
            f"edges: expected ages in ascending order, got {shown(edges)}", argument="edges"
        )
    return checked


def bucket_of(age: timedelta, edges: Sequence[timedelta] = AGE_EDGES) -> int:
    """The index of the age bucket ``age`` falls in (an age on an edge belongs above it)."""
    for i, edge in enumerate(edges):
        if age < edge:
            return i
    return len(edges)


def shape_rows(counts: Mapping[tuple[str, int], int], buckets: int) -> list[ShapeRow]:
    """Rows from ``{(domain, bucket): n}``, largest total first (ties by domain)."""
    by_domain: dict[str, list[int]] = {}
    for (domain, bucket), n in counts.items():
        by_domain.setdefault(domain, [0] * buckets)[bucket] += int(n)
    rows = [ShapeRow(domain=d, counts=tuple(c)) for d, c in by_domain.items()]
    rows.sort(key=lambda r: (-r.total, r.domain))
    return rows
