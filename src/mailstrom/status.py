"""Value types describing where each message and recipient stands.

These are what :meth:`Mailstrom.query_status` returns and what stores persist. Enum values
are the strings the stores write, so they must never change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

# Imported for real (it needs only the standard library), so that typing.get_type_hints()
# resolves every field of these types, as serialisers (pydantic, FastAPI...) ask.
from mailstrom.dkim.signature import DKIMSignature


class RecipientState(StrEnum):
    """Where one recipient of one message stands."""

    QUEUED = "queued"
    """Accepted, not yet attempted."""
    DEFERRED = "deferred"
    """Attempted, failed temporarily; another attempt is scheduled at ``next_attempt_at``."""
    DELIVERED = "delivered"
    """The receiving server accepted the message for this recipient (final)."""
    FAILED = "failed"
    """Permanently failed, given up after retries, or cancelled (final)."""

    @property
    def is_final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


class AttemptOutcome(StrEnum):
    """How one delivery attempt for one recipient ended."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class ReasonClass(StrEnum):
    """Why an attempt failed, in words a user can act on: an explanation beside the
    outcome, never a decision (temporary or permanent stays the reply code's call).

    :mod:`mailstrom.policy.reasons` derives it from the reply (the providers' well-known
    replies first, then the RFC 3463 enhanced code, then the basic code) or, for a
    failure without a reply, from the local error; :func:`mailstrom.policy.advice_for`
    says what to do about it, with the provider's help page when one is known.
    """

    RATE_LIMITED = "rate_limited"
    """The receiver wants mail from us more slowly: too many messages, connections or
    unwanted mail in some time."""
    GREYLISTED = "greylisted"
    """A deliberate first refusal of an unknown sender; the retry gets through."""
    AUTHENTICATION = "authentication"
    """The receiver could not verify the sender: SPF, DKIM, DMARC, the sending IP's
    reverse DNS, or the credentials given to a relay."""
    REPUTATION = "reputation"
    """The sending IP or domain is distrusted: on a block list, or with a poor record."""
    POLICY = "policy"
    """The receiver's own rules refuse the mail (a catch-all of security refusals)."""
    TLS = "tls"
    """Encryption was required and not achieved, or the TLS handshake failed."""
    MAILBOX = "mailbox"
    """The address or mailbox: unknown user, bad address, disabled or full mailbox."""
    CONTENT = "content"
    """The message itself: judged spam or malware, too large, or in a form refused."""
    DNS = "dns"
    """A DNS lookup failed or found nothing (the recipient's domain does not exist)."""
    ROUTING = "routing"
    """No way to the destination: null MX, no usable address, a routing loop."""
    CONNECTION = "connection"
    """The connection could not be made, timed out or broke."""
    PROTOCOL = "protocol"
    """The two sides did not agree on SMTP: a command, syntax or extension refused."""
    SYSTEM = "system"
    """The receiving system has trouble of its own: busy, full or misconfigured."""
    LOCAL = "local"
    """This host's own trouble, before any server was asked: it ran out of file
    descriptors, socket buffers or memory (a local resource shortage, 4.3.0). No attempt:
    the recipient's ``attempts`` and history are left as they were."""
    OTHER = "other"
    """None of the above, or a reply that says too little to tell."""
    EXPIRED = "expired"
    """Not delivered before the message's own expiry (``expires_at`` or ``max_age`` at
    submission); given up without another attempt."""
    SUPPRESSED = "suppressed"
    """Not attempted: the address or its domain is on the suppression list (an earlier
    hard bounce, complaint or an operator's entry)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SMTPReply:
    """A server reply: ``code`` 250, ``enhanced`` "2.0.0", ``text`` (lines joined by "\\n")."""

    code: int
    text: str
    enhanced: str | None = None

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One delivery attempt for one recipient, kept as history.

    ``reply`` is the server reply that decided this recipient's outcome, if any; ``error``
    a local description when there was no reply (connection refused, timeout, DNS failure).
    ``uncertain`` marks an attempt whose connection was lost after the final dot but before
    the reply (RFC 5321 §4.5.3.2.6): the message may or may not have been delivered.
    ``reason_class`` says why it failed, for people and for code that reacts to a class
    (None when it did not fail).
    """

    at: datetime
    outcome: AttemptOutcome
    duration: float = 0.0
    mx_host: str | None = None
    ip: str | None = None
    port: int | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    reply: SMTPReply | None = None
    error: str | None = None
    uncertain: bool = False
    reason_class: ReasonClass | None = None
    """Why the attempt failed (see :class:`ReasonClass`); None when the server accepted
    the message. An uncertain attempt is ``connection`` even when counted as delivered."""
    tls_policy: str | None = None
    """The TLS policy the attempt's connection was made under: ``none``,
    ``opportunistic``, ``required``, ``verify``, ``dane``, ``mta-sts enforce`` or
    ``mta-sts testing`` (None: no connection was decided on, or recorded before
    mailstrom knew policies)."""

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    @property
    def reason(self) -> str:
        """Human-readable reason: the reply if any, else the local error."""
        return reason_of(self.reply, self.error)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientStatus:
    """The state of one recipient of one message, with its attempt history."""

    address: str
    state: RecipientState
    attempts: int = 0
    """Attempts recorded for it, every one (:attr:`history` keeps the latest 50)."""
    reply: SMTPReply | None = None
    """The reply that decided its latest attempt (text cut to 2,048 octets); None when
    that attempt had none, before any attempt, and once cancelled."""
    error: str | None = None
    """The local error of its latest attempt when there was no reply (DNS, a refused
    connection, a timeout), or ``"cancelled"``."""
    mx_host: str | None = None
    """The MX host its latest attempt went to (with :attr:`ip` and :attr:`tls`)."""
    ip: str | None = None
    tls: bool = False
    uncertain: bool = False
    """Whether its latest attempt lost the connection after the final dot, before the
    reply: the message may or may not have been delivered (RFC 5321 §4.5.3.2.6)."""
    reason_class: ReasonClass | None = None
    """The class of the latest attempt's failure (None after an accepted delivery, before
    any attempt, and once cancelled)."""
    first_attempt_at: datetime | None = None
    """When its first attempt ended (None before any)."""
    last_attempt_at: datetime | None = None
    """When its latest attempt ended (None before any)."""
    next_attempt_at: datetime | None = None
    """While pending, when it is due: a deferred one's retry, a queued one's first try
    (its ``send_at``, else when it was queued); None once final. A held message, or a
    suspended or throttled destination, may keep it waiting longer."""
    finished_at: datetime | None = None
    """When the recipient became final: its last attempt, or when it was cancelled (None
    while pending). Purges choose by it."""
    history: tuple[Attempt, ...] = ()
    """Its attempts, oldest first: the latest 50 (``MAX_HISTORY``; :attr:`attempts`
    counts them all). Empty in lists (``query``, ``query_recent``, the dashboard's
    pages), which read no history."""
    throttle: DestinationThrottle | None = None
    """The pause of this recipient's destination, while one holds it back (see
    :meth:`throttle_note`); None otherwise."""
    leased: bool = False
    """Whether a worker holds it under a lease (in delivery): a server may have accepted
    it already, the result not yet recorded (its state stays queued or deferred until
    then). False once the result is recorded or the lease given back; a lease that ran
    out counts until another worker leases the recipient (the first may still record
    it) or the dead worker's leases are given back."""

    @property
    def throttle_note(self) -> str | None:
        """``"destination *.google.com throttled until 2026-11-30T17:02:00+00:00: 421
        4.7.28 ..."`` while the recipient waits for its destination's pause; else None."""
        pause = self.throttle
        if pause is None:
            return None
        until = pause.until.isoformat(timespec="seconds")
        note = f"destination {pause.destination} throttled until {until}"
        return f"{note}: {pause.reply}" if pause.reply else note

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def reason(self) -> str:
        """Why the recipient is where it is: the last reply, else the last local error."""
        return reason_of(self.reply, self.error)


@dataclass(frozen=True, slots=True, kw_only=True)
class DKIMStatus:
    """Whether a message was DKIM-signed when it was queued, and how; for a message the
    worker signed anew as it sent it (its key rotated away, its ``x=`` about to pass),
    the signatures of that attempt, what the receiver got.

    Signed: ``signatures`` lists one :class:`~mailstrom.dkim.DKIMSignature` (domain,
    selector, algorithm) per key that signed it and ``reason`` is None. Unsigned although
    DKIM is configured: ``signatures`` is empty and ``reason`` says why (e.g. "no DKIM key
    for the From domain example.org"); the message is sent as it is and may fail DMARC at
    the receiver. A message queued without DKIM configured has no DKIMStatus at all
    (``MessageStatus.dkim`` is None).

    >>> from mailstrom.dkim import DKIMAlgorithm, DKIMSignature
    >>> rsa = DKIMSignature(domain="example.com", selector="s1",
    ...                     algorithm=DKIMAlgorithm.RSA_SHA256)
    >>> st = DKIMStatus(signatures=(rsa,))
    >>> st.signed, str(st)
    (True, 'signed: example.com (s1, rsa-sha256)')
    >>> str(DKIMStatus(reason="no DKIM key for the From domain example.org"))
    'unsigned: no DKIM key for the From domain example.org'
    """

    signatures: tuple[DKIMSignature, ...] = ()
    """The signatures the queued message carries, in the order they were made."""
    reason: str | None = None
    """Why the message is not signed; None when it is."""

    def __post_init__(self) -> None:
        if bool(self.signatures) == (self.reason is not None):
            raise ValueError("a DKIMStatus has either signatures or a reason, exactly one")

    @property
    def signed(self) -> bool:
        """True when at least one DKIM signature was made."""
        return bool(self.signatures)

    def __str__(self) -> str:
        if self.reason is not None:
            return f"unsigned: {self.reason}"
        return "signed: " + ", ".join(str(s) for s in self.signatures)


def reason_of(reply: SMTPReply | None, error: str | None) -> str:
    """A reason as one line: the reply if any, else the local error (an attempt's, a
    recipient's, or a read model's of the two columns)."""
    if reply is not None:
        return str(reply)
    return error or ""


def derive_message_state(states: Sequence[RecipientState]) -> RecipientState:
    """A message's state from its recipients' states.

    Any recipient still pending → ``DEFERRED`` if one was deferred, else ``QUEUED``;
    all final → ``DELIVERED`` if all were delivered, else ``FAILED``.
    """
    return state_of_counts(Counter(states))


def state_of_counts(counts: Mapping[RecipientState, int]) -> RecipientState:
    """:func:`derive_message_state` from how many recipients are in each state (the
    memory store keeps these per message)."""
    if counts.get(RecipientState.DEFERRED):
        return RecipientState.DEFERRED
    if counts.get(RecipientState.QUEUED):
        return RecipientState.QUEUED
    if counts.get(RecipientState.FAILED) or not any(counts.values()):
        return RecipientState.FAILED
    return RecipientState.DELIVERED


def reason_rank(state: RecipientState) -> int:
    """Where a recipient in ``state`` comes in the search for its message's reason
    (:func:`state_reason`): pending first, then failed, then delivered."""
    if not state.is_final:
        return 0
    return 2 if state is RecipientState.DELIVERED else 1


def state_reason(recipients: Sequence[RecipientStatus]) -> str | None:
    """The recipients' reason that explains their message's state, for a one-line view:
    a pending recipient's (what holds the message back), else a failed one's (why it
    failed), a delivered one's last (a "250" explains nothing on a failed message)."""
    ranked = sorted(recipients, key=lambda r: reason_rank(r.state))
    return next((r.reason for r in ranked if r.reason), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageStatus:
    """The state of one queued message and each of its recipients."""

    id: str
    state: RecipientState
    envelope_from: str
    created_at: datetime
    size: int
    recipients: tuple[RecipientStatus, ...]
    header_message_id: str | None = None
    subject: str | None = None
    held: bool = False
    """Held (``hold``): its pending recipients wait for a release. A message that finished
    while held (its delivery in flight, or cancelled) is not: it waits for nothing."""
    dkim: DKIMStatus | None = None
    """Whether the message was DKIM-signed when queued, or as last signed anew by the
    worker (see :class:`DKIMStatus`); None when DKIM was not configured, or the message
    was queued by a mailstrom that did not record it."""
    tags: tuple[str, ...] = ()
    """The labels given at submission (``Email.tags`` or ``send_email(tags=...)``)."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """The key/value strings given at submission."""
    priority: str | None = None
    """The priority lane (None for messages queued before lanes existed)."""
    send_at: datetime | None = None
    """Not delivered before this time (None: at once)."""
    expires_at: datetime | None = None
    """Recipients still pending at this time fail with the reason ``expired``."""
    idempotency_key: str | None = None
    """The key it was submitted with, if any."""

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def recipient(self, address: str) -> RecipientStatus:
        """The status of ``address`` (domain compared case-insensitively; a U-label
        domain, ``bob@bücher.example``, finds the A-label form the envelope holds, and a
        local part is taken as the envelope writes it: in Unicode NFC, a role name such as
        ``Postmaster`` in lower case, needless quotes dropped; a recipient queued by hand in
        another spelling is found by it too). KeyError for an address not among them, and
        for what is no string (None, bytes), which names none."""
        if not isinstance(address, str):
            raise KeyError(address)
        # Imported here: this module needs only the standard library to load.
        from mailstrom.stores.operator import filter_address

        wanted = filter_address(address)
        local, _, domain = wanted.rpartition("@")
        for r in self.recipients:
            r_local, _, r_domain = r.address.rpartition("@")
            if r_local == local and r_domain.lower() == domain:
                return r
        # A message handed to a store by hand keeps its recipients as written (a U-label
        # domain, a quoted local part): found by the same stored form, not only by it.
        for r in self.recipients:
            if filter_address(r.address) == wanted:
                return r
        raise KeyError(address)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryEvent:
    """One recorded result, as the store's event outbox keeps it: what hooks receive and
    ``mailstrom events`` shows.

    ``id`` grows with every event of a store (never reused); ``attempt`` is the
    recipient's attempt count including this one; ``at`` is when the attempt ended.
    """

    id: int
    at: datetime
    message_id: str
    address: str
    state: RecipientState
    attempt: int
    reply: SMTPReply | None = None
    error: str | None = None
    reason_class: str | None = None
    mx_host: str | None = None
    ip: str | None = None
    tls: bool = False
    uncertain: bool = False
    next_attempt_at: datetime | None = None
    tags: tuple[str, ...] = ()
    """The message's tags, copied when the event was written."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """The message's metadata, copied when the event was written."""

    @property
    def reason(self) -> str:
        """The reply if any, else the local error."""
        if self.reply is not None:
            return str(self.reply)
        return self.error or ""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """Counts of recipients by state, and of pending recipients by destination domain."""

    by_state: dict[RecipientState, int] = field(default_factory=dict)
    pending_by_domain: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    held: int = 0
    unsent_events: int | None = None
    """Events in the outbox not acknowledged yet (a hook's backlog); None when not read
    (only a reader for a worker with a hook counts them, see
    :class:`~mailstrom.runtime.metrics.QueueStatsCache`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Histogram:
    """Observations counted into buckets, as Prometheus histograms are.

    ``counts[i]`` is how many observations were at most ``bounds[i]`` and more than the
    bound before it; the last count (one more than there are bounds) is everything above
    the last bound. ``sum`` adds up every observation.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many observations there were."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most that)`` per bucket, ending with infinity."""
        pairs, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            pairs.append((bound, running))
        return pairs


QUEUE_SECONDS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)
"""Bucket bounds of the queue-delay histogram: seconds when the first attempt succeeds,
then the retry schedule's minutes and hours, up to the default maximum age of 5 days."""


def _no_queue_delay() -> Histogram:
    return Histogram(bounds=QUEUE_SECONDS, counts=(0,) * (len(QUEUE_SECONDS) + 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerMetrics:
    """What a worker counted since it started: the numbers behind its Prometheus metrics.

    Every label has a bounded set of values: outcomes and states are enums, reason classes
    a short fixed vocabulary (anything else counts as ``other``), and destination domains
    only those configured in ``Config.metrics_domains`` (the rest as ``other``).
    """

    attempts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """Attempts by (outcome, reason class); the reason class is ``none`` when the attempt
    has none (deliveries, and results recorded before reason classes existed)."""
    domain_results: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """Recorded results by (destination domain, new state), for the configured domains."""
    attempt_duration: Mapping[str, Histogram] = field(default_factory=dict)
    """Seconds per attempt (connection, or its share of one, to the last reply) by outcome."""
    queue_delay: Histogram | None = field(default_factory=_no_queue_delay)
    """Seconds from queueing to delivery, for each delivered recipient: empty (never None)
    until a worker has counted one, as the other counters are, so that
    ``metrics.queue_delay.count`` reads 0 before a worker (or a queue-only facade's
    none) has reported."""
    store_errors: int = 0
    """Store calls that failed (and were retried) since the worker started."""
    ignored_results: int = 0
    """Results the store ignored: their lease was taken over, or they were cancelled."""
    hook_events_sent: int = 0
    """Events the hook endpoint acknowledged."""
    hook_failures: int = 0
    """Hook requests that failed (they are retried with backoff)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStatus:
    """Whether the background worker runs, and what it has done since it started."""

    running: bool
    started_at: datetime | None = None
    """When the worker started: for a worker process, its first child since ``start()``
    (its counters go on across restarts)."""
    error: str | None = None
    in_flight: int = 0
    """Recipients the worker holds for delivery, leased and not yet reported: on the wire,
    or queued for a session or a destination's rate (a few seconds of it; see
    "Traffic shaping" in the guide). A stop gives back what waits for a rate at once,
    and no longer counts it."""
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    last_activity_at: datetime | None = None
    store_error: str | None = None
    """The store's latest failure while it keeps failing (the worker retries with
    backoff and goes on by itself); None when the store answers."""
    store_wait_since: datetime | None = None
    """When the worker's event loop began the store call it still waits in (memory,
    SQLite: a write lock held elsewhere is waited for up to ``busy_timeout``), None
    when it waits in none. Meanwhile the loop does nothing else: a worker process's
    status comes from its control thread then, every few seconds, and a long wait here
    says why the numbers stand still. PostgreSQL's calls run beside the loop: None."""
    unrecorded: int = 0
    """Results held in memory because the store could not take them yet."""
    sessions: int = 0
    """SMTP sessions open or being opened."""
    record_lag: float = 0.0
    """Seconds the oldest result of the last recorded batch waited for its record: the
    window in which a crash would make a delivered recipient be sent again."""
    transactions: int = 0
    """Work items (one SMTP transaction each) handed to delivery and not finished."""
    idle_connections: int = 0
    """Connections kept open for reuse."""
    leased_bytes: int = 0
    """Octets of message data the worker's leases hold now (bounded by
    ``Config.max_leased_bytes``, plus one message larger than it)."""
    leased_bytes_peak: int = 0
    """The most :attr:`leased_bytes` has been since the worker started."""
    clock_skew: float | None = None
    """Seconds the worker's clock is ahead of its store server's (negative: behind), as
    last measured: workers on many hosts share a PostgreSQL store, and their leases rely
    on their clocks agreeing. None for a store on the worker's own host (memory, SQLite),
    and until the first measurement."""
    clock_warning: bool = False
    """Whether the worker judges its clock off from the store server's by more than
    ``WARN_SKEW`` (30 s), beyond what the measurement's round trip can explain, as its log
    says: the verdict :attr:`clock_skew` alone cannot give (a slow round trip makes a
    reading uncertain; a verdict holds until the skew is a tenth below its threshold)."""
    paused: str | None = None
    """Why the worker takes no new work although it runs, e.g. ``"clock: 45.0 s ahead of
    PostgreSQL server db:5432 (± 0.001 s), beyond 300 s (a third of lease_for)"``. It
    still delivers and records what it holds, and resumes by itself once the cause is
    gone; but a worker cut off from a PostgreSQL store that other workers share
    (``"store: not reached for ..."``) gives back what it has not started, which they may
    deliver. None while it leases."""
    stopping: bool = False
    """Whether the running worker was asked to stop and is draining: it leases nothing
    new, lets its deliveries in flight finish (up to its drain timeout) and gives the rest
    back. False while it runs on, and once it stopped (:attr:`running` False)."""
    holder: str | None = None
    """The worker's lease holder: the start of its lease tokens, and its name in
    ``mailstrom workers``. None until the worker is built (a worker process starting)."""
    restarts: int = 0
    """Times the facade started its worker process again after it died (killed by a
    signal, or gone without a word); always 0 for a worker thread, task or ``mailstrom
    worker``."""
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    """Counters and histograms since the worker started."""

    @property
    def dead(self) -> bool:
        """True when the worker stopped because of an error."""
        return not self.running and self.error is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSnapshot:
    """The worker's numbers with the queue's: what ``Mailstrom.metrics()`` returns and what
    ``mailstrom worker --metrics`` exports."""

    worker: WorkerStatus
    queue: QueueStats | None = None
    """Recipients by state and pending ones by domain, read from the store at most every
    few seconds (counting a large queue is not free); None when the store did not answer."""
    queue_read_at: datetime | None = None
    """When ``queue`` was read."""
    workers: int | None = None
    """How many workers run on the store (``mailstrom workers``), read with ``queue``; None
    when the store cannot tell (memory) or did not answer. 0 while mail is queued means
    nobody delivers it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationThrottle:
    """A destination paused after a throttling reply (traffic shaping, docs/guide.md).

    ``destination`` is the shaping rule's pattern (``*.google.com``) or, without a rule,
    the recipient domain; no connection is made to it before ``until``. ``strikes`` counts
    the throttles in a row (the pause doubles with each); ``reply`` is the one that
    started this pause; ``since`` when it came.
    """

    destination: str
    until: datetime
    strikes: int
    reply: str
    since: datetime
